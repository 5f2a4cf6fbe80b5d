"""Outer losses (part_fast.losses) against independent re-computations.

Two oracles per loss:
- a float64 oracle written from the formula with explicit per-example, per-class loops (0-dim tensor
  ops, so autograd gives the oracle's gradient too);
- the release's expression (KLDivLoss on a softmax target, nll_loss on log(1.0001 - p + 1e-12), argsort
  for MART's y') re-written here with torch.nn.functional in float32, which the result must match tightly.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from part_fast.losses import OUTER_LOSSES, at_loss, mart_loss, trades_loss

C = 10


def F32(v: float) -> float:
    """v rounded to float32, as a float32 tensor op with a Python scalar uses it."""
    return float(torch.tensor(v, dtype=torch.float32))


# ----------------------------------------------------------------------------------------------- oracles
def _row_log_softmax(row):
    """log softmax of one row by explicit loops (float64 0-dim tensors)."""
    m = row[0]
    for c in range(1, row.shape[0]):
        m = torch.maximum(m, row[c])
    s = 0.0
    for c in range(row.shape[0]):
        s = s + torch.exp(row[c] - m)
    lse = m + torch.log(s)
    return [row[c] - lse for c in range(row.shape[0])]


def oracle_at(za, y):
    B = za.shape[0]
    total = 0.0
    for i in range(B):
        total = total - _row_log_softmax(za[i])[int(y[i])]
    return total / B


def oracle_smoothed_ce(z, y, eps):
    """Cross-entropy against the target (1 - eps) one-hot(y) + eps / C, batch mean, by explicit loops."""
    B, K = z.shape
    total = 0.0
    for i in range(B):
        log_p = _row_log_softmax(z[i])
        for c in range(K):
            target = (1 - eps) * (c == int(y[i])) + eps / K
            total = total - target * log_p[c]
    return total / B


def oracle_trades(zn, za, y, beta):
    B, K = zn.shape
    ce, kl = 0.0, 0.0
    for i in range(B):
        ln, la = _row_log_softmax(zn[i]), _row_log_softmax(za[i])
        ce = ce - ln[int(y[i])]
        for c in range(K):
            p = torch.exp(ln[c])
            kl = kl + p * (ln[c] - la[c])  # p_nat * log(p_nat / p_adv): KL(p_nat || p_adv)
    return ce / B + beta * kl / B


def oracle_mart(zn, za, y, beta, one=1.0001, weight_one=1.0000001):
    """one, weight_one: the release's constants; a float32 run uses them rounded to float32, which matters
    where p ~ 1 (1.0001 - p ~ 1e-4, 1.0000001 - p ~ 1e-7)."""
    B, K = zn.shape
    ce, boost, robust = 0.0, 0.0, 0.0
    for i in range(B):
        yi = int(y[i])
        ln, la = _row_log_softmax(zn[i]), _row_log_softmax(za[i])
        pa = [torch.exp(v) for v in la]
        pn = [torch.exp(v) for v in ln]
        ce = ce - la[yi]
        best = max((c for c in range(K) if c != yi), key=lambda c: float(pa[c].detach()))
        boost = boost - torch.log(one - pa[best] + 1e-12)
        kl = 0.0
        for c in range(K):
            kl = kl + pn[c] * (ln[c] - torch.log(pa[c] + 1e-12))
        robust = robust + kl * (weight_one - pn[yi])
    return ce / B + boost / B + beta * robust / B


ORACLES = {"at": oracle_at, "trades": oracle_trades, "mart": oracle_mart}


def release_expression(name, zn, za, y, beta):
    """The release's outer-loss expressions, in the dtype given (float32 here)."""
    B = zn.shape[0]
    if name == "at":
        return F.cross_entropy(za, y)
    if name == "trades":
        return F.cross_entropy(zn, y) + beta * F.kl_div(
            F.log_softmax(za, dim=1), F.softmax(zn, dim=1), reduction="sum") / B
    p_adv = F.softmax(za, dim=1)
    top2 = torch.argsort(p_adv, dim=1)[:, -2:]
    new_y = torch.where(top2[:, -1] == y, top2[:, -2], top2[:, -1])
    loss_adv = F.cross_entropy(za, y) + F.nll_loss(torch.log(1.0001 - p_adv + 1e-12), new_y)
    p_nat = F.softmax(zn, dim=1)
    true_p = p_nat.gather(1, y[:, None]).squeeze()
    kl = F.kl_div(torch.log(p_adv + 1e-12), p_nat, reduction="none").sum(1)
    return loss_adv + float(beta) * (kl * (1.0000001 - true_p)).sum() / B


