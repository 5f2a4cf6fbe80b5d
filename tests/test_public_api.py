"""The public API at the top level (`part_fast.PixelBudget`, `PGD`, `MMA`, `compute_cam`, `evaluate`,
`get_model`), the same objects as at their submodule paths, which keep working; `import part_fast` stays
cheap; and the README's first example, a bring-your-own model, runs as written."""
import ast
import importlib
import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import part_fast
from part_fast.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]

# name -> the submodule that defines it
PUBLIC = {"PixelBudget": "part_fast.budget", "PGD": "part_fast.attacks", "MMA": "part_fast.attacks",
          "compute_cam": "part_fast.cam", "evaluate": "part_fast.evaluation", "get_model": "part_fast.models"}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("name, module", sorted(PUBLIC.items()))
def test_top_level_name_is_the_submodule_object(name, module):
    assert getattr(part_fast, name) is getattr(importlib.import_module(module), name)
    assert name in part_fast.__all__ and name in dir(part_fast)


def test_submodule_paths_keep_working():
    from part_fast.attacks import MMA, PGD
    from part_fast.budget import PixelBudget
    from part_fast.cam import compute_cam
    from part_fast.evaluation import ATTACKS, TORCHATTACKS_VERSION, evaluate

    assert (PGD, MMA, PixelBudget, compute_cam) == (part_fast.PGD, part_fast.MMA, part_fast.PixelBudget,
                                                    part_fast.compute_cam)
    assert inspect.isfunction(part_fast.evaluate) and part_fast.evaluate is evaluate
    assert evaluate.__module__ == "part_fast.evaluation"
    assert ATTACKS[0] == "natural" and TORCHATTACKS_VERSION


def test_star_import_gives_the_public_api():
    namespace = {}
    exec("from part_fast import *", namespace)
    for name, module in PUBLIC.items():
        assert namespace[name] is getattr(importlib.import_module(module), name)
    assert namespace["cam_eps_map"] is part_fast.ops.cam_eps_map
    assert set(part_fast.__all__) <= set(dir(part_fast))


