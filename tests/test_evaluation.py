"""evaluate(): accuracies under natural / PGD-20 / MMA / AutoAttack, errors, the AutoAttack import path
and its zero_gradients shim.

The attacked model is template_net.TemplateNet on 16x16 images: an example is robust exactly when its
amplitude a > eps. With a = 3 eps for half the examples and a = 0.3 eps for the other half, the robust
accuracy of every sound attack that finds the (easy) worst case is exactly 50%."""
import sys
import types

import pytest
import torch

from part_fast.evaluation import ATTACKS, MissingExtraError, _install_zero_gradients_shim, evaluate, load_autoattack
from template_net import TemplateNet, templates

EPS, ALPHA = 8 / 255, 2 / 255


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def setup():
    """(model, loader): 8 examples in batches of 3, 3, 2; robust exactly at odd indices (a = 3 eps)."""
    t = templates()
    model = TemplateNet(t, record=True).eval()
    y = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7]) % 10
    a = torch.tensor([0.3, 3.0] * 4) * EPS
    x = 0.5 + a.view(-1, 1, 1, 1) * t[y]
    loader = [(x[0:3], y[0:3]), (x[3:6], y[3:6]), (x[6:8], y[6:8])]
    return model, loader


def direct_accuracy(model, loader):
    with torch.no_grad():
        correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in loader)
    return 100.0 * correct / sum(len(y) for _, y in loader)


def test_natural_accuracy_equals_a_direct_computation(setup):
    model, loader = setup
    # Mislabel 3 of the 8 examples: 62.5 %.
    labels = [torch.tensor([0, 9, 2]), torch.tensor([3, 4, 0]), torch.tensor([1, 7])]
    loader = [(x, y) for (x, _), y in zip(loader, labels)]
    result = evaluate(model, loader, attacks=("natural",), progress=False)
    assert result["natural"] == direct_accuracy(model, loader) == 62.5
    assert result["examples"] == 8
    assert set(result["seconds"]) == {"natural"} and result["seconds"]["natural"] > 0


def test_robust_accuracies(setup):
    model, loader = setup
    model.train()
    rng = torch.random.get_rng_state()
    result = evaluate(model, loader, attacks=("natural", "pgd20", "mma"), eps=EPS, alpha=ALPHA, progress=False)
    assert result["natural"] == 100.0
    assert result["pgd20"] == 50.0 and result["mma"] == 50.0
    assert result["pgd20"] <= result["natural"] and result["mma"] <= result["natural"]
    assert set(result["seconds"]) == {"natural", "pgd20", "mma"}
    assert all(isinstance(s, float) and s > 0 for s in result["seconds"].values()), "each attack was timed"
    # The model's mode, the global RNG and the parameters are left alone.
    assert model.training
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert all(p.grad is None for p in model.parameters())
    # A larger budget breaks the robust half too; a zero budget breaks nothing.
    assert evaluate(model, loader, attacks=("pgd20",), eps=4 * EPS, alpha=ALPHA, progress=False)["pgd20"] == 0.0
    zero = evaluate(model, loader, attacks=("pgd20", "mma"), eps=0.0, alpha=ALPHA, progress=False)
    assert (zero["pgd20"], zero["mma"], zero["examples"]) == (100.0, 100.0, 8)


def test_random_start_follows_the_seed_not_the_global_rng(setup):
    model, loader = setup
    # Tiny steps: the AEs keep most of their random start.
    kwargs = dict(attacks=("pgd20",), eps=EPS, alpha=EPS / 100, progress=False)

    def adversarial_examples(global_seed, seed):
        torch.manual_seed(global_seed)
        model.scored.clear()
        evaluate(model, loader, seed=seed, **kwargs)
        return torch.cat(model.scored)

    first = adversarial_examples(1, seed=3)
    assert first.shape == (8, 3, 16, 16)
    assert torch.equal(adversarial_examples(2, seed=3), first)
    assert not torch.equal(adversarial_examples(1, seed=4), first)


