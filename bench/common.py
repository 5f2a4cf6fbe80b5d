"""What the benchmark sections share; no section imports another (bench/run.py, the harness, runs them all).

- the machine a run measured (machine_info) and the backends worth timing there;
- timing, the one toolkit every section uses: calls timed one at a time (time_calls) or in blocks of
  back-to-back calls (time_blocks, block_median) after a warm-up (warm_up), wall seconds of a section or a
  step's splits (Stopwatch), the CPU other processes used meanwhile (Interference, others_now, wait_quiet),
  the runs of one case and their quickest / median (Runs), the load average; glibc's malloc set to keep
  freed memory (keep_freed_memory);
- kernel launches (kernels_per_call) and the op sections' seeded inputs (update_inputs), both from
  part_fast.check, which measures the same things on a GPU; the CIFAR-10 subset (load_cifar_subset);
- output: JSON written atomically (write_json), generated blocks in a README (readme_text,
  write_readme_blocks), "—" for a missing table cell (cell);
- progress messages: every module logs to its own `logging.getLogger(__name__)`; a program shows them with
  show_messages (bare messages on a stream, as print showed them).
"""
from __future__ import annotations

import ctypes
import datetime
import json
import logging
import os
import platform
import statistics
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

import part_fast
from part_fast import cpu_load, ops
from part_fast.check.environment import cpu_model, triton_version
from part_fast.data.folders import classes_interleaved
from part_fast.check import inputs
from part_fast.check.inputs import update_inputs  # noqa: F401 (the sections take it from here)
from part_fast.check.op_count import kernels_per_call  # noqa: F401 (idem)
from part_fast.files import (
    MarkersMissing,
    atomic_write_text,
    read_with_markers,
    replace_between_markers,
)

# The op sections' budget and step (ops_report, gpu_evidence): a mix of two eps values, so every clamp of
# the step does real work.
EPS, EPS_LOW, STEP_SIZE = inputs.EPS, inputs.EPS_LOW, inputs.STEP  # one home: part_fast.check.inputs
DEFAULT_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "cifar10-subset.tar")


# ------------------------------------------------------------------------------------------ machine
def timed_backends(device: torch.device) -> list[str]:
    """part_fast backends worth timing on `device`: compiled ones and the reference, never the Triton
    interpreter (TRITON_INTERPRET=1), which is a correctness tool."""
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    return [b for b in ops.available_backends(device) if not (b == "triton" and interpreted)]


def machine_info(device: torch.device) -> dict:
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "logical_cores": os.cpu_count(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "part_fast": part_fast.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "cuda_available": torch.cuda.is_available(),
        "triton": triton_version(),
        "backends_available": ops.available_backends(),
        "backends_timed": timed_backends(device),
        "dtype": "float32",
        "load_average_before": load_average(),
    }


# ------------------------------------------------------------------------------------------- timing
# The one timing toolkit of the harness: every section times with these, and nothing else calls perf_counter.
def synchronizer(device: torch.device) -> Callable[[], None]:
    """A function that waits for the device's queued work (a no-op on the CPU)."""
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def load_average() -> list[float]:
    """The 1, 5 and 15-minute load averages: other work on the machine skews CPU timings."""
    return list(os.getloadavg())


class Stopwatch:
    """Wall seconds since it was made (elapsed) and since the previous lap (lap): the seconds a section or a
    session took, and the split columns of a step."""

    def __init__(self):
        self.start = self.last = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def lap(self) -> float:
        now = time.perf_counter()
        seconds, self.last = now - self.last, now
        return seconds


def warm_up(fn, device: torch.device, calls: int = 1) -> None:
    """Call fn `calls` times and drain the device: lazy initialisation, allocations and caches out of the
    timed calls that follow."""
    sync = synchronizer(device)
    for _ in range(calls):
        fn()
    sync()


def time_calls(fn, device: torch.device, reps: int, warmup: int = 1) -> list[float]:
    """Wall seconds of each of `reps` calls of fn, each timed alone with the device drained, after `warmup`
    calls: for calls long enough to time one at a time (a budget stage, a forward)."""
    sync = synchronizer(device)
    warm_up(fn, device, warmup)
    times = []
    for _ in range(reps):
        watch = Stopwatch()
        fn()
        sync()
        times.append(watch.elapsed())
    return times


