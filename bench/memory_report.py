"""Benchmark section 5: what PART adds in memory, and how its budget stage scales with the image size.

    python -m bench.memory_report --quick          # small sizes: under a minute on 2 cores
    python -m bench.memory_report --out mem.json   # batch 128 and 512, 32 / 64 / 224 px: several minutes

1. Peak memory of ONE optimiser step of AT, PART (ours) and PART as released (bench.step_cases: the same
   steps section 3 times; ResNet-18, PGD-k), and of the CAM + budget stage alone (ours: one batched
   `PixelBudget`; the release's per-image pipeline, part_fast.release), at batch 128 and 512.
2. Scaling: the budget stage's time and peak memory at 32x32 and 64x64 (ResNet-18: 4x4 and 8x8 CAMs) and
   224x224 (torchvision ResNet-50: 7x7 CAMs), ours against the release's, with an eval forward of the same
   batch as the yardstick. A table and a plot (PNG).

How memory is measured. On a GPU: torch.cuda.max_memory_allocated() minus memory_allocated() before the
call (peak stats reset first) - what the caching allocator handed out, the figure that decides an OOM. On
the CPU torch has no allocator statistics, so the peak resident set is read instead: every figure is
measured in a worker process whose glibc malloc gives freed memory straight back to the OS
(MALLOC_MMAP_THRESHOLD_=65536, MALLOC_TRIM_THRESHOLD_=0), so its resident set follows the live tensors; the
kernel's peak (VmHWM) is reset before the call (/proc/self/clear_refs) and the figure is the peak minus
the resident set before it. Every call is made once first, so one-time allocations (momentum buffers,
oneDNN caches) are not counted. The figure is the memory the call needs above what
stays allocated across steps (weights, optimiser state; the same for all three methods); a step starts with
no parameter .grad (zero_grad(set_to_none=True)), so the gradients are part of every step's figure. Times are measured in the harness process (glibc's default malloc), the quickest of `reps`.
Figures are reported, never asserted.
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from bench.common import Stopwatch, machine_info, show_messages, time_calls, write_json, write_readme_blocks
from bench.step_cases import release_cam_model
from part_fast.budget import PixelBudget
from part_fast.check.timing import cuda_peak_bytes
from part_fast.files import atomic_write_bytes
from part_fast.models import get_model
from part_fast.modes import eval_mode
from part_fast.release import EPS, EPS_LOW, release_eps_map

FULL = {"arch": "resnet18", "batches": (128, 512), "steps": 10, "scaling_batch": 32, "reps": 3,
        "sizes": ((32, "resnet18"), (64, "resnet18"), (224, "resnet50"))}
QUICK = {"arch": "cnn-small", "batches": (8, 32), "steps": 2, "scaling_batch": 4, "reps": 1,
         "sizes": ((32, "resnet18"), (64, "resnet18"), (96, "resnet50"))}
STEP_METHODS = (("AT", "at", False), ("PART (ours)", "part", True), ("PART (release)", "release", True))
BUDGET_IMPLS = ("ours", "release")
WORKER_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
MB = 2**20
logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------- peak memory
def _proc_status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {key}")


def peak_memory(fn, device: torch.device) -> int:
    """Bytes `fn()` needed above what was allocated before it (see the module docstring for how)."""
    if device.type == "cuda":
        return cuda_peak_bytes(fn, device)
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident set
    except OSError as err:
        raise RuntimeError(f"the CPU peak needs Linux's /proc/self/clear_refs, which cannot be written here "
                           f"({err.strerror})") from None
    before = _proc_status("VmRSS")
    fn()
    return _proc_status("VmHWM") - before


def _images(batch: int, size: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, size, size, generator=gen), torch.randint(0, 10, (batch,), generator=gen)


def _budget_call(impl: str, model, x, arch: str):
    """The CAM + budget stage of one implementation on the batch x (model in eval mode, as in training)."""
    if impl == "ours":
        budget = PixelBudget(eps=EPS, eps_low=EPS_LOW, method="gradcam", mask="jet")
        return lambda: budget(model, x)

    cam_model = release_cam_model(model, arch)

    def release():
        with eval_mode(model), np.errstate(invalid="ignore", divide="ignore"):
            release_eps_map(cam_model, x, EPS, EPS_LOW)
        for p in model.parameters():  # the release's loop leaves a .grad on every parameter
            p.grad = None

    return release


def _forward_call(model, x):
    def forward():
        with eval_mode(model), torch.no_grad():
            model(x)

    return forward


def _model(arch: str, device):
    torch.manual_seed(0)
    return get_model(arch, num_classes=10).to(device)


def measure_one(spec: dict, device: torch.device) -> int:
    """Peak bytes of one spec: {"kind": "step", "method", "arch", "batch", "steps"} or
    {"kind": "budget" | "forward", "impl", "arch", "batch", "size"}."""
    if spec["kind"] == "step":
        from bench.step_cases import Case

        name, method, phase = next(m for m in STEP_METHODS if m[0] == spec["method"])
        init = _model(spec["arch"], torch.device("cpu")).state_dict()
        case = Case(name, method, phase, spec["arch"], spec["batch"], spec["steps"], init, device=device)
        x, y = _images(spec["batch"], 32)
        x, y = x.to(device), y.to(device)
        case.step(x, y, timed=False)  # one-time allocations: momentum buffers, caches
        # Each step starts with .grad = None (as zero_grad(set_to_none=True) leaves it), so the parameter
        # gradients are counted in every method's step alike.
        return peak_memory(lambda: case.step(x, y, timed=False), device)
    model = _model(spec["arch"], device)
    x, _ = _images(spec["batch"], spec["size"])
    x = x.to(device)
    call = _budget_call(spec["impl"], model, x, spec["arch"]) if spec["kind"] == "budget" else _forward_call(model, x)
    call()
    return peak_memory(call, device)


def measure(specs: list[dict], device: torch.device) -> list[int]:
    """Peak bytes per spec: in a worker process on the CPU (see the module docstring), in-process on a GPU."""
    if device.type == "cuda":
        return [measure_one(s, device) for s in specs]
    env = {**os.environ, **WORKER_ENV}
    # The worker uses the harness's thread count (bench.run --threads), as every other section does.
    done = subprocess.run([sys.executable, "-m", "bench.memory_report", "--worker", json.dumps(specs),
                           "--worker-threads", str(torch.get_num_threads())],
                          capture_output=True, text=True, env=env, cwd=Path(__file__).resolve().parents[1])
    if done.returncode != 0:
        raise RuntimeError(f"memory worker failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _worker(specs_json: str, threads: int) -> None:
    torch.set_num_threads(threads)
    specs = json.loads(specs_json)
    print(json.dumps([measure_one(s, torch.device("cpu")) for s in specs]), flush=True)


# ------------------------------------------------------------------------------------------- the run
def run(quick: bool = False, device=torch.device("cpu")) -> dict:
    """Measure the section: the peak memory of every step and stage call and the scaling rows' times,
    JSON-able (markdown() and plot() render it)."""
    config = QUICK if quick else FULL
    device = torch.device(device)
    watch = Stopwatch()
    step_specs = [{"kind": "step", "method": m[0], "arch": config["arch"], "batch": b, "steps": config["steps"]}
                  for b in config["batches"] for m in STEP_METHODS]
    stage_specs = [{"kind": kind, "impl": impl, "arch": config["arch"], "batch": b, "size": 32}
                   for b in config["batches"] for kind, impl in (("budget", "ours"), ("budget", "release"),
                                                              ("forward", "forward"))]
    scaling_specs = [{"kind": kind, "impl": impl, "arch": arch, "batch": config["scaling_batch"], "size": size}
                     for size, arch in config["sizes"] for kind, impl in (("budget", "ours"), ("budget", "release"),
                                                                       ("forward", "forward"))]
    logger.info("memory: %d training steps, %d stage calls%s", len(step_specs), len(stage_specs) + len(scaling_specs),
                " (worker process)" if device.type == "cpu" else "")
    peaks = measure(step_specs + stage_specs + scaling_specs, device)
    for spec, peak in zip(step_specs + stage_specs + scaling_specs, peaks):
        spec["peak_mb"] = peak / MB

    logger.info("scaling: budget stage times")
    for spec in scaling_specs:
        model = _model(spec["arch"], device)
        x, _ = _images(spec["batch"], spec["size"])
        x = x.to(device)
        call = _budget_call(spec["impl"], model, x, spec["arch"]) if spec["kind"] == "budget" else _forward_call(model, x)
        spec["seconds"] = min(time_calls(call, device, config["reps"]))  # the quickest, after one warm-up call
        spec["ms_per_image"] = 1000 * spec["seconds"] / spec["batch"]
    return {"quick": quick, "config": dict(config), "device": str(device),
            "method": ("torch.cuda.max_memory_allocated - memory_allocated before" if device.type == "cuda" else
                       "peak RSS (VmHWM after /proc/self/clear_refs) minus RSS before, glibc malloc returning freed "
                       "memory (MALLOC_MMAP_THRESHOLD_=65536, MALLOC_TRIM_THRESHOLD_=0), after one warm-up call"),
            "steps": step_specs, "stage": stage_specs, "scaling": scaling_specs,
            "seconds": watch.elapsed()}


# ------------------------------------------------------------------------------------------ rendering
README_MARKERS = ("<!-- bench:memory:start -->", "<!-- bench:memory:end -->")


def readme_block(res: dict) -> str:
    """The README's bench:memory block of a standalone run (its machine included)."""
    m = res["machine"]
    where = f"GPU {m['gpu']}" if m.get("gpu") and res["device"].startswith("cuda") else \
        f"{m['cpu']} ({m['logical_cores']} cores)"
    return (f"`python -m bench.memory_report{' --quick' if res['quick'] else ''}`, {m['date'][:10]}, {where}, torch "
            f"{m['torch']}; {res['seconds']:.0f} s in all.\n\n" + markdown(res))