def test_import_is_cheap():
    # In a fresh interpreter: the public names resolve without pulling in plotting, datasets or the trainer.
    code = (
        "import json, sys, part_fast\n"
        "names = [part_fast.PixelBudget, part_fast.PGD, part_fast.MMA, part_fast.compute_cam, part_fast.evaluate,"
        " part_fast.get_model]\n"
        "heavy = ('matplotlib', 'torchvision', 'part_fast.train', 'part_fast.data', 'part_fast.cli',"
        " 'part_fast.demo', 'part_fast.plots')\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in heavy or m.startswith(heavy))))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []


# --------------------------------------------------------------------- the README's first example
# Paste-identical to the README's "Your own model" example (test_readme_holds_the_example checks this).
README_EXAMPLE = '''\
import torch
from torch import nn
import part_fast

# your own CNN (inputs in [0, 1]): it has no layer4 / block3 / features, so name the CAM layer
model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
                      nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
x, y = torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,))

# without layer=: ConfigError: could not find the CAM layer of Sequential: pass layer= (a module or its
# name); modules with a 4-D output, deepest first: 3 (32x16x16), 1 (16x32x32)
budget = part_fast.PixelBudget(eps=8 / 255, eps_low=7 / 255, layer="3")
eps_map = budget(model, x)                  # (8, 3, 32, 32): eps where the CAM points, eps_low elsewhere
cam = part_fast.compute_cam(model, x, layer="3")                                    # (8, 16, 16)
x_adv = part_fast.PGD(model, eps=8 / 255, alpha=2 / 255, steps=10)(x, y, eps_map=eps_map)
x_mma = part_fast.MMA(model, eps=8 / 255, alpha=2 / 255, steps=20, k=3)(x, y, eps_map=eps_map)
print(part_fast.evaluate(model, [(x, y)], attacks=("natural", "pgd20", "mma"), progress=False))
'''

NO_LAYER_ERROR = ("could not find the CAM layer of Sequential: pass layer= (a module or its name); modules with a "
                  "4-D output, deepest first: 3 (32x16x16), 1 (16x32x32)")


def test_readme_example_runs_as_written(capsys):
    torch.manual_seed(0)
    namespace = {}
    exec(README_EXAMPLE, namespace)
    model, x, y, eps_map = namespace["model"], namespace["x"], namespace["y"], namespace["eps_map"]
    eps, eps_low = torch.tensor(8 / 255).item(), torch.tensor(7 / 255).item()
    assert not hasattr(model, "layer4")
    assert eps_map.shape == (8, 3, 32, 32) and eps_map.dtype == torch.float32
    assert set(eps_map.unique().tolist()) == {eps, eps_low}
    assert namespace["cam"].shape == (8, 16, 16)
    for name in ("x_adv", "x_mma"):
        x_adv = namespace[name]
        assert x_adv.shape == x.shape and not torch.equal(x_adv, x)
        assert ((x_adv - x).abs() <= eps_map + 1e-7).all() and x_adv.min() >= 0 and x_adv.max() <= 1
    printed = capsys.readouterr().out
    assert set(ast.literal_eval(printed.strip().splitlines()[-1])) == {"natural", "pgd20", "mma", "seconds", "examples"}
    # The top-level evaluate is the function's result (same seed, same examples).
    direct = part_fast.evaluation.evaluate(model, [(x, y)], attacks=("natural", "pgd20"), progress=False)
    top = part_fast.evaluate(model, [(x, y)], attacks=("natural", "pgd20"), progress=False)
    same = ("natural", "pgd20", "examples")
    assert {k: top[k] for k in same} == {k: direct[k] for k in same}
    # The comment's error is what the model without layer= gets, and the first layer it lists works.
    with pytest.raises(ConfigError) as info:
        part_fast.PixelBudget()(model, x)
    assert str(info.value) == NO_LAYER_ERROR
    listed = str(info.value).split("deepest first: ")[1].split(" (")[0]
    assert listed == "3"
    assert torch.equal(part_fast.PixelBudget(8 / 255, 7 / 255, layer=listed)(model, x), eps_map)
    assert all(not m._forward_hooks for m in model.modules())


def test_readme_example_comment_is_the_error():
    comment = " ".join(line.removeprefix("# ") for line in README_EXAMPLE.splitlines()
                       if line.startswith(("# without layer=", "# name)")))
    assert comment == "without layer=: ConfigError: " + NO_LAYER_ERROR


def test_readme_holds_the_example():
    """The README's "Your own model" example is, byte for byte, the one test_readme_example_runs_as_written runs."""
    assert README_EXAMPLE in (ROOT / "README.md").read_text()


def _documented_public_api():
    from part_fast import ops
    from part_fast.train import TrainConfig, train
    return {**{name: getattr(part_fast, name) for name in PUBLIC}, "cam_eps_map": ops.cam_eps_map,
            "pgd_step_": ops.pgd_step_, "project_": ops.project_, "TrainConfig": TrainConfig, "train": train}


@pytest.mark.parametrize("name", sorted(_documented_public_api()))
def test_public_api_docstring_names_every_argument(name):
    """Args: one entry per parameter (PGD's "eps, alpha, ...: as PGD's" style counts each name); functions
    also say what they return, classes what shapes their call takes."""
    obj = _documented_public_api()[name]
    doc = inspect.getdoc(obj)
    assert doc and "\nArgs:\n" in doc, f"{name}: no Args section"
    args = doc.split("\nArgs:\n", 1)[1].split("\n\n", 1)[0]
    entries = {n.strip() for line in args.splitlines() if line.startswith("    ") and not line.startswith("     ")
               for n in line.split(":", 1)[0].split(",")}
    params = [p for p in inspect.signature(obj).parameters.values() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    assert [p.name for p in params if p.name not in entries] == [], f"{name}: arguments missing from Args"
    if inspect.isclass(obj):  # a class's call says its shapes; TrainConfig, a record of settings, has none
        assert "\nShape:\n" in doc or name == "TrainConfig", f"{name}: no Shape section"
    else:
        assert "\nReturns:\n" in doc, f"{name}: no Returns section"