def call(name, zn, za, y, beta):
    return at_loss(za, y) if name == "at" else OUTER_LOSSES[name](zn, za, y, beta)


def call_oracle(name, zn, za, y, beta):
    return oracle_at(za, y) if name == "at" else ORACLES[name](zn, za, y, beta)


# ----------------------------------------------------------------------------------------------- inputs
def make_inputs(gen, B, kind, dtype=torch.float64):
    """kind: "random" (logits ~ 3·N(0,1)), "peaked" (p_y ~ 1 on both nat and adv: the true logit 30 above
    the rest), "adv_wrong" (p_nat[y] ~ 1 while the adversarial logits put ~all mass on another class)."""
    y = torch.randint(0, C, (B,), generator=gen)
    zn = 3 * torch.randn(B, C, generator=gen, dtype=torch.float64)
    za = zn + torch.randn(B, C, generator=gen, dtype=torch.float64)
    if kind in ("peaked", "adv_wrong"):
        zn[torch.arange(B), y] += 30.0
    if kind == "peaked":
        za[torch.arange(B), y] += 30.0
    if kind == "adv_wrong":
        za[torch.arange(B), (y + 1) % C] += 25.0
    return zn.to(dtype), za.to(dtype), y


NAMES = ["at", "trades", "mart"]
KINDS = ["random", "peaked", "adv_wrong"]


# ------------------------------------------------------------------------------------------------ values
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("B", [1, 7])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("beta", [0.0, 1.0, 6.0])
def test_value_matches_float64_oracle(name, B, kind, beta, gen):
    zn, za, y = make_inputs(gen, B, kind)
    expected = call_oracle(name, zn, za, y, beta)
    got64 = call(name, zn, za, y, beta)
    assert got64.dtype == torch.float64 and got64.dim() == 0
    torch.testing.assert_close(got64, expected, rtol=1e-10, atol=1e-12)
    got32 = call(name, zn.float(), za.float(), y, beta)
    assert got32.dtype == torch.float32 and got32.dim() == 0
    atol = 2e-6
    if name == "mart":
        # the release's constants as a float32 computation sees them, and the conditioning of its
        # log(1.0001 - p_adv[y'] + 1e-12): p ~ 1 is known to a few float32 ulps (6e-8 each below 1), while
        # d/dp = 1 / (1.0001 - p) reaches 1e4; the float32 release expression has the same error (see
        # test_value_matches_release_expression_in_float32, which is tight)
        expected = oracle_mart(zn, za, y, beta, one=F32(1.0001), weight_one=F32(1.0000001))
        p_adv = F.softmax(za, dim=1)
        p_wrong = p_adv.scatter(1, y[:, None], -1.0).amax(1)
        atol += float((2 * 2**-24 / (1.0001 - p_wrong)).mean())
    torch.testing.assert_close(got32.double(), expected, rtol=2e-6, atol=atol)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("B", [1, 16])
@pytest.mark.parametrize("kind", KINDS)
def test_value_matches_release_expression_in_float32(name, B, kind, gen):
    zn, za, y = make_inputs(gen, B, kind, torch.float32)
    got = call(name, zn, za, y, 6.0)
    expected = release_expression(name, zn, za, y, 6.0)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_oracle_is_not_trivially_equal_to_ce(gen):
    """Guard for the oracles: with beta > 0 and different logits, TRADES and MART differ from their CE."""
    zn, za, y = make_inputs(gen, 5, "random")
    assert float(oracle_trades(zn, za, y, 6.0)) > float(F.cross_entropy(zn, y)) + 1e-3
    assert float(oracle_mart(zn, za, y, 6.0)) > float(F.cross_entropy(za, y)) + 1e-3


