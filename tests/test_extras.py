"""The core needs torch alone: `import part_fast`, the ops, the budget, CAMs, attacks, models and
evaluate work with torch and numpy only; every other package is in an extra of pyproject.toml, and a
command that needs a missing one says so in one line naming the extra (part_fast/extras.py).

The optional packages are blocked in a fresh interpreter by a meta-path finder that raises
ModuleNotFoundError for them, as `import` does when a package is not installed; the finder also records
every import of them that was tried, so a module that imports one and swallows the error is caught too."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from part_fast import extras

ROOT = Path(__file__).resolve().parents[1]
# The top-level names of every optional package (pyautoattack and the GitHub `autoattack` both serve "aa").
OPTIONAL = ("tqdm", "torchvision", "matplotlib", "PIL", "tensorboard", "autoattack", "pyautoattack", "torchattacks")

# Put first in every child: blocks the names in BLOCKED (a JSON list set by the test), records the tries in
# `tried`. torch is imported before recording starts: torch.hub tries tqdm itself, which is not ours.
PRELUDE = """\
import json, sys, warnings
BLOCKED = set(json.loads({blocked!r}))
tried = []

class _Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            tried.append(name)
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked by tests/test_extras.py)", name=name)
        return None

sys.meta_path.insert(0, _Blocker())
# Whether the compiled extension loads is not this file's business (ops warns once when it does not).
warnings.filterwarnings("ignore", message=r"part_fast: the (compiled|CUDA) kernels", category=RuntimeWarning)
import torch
tried.clear()
loaded_before = set(sys.modules)
"""


def _child(body: str, blocked=OPTIONAL, timeout=240) -> subprocess.CompletedProcess:
    code = PRELUDE.format(blocked=json.dumps(list(blocked))) + textwrap.dedent(body)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=timeout)


def _last_json(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------ (a) the core with torch alone
CORE = """\
import part_fast
from part_fast import attacks, budget, cam, models, ops, reference
from part_fast import MMA, PGD, PixelBudget, cam_eps_map, compute_cam, evaluate, get_model, pgd_step_, project_
from torch import nn

report = {"tried_by_import": list(tried)}

# ops: dyadic values, so every result is exact
x_nat = torch.full((1, 3, 2, 2), 0.5)
x_nat[0, 0, 0, 0] = 0.875  # its step up is clipped at hi = 1
grad = torch.tensor([1.0, -1.0, 0.0, 1.0]).repeat(3).view(1, 3, 2, 2)
eps_map = torch.tensor([0.25, 0.125]).repeat(6).view(1, 3, 2, 2)
x_adv = pgd_step_(x_nat.clone(), grad, x_nat, eps_map, 0.5)
expected = torch.clamp(x_nat + eps_map * torch.sign(grad), 0, 1)
assert torch.equal(x_adv, expected), x_adv
assert x_adv[0, 0, 0, 0] == 1.0 and x_adv[0, 0, 0, 1] == 0.375 and x_adv[0, 0, 1, 0] == 0.5
far = project_(torch.full((1, 3, 2, 2), 2.0), x_nat, eps_map)
assert torch.equal(far, torch.clamp(x_nat + eps_map, 0, 1)), far

# compute_cam on a model whose GradCAM is known in closed form: conv 1x1 -> ReLU -> mean -> linear, so
# the weights are head[pred] / (h * w) and the CAM is ReLU(sum_k w_k A_k)
conv, head = nn.Conv2d(3, 2, 1, bias=False), nn.Linear(2, 2, bias=False)
with torch.no_grad():
    conv.weight.copy_(torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]).view(2, 3, 1, 1))
    head.weight.copy_(torch.tensor([[1.0, -1.0], [-1.0, 2.0]]))