def time_blocks(fn, device, run_time: float, min_blocks=3, block_time=2e-3, warmup_time=0.05) -> list[float]:
    """Per-call times of blocks of back-to-back calls (a block lasts ~block_time, or one call), after a
    warm-up (the first call, then warmup_time seconds of calls); at least min_blocks blocks and run_time
    seconds: for calls too short to time one at a time (an op)."""
    sync = synchronizer(device)
    warm_up(fn, device)
    watch, warmup_calls = Stopwatch(), 0
    while warmup_calls == 0 or watch.elapsed() < warmup_time:
        fn()
        sync()
        warmup_calls += 1
    one_call = watch.elapsed() / warmup_calls
    calls_per_block = max(1, round(block_time / max(one_call, 1e-7)))
    block_means = []
    running = Stopwatch()
    while len(block_means) < min_blocks or running.elapsed() < run_time:
        block = Stopwatch()
        for _ in range(calls_per_block):
            fn()
        sync()
        block_means.append(block.elapsed() / calls_per_block)
    return block_means


def block_median(fn, device, run_time: float) -> float:
    """The median per-call seconds of time_blocks(fn, device, run_time): one round's figure of an op."""
    return statistics.median(time_blocks(fn, device, run_time))


class Interference:
    """CPU time other processes used while the block ran, in cores (0 = we had the machine; 1 = another
    process kept one of the 2 cores busy the whole time; NaN where /proc/stat cannot be read):
    part_fast.cpu_load's reading. Also the block's wall seconds (`seconds`)."""

    def __enter__(self):
        self.start = cpu_load.sample()
        return self

    def __exit__(self, *exc):
        end = cpu_load.sample()
        self.seconds = end.wall - self.start.wall
        others = cpu_load.other_cores(self.start, end)
        self.others = float("nan") if others is None else others
        return False


def others_now(interval: float = 1.0) -> float:
    """Cores other processes use now, sampled over `interval` seconds."""
    with Interference() as it:
        time.sleep(interval)
    return it.others


def wait_quiet(max_wait: float, threshold: float) -> float:
    """Wait (up to max_wait s) until other processes use < threshold cores over a 1-s sample; returns
    the seconds waited."""
    watch = Stopwatch()
    while max_wait > 0 and watch.elapsed() < max_wait and others_now() >= threshold:
        pass
    return watch.elapsed()


def minor_faults() -> int:
    """Minor page faults of this process so far (0 where getrusage is missing)."""
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    except (ImportError, OSError):
        return 0


class Runs:
    """Timed runs of one case: wall seconds and the other processes' CPU use (cores) during each, and with
    count_faults the minor page faults each run took."""

    def __init__(self, count_faults: bool = False):
        self.count_faults = count_faults
        self.seconds, self.others, self.faults = [], [], []

    def time(self, fn):
        """Run fn once, timed; returns what fn returns."""
        faults = minor_faults() if self.count_faults else 0
        with Interference() as it:
            out = fn()
        if self.count_faults:
            self.faults.append(minor_faults() - faults)
        self.add(it.seconds, it.others)
        return out

    def time_blocks(self, fn, device, run_time: float) -> None:
        """One run: the median per-call seconds of time_blocks(fn), with the CPU others used meanwhile."""
        with Interference() as it:
            seconds = block_median(fn, device, run_time)
        self.add(seconds, it.others)

    def add(self, seconds: float, others: float):
        self.seconds.append(seconds)
        self.others.append(others)

    def best(self) -> int:
        """The index of the quickest run: other work on the machine only slows a run down."""
        return min(range(len(self.seconds)), key=self.seconds.__getitem__)

    def summary(self) -> dict:
        """The quickest and the median run, every run, and the others' CPU use (and faults) of each."""
        b = self.best()
        out = {"min_s": self.seconds[b], "median_s": statistics.median(self.seconds), "runs_s": self.seconds,
               "others_cores_runs": self.others, "others_cores_best": self.others[b]}
        if self.faults:
            out |= {"minor_faults_runs": self.faults, "minor_faults_best": self.faults[b]}
        return out