def _find(rows, **match):
    return next(r for r in rows if all(r.get(k) == v for k, v in match.items()))


def markdown(res: dict) -> str:
    """The section's two tables, rendered from run()'s result (or a saved run's)."""
    config = res["config"]
    steps, stage, scaling = res["steps"], res["stage"], res["scaling"]
    quick = " (quick)" if res["quick"] else ""
    lines = [f"### Peak memory of one training step{quick}: {config['arch']}, PGD-{config['steps']}, {res['device']}",
             "", f"Measured as {res['method']}.", "",
             "| batch | AT | PART (ours) | PART (release) | PART (ours) − AT | CAM + budget: ours | release | "
             "eval forward |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for b in config["batches"]:
        at, ours, rel = (_find(steps, method=m[0], batch=b)["peak_mb"] for m in STEP_METHODS)
        s_ours, s_rel, fwd = (_find(stage, impl=i, batch=b)["peak_mb"] for i in ("ours", "release", "forward"))
        lines.append(f"| {b} | {at:.0f} MB | {ours:.0f} MB | {rel:.0f} MB | {ours - at:+.0f} MB ({100 * (ours / at - 1):+.1f}%)"
                     f" | {s_ours:.0f} MB | {s_rel:.0f} MB | {fwd:.0f} MB |")
    lines += ["", f"### The budget stage against the image size{quick}: batch {config['scaling_batch']}", "",
              "| input | model | ours: ms / image | release: ms / image | release ÷ ours | ours ÷ eval forward | "
              "ours: peak MB | release: peak MB | forward: peak MB |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for size, arch in config["sizes"]:
        ours, rel, fwd = (_find(scaling, impl=i, size=size) for i in ("ours", "release", "forward"))
        lines.append(f"| {size}×{size} | {arch} | {ours['ms_per_image']:.2f} | {rel['ms_per_image']:.2f} | "
                     f"{rel['seconds'] / ours['seconds']:.1f}× | {ours['seconds'] / fwd['seconds']:.2f} | "
                     f"{ours['peak_mb']:.0f} | {rel['peak_mb']:.0f} | {fwd['peak_mb']:.0f} |")
    return "\n".join(lines)


def plot(res: dict, path: Path) -> None:
    """Two panels against the input size: ms per image and peak MB of the budget stage, ours vs the release,
    with the eval forward as the yardstick."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import LogLocator, NullLocator, ScalarFormatter

    config, rows = res["config"], res["scaling"]
    sizes = [s for s, _ in config["sizes"]]
    fig = Figure(figsize=(10, 3.8))
    FigureCanvasAgg(fig)
    ax_t, ax_m = fig.subplots(1, 2)
    # The eval forward first, wide and dashed, so that ours stays visible where the two coincide.
    styles = {"forward": dict(color="grey", ls="--", marker="s", lw=3, alpha=0.6,
                              label="eval forward of the batch (yardstick)"),
              "release": dict(color="tab:red", ls="-", marker="o", lw=1.5,
                              label="release (per-image CAM, PIL, matplotlib, numpy)"),
              "ours": dict(color="tab:blue", ls="-", marker="o", lw=1.5,
                           label="part_fast (batched CAM + fused cam_eps_map)")}
    for impl, style in styles.items():
        sub = [_find(rows, impl=impl, size=s) for s in sizes]
        ax_t.plot(sizes, [r["ms_per_image"] for r in sub], **style)
        ax_m.plot(sizes, [r["peak_mb"] for r in sub], **style)
    names = ", ".join(f"{s} px: {a}" for s, a in config["sizes"])
    for ax, ylabel in ((ax_t, "ms per image (log scale)"), (ax_m, "peak memory, MB (log scale)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticks(sizes, [f"{s}×{s}" for s in sizes])
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_locator(LogLocator(subs=(2, 5)))  # 20, 50, 200, 500: labelled, as the decades
        ax.yaxis.set_minor_formatter(ScalarFormatter())
        ax.set_xlabel(f"input size ({names})", fontsize=8)
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    ax_t.set_title(f"CAM + budget stage time, batch {config['scaling_batch']}", fontsize=9)
    ax_m.set_title(f"its peak memory ({res['device']}; ours and the forward coincide)", fontsize=9)
    ax_t.legend(fontsize=7)
    fig.tight_layout()
    atomic_write_bytes(path, lambda f: fig.savefig(f, format="png", dpi=110))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.memory_report", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (under a minute on 2 cores)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--out", default=None, help="write the JSON here (and a PNG beside it)")
    parser.add_argument("--from-json", help="measure nothing: re-render this earlier run's JSON")
    parser.add_argument("--readme", help="regenerate this README's bench:memory block from the JSON")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker-threads", type=int, default=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args.worker, args.worker_threads)
        return 0
    if args.from_json:
        res = json.loads(Path(args.from_json).read_text())
    else:
        torch.set_num_threads(2)
        show_messages(__name__, "bench")
        res = run(args.quick, torch.device(args.device))
        res["machine"] = machine_info(torch.device(args.device))
    if args.out:
        write_json(args.out, res)
        plot(res, Path(args.out).with_suffix(".png"))
    print(markdown(res))
    if args.readme:
        write_readme_blocks(args.readme, {README_MARKERS: readme_block(res)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