net = nn.Sequential(conv, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), head)
x = torch.zeros(1, 3, 4, 4)
x[0, 1, 1, 2] = 1.0  # one hot pixel in channel 1: class 1 wins, its CAM is that pixel alone
hot = torch.zeros(1, 4, 4)
hot[0, 1, 2] = 2.0 / 16
assert torch.equal(compute_cam(net, x, layer="1"), hot)
x2 = x.clone()
x2[0, 0, 1, 2], x2[0, 1] = 1.0, 0.25
cam2 = torch.full((1, 4, 4), 0.5 / 16)
cam2[0, 1, 2] = 0.0  # ReLU(-1/16 + 0.25 * 2/16)
assert torch.equal(compute_cam(net, x2, layer="1"), cam2)

# PixelBudget: the full eps on the hot pixel only (channel-shared mask), and the released (jet) mask is
# the reference's for the same CAM
eps_cam = PixelBudget(0.25, 0.125, mask="cam", layer="1")(net, x)
want = torch.full((1, 1, 4, 4), 0.125)
want[0, 0, 1, 2] = 0.25
assert torch.equal(eps_cam, want), eps_cam
eps_jet = PixelBudget(0.25, 0.125, mask="jet", layer="1")(net, x)
assert eps_jet.shape == (1, 3, 4, 4)
assert torch.equal(eps_jet, reference.cam_eps_map(hot, (4, 4), 0.25, 0.125, "jet"))
assert torch.equal(cam_eps_map(hot, 4, 0.25, 0.125, "cam"), want)

# PGD and MMA on a linear model whose loss gradient has the sign of w1 everywhere (w0 = 0): from x = 0.5
# every pixel ends on its budget's edge in the direction of w1
lin = nn.Linear(48, 2)
with torch.no_grad():
    lin.weight.zero_()
    lin.bias.copy_(torch.tensor([1.0, 0.0]))
    signs = torch.tensor([1.0, -1.0]).repeat(24)[torch.randperm(48, generator=torch.Generator().manual_seed(0))]
    lin.weight[1] = signs
linear = nn.Sequential(nn.Flatten(), lin)
xs, ys = torch.full((2, 3, 4, 4), 0.5), torch.zeros(2, dtype=torch.long)
edge = 0.5 + 0.25 * signs.view(1, 3, 4, 4).expand(2, 3, 4, 4)
assert torch.equal(PGD(linear, eps=0.25, alpha=0.125, steps=3, start=None)(xs, ys), edge)
per_pixel = torch.tensor([0.25, 0.125]).repeat(24).view(1, 3, 4, 4)
assert torch.equal(PGD(linear, eps=0.25, alpha=0.125, steps=3, start=None)(xs, ys, eps_map=per_pixel),
                   (0.5 + per_pixel * signs.view(1, 3, 4, 4)).expand(2, 3, 4, 4))
assert torch.equal(MMA(linear, eps=0.25, alpha=0.125, steps=3, k=1, start=None)(xs, ys), edge)

assert type(get_model("cnn-small")).__name__ == "CNNSmall"
report["tried_by_core"] = list(tried)

# evaluate, progress bar asked for: with tqdm missing it runs without one. At 8/255 the attacks flip
# every prediction (1 vs 48 * 8/255 = 1.51).
result = evaluate(linear, [(xs, ys)], attacks=("natural", "pgd20", "mma"), progress=True)
report["evaluate"] = {k: result[k] for k in ("natural", "pgd20", "mma", "examples")}
report["tried_by_evaluate"] = list(tried)
errors = {}
for name, call in (("evaluate", lambda: evaluate(linear, [(xs, ys)], progress=False)),  # default attacks: "aa"
                   ("get_model", lambda: get_model("resnet50"))):
    try:
        call()
    except ImportError as error:
        errors[name] = [type(error).__name__, isinstance(error, part_fast.evaluation.MissingExtraError), str(error)]
