"""part_fast: fast, reproducible PART (Pixel-reweighted Adversarial Training, ICML 2024).

Fused attack ops (part_fast.ops) with a pure-PyTorch reference (part_fast.reference) that is the
ground truth, the fallback when the compiled extension is missing, and the benchmark baseline.

The public API is here at the top level (`part_fast.PixelBudget`, `part_fast.PGD`, `part_fast.MMA`,
`part_fast.compute_cam`, `part_fast.evaluate`, `part_fast.get_model`) and stays at its submodule paths
(`part_fast.budget.PixelBudget`, `part_fast.evaluation.evaluate`, ...). Importing it costs milliseconds over
torch: these modules need torch alone; the trainer, the datasets, torchvision and matplotlib are imported only
where used.
"""
from . import attacks, budget, cam, evaluation, models, ops, reference
from .attacks import MMA, PGD
from .budget import PixelBudget
from .cam import compute_cam
from .evaluation import evaluate
from .models import get_model
from .ops import available_backends, cam_eps_map, pgd_step_, project_, use_backend

__version__ = "0.1.0"

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
