"""Shared fixtures and helpers for the part_fast op tests.

The op tests run on every device the machine has. Without a GPU, TRITON_INTERPRET=1 makes the Triton
backend run on CPU tensors (interpreted): it must be in the environment before Triton (and part_fast, which
may import it) is first imported, so this module sets it at import time (importing torch does not import
Triton). With a GPU it is left unset: Triton then compiles for the GPU, and the comparison tests also run the
cuda and triton backends on CUDA tensors (DEVICE_BACKENDS), against the reference computed on the CPU.
"""
import os

import torch

GPU = torch.cuda.is_available()
if not GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import tarfile  # noqa: E402
import zlib  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

import part_fast  # noqa: E402
from part_fast import ops, reference  # noqa: E402
from part_fast.check.correctness import same_attack_result  # noqa: E402
from part_fast.check.inputs import same_strides_on  # noqa: E402

# Every backend usable for CPU tensors here, except the reference they are all compared against.
BACKENDS = [name for name in ops.available_backends("cpu") if name != "reference"]
# The same plus the reference, for checks every backend must pass on its own (errors, invariants).
ALL_BACKENDS = ops.available_backends("cpu")


class Target(str):
    """A backend on the device its tensors live on. It is the backend's name (what ops.use_backend takes,
    what the messages print) and carries `.device`; the tests' run() helpers move their CPU inputs there
    with the same strides and bring the result back, so a test reads the same on any device."""

    def __new__(cls, backend: str, device: str = "cpu"):
        target = super().__new__(cls, backend)
        target.device = torch.device(device)
        return target

    @property
    def on_gpu(self) -> bool:
        return self.device.type != "cpu"

    def to_device(self, t):
        return same_strides_on(t, self.device) if self.on_gpu else t


# The backends usable for CUDA tensors when there is a GPU (cuda, triton compiled for it, the reference).
GPU_ALL_BACKENDS = [Target(name, "cuda") for name in ops.available_backends("cuda")] if GPU else []
# The comparison tests' parametrisation: every backend on the CPU, and on the GPU where there is one.
DEVICE_BACKENDS = [Target(name) for name in BACKENDS] + [t for t in GPU_ALL_BACKENDS if t != "reference"]
DEVICE_ALL_BACKENDS = [Target(name) for name in ALL_BACKENDS] + GPU_ALL_BACKENDS


def target_id(backend) -> str:
    """'cpu', 'triton' on the CPU; 'cuda-on-cuda', 'triton-on-cuda' on the GPU (`-k on-cuda` selects them)."""
    device = getattr(backend, "device", torch.device("cpu"))
    return str(backend) if device.type == "cpu" else f"{backend}-on-{device.type}"

HALF_DTYPES = (torch.float16, torch.bfloat16)
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

# The Triton interpreter runs kernels in numpy, one program at a time: keep its cases at CIFAR-batch size.
TRITON_MAX_NUMEL = 400_000


def seed_of(text: str) -> int:
    return zlib.crc32(text.encode()) & 0x7FFFFFFF


@pytest.fixture
def gen(request) -> torch.Generator:
    """A CPU generator seeded by the test's node id (test name + params): fresh but reproducible inputs."""
    return torch.Generator().manual_seed(seed_of(request.node.nodeid))


@pytest.fixture(autouse=True)
def _automatic_backend():
    """Every test starts with no forced backend, whatever PART_FAST_BACKEND the runner had, and leaves the
    forced backend as it found it."""
    token = ops._forced_backend.set(None)
    yield
    ops._forced_backend.reset(token)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for modules of small models: as fast on an idle machine, and on a loaded one it
    avoids OpenMP workers spin-waiting for a core (several times slower with 2 threads on 2 busy cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# The dtypes each backend supports for CPU tensors, as documented (README "Fused ops": float32, float16,
# bfloat16, and float64 on the CPU). On CUDA tensors the cuda and triton backends reject float64 (test_cam_eps_map
# test_float64_rejected_only_where_documented checks both rules, test_documented_cpu_dtypes this table).
CPU_DTYPES = {name: DTYPES for name in ops.BACKENDS if name != "cuda"}


# On CUDA tensors: float64 is CPU-only for the compiled backends (the reference runs it anywhere).
GPU_DTYPES = {name: (DTYPES if name == "reference" else DTYPES[:3]) for name in ops.BACKENDS}


def skip_unsupported(backend: str, dtype: torch.dtype | None = None, numel: int = 0) -> None:
    """Skip, with a reason, the cases a backend does not cover on its device: a dtype it does not support
    there, or (interpreted Triton on CPU tensors) a tensor too large to run in reasonable time."""
    if getattr(backend, "on_gpu", False):
        if dtype is not None and dtype not in GPU_DTYPES[backend]:
            pytest.skip(f"backend {backend!r} does not support {dtype} on CUDA tensors (float64 is CPU-only)")
        return
    if dtype is not None and dtype not in CPU_DTYPES.get(backend, ()):
        supported = ", ".join(str(d).replace("torch.", "") for d in CPU_DTYPES.get(backend, ())) or "none"
        pytest.skip(f"backend {backend!r} does not support {dtype} on CPU tensors (supported: {supported})")
    if backend == "triton" and numel > TRITON_MAX_NUMEL:
        pytest.skip(f"triton runs interpreted on CPU (TRITON_INTERPRET=1): {numel} elements is too slow")


def rand(shape, gen, dtype=torch.float32, low=0.0, high=1.0):
    return (torch.rand(shape, generator=gen, dtype=torch.float64) * (high - low) + low).to(dtype)


def randn(shape, gen, dtype=torch.float32):
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)