report["errors"] = errors
report["loaded"] = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
print(json.dumps(report))
"""


def test_the_core_works_with_torch_alone():
    report = _last_json(_child(CORE))
    assert report["tried_by_import"] == []  # import part_fast and its core tried no optional package
    assert report["tried_by_core"] == []
    assert report["evaluate"] == {"natural": 100.0, "pgd20": 0.0, "mma": 0.0, "examples": 2}
    assert report["tried_by_evaluate"] == ["tqdm"]  # the bar was asked for, and left out
    assert report["errors"] == {
        "evaluate": ["MissingExtraError", True, "attack 'aa' (the original AutoAttack) needs the pyautoattack "
                                                "package, which is not installed: pip install \"part_fast[eval]\""],
        "get_model": ["MissingExtraError", True, "architecture 'resnet50' (not bundled: cnn-small, "
                                                 "preact-resnet18, resnet-small, resnet18, wrn34-10; any other name "
                                                 "is torchvision's) needs the torchvision package, which is not "
                                                 "installed: pip install \"part_fast[train]\""],
    }
    assert report["loaded"] == []


def test_the_core_imports_no_optional_package_even_when_installed():
    # Nothing blocked: what is installed here stays unimported by `import part_fast` and the core's work
    # (torch.hub imports tqdm when it is installed: what torch itself loaded is left out).
    proc = _child("""\
        import part_fast
        from part_fast import ops, reference, cam, budget, attacks, models
        from torch import nn
        net = part_fast.get_model("cnn-small").eval()
        x, y = torch.rand(2, 3, 32, 32), torch.tensor([0, 1])
        eps_map = part_fast.PixelBudget(8 / 255, 7 / 255)(net, x)
        part_fast.PGD(net, steps=1)(x, y, eps_map=eps_map)
        part_fast.MMA(net, steps=1, k=1)(x, y)
        part_fast.evaluate(net, [(x, y)], attacks=("natural", "pgd20"), progress=False)
        print(json.dumps(sorted(m for m in set(sys.modules) - loaded_before if m.split(".")[0] in {optional})))
        """.replace("{optional}", repr(set(OPTIONAL))), blocked=())
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []


def test_the_command_line_starts_with_torch_alone():
    proc = _child("""\
        import contextlib, io
        from part_fast import cli
        codes = []
        for argv in (["--help"], ["train", "--help"], ["eval", "--help"], ["demo", "--help"]):
            with contextlib.redirect_stdout(io.StringIO()):
                try:
                    cli.main(argv)
                except SystemExit as stop:
                    codes.append(stop.code)
        print(json.dumps({"codes": codes, "tried": tried}))
        """)
    assert _last_json(proc) == {"codes": [0, 0, 0, 0], "tried": []}


# ------------------------------------------------------------- (b) a command that needs a missing extra
# One interpreter runs every command in turn, `part-fast ARGS` as `python -m part_fast` runs it, each with its
# own packages blocked; it reports whether a blocked package was already imported (by an earlier command:
# then the case would prove nothing, and fails), the exit code and everything written to stderr.
COMMANDS = """\
import contextlib, io, runpy
results = {}
for case, (args, blocked) in json.loads(CASES).items():
    BLOCKED.clear()
    BLOCKED.update(blocked)
    imported = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    err = io.StringIO()
    sys.argv = ["part-fast", *args]
    code = None
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            runpy.run_module("part_fast", run_name="__main__")
        except SystemExit as stop:
            code = stop.code
    results[case] = {"imported before": imported, "exit": code, "stderr": err.getvalue()}