def test_unknown_attack(setup):
    model, loader = setup
    for attacks in (("natural", "pgd10"), ("AA",), ("fgsm",)):
        with pytest.raises(ValueError, match="unknown attack") as info:
            evaluate(model, loader, attacks=attacks, progress=False)
        assert all(name in str(info.value) for name in ATTACKS)
    assert model.calls == 0  # rejected before any example ran


def test_empty_loader(setup):
    model, _ = setup
    with pytest.raises(ValueError, match="no examples"):
        evaluate(model, [], attacks=("natural",), progress=False)


# --------------------------------------------------------------------------------------- AutoAttack
@pytest.fixture
def no_autoattack(monkeypatch):
    """Neither the original `autoattack` nor `pyautoattack` importable (a None entry in sys.modules makes
    `import` raise ImportError)."""
    monkeypatch.setitem(sys.modules, "autoattack", None)
    monkeypatch.setitem(sys.modules, "pyautoattack", None)


def test_aa_without_the_extra(setup, no_autoattack):
    model, loader = setup
    with pytest.raises(MissingExtraError, match=r"part_fast\[eval\]") as info:
        evaluate(model, loader, attacks=("natural", "aa"), progress=False)
    assert isinstance(info.value, ImportError)
    assert model.calls == 0  # reported before any example ran
    with pytest.raises(MissingExtraError, match=r"part_fast\[eval\]"):
        load_autoattack()


def test_aa_release_without_torchattacks(setup, monkeypatch):
    model, loader = setup
    monkeypatch.setitem(sys.modules, "torchattacks", None)
    with pytest.raises(MissingExtraError, match="torchattacks") as info:
        evaluate(model, loader, attacks=("aa-release",), progress=False)
    assert "--no-deps" in str(info.value)


def test_aa_wiring_to_the_original_api(setup, monkeypatch):
    """The original AutoAttack API (GitHub `autoattack`: run_standard_evaluation(x, y, bs=...) returning
    x_adv) is preferred over pyautoattack, constructed as the standard version with the given eps."""
    model, loader = setup
    created = []

    class FakeAutoAttack:
        def __init__(self, model, norm="Linf", eps=0.3, version="standard", device="cuda", seed=None, **kwargs):
            created.append(dict(model=model, norm=norm, eps=eps, version=version, device=device, seed=seed, **kwargs))
            self.verbose = True
            self.model = model

        def run_standard_evaluation(self, x, y, bs=250):
            created[-1].setdefault("bs", []).append(bs)
            x_adv = x.clone()
            x_adv[::2] = 1 - x_adv[::2]  # the negated template: misclassified
            return x_adv

    monkeypatch.setitem(sys.modules, "autoattack", types.SimpleNamespace(AutoAttack=FakeAutoAttack))
    result = evaluate(model, loader, attacks=("natural", "aa"), eps=EPS, seed=5, progress=False)
    assert len(created) == 1
    call = created[0]
    assert call["model"] is model and call["norm"] == "Linf" and call["eps"] == EPS
    assert call["version"] == "standard" and call["seed"] == 5 and call["device"] == "cpu"
    assert call["bs"] == [3, 3, 2]
    # Batches of 3, 3, 2: the fake breaks local examples 0 and 2 of each, i.e. 5 of 8.
    assert result["natural"] == 100.0 and result["aa"] == 37.5


def test_aa_with_pyautoattack(setup):
    """The real thing: pyautoattack's standard AutoAttack (APGD-CE, APGD-T, FAB-T, Square; 100 iterations)
    on the template CNN, one example per batch. APGD-CE breaks the weak one; the robust one (3 eps from the
    boundary by construction) survives all four attacks, each run in full, which is most of this test's time."""
    pytest.importorskip("pyautoattack")
    model, loader = setup
    loader = [(loader[0][0][1:2], loader[0][1][1:2]), (loader[0][0][:1], loader[0][1][:1])]  # a robust, a weak one
    result = evaluate(model, loader, attacks=("natural", "pgd20", "aa"), eps=EPS, alpha=ALPHA, progress=False)
    assert result["natural"] == 100.0
    assert result["aa"] == 50.0 and result["pgd20"] == 50.0
    assert result["aa"] <= result["natural"]
    assert result["seconds"]["aa"] > 0
    assert [c["passed"] for c in result["autoattack_checks"]] == [True] * 4


