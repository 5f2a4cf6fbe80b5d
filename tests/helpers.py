"""What the tests share (conftest keeps the fixtures).

The op tests: the backends and dtypes to run, the inputs (built on part_fast.check.inputs, the one vocabulary
of eps forms and layouts that `part-fast check` uses too), the comparison with the reference, skips with their
reasons, and a pairwise covering of parameter grids.

The trainer tests: tiny runs, their weights and logs, and running the CLI / torchrun as a user would.

The op tests run on every device the machine has. Without a GPU, TRITON_INTERPRET=1 makes the Triton
backend run on CPU tensors (interpreted): it must be in the environment before Triton (and part_fast, which
may import it) is first imported, so this module sets it at import time (conftest imports it first).
With a GPU it is left unset: Triton then compiles for the GPU, and the comparison tests also run the cuda
and triton backends on CUDA tensors (DEVICE_BACKENDS), against the reference computed on the CPU.
"""
import os

import torch

GPU = torch.cuda.is_available()
if not GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import itertools  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import zlib  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from part_fast import ops  # noqa: E402
from part_fast.check.correctness import same_attack_result  # noqa: E402
from part_fast.check.inputs import (EPS, EPS_FORMS, EPS_LOW, LAYOUTS, STEP, attack_inputs,  # noqa: E402,F401
                                    distinct_eps_forms, make_eps, same_strides_on, to_layout)
from part_fast.data import ShapesDataset  # noqa: E402
from part_fast.train import TrainConfig, load_checkpoint  # noqa: E402

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


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """The same shape, dtype and values bit for bit (so NaN equals the same NaN, and -0.0 differs from +0.0):
    what an input the op must not write still holds."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    bits = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return torch.equal(a.contiguous().view(bits), b.contiguous().view(bits))


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


def pairwise(**parameters) -> list[dict]:
    """Cases covering every pair of values of every two parameters (a pairwise covering array), built
    greedily and deterministically: for 17 eps forms x 2 layouts x 4 dtypes x 5 shapes about 90 cases
    where the full product has 680. Each case is a dict {name: value}.

    Args:
        **parameters: name -> the list of its values.

    Returns:
        The cases, in a fixed order."""
    names = list(parameters)
    values = [list(parameters[n]) for n in names]
    uncovered = {(i, a, j, b) for i, j in itertools.combinations(range(len(names)), 2)
                 for a in range(len(values[i])) for b in range(len(values[j]))}
    cases = []
    while uncovered:
        # Start from the first uncovered pair, then fill every other parameter with the value that covers
        # the most pairs still uncovered (ties: the first value).
        i, a, j, b = min(uncovered)
        case = {i: a, j: b}
        for k in range(len(names)):
            if k in case:
                continue
            def gain(v, k=k):
                return sum(((min(k, m), v if k < m else case[m], max(k, m), case[m] if k < m else v) in uncovered)
                           for m in case)
            case[k] = max(range(len(values[k])), key=gain)
        for p, q in itertools.combinations(range(len(names)), 2):
            uncovered.discard((p, case[p], q, case[q]))
        cases.append({names[k]: values[k][case[k]] for k in range(len(names))})
    return cases


# ------------------------------------------------------------------------------------------ trainer
def tiny(out, **kw) -> TrainConfig:
    """A run that takes a few seconds: 96 shapes images, batches of 32, PGD-1, cnn-small."""
    base = dict(out=str(out), dataset="shapes", arch="cnn-small", method="part", epochs=3, warmup=1, lr=0.05,
                batch_size=32, steps=1, train_subset=96, test_subset=32, eval_examples=0, seed=3, progress=False)
    base.update(kw)
    return TrainConfig(**base)


def quiet(*_args):
    pass


def weights(run_dir, name="last.pt") -> dict:
    """The checkpoint's trained weights, and its weight average's as "average.<name>" when it kept one."""
    ckpt = load_checkpoint(Path(run_dir) / name)
    average = {} if ckpt.get("average") is None else {f"average.{k}": v for k, v in ckpt["average"]["model"].items()}
    return {**ckpt["model"], **average}


def assert_same_weights(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def without_timings(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if "seconds" not in k} for r in history]


def env() -> dict:
    return {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}


def cli_train(out, *flags) -> list[str]:
    return [sys.executable, "-m", "part_fast", "train", "--out", str(out), *flags]


def torchrun(*args) -> list[str]:
    exe = shutil.which("torchrun")
    return ([exe] if exe else [sys.executable, "-m", "torch.distributed.run"]) + list(args)


def step_lines(run_dir) -> list[dict]:
    path = Path(run_dir) / "steps.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def metric_lines(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def wait_for_steps(run_dir, n: int, proc: subprocess.Popen, timeout: float = 240) -> None:
    """Poll RUN_DIR/steps.jsonl until it holds n complete lines; fail if the process ends first."""
    path = Path(run_dir) / "steps.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_bytes().count(b"\n") >= n:
            return
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (exit {proc.returncode}) before step {n}")
        time.sleep(0.005)
    raise AssertionError(f"no step {n} within {timeout} s")


def worker_pids(launcher_pid: int, rank: int) -> list[int]:
    """The torchrun workers of `launcher_pid` (its child processes) that run `rank`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == launcher_pid and f"RANK={rank}".encode() in environ:
            found.append(int(entry.name))
    return found


