"""part_fast: fast, reproducible PART (Pixel-reweighted Adversarial Training, ICML 2024).

Fused attack ops (part_fast.ops) with a pure-PyTorch reference (part_fast.reference) that is the
ground truth, the fallback when the compiled extension is missing, and the benchmark baseline.
"""
from . import ops, reference
from .ops import available_backends, cam_eps_map, pgd_step_, project_, use_backend

__version__ = "0.1.0"

__all__ = [
    "available_backends",
    "cam_eps_map",
    "ops",
    "pgd_step_",
    "project_",
    "reference",
    "use_backend",
]
