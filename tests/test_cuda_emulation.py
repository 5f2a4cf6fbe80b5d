"""The CUDA kernels' device code, run on the CPU and compared with the reference bit for bit.

No GPU is available here, so csrc/cuda/*.cu is otherwise only compiled. This module compiles each op's
device header (csrc/cuda/<op>_device.cuh, the one its .cu file includes) as plain C++ with
tests/cuda_emulation/emu.h standing in for the CUDA built-ins, and runs the kernels on the CPU: the indexing,
vectorised chunks, eps-plan walks, block reductions, shared-memory layout and barriers are the real code.
Which pgd_kernel instance runs is decided by the header's own make_args / choose_walk; the grid size and
the 32/64-bit index choice are the harness's parameters (both are exercised). Misaligned vector accesses
fail (emu.h's alignment hook), shared memory starts as garbage, and threads leave barriers at staggered times.

What it cannot catch: device-compiler behaviour (FMA contraction, which setup.py turns off with
--fmad=false), and races beyond what staggered barrier exits expose.
"""
from __future__ import annotations

import glob
import math
import os
from pathlib import Path

import pytest
import torch

from helpers import pairwise
from part_fast import reference

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
HERE = Path(__file__).resolve().parent / "cuda_emulation"

# The headers the .cu files include for their device code, so the emulation runs exactly what nvcc compiles.
DEVICE_HEADERS = ("cuda/cam_eps_map_device.cuh", "cuda/pgd_step_device.cuh")


def emulation_source() -> str:
    return "\n".join([
        # First, so the CUDA keywords and built-ins are defined before any header uses them.
        f'#include "{HERE / "emu.h"}"',
        # The headers' hook for the block's dynamic shared memory: emu.h's array (a host compiler has no
        # extern __shared__).
        "#define PF_DYNAMIC_SHARED_DOUBLES(name) double* name = g_dynamic_smem",
        # The kernels' own stable-ABI headers (the harness registers its ops with STABLE_TORCH_LIBRARY).
        "#include <torch/csrc/stable/library.h>",
        "#include <torch/csrc/stable/ops.h>",
        "#include <optional>",
        "#include <tuple>",
        *(f'#include "{header}"' for header in DEVICE_HEADERS),
        (HERE / "harness.cpp").read_text(),
    ])


def test_cuda_sources_include_the_emulated_device_headers():
    """Each .cu file includes the device header emulated here, and holds no kernel of its own."""
    for header in DEVICE_HEADERS:
        cu = CSRC / header.replace("_device.cuh", ".cu")
        text = cu.read_text()
        assert f'#include "{header}"' in text, f"{cu} does not include {header}"
        assert "__global__" not in text and "__device__" not in text, f"{cu} has device code outside {header}"


def cuda_include_dirs() -> list[str]:
    """Where cuda_runtime.h is, if anywhere: the CUDA wheels torch depends on, else a toolkit. The device
    headers do not need it (emu.h stands in for the CUDA built-ins); nothing from it is linked or run, and
    without it the build is simply tried without."""
    candidates = []
    try:
        import nvidia

        for base in nvidia.__path__:
            candidates += sorted(glob.glob(os.path.join(base, "cu*", "include")))
            candidates += sorted(glob.glob(os.path.join(base, "cuda_runtime", "include")))
    except ImportError:
        pass
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home:
            candidates.append(os.path.join(home, "include"))
    return [d for d in candidates if os.path.isfile(os.path.join(d, "cuda_runtime.h"))][:1]


@pytest.fixture(scope="session")
def emu(tmp_path_factory):
    from torch.utils import cpp_extension

    build = tmp_path_factory.mktemp("cuda_emulation")
    source = build / "cuda_emulation.cpp"
    source.write_text(emulation_source())
    # A library of ops (torch.ops.part_fast_emulation.*), not a Python module: built, like the kernels, on
    # the stable ABI only (TORCH_TARGET_VERSION makes an ATen include a compile error).
    cpp_extension.load(
        name="part_fast_cuda_emulation", sources=[str(source)], build_directory=str(build),
        extra_include_paths=[str(CSRC)] + cuda_include_dirs(), is_python_module=False,
        # -ffp-contract=off as setup.py builds the CPU kernels (and --fmad=false the CUDA ones).
        extra_cflags=["-O1", "-std=c++20", "-ffp-contract=off", "-Wno-unknown-pragmas",
                      "-DTORCH_TARGET_VERSION=0x020a000000000000"], verbose=False)
    return torch.ops.part_fast_emulation