def keep_freed_memory() -> bool:
    """glibc only: serve every allocation from the heap (M_MMAP_MAX = 0) and never give freed memory back
    to the OS (M_TRIM_THRESHOLD = 1 GiB), as a caching allocator (CUDA's, jemalloc's) does. With glibc's
    defaults every activation buffer above the mmap threshold (a 128x64x32x32 float32 map is 33.5 MB, over
    the 32 MB ceiling) is mmapped fresh and page-faulted in at each forward/backward: ~1.2 M minor faults
    (~5 GB of zeroed pages) per 4 PGD steps here, 20-40 % of the wall time as kernel time, and the
    amount depends on the heap's history, so identical loops differed by up to ~10 %. Returns whether
    both settings were accepted."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_max = -1, -4
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))


def load_cifar_subset(tar_path: str, split: str, n: int):
    """n images of `split` ("train"/"test"), classes round robin (part_fast.data.folders.classes_interleaved,
    the order of the data module's folder datasets), as (x, y):
    x (n, 3, 32, 32) float32 in [0, 1] (PIL RGB / 255, as ToTensor), y int64. Only those members are
    extracted, into a temporary folder that is removed afterwards."""
    from PIL import Image

    with tarfile.open(tar_path) as tf:
        members = sorted((m for m in tf.getmembers() if m.isfile() and f"/{split}/" in m.name), key=lambda m: m.name)
        classes = sorted({m.name.split("/")[-2] for m in members})
        label_of = {c: k for k, c in enumerate(classes)}
        # the data module's order: classes round robin, each in file order
        picked = classes_interleaved([(m, label_of[m.name.split("/")[-2]]) for m in members])[:n]
        with tempfile.TemporaryDirectory() as tmp:
            tf.extractall(tmp, members=[m for m, _ in picked], filter="data")
            images = [np.asarray(Image.open(os.path.join(tmp, m.name)).convert("RGB"), dtype=np.float32) / 255
                      for m, _ in picked]
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    return x, torch.tensor([label for _, label in picked])


# -------------------------------------------------------------------------------------------- output
def write_json(path: str | os.PathLike, obj, default=str) -> None:
    """obj as indented JSON at path, atomically (temp file + rename): a reader never sees half a report.
    default: what a value JSON cannot represent becomes (str: its text; None: it raises)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write_text(Path(path), json.dumps(obj, indent=1, default=default) + "\n")


def readme_text(path, markers: list[tuple[str, str]]) -> str:
    """The file's text, after checking that it holds every (start, end) marker pair; a SystemExit naming
    the missing pair otherwise (callers check before hours of work, not after)."""
    try:
        return read_with_markers(path, markers)
    except MarkersMissing as err:
        raise SystemExit(str(err)) from None


def write_readme_blocks(path, blocks: dict[tuple[str, str], str]) -> None:
    """Replace the text between each (start, end) marker pair with its body, in one atomic write; a
    SystemExit naming a missing pair, with the file untouched, otherwise."""
    try:
        replace_between_markers(path, blocks)
    except MarkersMissing as err:
        raise SystemExit(str(err)) from None


def cell(value, spec: str = "") -> str:
    """A table cell: the value formatted, or "—" where there is none."""
    return "—" if value is None else format(value, spec)


# ---------------------------------------------------------------------------------------- messages
class _WrittenMessages(logging.Handler):
    """Hands each formatted message to a write function (tqdm.write: above a progress bar)."""

    def __init__(self, write: Callable[[str], object]):
        super().__init__()
        self.write = write

    def emit(self, record):
        self.write(self.format(record))


def show_messages(*names: str, stream=None, write: Callable[[str], object] | None = None) -> None:
    """Make the named loggers print their INFO (and higher) messages bare on `stream`, flushed, as the
    harness's programs printed their progress before they logged it. A name below another one given is
    skipped (its messages reach the parent's handler), and calling again replaces the handler instead of
    adding a second.

    Args:
        names: logger names, e.g. a program's `__name__` and "bench" (every module of the harness).
        stream: where the messages go (default: sys.stderr at call time).
        write: instead of a stream, a function each message is handed to (e.g. tqdm.write).
    """
    for name in names:
        if any(name.startswith(other + ".") for other in names if other != name):
            continue
        target = logging.getLogger(name)
        for handler in [h for h in target.handlers if getattr(h, "shows_bench_messages", False)]:
            target.removeHandler(handler)
        if write is not None:
            handler = _WrittenMessages(write)
        else:
            handler = logging.StreamHandler(sys.stderr if stream is None else stream)
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler.shows_bench_messages = True
        target.addHandler(handler)
        target.setLevel(logging.INFO)
