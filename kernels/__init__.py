"""Triton kernels of part_fast (the backend "triton"): one module per op, each holding its kernels and its
launcher. The source tree keeps them in the top-level kernels/ folder, installed as the subpackage
part_fast.kernels (pyproject.toml's package-dir): import them as part_fast.kernels once part_fast is installed
(`pip install -e .` for a checkout). Launchers take arguments already validated by part_fast._validate:

    pgd_step.pgd_step_(x_adv, grad, x_nat, eps, step_size, lo, hi) -> None   (grad=None: project only)
    pgd_step.project_(x_adv, x_nat, eps, lo, hi) -> None
    cam_eps_map.cam_eps_map(cam, size, eps, eps_low, mode) -> Tensor
    ptx.compile_kernels(arch) -> list[dict]                                  (PTX without a GPU)

The op modules keep their names (the cam_eps_map function is not re-exported over its module).
Set TRITON_INTERPRET=1 before importing this package to run the kernels on CPU tensors.
"""
from . import cam_eps_map, pgd_step
from .pgd_step import pgd_step_, project_

__all__ = ["cam_eps_map", "pgd_step", "pgd_step_", "project_"]