_BITS = {4: torch.int32, 2: torch.int16}


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-for-bit equality (so -0.0 != +0.0), with any NaN equal to any NaN (payloads are not specified)."""
    nan = a.isnan()
    if not torch.equal(nan, b.isnan()):
        return False
    bits = _BITS[a.element_size()]
    zero = torch.zeros((), dtype=bits)
    return torch.equal(torch.where(nan, zero, a.view(bits)), torch.where(nan, zero, b.view(bits)))


# ------------------------------------------------------------------------------------------ cam_eps_map
CAM_CASES = [  # (B, h, w, H, W)
    (3, 7, 7, 224, 224),   # ResNet-18 at ImageNet size: taps and the h x W intermediate at full width
    (4, 8, 8, 64, 64),     # TinyImageNet
    (4, 4, 4, 32, 32),     # CIFAR
    (3, 7, 5, 40, 33),     # odd, non-square, non-integer scale
    (2, 16, 12, 8, 9),     # downsampling
    (2, 1, 3, 5, 7),       # a 1-pixel-high CAM
]


def _cam_comparisons() -> list:
    """(B, h, w, H, W, dtype, mode): every case in both modes in float32 (the resize walk depends on the
    shapes and the mode), plus every pair of case, dtype and mode (helpers.pairwise): 24 of the 36."""
    dtypes = [torch.float32, torch.float16, torch.bfloat16]
    core = [(case, torch.float32, mode) for case in CAM_CASES for mode in ("jet", "cam")]
    pairs = [(c["case"], c["dtype"], c["mode"]) for c in pairwise(case=CAM_CASES, dtype=dtypes, mode=["jet", "cam"])]
    return [pytest.param(*case, dtype, mode, id=f"{'-'.join(map(str, case))}-{str(dtype).replace('torch.', '')}-{mode}")
            for case, dtype, mode in dict.fromkeys(core + pairs)]


@pytest.mark.parametrize("B,h,w,H,W,dtype,mode", _cam_comparisons())
def test_cam_eps_map_device_code_matches_reference(emu, B, h, w, H, W, dtype, mode, gen):
    cam = torch.randn(B, h, w, generator=gen) * 2
    if B >= 3:
        cam[1] = 0.5                     # constant: degenerate, all eps_low
        cam[2, 0, 0] = -math.inf         # relu(-inf) = 0: not degenerate
    if B >= 4:
        cam[3, 0, -1] = math.nan         # degenerate
    cam = cam.to(dtype)
    expected = reference.cam_eps_map(cam, (H, W), 8 / 255, 2 / 255, mode)
    got = emu.cam_eps_map(cam, H, W, 8 / 255, 2 / 255, mode == "jet")
    assert same_bits(got, expected), f"{(got != expected).sum().item()} elements differ"
    assert (expected == 8 / 255).any() and (expected == 2 / 255).any()  # both budgets occur: a real test


def test_cam_eps_map_device_code_reads_a_strided_cam(emu, gen):
    cam = torch.randn(3, 8, 6, generator=gen).transpose(1, 2)
    expected = reference.cam_eps_map(cam, (48, 64), 0.03, 0.02, "jet")
    assert same_bits(emu.cam_eps_map(cam, 48, 64, 0.03, 0.02, True), expected)


# ------------------------------------------------------------------------------------- pgd_step_ / project_
def _eps_forms(shape, dtype, channels_last, gen):
    """(name, eps tensor or None): scalar, dense in either layout, broadcast, transposed, offset storage."""
    B, C, H, W = shape

    def rand(*s):
        return torch.rand(*s, generator=gen) * 0.05

    forms = [
        ("scalar", None),
        ("dense, x dtype", rand(*shape).to(dtype)),
        ("dense float32", rand(*shape)),
        ("(B,1,H,W)", rand(B, 1, H, W)),
        ("(1,C,1,1)", rand(1, C, 1, 1).to(dtype)),
        ("(W,)", rand(W)),
        ("transposed", rand(B, C, W, H).transpose(2, 3)),
        ("channels_last float32", rand(*shape).contiguous(memory_format=torch.channels_last)),
        ("(B,1,H,W) at a storage offset", rand(1 + B * H * W)[1:].view(B, 1, H, W)),
    ]
    if channels_last:
        forms.append(("dense channels_last, x dtype", rand(*shape).to(dtype).contiguous(memory_format=torch.channels_last)))
    return forms


def copy_at_same_alignment(x: torch.Tensor) -> torch.Tensor:
    """A copy of the dense tensor x whose data pointer has x's alignment mod 16 bytes (clone() would align
    a view that starts one element into its storage, and so change which kernel instance runs)."""
    shift = (x.data_ptr() % 16) // x.element_size()
    copy = torch.empty(shift + x.numel(), dtype=x.dtype)[shift:].as_strided(x.size(), x.stride())
    copy.copy_(x)
    assert copy.data_ptr() % 16 == x.data_ptr() % 16
    return copy


def _check_pgd(emu, x, grad, x_nat, eps_map, eps, step, lo, hi, blocks, index64):
    expected = x.clone()
    budget = eps_map if eps_map is not None else eps
    if grad is not None:
        reference.pgd_step_(expected, grad, x_nat, budget, step, lo, hi)
    else:
        reference.project_(expected, x_nat, budget, lo, hi)
    got = copy_at_same_alignment(x)
    ran = tuple(emu.pgd(got, grad, x_nat, eps_map, eps, step, lo, hi, blocks, index64))
    assert same_bits(got, expected), f"{(got != expected).sum().item()} elements differ; ran {ran}"
    return ran


# (2, 8, 3, 3): channels_last rows are channel vectors, which only 8 channels fill for every dtype's VEC.
# (1, 1, 1, 1): the single-element plan.
PGD_SHAPES = [(2, 3, 7, 5), (4, 3, 16, 16), (1, 1, 1, 3), (3, 2, 5, 9), (2, 3, 8, 8), (2, 8, 3, 3), (1, 1, 1, 1)]


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_pgd_device_code_matches_reference(emu, dtype, channels_last, gen):
    layout = torch.channels_last if channels_last else torch.contiguous_format
    walks = set()
    for shape in PGD_SHAPES:
        x_nat = torch.rand(shape, generator=gen).to(dtype).contiguous(memory_format=layout)
        x = (x_nat.float() + (torch.rand(shape, generator=gen) - 0.5) * 0.1).to(dtype).contiguous(memory_format=layout)
        grad = torch.randn(shape, generator=gen).to(dtype).contiguous(memory_format=layout)
        grad[0, 0, 0, 0] = 0.0
        grad[-1, -1, -1, -1] = math.nan  # sign(NaN) = 0
        x[0, 0, 0, -1] = math.nan        # a NaN iterate stays NaN
        for name, eps_map in _eps_forms(shape, dtype, channels_last, gen):
            for index64 in (False, True):
                for blocks in (1, 3):  # one block walks the whole grid-stride loop; three split it
                    for step in (2 / 255, 0.0):
                        walks.add(_check_pgd(emu, x, grad, x_nat, eps_map, 0.03, step, 0.0, 1.0, blocks, index64))
                    walks.add(_check_pgd(emu, x, None, x_nat, eps_map, 0.03, 0.0, 0.1, 0.9, blocks, index64))
    vec = 16 // torch.empty((), dtype=dtype).element_size()
    # Every instance family ran: vector chunks, and strided eps read both by rows and by gathers.
    assert (vec, False, 0) in walks and (vec, False, 1) in walks
    assert (vec, True, 2) in walks and (vec, False, 2) in walks


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_pgd_device_code_chooses_the_walk_the_pointers_allow(emu, dtype, gen):
    vec = 16 // torch.empty((), dtype=dtype).element_size()
    shape = (2, 3, 8, 8)
    x = torch.rand(shape, generator=gen).to(dtype)
    x_nat = torch.rand(shape, generator=gen).to(dtype)
    grad = torch.randn(shape, generator=gen).to(dtype)
    budget = torch.rand(2, 1, 8, 8, generator=gen) * 0.05

    # The PART budget (B, 1, H, W) on a contiguous x: 16-byte chunks, eps read a row at a time.
    assert _check_pgd(emu, x, grad, x_nat, budget, 0.0, 0.01, 0.0, 1.0, 2, False) == (vec, True, 2)
    # The same budget one element into its storage: rows are misaligned, so eps is gathered.
    shifted = (torch.rand(1 + budget.numel(), generator=gen) * 0.05)[1:].view_as(budget)
    assert _check_pgd(emu, x, grad, x_nat, shifted, 0.0, 0.01, 0.0, 1.0, 2, False) == (vec, False, 2)
    # Rows shorter than a chunk (H * W = 6 is not a multiple of VEC): gathered.
    small = torch.rand(2, 3, 2, 3, generator=gen).to(dtype)
    assert _check_pgd(emu, small, torch.randn_like(small), torch.rand_like(small),
                      torch.rand(2, 1, 2, 3, generator=gen) * 0.05, 0.0, 0.01, 0.0, 1.0, 1, False) == (vec, False, 2)
    # x itself one element into its storage: no vector chunks at all.
    x_shifted = torch.rand(1 + x.numel(), generator=gen).to(dtype)[1:].view(shape)
    assert _check_pgd(emu, x_shifted, grad, x_nat, None, 0.03, 0.01, 0.0, 1.0, 2, False) == (1, False, 0)
    # Rows padded to 10 floats (40 B): row starts are not 16-byte aligned, so eps is gathered; padded to
    # 12 floats (48 B) they are, and rows are read with vector loads (emu.h fails any misaligned one).
    padded = (torch.rand(2, 1, 8, 10, generator=gen) * 0.05)[..., :8]
    assert _check_pgd(emu, x, grad, x_nat, padded, 0.0, 0.01, 0.0, 1.0, 2, False) == (vec, False, 2)
    padded = (torch.rand(2, 1, 8, 12, generator=gen) * 0.05)[..., :8]
    assert _check_pgd(emu, x, grad, x_nat, padded, 0.0, 0.01, 0.0, 1.0, 2, False) == (vec, True, 2)
    # A per-channel (1, C, 1, 1) eps: rows of stride 0, one eps load per chunk.
    per_channel = torch.rand(1, 3, 1, 1, generator=gen) * 0.05
    assert _check_pgd(emu, x, grad, x_nat, per_channel, 0.0, 0.01, 0.0, 1.0, 2, False) == (vec, True, 2)


def test_pgd_device_code_zero_eps_returns_the_clipped_natural_image(emu, gen):
    x = torch.rand(2, 3, 4, 4, generator=gen)
    x_nat = torch.rand(2, 3, 4, 4, generator=gen) * 1.2 - 0.1
    got = x.clone()
    emu.pgd(got, torch.randn(2, 3, 4, 4, generator=gen), x_nat, None, 0.0, 0.01, 0.0, 1.0, 1, False)
    assert torch.equal(got, x_nat.clamp(0.0, 1.0))


# ---------------------------------------------------------------------------------------- int_divider.cuh
@pytest.mark.parametrize("divisor", [1, 2, 3, 5, 7, 10, 31, 33, 224, 1000, 50176, 2**16 + 1, 2**30 - 1, 2**30,
                                     2**31 - 1])
def test_int_divider_divides_exactly(emu, divisor):
    """The 32-bit multiply-shift division the strided eps walk uses equals n // d and n % d, on the
    numerators where rounding errs first (around multiples of d) and at the top of the 32-bit index range."""
    mismatches = emu.divider_mismatches(divisor, 0, 200_000)
    top = 2**31 - 1
    mismatches += emu.divider_mismatches(divisor, top - 200_000, top + 1)
    # around the largest multiples of d below 2^31
    for k in range(1, 4):
        m = (top // divisor - k) * divisor
        if m > 0:
            mismatches += emu.divider_mismatches(divisor, m - 2, m + 2)
    assert mismatches == 0
