"""PGD and MMA with a per-pixel budget: the box, exactness against textbook loops and torchattacks,
side effects on the model, batch-size independence, autocast, and use of the fused step."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import ulp_distance
from part_fast import ops
from part_fast.attacks import LOSSES, MMA, PGD, PGD_STARTS, margin

EPS, EPS_LOW, ALPHA = 8 / 255, 7 / 255, 2 / 255
B, H = 8, 16


pytestmark = pytest.mark.usefixtures("one_thread")


class SmallNet(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        )
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(64, num_classes))

    def forward(self, x):
        return self.head(self.features(x))


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    model = SmallNet()
    with torch.no_grad():
        model.train()(torch.rand(16, 3, H, H))  # non-default running statistics
    return model.eval()


def data(n=B, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, H, H, generator=gen), torch.randint(0, 10, (n,), generator=gen)


def two_valued_map(n=B, channels=1, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.where(torch.rand(n, channels, H, H, generator=gen) < 0.3, EPS, EPS_LOW).float()


def eps_forms():
    """(id, eps_map argument, the same budget as a full (B, 3, H, W) tensor)."""
    m1 = two_valued_map(channels=1)
    m3 = two_valued_map(channels=3, seed=2)
    return [
        ("none", None, torch.full((B, 3, H, H), EPS)),
        ("float", EPS_LOW, torch.full((B, 3, H, H), EPS_LOW)),
        ("B1HW", m1, m1.expand(B, 3, H, H)),
        ("B3HW", m3, m3),
    ]


def assert_in_budget(x_adv, x, eps_full):
    """x_adv in the projected box: x - eps <= x_adv <= x + eps (as float32 computes the bounds), in [0, 1],
    and |x_adv - x| <= eps + 1 ulp in exact arithmetic."""
    assert x_adv.dtype == torch.float32 and x_adv.shape == x.shape
    assert torch.isfinite(x_adv).all()
    assert (x_adv >= x - eps_full).all() and (x_adv <= x + eps_full).all()
    assert (x_adv >= 0).all() and (x_adv <= 1).all()
    assert ((x_adv.double() - x.double()).abs() <= eps_full.double() + 2.0**-24).all()


# --------------------------------------------------------------------------------------- textbook
def textbook_pgd(model, x, y, eps, alpha, steps, loss_fn, x_start=None):
    """x <- x + alpha * sign(grad loss); clamp to [x_nat - eps, x_nat + eps]; clamp to [0, 1]."""
    model.eval()
    x_adv = (x if x_start is None else x_start).clone()
    for _ in range(steps):
        x_adv.requires_grad_(True)
        (grad,) = torch.autograd.grad(loss_fn(model(x_adv), y), x_adv)
        x_adv = x_adv.detach() + alpha * grad.sign()
        x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0, 1)
    return x_adv


def cw_loss(logits, y):
    onehot = F.one_hot(y, logits.shape[1]).bool()
    return (logits.masked_fill(onehot, float("-inf")).amax(1) - logits[onehot]).sum()


def test_ce_no_start_equals_textbook_loop(net):
    x, y = data()
    out = PGD(net, EPS, ALPHA, steps=10, start=None)(x, y)
    expected = textbook_pgd(net, x, y, EPS, ALPHA, 10, F.cross_entropy)  # batch-mean CE, as usual
    assert torch.equal(out, expected)
    assert not torch.equal(out, x)


@pytest.mark.parametrize("form", ["float", "B1HW", "B3HW"])
def test_ce_with_eps_map_equals_textbook_loop(net, form):
    x, y = data(seed=3)
    _, eps_map, eps_full = next(f for f in eps_forms() if f[0] == form)
    out = PGD(net, EPS, ALPHA, steps=5, start=None)(x, y, eps_map=eps_map)
    expected = textbook_pgd(net, x, y, eps_full, ALPHA, 5, F.cross_entropy)
    assert torch.equal(out, expected)


def test_cw_equals_textbook_loop(net):
    x, y = data(seed=4)
    out = PGD(net, EPS, ALPHA, steps=6, start=None, loss="cw")(x, y)
    expected = textbook_pgd(net, x, y, EPS, ALPHA, 6, cw_loss)
    assert torch.equal(out, expected)
    # A different objective than CE: a different result.
    assert not torch.equal(out, PGD(net, EPS, ALPHA, steps=6, start=None)(x, y))
    # The margin (largest wrong minus true logit) went up.
    with torch.no_grad():
        assert margin(net(out), y).sum() > margin(net(x), y).sum()


def test_kl_needs_no_labels_and_equals_the_trades_loop(net):
    # TRADES' inner maximisation: start x + 0.001 N(0, 1) (projected), ascend KL(p(x_nat) || p(x)) summed.
    x, _ = data(seed=5)
    eps_map = two_valued_map(seed=6)
    out = PGD(net, EPS, ALPHA, steps=5, start="normal", loss="kl")(
        x, eps_map=eps_map, generator=torch.Generator().manual_seed(7)
    )
    with torch.no_grad():
        p_nat = F.softmax(net(x), dim=1)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(7))
    # x + 0.001 n as one torch.add (TRADES writes x + 0.001 * n: the same up to one rounding of 0.001 n).
    noisy = torch.add(x, noise, alpha=0.001)
    torch.testing.assert_close(noisy, x + 0.001 * noise, rtol=0, atol=2.0**-24)
    start = torch.min(torch.max(noisy, x - eps_map), x + eps_map).clamp(0, 1)
    kl = lambda logits, _: F.kl_div(F.log_softmax(logits, dim=1), p_nat, reduction="sum")  # noqa: E731
    expected = textbook_pgd(net, x, None, eps_map, ALPHA, 5, kl, x_start=start)
    assert torch.equal(out, expected)
    assert_in_budget(out, x, eps_map.expand_as(x))
    # KL from the clean prediction grew.
    with torch.no_grad():
        assert kl(net(out), None) > kl(net(start), None)


def test_kl_reuses_given_clean_logits(net):
    """clean_logits (e.g. from the PART budget's CAM forward) replace the attack's own clean forward: the
    same logits give the same result; other logits give another result; a wrong shape is refused."""
    x, _ = data(seed=5)
    atk = PGD(net, EPS, ALPHA, steps=3, start=None, loss="kl")
    with torch.no_grad():
        logits = net(x)
    assert torch.equal(atk(x, clean_logits=logits), atk(x))
    assert not torch.equal(atk(x, clean_logits=logits.flip(0)), atk(x))
    with pytest.raises(ValueError, match="clean_logits"):
        atk(x, clean_logits=logits[:1])


def test_equals_torchattacks_pgd(net):
    torchattacks = pytest.importorskip("torchattacks")
    x, y = data(seed=9)
    out = PGD(net, EPS, ALPHA, steps=10, start=None)(x, y)
    expected = torchattacks.PGD(net, eps=EPS, alpha=ALPHA, steps=10, random_start=False)(x, y)
    # torchattacks projects as x + clamp(x_adv - x, -eps, eps); the fused step clamps x_adv between
    # x - eps and x + eps. Inside the ball x + ((x_adv) - x) may round differently from x_adv by one ulp,
    # so one ulp is allowed; on the boundary both give x +- eps. (On this machine they agree bit for bit.)
    assert int(ulp_distance(out, expected).max()) <= 1
    assert not torch.equal(out, x)


# ---------------------------------------------------------------------------------------- budget
@pytest.mark.parametrize("form", ["none", "float", "B1HW", "B3HW"])
@pytest.mark.parametrize("start", PGD_STARTS)
def test_budget_respected_for_every_start(net, start, form):
    x, y = data(seed=10)
    _, eps_map, eps_full = next(f for f in eps_forms() if f[0] == form)
    # 5 steps of 2/255 reach 8/255 from x itself, so the bound is reached from every start.
    out = PGD(net, EPS, ALPHA, steps=5, start=start)(x, y, eps_map=eps_map, generator=torch.Generator().manual_seed(1))
    assert_in_budget(out, x, eps_full)
    d = (out - x).abs()
    assert (d > 0).any()
    # The per-pixel budget binds: some elements sit exactly on their own bound (x +- eps_map, in [0, 1]).
    on_bound = (out == x + eps_full) | (out == x - eps_full)
    assert on_bound.any()
    if form in ("B1HW", "B3HW"):
        assert (on_bound & (eps_full == EPS_LOW)).any() and (on_bound & (eps_full == EPS)).any()


@pytest.mark.parametrize("start", ["uniform", "normal"])
def test_start_is_projected_before_the_first_gradient(net, start):
    x, y = data(seed=11)
    x[0, 0, 0, 0], x[0, 0, 0, 1] = 0.0, 1.0  # at the edges of [0, 1]
    eps_map = two_valued_map(seed=12)
    out = PGD(net, EPS, ALPHA, steps=0, start=start)(x, y, eps_map=eps_map, generator=torch.Generator().manual_seed(2))
    assert_in_budget(out, x, eps_map.expand_as(x))
    assert (out != x).float().mean() > 0.9


def test_release_start_is_unclipped_until_the_first_step(net):
    # The release: x + U(-eps, eps) with the global eps, no clip before the first gradient.
    x, y = data(seed=13)
    eps_map = torch.full((B, 1, H, H), EPS_LOW)
    gen = torch.Generator().manual_seed(3)
    start = PGD(net, EPS, ALPHA, steps=0, start="release")(x, y, eps_map=eps_map, generator=gen)
    d = (start - x).abs()
    assert (d <= EPS + 1e-7).all()
    assert (d > EPS_LOW + 1e-6).any()  # beyond eps_map
    assert (start < 0).any() or (start > 1).any()  # and outside [0, 1]
    unit = 2 * torch.rand(x.shape, generator=torch.Generator().manual_seed(3)) - 1
    # x + eps U(-1, 1), up to the rounding of eps U (one float32 spacing of values below 2).
    torch.testing.assert_close(start, x + unit * EPS, rtol=0, atol=2.0**-23)
    one_step = PGD(net, EPS, ALPHA, steps=1, start="release")(x, y, eps_map=eps_map,
                                                              generator=torch.Generator().manual_seed(3))
    assert_in_budget(one_step, x, eps_map.expand_as(x))


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("start", PGD_STARTS)
def test_zero_budget_returns_x_exactly(net, start, loss):
    x, y = data(seed=14)
    y_arg = None if loss == "kl" else y
    gen = torch.Generator().manual_seed(4)
    steps = 1 if start == "release" else 3  # the release start is only projected by a step
    assert torch.equal(PGD(net, 0.0, ALPHA, steps, start, loss)(x, y_arg, generator=gen), x)
    for zeros in (torch.zeros(B, 1, H, H), torch.zeros(B, 3, H, H), 0.0):
        out = PGD(net, EPS, ALPHA, steps, start, loss)(x, y_arg, eps_map=zeros, generator=gen)
        assert torch.equal(out, x)


def test_mma_zero_budget_returns_x_exactly(net):
    x, y = data(seed=15)
    assert torch.equal(MMA(net, 0.0, ALPHA, steps=2)(x, y), x)
    assert torch.equal(MMA(net, EPS, ALPHA, steps=2)(x, y, eps_map=torch.zeros(B, 1, H, H)), x)


def test_channels_last_input_gives_the_same_result(net):
    x, y = data(seed=16)
    eps_map = two_valued_map(seed=17)
    expected = PGD(net, EPS, ALPHA, steps=3, start=None)(x, y, eps_map=eps_map)
    out = PGD(net, EPS, ALPHA, steps=3, start=None)(x.contiguous(memory_format=torch.channels_last), y, eps_map=eps_map)
    assert torch.equal(out, expected)


# ----------------------------------------------------------------------------------- side effects
def bn_state(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}


@pytest.mark.parametrize("attack", ["ce", "kl", "cw", "mma"])
@pytest.mark.parametrize("train", [True, False])
def test_model_left_as_it_was(net, attack, train):
    model = copy.deepcopy(net).train(train)
    before = bn_state(model)
    x, y = data(seed=18)
    if attack == "mma":
        out = MMA(model, EPS, ALPHA, steps=2, k=2)(x, y)
    else:
        out = PGD(model, EPS, ALPHA, steps=2, loss=attack)(x, None if attack == "kl" else y)
    assert not out.requires_grad
    assert all(m.training == train for m in model.modules())
    assert all(p.grad is None for p in model.parameters())
    after = bn_state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    # The attack ran in eval mode: in train mode, the same attack on an eval-mode copy gives the same AEs.
    if train and attack == "ce":
        assert torch.equal(PGD(net, EPS, ALPHA, steps=2, start=None)(x, y),
                           PGD(model, EPS, ALPHA, steps=2, start=None)(x, y))


def test_mode_restored_per_module(net):
    model = copy.deepcopy(net).train()
    model.features[1].eval()  # a frozen BatchNorm inside a training model
    x, y = data(seed=19)
    PGD(model, EPS, ALPHA, steps=1)(x, y)
    MMA(model, EPS, ALPHA, steps=1, k=1)(x, y)
    assert not model.features[1].training
    assert all(m.training for n, m in model.named_modules() if n != "features.1")


def test_mode_restored_when_the_model_raises(net):
    class Boom(Exception):
        pass

    class Raising(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = copy.deepcopy(net)
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            if self.calls == 2:
                raise Boom
            return self.inner(x)

    model = Raising().train()
    x, y = data(seed=20)
    with pytest.raises(Boom):
        PGD(model, EPS, ALPHA, steps=3)(x, y)
    assert all(m.training for m in model.modules())
    assert all(p.grad is None for p in model.parameters())


# ---------------------------------------------------------------------------- batch independence
@pytest.mark.parametrize("loss", LOSSES)
def test_batch_size_independent_no_start(net, loss):
    x, y = data(seed=21)
    y_arg = None if loss == "kl" else y
    start = "normal" if loss == "kl" else None
    eps_map = two_valued_map(seed=22)
    attack = PGD(net, EPS, ALPHA, steps=4, start=start, loss=loss)
    gen = torch.Generator().manual_seed(5)
    whole = attack(x, y_arg, eps_map=eps_map, generator=gen)
    gen = torch.Generator().manual_seed(5)
    halves = [attack(x[s], None if y_arg is None else y[s], eps_map=eps_map[s], generator=gen)
              for s in (slice(0, 4), slice(4, 8))]
    assert torch.equal(whole, torch.cat(halves))


def test_batch_size_independent_uniform_start(net):
    # The same generator state gives the same noise per example whether drawn for 8 or for 4 + 4.
    x, y = data(seed=23)
    attack = PGD(net, EPS, ALPHA, steps=4, start="uniform")
    whole = attack(x, y, generator=torch.Generator().manual_seed(6))
    gen = torch.Generator().manual_seed(6)
    halves = torch.cat([attack(x[:4], y[:4], generator=gen), attack(x[4:], y[4:], generator=gen)])
    assert torch.equal(whole, halves)
    single = attack(x[:1], y[:1], generator=torch.Generator().manual_seed(6))
    assert torch.equal(single, whole[:1])


def test_batch_size_independent_mma(net):
    x, y = data(seed=24)
    attack = MMA(net, EPS, ALPHA, steps=3, k=3, start=None)
    assert torch.equal(attack(x, y), torch.cat([attack(x[:4], y[:4]), attack(x[4:], y[4:])]))


# ------------------------------------------------------------------------------------------ autocast
@pytest.mark.parametrize("form", ["none", "B1HW", "B3HW"])
def test_autocast_bfloat16(net, form):
    x, y = data(seed=25)
    _, eps_map, eps_full = next(f for f in eps_forms() if f[0] == form)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert net(x).dtype == torch.bfloat16  # autocast is really on for this model
        out = PGD(net, EPS, ALPHA, steps=3, start="uniform")(x, y, eps_map=eps_map,
                                                             generator=torch.Generator().manual_seed(7))
        mma = MMA(net, EPS, ALPHA, steps=2, k=2)(x, y, eps_map=eps_map)
    for adv in (out, mma):
        assert adv.dtype == torch.float32
        assert_in_budget(adv, x, eps_full)
        assert not torch.equal(adv, x)


# ------------------------------------------------------------------------------------- fused step
def test_uses_the_fused_step(net, monkeypatch):
    calls = {"pgd_step_": 0, "project_": 0}
    real_step, real_project = ops.pgd_step_, ops.project_

    def counting_step(*args, **kwargs):
        calls["pgd_step_"] += 1
        return real_step(*args, **kwargs)

    def counting_project(*args, **kwargs):
        calls["project_"] += 1
        return real_project(*args, **kwargs)

    monkeypatch.setattr(ops, "pgd_step_", counting_step)
    monkeypatch.setattr(ops, "project_", counting_project)
    x, y = data(seed=26)
    expected = PGD(net, EPS, ALPHA, steps=5, start=None)
    PGD(net, EPS, ALPHA, steps=5, start="uniform")(x, y)
    assert calls == {"pgd_step_": 5, "project_": 1}
    MMA(net, EPS, ALPHA, steps=4, k=3, start=None)(x, y)
    assert calls == {"pgd_step_": 5 + 12, "project_": 1}
    # And the step is what moves x: with a no-op step, x stays put.
    monkeypatch.setattr(ops, "pgd_step_", lambda x_adv, *a, **k: x_adv)
    assert torch.equal(expected(x, y), x)


# ---------------------------------------------------------------------------------------------- MMA
def targeted_run(model, x, y, target, eps_full, steps, start_unit=None, confidence=50.0):
    """One textbook targeted margin PGD: ascend -max(z_y - z_t + confidence, 0)."""
    def loss(logits, _):
        true = logits.gather(1, y[:, None]).squeeze(1)
        other = logits.gather(1, target[:, None]).squeeze(1)
        return -torch.clamp(true - other + confidence, min=0).sum()

    start = None
    if start_unit is not None:
        start = torch.min(torch.max(x + start_unit * eps_full, x - eps_full), x + eps_full).clamp(0, 1)
    return textbook_pgd(model, x, y, eps_full, ALPHA, steps, loss, x_start=start)


@pytest.fixture(scope="module")
def linear_net():
    """A linear classifier whose class weight rows have very different scales (0.1 to 10): how far a
    targeted attack can push depends on the target, so different examples are won by different targets
    (with the small CNN above, the most likely wrong class always wins and MMA's choice would be moot)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * H * H, 10))
    with torch.no_grad():
        model[1].weight.mul_(torch.logspace(-1, 1, 10)[torch.randperm(10)][:, None])
    return model.eval()


@pytest.mark.parametrize("start", [None, "uniform"])
def test_mma_keeps_the_largest_margin_of_its_targeted_runs(linear_net, start):
    net = linear_net
    x, y = data(seed=27)
    eps_map = two_valued_map(seed=28)
    eps_full = eps_map.expand_as(x)
    out = MMA(net, EPS, ALPHA, steps=5, k=3, start=start)(x, y, eps_map=eps_map,
                                                          generator=torch.Generator().manual_seed(8))
    assert_in_budget(out, x, eps_full)
    with torch.no_grad():
        clean = net(x)
        m_out = margin(net(out), y)
    targets = clean.scatter(1, y[:, None], float("-inf")).topk(3, dim=1).indices
    gen = torch.Generator().manual_seed(8)
    runs, margins = [], []
    for j in range(3):
        unit = None if start is None else 2 * torch.rand(x.shape, generator=gen) - 1
        run = targeted_run(net, x, y, targets[:, j], eps_full, 5, unit)
        runs.append(run)
        with torch.no_grad():
            margins.append(margin(net(run), y))
    margins = torch.stack(margins)  # (k, B)
    # At least as adversarial as every single targeted run ...
    assert (m_out >= margins.max(0).values - 1e-5).all()
    # ... because it is, per example, exactly the run with the largest margin.
    for i in range(B):
        assert torch.equal(out[i], runs[int(margins[:, i].argmax())][i])
    # Not vacuous: different examples are won by different targets.
    assert len(set(margins.argmax(0).tolist())) >= 2
    assert (m_out > margins[0] + 1e-4).any()


def test_mma_k_larger_than_the_wrong_classes(net):
    # 10 classes: at most 9 wrong targets.
    x, y = data(n=2, seed=29)
    out = MMA(net, EPS, ALPHA, steps=1, k=20, start=None)(x, y)
    assert_in_budget(out, x, torch.full_like(x, EPS))


# ------------------------------------------------------------------------------------------- errors
def test_bad_arguments(net):
    x, y = data(n=2)
    with pytest.raises(ValueError, match="start"):
        PGD(net, start="zeros")
    with pytest.raises(ValueError, match="loss"):
        PGD(net, loss="mse")
    with pytest.raises(ValueError, match="eps"):
        PGD(net, eps=-0.1)
    with pytest.raises(ValueError, match="alpha"):
        PGD(net, alpha=float("nan"))
    with pytest.raises(ValueError, match="steps"):
        PGD(net, steps=-1)
    with pytest.raises(ValueError, match="steps"):
        PGD(net, steps=2.0)
    with pytest.raises(ValueError, match="labels"):
        PGD(net)(x)
    with pytest.raises(ValueError, match="labels"):
        PGD(net, loss="cw")(x)
    with pytest.raises(ValueError, match="4-D"):
        PGD(net)(x[0], y)
    with pytest.raises(ValueError, match="4-D"):
        PGD(net)((x * 255).to(torch.uint8), y)
    with pytest.raises(ValueError, match="y must"):
        PGD(net)(x, y[:1])
    with pytest.raises(ValueError, match="k must"):
        MMA(net, k=0)
    with pytest.raises(ValueError, match="labels"):
        MMA(net)(x, None)


def test_pgd_runs_inside_no_grad_and_refuses_inference_mode():
    """A user's torch.no_grad() must not break the attack; inference_mode gets a clear error."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(4, 3)).eval()
    x, y = torch.rand(2, 3, 8, 8), torch.tensor([0, 1])
    atk = PGD(model, eps=8 / 255, alpha=2 / 255, steps=2, start=None)
    expected = atk(x, y)
    with torch.no_grad():
        got = atk(x, y)
    assert torch.equal(got, expected) and not torch.equal(got, x)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        atk(x, y)


@pytest.mark.parametrize("kwargs, message", [
    (dict(eps=8), "eps must be in [0, 1], got eps=2040/255 (8.0000); inputs are in [0, 1], so a budget above 1 is "
                  "never meant: did you mean 8/255 (0.0314)?"),
    (dict(alpha=2), "alpha must be in [0, 1], got alpha=510/255 (2.0000)"),
    (dict(eps=-1 / 255), "eps must be in [0, 1], got eps=-1/255 (-0.0039)"),
])
def test_budgets_of_an_attack_on_unit_inputs_are_checked(kwargs, message):
    """PGD / MMA on inputs in [0, 1] (the default box) refuse a budget above 1 with the k/255 hint."""
    from part_fast.errors import ConfigError

    model = torch.nn.Linear(3, 2)
    for attack in (PGD, MMA):
        with pytest.raises(ConfigError) as info:
            attack(model, **kwargs)
        assert str(info.value).startswith(message), str(info.value)
    assert PGD(model, eps=3.0, lo=-5.0, hi=5.0).eps == 3.0  # another box: its own scale