# ------------------------------------------------------------------------------ zero_gradients shim
@pytest.fixture
def gradcheck_module(monkeypatch):
    """torch.autograd.gradcheck the *module* (the package attribute of that name is the function), with
    any zero_gradients removed for the test (and put back afterwards)."""
    import importlib

    importlib.import_module("torch.autograd.gradcheck")
    module = sys.modules["torch.autograd.gradcheck"]
    monkeypatch.delattr(module, "zero_gradients", raising=False)
    return module


def test_shim_makes_the_old_import_work(gradcheck_module):
    with pytest.raises(ImportError):
        from torch.autograd.gradcheck import zero_gradients  # noqa: F401
    _install_zero_gradients_shim()
    from torch.autograd.gradcheck import zero_gradients

    assert gradcheck_module.zero_gradients is zero_gradients
    # torch's own names are untouched: torch.autograd.gradcheck is still the function.
    assert callable(torch.autograd.gradcheck) and not isinstance(torch.autograd.gradcheck, types.ModuleType)
    # A second install keeps the first function.
    _install_zero_gradients_shim()
    assert gradcheck_module.zero_gradients is zero_gradients


def test_shim_zeroes_gradients_in_place(gradcheck_module):
    _install_zero_gradients_shim()
    zero_gradients = gradcheck_module.zero_gradients
    leaves = [torch.randn(3, requires_grad=True) for _ in range(4)]
    for t in leaves:
        (t * torch.arange(1.0, 4.0)).sum().backward()
    grads = [t.grad for t in leaves]
    assert all(bool((g != 0).all()) for g in grads)
    no_grad = torch.zeros(2, requires_grad=True)
    zero_gradients(leaves[0])
    assert leaves[0].grad is grads[0] and torch.equal(grads[0], torch.zeros(3))  # in place, same tensor
    assert bool((leaves[1].grad != 0).all())
    zero_gradients([leaves[1], (leaves[2], [leaves[3], no_grad])])  # recurses into sequences
    for t, g in zip(leaves, grads):
        assert t.grad is g and torch.equal(g, torch.zeros(3))
    assert no_grad.grad is None


def test_load_autoattack_installs_the_shim_before_importing(gradcheck_module, tmp_path, monkeypatch):
    """The original AutoAttack (GitHub) does `from torch.autograd.gradcheck import zero_gradients` at import
    time: load_autoattack must succeed with it on current torch."""
    package = tmp_path / "autoattack"
    package.mkdir()
    (package / "__init__.py").write_text(
        "from torch.autograd.gradcheck import zero_gradients\n"
        "class AutoAttack:\n"
        "    zero = staticmethod(zero_gradients)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    saved = sys.modules.pop("autoattack", None)
    try:
        cls = load_autoattack()
        assert cls.__module__ == "autoattack" and cls.zero is gradcheck_module.zero_gradients
    finally:
        sys.modules.pop("autoattack", None)
        if saved is not None:
            sys.modules["autoattack"] = saved


def test_aa_release_with_torchattacks(setup):
    """torchattacks' AutoAttack (what the release reported), under its own label, never as "aa"."""
    pytest.importorskip("torchattacks")
    model, loader = setup
    loader = [(loader[0][0][1:2], loader[0][1][1:2]), (loader[0][0][:1], loader[0][1][:1])]  # a robust, a weak one
    result = evaluate(model, loader, attacks=("natural", "aa-release"), eps=EPS, progress=False)
    assert "aa" not in result and set(result["seconds"]) == {"natural", "aa-release"}
    assert result["natural"] == 100.0 and result["aa-release"] == 50.0
