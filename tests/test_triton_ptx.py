"""The Triton kernels compile for real GPUs (sm_80, sm_90) without one, and the streaming PGD step moves
memory in 128-bit accesses.

Compilation runs in a subprocess without TRITON_INTERPRET: under the interpreter `triton.jit` yields
interpreter wrappers that triton.compile cannot take, and the variable must be unset before the kernels
are imported.
"""
from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("triton")
# The kernels' source is the top-level kernels/ folder, importable as part_fast.kernels only once part_fast is
# installed (pyproject.toml's package-dir): a checkout on PYTHONPATH alone does not have it.
if importlib.util.find_spec("part_fast.kernels") is None:
    pytest.skip("part_fast.kernels is not importable: install the checkout (pip install -e .) to map kernels/ to it",
                allow_module_level=True)

REPO = pathlib.Path(__file__).resolve().parents[1]
ARCHS = (80, 90)
STREAMING_FP32 = ("pgd_step_fp32_eps_scalar", "pgd_step_fp32_eps_dense")
EXPECTED = {
    *STREAMING_FP32,
    "pgd_step_bf16_eps_scalar",
    "pgd_step_bf16_eps_dense",
    "project_fp32_eps_scalar",
    "project_fp32_eps_dense",
    "pgd_step_fp32_eps_strided_1c11",
    "cam_eps_map_jet_4x4_to_32x32",
    "cam_eps_map_cam_4x4_to_32x32",
    "cam_eps_map_jet_7x7_to_224x224",
}
# What training launches besides (ptx.training_variant_specs, compiled with --training-variants).
TRAINING_VARIANTS = {"pgd_step_bf16_eps_dense_f32", "pgd_step_bf16_eps_b1hw_f32", "pgd_step_fp32_eps_b1hw"}


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # REPO first, as the tests run: the checkout's part_fast/, and part_fast.kernels (its kernels/) through the
    # editable install's mapping
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "part_fast.kernels.ptx", *(f"--arch={arch}" for arch in ARCHS),
               "--training-variants"]
    result = subprocess.run(command, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    return {(k["name"], k["arch"]): k for k in json.loads(result.stdout)}


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_every_kernel_compiles(compiled, arch):
    names = {name for name, a in compiled if a == arch}
    assert names == EXPECTED | TRAINING_VARIANTS
    for name in names:
        kernel = compiled[(name, arch)]
        assert kernel["registers"] > 0, kernel
        assert kernel["num_warps"] > 0, kernel
        assert kernel["local_bytes"] in (0, None), f"{name} spills: {kernel}"


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", STREAMING_FP32)
def test_streaming_pgd_step_uses_128_bit_accesses(compiled, arch, name):
    kernel = compiled[(name, arch)]
    assert "ld.global.v4.b32" in kernel["global_loads"], kernel
    assert "st.global.v4.b32" in kernel["global_stores"], kernel
    # every x_adv / grad / x_nat (/ eps) access is 128-bit: nothing narrower is left in the stream
    assert all(".v4." in op for op in kernel["global_loads"] + kernel["global_stores"]), kernel


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", sorted({*STREAMING_FP32, "pgd_step_bf16_eps_dense", *TRAINING_VARIANTS}))
def test_streaming_variants_move_128_bits_per_access(compiled, arch, name):
    # the widths the harness's GPU evidence shows: a dense, scalar or (B,1,H,W) eps streams at full width,
    # bf16 tensors with a float32 eps included
    kernel = compiled[(name, arch)]
    assert (kernel["load_bits"], kernel["store_bits"]) == ([128], [128]), kernel


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_a_broadcast_eps_is_gathered_per_element(compiled, arch):
    # a (1, C, 1, 1) eps has no contiguous run to vectorise: its element loads are 32-bit, the rest stays 128
    kernel = compiled[("pgd_step_fp32_eps_strided_1c11", arch)]
    assert (kernel["load_bits"], kernel["store_bits"]) == ([32, 128], [128]), kernel


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_cam_eps_map_keeps_pil_sums_unfused(compiled, arch):
    # PIL accumulates mul then add, each rounded; a fused multiply-add would change the resized map.
    for name in ("cam_eps_map_jet_4x4_to_32x32", "cam_eps_map_cam_4x4_to_32x32", "cam_eps_map_jet_7x7_to_224x224"):
        assert compiled[(name, arch)]["fp64_fma"] is False


def test_the_harness_marks_the_variants_ptx_compiles_for_training():
    # bench/gpu_evidence.py names them too (a saved run renders without Triton): the two lists must agree
    from bench.gpu_evidence import TRAINING_VARIANTS as marked
    from part_fast.kernels.ptx import TRAINING_VARIANTS as compiled

    assert set(marked) == set(compiled) == TRAINING_VARIANTS
