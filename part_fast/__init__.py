"""part_fast: fast, reproducible PART (Pixel-reweighted Adversarial Training, ICML 2024).

Fused attack ops (part_fast.ops) with a pure-PyTorch reference (part_fast.reference) that is the
ground truth, the fallback when the compiled extension is missing, and the benchmark baseline.

The public API is here at the top level (`part_fast.PixelBudget`, `part_fast.PGD`, `part_fast.MMA`,
`part_fast.compute_cam`, `part_fast.evaluate`, `part_fast.get_model`) and stays at its submodule paths
(`part_fast.budget.PixelBudget`, ...). Importing it costs milliseconds over torch: these modules need
torch alone; the trainer, the datasets, torchvision and matplotlib are imported only where used.
"""
import types as _types

from . import attacks, budget, cam, evaluate, models, ops, reference
from .attacks import MMA, PGD
from .budget import PixelBudget
from .cam import compute_cam
from .models import get_model
from .ops import available_backends, cam_eps_map, pgd_step_, project_, use_backend

__version__ = "0.1.0"


class _CallableEvaluateModule(_types.ModuleType):
    """`part_fast.evaluate` names both the submodule (its ATTACKS, load_autoattack, ..., and the path
    `from part_fast.evaluate import evaluate`) and, as a top-level function, `part_fast.evaluate(...)`.
    A name cannot be both, and importing a submodule binds its name on the package, so binding the
    function here would be undone by the next `import part_fast.evaluate` elsewhere. The module stays the
    module and calling it calls its `evaluate` (looked up at each call, so a patched one is used)."""

    def __call__(self, *args, **kwargs):
        return self.evaluate(*args, **kwargs)

    @property
    def __signature__(self):
        import inspect

        return inspect.signature(self.evaluate)


evaluate.__class__ = _CallableEvaluateModule

__all__ = [
    "MMA",
    "PGD",
    "PixelBudget",
    "available_backends",
    "cam_eps_map",
    "compute_cam",
    "evaluate",
    "get_model",
    "ops",
    "pgd_step_",
    "project_",
    "reference",
    "use_backend",
]
