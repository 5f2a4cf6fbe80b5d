"""`part-fast eval --protocol robustbench`: the test set, the numbers and the model_info record agree exactly
with RobustBench's own benchmark() (where robustbench is installed), and with what the model's construction
says they must be (everywhere).

The model is template_net.TemplateNet on 32x32 CIFAR-format files: an example is correct exactly when its
amplitude a > 0 and robust exactly when a > eps, so both accuracies are known before any attack runs."""
from __future__ import annotations

import functools
import importlib
import json
import re
import sys
import types

import pytest
import torch

from cifar_files import stored, trust_cifar_files, write_cifar
from part_fast import cli
from part_fast import robustbench_protocol as rbp
from part_fast.errors import ConfigError
from template_net import TemplateNet, examples, templates

EPS = 8 / 255
N_FILE, N_EXAMPLES, BATCH = 100, 15, 6  # batches of 6, 6, 3
# Per group of five: correct 4 of 5 (a > 0), robust 2 of 5 (a > eps); margins far from the uint8 rounding.
PATTERN = torch.tensor([3.0, 0.3, -1.0, 2.0, 0.5]) * EPS
CLEAN, ROBUST = 12 / 15, 6 / 15


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def cifar(tmp_path, monkeypatch):
    """(data_dir, model): 100 test images, the first 15 following PATTERN and the other 85 correct but not
    robust (a = 0.3 eps), so a wrong count or order changes both numbers."""
    t = templates(size=32)
    y = torch.arange(N_FILE) * 7 % 10
    a = torch.cat([PATTERN.repeat(N_EXAMPLES // 5), torch.full((N_FILE - N_EXAMPLES,), 0.3 * EPS)])
    write_cifar(tmp_path / "data", examples(t, y, a), y)
    trust_cifar_files(monkeypatch)
    return tmp_path / "data", TemplateNet(t, scale=1 / 64).eval()


def test_load_test_set_is_the_files_first_n_in_order(cifar):
    data_dir, _ = cifar
    x, y = rbp.load_test_set("cifar10", data_dir, N_EXAMPLES)
    t = templates(size=32)
    labels = torch.arange(N_FILE) * 7 % 10
    expected = stored(examples(t, labels, torch.cat([PATTERN.repeat(N_EXAMPLES // 5),
                                                     torch.full((N_FILE - N_EXAMPLES,), 0.3 * EPS)])))
    assert x.dtype == torch.float32 and x.shape == (N_EXAMPLES, 3, 32, 32) and x.is_contiguous()
    assert torch.equal(x, expected[:N_EXAMPLES]) and torch.equal(y, labels[:N_EXAMPLES])


def test_load_test_set_errors_name_the_problem(cifar, tmp_path):
    data_dir, _ = cifar
    with pytest.raises(FileNotFoundError, match="cifar-100-python.*ImageFolder copy cannot stand in"):
        rbp.load_test_set("cifar100", data_dir, 10)
    with pytest.raises(ConfigError, match="has 100 images"):
        rbp.load_test_set("cifar10", data_dir, N_FILE + 1)
    with pytest.raises(ConfigError, match="covers cifar10, cifar100"):
        rbp.load_test_set("svhn", data_dir, 10)
    with pytest.raises(ConfigError, match="positive int"):
        rbp.load_test_set("cifar10", data_dir, 0)
    with pytest.raises(ConfigError, match="--data-dir"):
        rbp.load_test_set("cifar10", None, 10)


def test_cifar100_is_read_from_its_own_files(tmp_path, monkeypatch):
    x = torch.rand(12, 3, 32, 32)
    y = torch.arange(12) * 9 % 100
    write_cifar(tmp_path, x, y, "cifar100")
    trust_cifar_files(monkeypatch)
    got_x, got_y = rbp.load_test_set("cifar100", tmp_path, 12)
    assert torch.equal(got_x, stored(x)) and torch.equal(got_y, y)


@pytest.mark.slow
def test_the_protocol_finds_the_known_accuracies(cifar):
    data_dir, model = cifar
    x, y = rbp.load_test_set("cifar10", data_dir, N_EXAMPLES)
    seen = []
    result = rbp.evaluate_robustbench(model, x, y, eps=EPS, batch_size=BATCH, seed=0, verbose=False,
                                      on_audit=seen.append)
    assert (result.clean_acc, result.autoattack_acc) == (CLEAN, ROBUST)
    assert (result.clean_correct, result.autoattack_correct, result.n_examples) == (12, 6, 15)
    assert seen == [result.checks] and result.checks_passed
    assert result.autoattack.split()[0] in ("autoattack", "pyautoattack")
    info = rbp.model_info(result, name="run7", arch="wrn34-10")
    assert list(info) == list(rbp.MODEL_INFO_FIELDS)
    assert (info["clean_acc"], info["autoattack_acc"], info["eps"]) == ("80.0", "40.0", EPS)
    assert (info["architecture"], info["dataset"], info["number_forward_passes"]) == ("WideResNet-34-10", "cifar10", 1)


def test_model_info_rounds_like_robustbench():
    result = rbp.ProtocolResult("cifar10", EPS, 3, 500, 0, 2, 1, [], "x 1", {})
    info = rbp.model_info(result, name="r", arch="resnet18")
    assert (info["clean_acc"], info["autoattack_acc"]) == ("66.67", "33.33")


# ------------------------------------------------------------------------------ against robustbench itself
def _pyautoattack_as_autoattack():
    """robustbench 1.1.1 imports `autoattack` (AutoAttack's GitHub install), passes log_path=None, calls
    run_standard_evaluation(x, y, bs=..., state_path=...) and uses the returned x_adv. The PyPI packaging
    (pyautoattack, the same attacks) has no log_path, takes batch_size= and returns (x_adv, y_adv): adapt
    those, nothing else."""
    import pyautoattack
    import pyautoattack.state

    class AutoAttack(pyautoattack.AutoAttack):
        def __init__(self, model, log_path=None, **kwargs):
            assert log_path is None, "the adapter has no log file"
            super().__init__(model, **kwargs)

        def run_standard_evaluation(self, x, y, bs=250, state_path=None):
            return super().run_standard_evaluation(x, y, batch_size=bs, state_path=state_path)[0]

    module = types.ModuleType("autoattack")
    module.AutoAttack = AutoAttack
    module.state = pyautoattack.state
    return module


_SHIM = []  # the one stand-in module: robustbench.eval keeps the class it imported first


@pytest.fixture
def robustbench(monkeypatch):
    """The robustbench package, importable here: setuptools >= 81 has no pkg_resources, which
    robustbench.loaders imports for ImageNet only; without the GitHub `autoattack`, pyautoattack stands in
    (for robustbench and for part_fast alike, so both run the same AutoAttack class)."""
    if importlib.util.find_spec("robustbench") is None:
        pytest.skip("robustbench is not installed (it is in the test extra: pip install -e '.[test]')")
    if importlib.util.find_spec("pkg_resources") is None:
        monkeypatch.setitem(sys.modules, "pkg_resources", types.ModuleType("pkg_resources"))
    if importlib.util.find_spec("autoattack") is None:
        if not _SHIM:
            _SHIM.append(_pyautoattack_as_autoattack())
        monkeypatch.setitem(sys.modules, "autoattack", _SHIM[0])
        monkeypatch.setitem(sys.modules, "autoattack.state", _SHIM[0].state)
    module = importlib.import_module("robustbench")
    if not hasattr(importlib.import_module("robustbench.eval"), "benchmark"):
        pytest.skip("the installed robustbench package is torchattacks' old copy (its wheel overwrites "
                    "robustbench's files; benchmark() is commented out there): reinstall it after torchattacks, "
                    "pip install --no-deps --force-reinstall robustbench==1.1.1 (.ci/run does)")
    return module


def test_the_test_set_equals_robustbench_load_clean_dataset(cifar, robustbench):
    from robustbench.data import PREPROCESSINGS, load_clean_dataset
    from robustbench.model_zoo.enums import BenchmarkDataset

    data_dir, _ = cifar
    for n in (N_EXAMPLES, 1, N_FILE):
        theirs = load_clean_dataset(BenchmarkDataset.cifar_10, n, str(data_dir), PREPROCESSINGS[None])
        ours = rbp.load_test_set("cifar10", data_dir, n)
        assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1]), n


@pytest.mark.slow
def test_agrees_exactly_with_robustbench_benchmark(cifar, robustbench, tmp_path, monkeypatch):
    """benchmark() seeds AutoAttack from the clock (it passes no seed); pinned here to the protocol's seed,
    everything else is robustbench's own code: its loader, batching, AutoAttack call and JSON writer."""
    import robustbench.eval as rb_eval

    from part_fast.evaluation import load_autoattack

    data_dir, model = cifar
    aa_cls = rb_eval.AutoAttack
    assert load_autoattack() is aa_cls  # both sides run the same AutoAttack class
    monkeypatch.setattr(aa_cls, "get_seed", lambda self: 0 if self.seed is None else self.seed)
    # Record every AutoAttack run: the same inputs, batch size and seed must give the same adversarial
    # examples on both sides (the accuracies alone could agree by luck on this model).
    calls = []
    original = aa_cls.run_standard_evaluation

    @functools.wraps(original)
    def recorded(self, x, y, *args, **kwargs):
        x_adv = original(self, x, y, *args, **kwargs)
        out = x_adv[0] if isinstance(x_adv, tuple) else x_adv
        calls.append((x.clone(), y.clone(), args, kwargs, self.get_seed(), self.version, out.clone()))
        return x_adv

    monkeypatch.setattr(aa_cls, "run_standard_evaluation", recorded)
    monkeypatch.chdir(tmp_path)
    clean, robust = robustbench.benchmark(model, n_examples=N_EXAMPLES, dataset="cifar10", threat_model="Linf",
                                          to_disk=True, model_name="Template", data_dir=str(data_dir),
                                          device=torch.device("cpu"), batch_size=BATCH, eps=EPS)
    theirs = json.loads((tmp_path / "model_info" / "cifar10" / "Linf" / "Template.json").read_text())

    x, y = rbp.load_test_set("cifar10", data_dir, N_EXAMPLES)
    result = rbp.evaluate_robustbench(model, x, y, eps=EPS, batch_size=BATCH, seed=0, verbose=False)
    ours = rbp.model_info(result, name="Template", arch="template")
    assert (result.clean_acc, result.autoattack_acc) == (clean, robust) == (CLEAN, ROBUST)
    assert len(calls) == 2
    (x_rb, y_rb, a_rb, kw_rb, seed_rb, v_rb, adv_rb), (x_us, y_us, a_us, kw_us, seed_us, v_us, adv_us) = calls
    assert torch.equal(x_rb, x_us) and torch.equal(y_rb, y_us) and x_us.shape[0] == N_EXAMPLES
    assert a_rb == a_us == () and kw_rb.get("bs", kw_rb.get("batch_size")) == BATCH
    assert kw_us.get("bs", kw_us.get("batch_size")) == BATCH
    assert seed_rb == seed_us == 0 and v_rb == v_us == "standard"
    assert torch.equal(adv_rb, adv_us)
    assert set(ours) == set(theirs)
    written_by_benchmark = {k: v for k, v in theirs.items() if v is not None}
    assert written_by_benchmark == {k: ours[k] for k in written_by_benchmark}
    assert set(written_by_benchmark) == {"dataset", "eps", "clean_acc", "autoattack_acc"}


# ------------------------------------------------------------------------------ the command line
@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """A cnn-small run trained for one epoch on shapes (10 classes, like CIFAR-10)."""
    out = tmp_path_factory.mktemp("rb") / "run"
    assert cli.main(["train", "--dataset", "shapes", "--arch", "cnn-small", "--epochs", "1", "--warmup", "0",
                     "--batch-size", "32", "--steps", "1", "--train-subset", "64", "--test-subset", "32",
                     "--eval-examples", "0", "--out", str(out), "--device", "cpu"]) == 0
    return out


@pytest.mark.slow
def test_cli_writes_the_model_info_beside_the_checkpoint(small_run, cifar, capsys):
    # 16 examples in batches of 5, 5, 5, 1 (a last, short batch): each example the model gets right costs
    # AutoAttack's four attacks, and the 24 this test used took twice as long.
    n, batch = 16, 5
    data_dir, _ = cifar
    assert cli.main(["eval", str(small_run / "last.pt"), "--protocol", "robustbench", "--dataset", "cifar10",
                     "--data-dir", str(data_dir), "--test-subset", str(n), "--batch-size", str(batch),
                     "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    info = json.loads((small_run / "robustbench-cifar10-Linf.json").read_text())
    details = json.loads((small_run / "robustbench-cifar10-Linf.eval.json").read_text())

    from part_fast.train import load_model

    model, _ = load_model(small_run / "last.pt")
    x, y = rbp.load_test_set("cifar10", data_dir, n)
    clean = rbp._accuracy(model, x, y, batch, "cpu")  # in the protocol's batches, as the CLI counted
    robust = details["autoattack_correct"]
    assert 0 <= robust <= clean and details["clean_correct"] == clean
    assert info["clean_acc"] == str(round(100 * clean / n, 2)) and info["autoattack_acc"] == str(round(100 * robust / n, 2))
    assert info["architecture"] == "CNN (small)" and info["name"] == "run" and info["eps"] == EPS
    assert list(info) == list(rbp.MODEL_INFO_FIELDS) and info["footnote"].startswith("PART trained with part_fast")
    assert (details["n_examples"], details["batch_size"], details["seed"]) == (n, batch, 0)
    assert details["model_info"] == info and details["version"] == "standard"
    assert [c["check"] for c in details["checks"]] == ["logits", "deterministic", "eval mode", "input gradients"]
    for check in ("logits", "deterministic", "eval mode", "input gradients"):
        assert f"AutoAttack check {check}: pass" in out
    assert out.index("AutoAttack check logits") < out.index("clean accuracy:")
    assert f"clean accuracy: {100 * clean / n:.2f}% | AutoAttack accuracy: {100 * robust / n:.2f}%" in out


@pytest.mark.parametrize("flags, message", [
    (["--attacks", "natural"], "--attacks does not apply to --protocol robustbench"),
    (["--step-size", "2/255"], "--step-size does not apply"),
    ([], "trained on 'shapes'.*pass --dataset"),
    (["--dataset", "cifar100"], "--dataset cifar100 has 100 classes, the model 10"),
    (["--dataset", "cifar10", "--batch-size", "0"], "--batch-size must be a positive integer"),
])
def test_cli_protocol_errors(small_run, capsys, flags, message):
    assert cli.main(["eval", str(small_run / "last.pt"), "--protocol", "robustbench", "--device", "cpu",
                     *flags]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err


def test_cli_dataset_flag_belongs_to_the_protocol(small_run, capsys):
    assert cli.main(["eval", str(small_run / "last.pt"), "--dataset", "cifar10", "--device", "cpu"]) == 2
    assert "--dataset belongs to --protocol robustbench" in capsys.readouterr().err