print(json.dumps(results))
"""


TINY = ["--dataset", "shapes", "--arch", "cnn-small", "--train-subset", "64", "--test-subset", "32",
        "--batch-size", "32", "--steps", "1", "--eval-examples", "32", "--device", "cpu"]
PLOTS = 'needs the matplotlib package, which is not installed: pip install "part_fast[plots]"'
TRAIN = 'needs the torchvision package, which is not installed: pip install "part_fast[train]"'


def test_a_command_without_its_extra_says_which_in_one_line(tmp_path):
    def out(case):
        return tmp_path / case.replace(" ", "_") / "out"

    cases = {  # case: (args, blocked, the one line on stderr)
        # checked before the demo's minutes of training
        "demo": (["demo", "--out", out("demo"), "--device", "cpu"], ["matplotlib"],
                 f"part-fast demo: error: the budget-map PNG {PLOTS}"),
        "plot": (["plot", tmp_path], ["matplotlib"], f"part-fast plot: error: the training-curves PNG {PLOTS}"),
        "show-cam": (["show-cam", tmp_path / "last.pt", "--out", out("show-cam") / "cams.png"], ["matplotlib"],
                     f"part-fast show-cam: error: the budget-map PNG {PLOTS}"),
        "train cifar10": (["train", "--out", out("train cifar10"), *TINY, "--dataset", "cifar10", "--data-dir",
                           tmp_path], ["torchvision"], f"part-fast train: error: the cifar10 dataset {TRAIN}"),
        "train --arch": (["train", "--out", out("train --arch"), *TINY, "--arch", "resnet50"], ["torchvision"],
                         "part-fast train: error: architecture 'resnet50' (not bundled: cnn-small, preact-resnet18, "
                         f"resnet-small, resnet18, wrn34-10; any other name is torchvision's) {TRAIN}"),
        "train --tensorboard": (["train", "--out", out("train --tensorboard"), *TINY, "--tensorboard"], ["tensorboard"],
                                "part-fast train: error: tensorboard needs the tensorboard package, which is not "
                                'installed: pip install "part_fast[tensorboard]"'),
    }
    plan = {case: ([str(a) for a in args], blocked) for case, (args, blocked, _) in cases.items()}
    results = _last_json(_child(f"CASES = {json.dumps(plan)!r}\n" + COMMANDS, blocked=()))
    assert list(results) == list(cases)
    for case, (_, _, line) in cases.items():
        got = results[case]
        assert got["imported before"] == [], (case, got)
        assert got["exit"] == 2, (case, got)
        assert got["stderr"] == line + "\n", (case, got)  # exactly one line: no traceback, no warning
        assert not out(case).exists(), case  # nothing was written


# --------------------------------------------------------------------------------- (c) pyproject.toml
def _project() -> dict:
    tomllib = pytest.importorskip("tomllib")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _name(requirement: str) -> str:
    """The distribution a requirement names ('torch>=2.13,<2.15' -> 'torch')."""
    name = requirement.split(";")[0]
    for stop in "<>=!~[ (":
        name = name.split(stop)[0]
    return name.strip().lower().replace("_", "-")


def test_the_core_dependencies_are_torch_and_numpy():
    project = _project()
    assert sorted(_name(r) for r in project["dependencies"]) == ["numpy", "torch"]


def test_all_holds_every_extra_a_user_wants():
    extras_ = _project()["optional-dependencies"]
    assert {"train", "eval", "plots", "tensorboard", "all", "bench", "test"} <= set(extras_)
    user_facing = set(extras_) - {"all", "bench", "test"}
    for extra in user_facing:
        missing = set(extras_[extra]) - set(extras_["all"])
        assert not missing, f"[all] lacks {sorted(missing)} of [{extra}]"
    # [all] holds nothing beyond them (no test or benchmark tools)
    assert set(extras_["all"]) == set().union(*(extras_[e] for e in user_facing))
    # the tests need every user-facing package too
    assert {_name(r) for r in extras_["all"]} <= {_name(r) for r in extras_["test"]}


def test_torchvision_is_never_pinned():
    # Each torchvision release pins one torch: an upper bound or a pin here would choose the user's torch.
    for extra, requirements in _project()["optional-dependencies"].items():
        for requirement in requirements:
            if _name(requirement) == "torchvision":
                assert not any(op in requirement for op in ("==", "<", "~=", "!=")), (extra, requirement)


def test_each_message_names_an_extra_that_holds_the_package():
    extras_ = _project()["optional-dependencies"]
    for module, (package, extra, _) in extras.PACKAGES.items():
        if extra is None:
            continue  # torchattacks: installed by hand with --no-deps, as its message says
        assert package in {_name(r) for r in extras_[extra]}, (module, package, extra)