@pytest.mark.parametrize("name", ["trades", "mart"])
def test_reduction_is_a_batch_mean(name, gen):
    """Every term is a per-example mean: the loss of a batch is the size-weighted mean of its parts', so
    it does not depend on how the data is split into batches."""
    zn, za, y = make_inputs(gen, 12, "random")
    whole = call(name, zn, za, y, 6.0)
    a, b = call(name, zn[:5], za[:5], y[:5], 6.0), call(name, zn[5:], za[5:], y[5:], 6.0)
    torch.testing.assert_close(whole, (5 * a + 7 * b) / 12, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------- special cases
@pytest.mark.parametrize("B", [1, 9])
@pytest.mark.parametrize("kind", KINDS)
def test_trades_with_equal_logits_is_plain_ce(B, kind, gen):
    zn, _, y = make_inputs(gen, B, kind, torch.float32)
    got = trades_loss(zn, zn.clone(), y, 6.0)
    assert torch.equal(got, F.cross_entropy(zn, y))


@pytest.mark.parametrize("kind", KINDS)
def test_beta_zero_reduces_to_the_ce_terms(kind, gen):
    zn, za, y = make_inputs(gen, 6, kind)
    torch.testing.assert_close(trades_loss(zn, za, y, 0.0), F.cross_entropy(zn, y), rtol=1e-12, atol=0)
    # MART without its KL term: CE on x_adv plus the boosted term, whatever the natural logits are
    p_adv = F.softmax(za, dim=1)
    wrong = p_adv.scatter(1, y[:, None], -1.0).argmax(1)
    boosted = -torch.log(1.0001 - p_adv[torch.arange(6), wrong] + 1e-12).mean()
    expected = F.cross_entropy(za, y) + boosted
    torch.testing.assert_close(mart_loss(zn, za, y, 0.0), expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(mart_loss(torch.zeros_like(zn), za, y, 0), expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("eps", [0.1, 0.3])
def test_label_smoothing_smooths_the_cross_entropy_terms_only(eps, gen):
    """AT: the whole loss is the smoothed CE; TRADES: its natural CE is, its KL term (no label) is not."""
    zn, za = torch.randn(5, C, generator=gen, dtype=torch.float64), torch.randn(5, C, generator=gen, dtype=torch.float64)
    y = torch.randint(0, C, (5,), generator=gen)
    assert float(at_loss(za, y, label_smoothing=eps)) == pytest.approx(float(oracle_smoothed_ce(za, y, eps)), rel=1e-12)
    smoothed, hard = trades_loss(zn, za, y, 6.0, label_smoothing=eps), trades_loss(zn, za, y, 6.0)
    assert float(smoothed - hard) == pytest.approx(float(oracle_smoothed_ce(zn, y, eps) - oracle_at(zn, y)), rel=1e-9)
    assert float(smoothed) != pytest.approx(float(hard), rel=1e-6)  # a real difference at these eps
    for bad in (1.0, -0.1, True, "0.1"):
        with pytest.raises(ValueError, match="label_smoothing must be a number in \\[0, 1\\)"):
            at_loss(za, y, label_smoothing=bad)


def test_mart_tie_for_best_wrong_class_does_not_change_the_value():
    za = torch.tensor([[2.0, 5.0, 5.0, 0.0], [5.0, 5.0, 1.0, 1.0]])
    zn = torch.zeros(2, 4)
    y = torch.tensor([0, 0])  # row 0: classes 1 and 2 tie; row 1: y ties with class 1
    torch.testing.assert_close(mart_loss(zn, za, y, 6.0), release_expression("mart", zn, za, y, 6.0))
    torch.testing.assert_close(mart_loss(zn.double(), za.double(), y, 6.0),
                               oracle_mart(zn.double(), za.double(), y, 6.0))


def test_int32_labels_accepted(gen):
    zn, za, y = make_inputs(gen, 4, "random", torch.float32)
    for name in NAMES:
        assert torch.equal(call(name, zn, za, y.int(), 6.0), call(name, zn, za, y, 6.0))


# --------------------------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("B", [1, 5])
def test_gradients_match_oracle(name, kind, B, gen):
    """The release detaches nothing (p_nat carries gradient in the KL and in MART's weight): the gradient
    with respect to both logits must equal the oracle's, which detaches nothing either."""
    zn, za, y = make_inputs(gen, B, kind)
    zn1, za1 = zn.clone().requires_grad_(), za.clone().requires_grad_()
    zn2, za2 = zn.clone().requires_grad_(), za.clone().requires_grad_()
    call(name, zn1, za1, y, 6.0).backward()
    call_oracle(name, zn2, za2, y, 6.0).backward()
    torch.testing.assert_close(za1.grad, za2.grad, rtol=1e-9, atol=1e-12)
    if name == "at":
        assert zn1.grad is None  # at_loss never sees the natural logits
    else:
        torch.testing.assert_close(zn1.grad, zn2.grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", ["trades", "mart"])
def test_gradient_flows_to_both_logits_and_through_the_kl_target(name, gen):
    zn, za, y = make_inputs(gen, 6, "random")
    grads = {}
    for beta in (0.0, 6.0):
        n, a = zn.clone().requires_grad_(), za.clone().requires_grad_()
        OUTER_LOSSES[name](n, a, y, beta).backward()
        grads[beta] = (n.grad, a.grad)
    n0, a0 = grads[0.0]
    n6, a6 = grads[6.0]
    assert torch.isfinite(n6).all() and torch.isfinite(a6).all()
    assert n6.abs().sum() > 1e-3 and a6.abs().sum() > 1e-3
    if name == "trades":
        assert torch.equal(a0, torch.zeros_like(a0))  # beta = 0: CE(nat) only
        assert (n6 - n0).abs().sum() > 1e-3  # the KL target p_nat is not detached
    else:
        assert torch.equal(n0, torch.zeros_like(n0))  # beta = 0: only x_adv terms
        assert a0.abs().sum() > 1e-3


@pytest.mark.parametrize("name", ["trades", "mart"])
def test_underflowing_softmax_gives_finite_values_and_gradients(name):
    """Natural logits 400 apart: softmax(nat) has exact zeros in float32. The release's KLDivLoss on that
    target has NaN gradients; these losses keep the release's value and have finite gradients."""
    zn = torch.tensor([[0.0, 400.0, -400.0, 1.0], [-300.0, 0.0, 300.0, 2.0]], requires_grad=True)
    za = torch.tensor([[1.0, 2.0, 3.0, 0.0], [0.0, 90.0, -90.0, 1.0]], requires_grad=True)
    y = torch.tensor([1, 2])
    loss = OUTER_LOSSES[name](zn, za, y, 6.0)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(zn.grad).all() and torch.isfinite(za.grad).all()
    with torch.no_grad():
        torch.testing.assert_close(loss, release_expression(name, zn, za, y, 6.0), rtol=1e-6, atol=1e-6)
    zn2, za2 = zn.detach().double().requires_grad_(), za.detach().double().requires_grad_()
    ORACLES[name](zn2, za2, y, 6.0).backward()
    torch.testing.assert_close(za.grad.double(), za2.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(zn.grad.double(), zn2.grad, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------- half inputs
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", KINDS)
def test_half_logits_give_float32_result(name, dtype, kind, gen):
    zn, za, y = make_inputs(gen, 8, kind, torch.float32)
    hn, ha = zn.to(dtype), za.to(dtype)
    got = call(name, hn, ha, y, 6.0)
    assert got.dtype == torch.float32
    # computed in float32: exactly the float32 loss of the (exactly representable) upcast logits
    assert torch.equal(got, call(name, hn.float(), ha.float(), y, 6.0))
    # and close to the full-precision logits' loss (only the logits' rounding differs)
    tol = 0.05 if dtype == torch.bfloat16 else 0.01
    torch.testing.assert_close(got, call(name, zn, za, y, 6.0), rtol=tol, atol=tol)


@pytest.mark.parametrize("name", NAMES)
def test_under_autocast_the_loss_stays_float32(name, gen):
    zn, za, y = make_inputs(gen, 8, "random", torch.float32)
    hn, ha = zn.bfloat16(), za.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = call(name, hn, ha, y, 6.0)
        got_fp32_in = call(name, zn, za, y, 6.0)
    assert got.dtype == torch.float32 and got_fp32_in.dtype == torch.float32
    assert torch.equal(got, call(name, hn.float(), ha.float(), y, 6.0))
    assert torch.equal(got_fp32_in, call(name, zn, za, y, 6.0))


# ------------------------------------------------------------------------------------------- bad input
def _good(gen):
    zn, za, y = make_inputs(gen, 4, "random", torch.float32)
    return zn, za, y


@pytest.mark.parametrize("name", ["trades", "mart"])
def test_shape_mismatch_names_the_argument(name, gen):
    zn, za, y = _good(gen)
    f = OUTER_LOSSES[name]
    with pytest.raises(ValueError, match="logits_adv"):
        f(zn, za[:3], y, 6.0)
    with pytest.raises(ValueError, match="logits_adv"):
        f(zn, torch.randn(4, C + 1), y, 6.0)
    with pytest.raises(ValueError, match="logits_nat"):
        f(zn[0], za, y, 6.0)
    with pytest.raises(ValueError, match="logits_nat"):
        f(zn[:, :1], za[:, :1], y, 6.0)  # one class
    with pytest.raises(ValueError, match="logits_nat"):
        f(zn[:0], za[:0], y[:0], 6.0)  # empty batch
    with pytest.raises(ValueError, match="y"):
        f(zn, za, y[:3], 6.0)
    with pytest.raises(ValueError, match="y"):
        f(zn, za, y[:, None], 6.0)
    with pytest.raises(TypeError, match="y"):
        f(zn, za, y.float(), 6.0)
    with pytest.raises(TypeError, match="logits_adv"):
        f(zn, za.long(), y, 6.0)


def test_at_bad_shapes_name_the_argument(gen):
    zn, za, y = _good(gen)
    with pytest.raises(ValueError, match="logits_adv"):
        at_loss(za[0], y)
    with pytest.raises(ValueError, match="y"):
        at_loss(za, y[:2])
    with pytest.raises(TypeError, match="logits_adv"):
        at_loss(y, y)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("bad", [-1, C, 10**6])
def test_label_out_of_range_names_y(name, bad, gen):
    zn, za, y = _good(gen)
    y = y.clone()
    y[2] = bad
    with pytest.raises(ValueError, match=r"y must hold class indices in \[0, 9\], got " + str(bad)):
        call(name, zn, za, y, 6.0)


@pytest.mark.parametrize("name", ["trades", "mart"])
@pytest.mark.parametrize("beta", [-0.5, -1e-9, float("nan"), float("inf")])
def test_bad_beta_names_beta(name, beta, gen):
    zn, za, y = _good(gen)
    with pytest.raises(ValueError, match="beta"):
        OUTER_LOSSES[name](zn, za, y, beta)


@pytest.mark.parametrize("name", ["trades", "mart"])
def test_beta_must_be_a_number(name, gen):
    zn, za, y = _good(gen)
    with pytest.raises(TypeError, match="beta"):
        OUTER_LOSSES[name](zn, za, y, "6")
    with pytest.raises(TypeError, match="beta"):
        OUTER_LOSSES[name](zn, za, y, True)
    assert math.isfinite(float(OUTER_LOSSES[name](zn, za, y, 6)))  # an int is fine


# -------------------------------------------------------------------------------------------- registry
def test_registry():
    assert OUTER_LOSSES == {"at": at_loss, "trades": trades_loss, "mart": mart_loss}