def to_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    assert layout == "contiguous"
    return t.contiguous()


def attack_inputs(shape, dtype, layout, gen, eps=8 / 255):
    """x_nat in [0, 1]; x_adv = x_nat + noise of up to 2*eps (so some elements are outside the ball and
    some outside [0, 1]); grad standard normal with exact zeros, NaNs and infinities sprinkled in."""
    x_nat = rand(shape, gen)
    x_adv = x_nat + rand(shape, gen, low=-2 * eps, high=2 * eps)
    grad = randn(shape, gen)
    u = rand(shape, gen)
    grad = torch.where(u < 0.05, torch.zeros_like(grad), grad)
    grad = torch.where((u >= 0.05) & (u < 0.08), torch.full_like(grad, float("nan")), grad)
    grad = torch.where((u >= 0.08) & (u < 0.10), torch.full_like(grad, float("inf")), grad)
    grad = torch.where((u >= 0.10) & (u < 0.12), torch.full_like(grad, -float("inf")), grad)
    return tuple(to_layout(t.to(dtype), layout) for t in (x_adv, grad, x_nat))


def _ordered_bits(t: torch.Tensor) -> torch.Tensor:
    """The float's bit pattern as an integer that is monotone in the value (-0.0 and +0.0 both map to 0)."""
    bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    i = t.contiguous().view(bits).to(torch.int64)
    sign_bit = 1 << (8 * t.element_size() - 1)
    # a negative float's pattern reads as a negative integer: its magnitude bits are i + sign_bit
    return torch.where(i < 0, -(i + sign_bit), i)


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| in units in the last place of their (common) dtype, for finite values."""
    assert a.dtype == b.dtype
    return (_ordered_bits(a) - _ordered_bits(b)).abs()


def assert_same_attack_result(out: torch.Tensor, expected: torch.Tensor, backend: str) -> None:
    """pgd_step_ / project_ results of `backend` against the reference's `expected`: the math is the
    reference's, element for element, so every value must be equal, with NaN exactly where the reference
    has NaN. The sign of a zero is not compared: torch.maximum / torch.minimum themselves return +0.0 or
    -0.0 for (-0.0, +0.0) depending on whether the element falls in a vectorised chunk or the scalar tail."""
    assert backend in ops.BACKENDS and backend != "reference", (
        f"backend {backend!r}: compare one of {[b for b in ops.BACKENDS if b != 'reference']} with the reference "
        "(the reference against itself checks nothing)"
    )
    assert out.dtype == expected.dtype and out.shape == expected.shape, (
        f"backend {backend!r}: {out.dtype} {tuple(out.shape)}, reference {expected.dtype} {tuple(expected.shape)}"
    )
    same = same_attack_result(out, expected)
    if not bool(same.all()):
        first = tuple(int(i) for i in (~same).nonzero()[0])
        raise AssertionError(
            f"backend {backend!r} differs from the reference at {int((~same).sum())} of {same.numel()} elements; "
            f"first at {first}: {out[first].item()!r}, reference {expected[first].item()!r}"
        )


def backend_ids(names):
    return [f"backend={n}" for n in names]


__all__ = [
    "ALL_BACKENDS",
    "BACKENDS",
    "CPU_DTYPES",
    "DEVICE_ALL_BACKENDS",
    "DEVICE_BACKENDS",
    "DTYPES",
    "GPU",
    "GPU_ALL_BACKENDS",
    "HALF_DTYPES",
    "assert_same_attack_result",
    "attack_inputs",
    "part_fast",
    "rand",
    "randn",
    "reference",
    "seed_of",
    "skip_unsupported",
    "Target",
    "target_id",
    "to_layout",
]


# Real CIFAR-10 images in ImageFolder layout, next to the project on development and CI machines only.
CIFAR_SUBSET_TAR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10-subset.tar"


@pytest.fixture(scope="session")
def cifar_subset_dir(tmp_path_factory) -> Path:
    """cifar10-subset.tar extracted once per session: <dir>/{train,test}/<class>/NNNN.jpg."""
    if not CIFAR_SUBSET_TAR.is_file():
        pytest.skip(f"{CIFAR_SUBSET_TAR} is absent (test data outside the project; present in CI)")
    root = tmp_path_factory.mktemp("cifar10-subset")
    with tarfile.open(CIFAR_SUBSET_TAR) as archive:
        archive.extractall(root, filter="data")
    return root / "cifar10-subset"


@pytest.fixture(scope="session")
def uninterrupted_pair(tmp_path_factory) -> Path:
    """RUN_DIR of a 2-process torchrun of trainer_helpers.ELASTIC with no fault: what the fault-tolerance tests
    (one node and two) must end equal to."""
    from trainer_helpers import run_uninterrupted_pair
    return run_uninterrupted_pair(tmp_path_factory.mktemp("ddp-ref") / "run")