# The reference run of the one-process stop / resume tests (conftest's mid_run): 8 steps per epoch (128 shapes
# images in batches of 16), 2 epochs (warm-up, then PART).
# The fault-tolerance runs keep a weight average (--ema-decay 0.5: the ramp t / (t + 9) for steps 1-8, then
# 0.5), so every exact-resume test checks it too; the one-process ones also perturb the weights (AWP).
MID = dict(train_subset=128, batch_size=16, epochs=2, warmup=1, log_steps=True, ema_decay=0.5, awp_gamma=5e-3)
# The same run as `part-fast train` flags: tiny()'s settings spelled out.
MID_FLAGS = ["--dataset", "shapes", "--arch", "cnn-small", "--method", "part", "--epochs", "2", "--warmup", "1",
             "--lr", "0.05", "--batch-size", "16", "--steps", "1", "--train-subset", "128", "--test-subset", "32",
             "--eval-examples", "0", "--seed", "3", "--log-steps", "--ema-decay", "0.5", "--awp-gamma", "0.005"]
MID_STEPS = 16


# The fault-tolerance runs: 8 steps per epoch (batches of 16 split over 2 ranks), PGD-5 so that a step
# takes a while, 2 epochs of which the first is the warm-up; with the recipe's additions on: a weight
# average, AWP, and a quarter of every batch (2 of each rank's 8 images) from an extra-data file, so that 96
# training images fill the 8 steps. conftest's `elastic` fixture adds `--extra-data FILE` (write_extra_shapes).
ELASTIC = ["--dataset", "shapes", "--arch", "cnn-small", "--method", "part", "--epochs", "2", "--warmup", "1",
           "--lr", "0.05", "--batch-size", "16", "--steps", "5", "--train-subset", "96", "--test-subset", "32",
           "--eval-examples", "32", "--seed", "6", "--log-steps", "--ema-decay", "0.5", "--awp-gamma", "0.005",
           "--extra-fraction", "0.25"]
ELASTIC_STEPS = 16


def write_extra_shapes(path, n: int = 64, seed: int = 11) -> Path:
    """An --extra-data file of n shapes images drawn with another seed than the training set's (generated
    data of the same kind): uint8 (n, 32, 32, 3) images and their labels."""
    import numpy as np
    generated = ShapesDataset(n, seed=seed)
    np.savez(path, images=generated.images.permute(0, 2, 3, 1).numpy(), labels=generated.labels.numpy())
    return Path(path)


def run_uninterrupted_pair(out, elastic: list[str]) -> Path:
    """A 2-process run of `elastic` (ELASTIC and its extra data) with no interruption (and no step
    checkpoints), as `torchrun --standalone`: what every faulted run must equal."""
    done = subprocess.run(torchrun("--standalone", "--nproc_per_node=2", "-m", "part_fast", "train", *elastic,
                                   "--out", str(out)), env=env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return Path(out)


def assert_equals_uninterrupted(out, ref) -> None:
    """RUN_DIR `out` ends as the uninterrupted run `ref`: the same weights, one metrics line per epoch with the
    same values, every step logged once with the same loss."""
    assert_same_weights(weights(ref), weights(out))
    assert [m["epoch"] for m in metric_lines(out)] == [1, 2], "one metrics line per epoch, none lost or doubled"
    assert without_timings(metric_lines(out)) == without_timings(metric_lines(ref))
    assert [s["global_step"] for s in step_lines(out)] == list(range(1, ELASTIC_STEPS + 1))
    assert [s["loss"] for s in step_lines(out)] == [s["loss"] for s in step_lines(ref)]
