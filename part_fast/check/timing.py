"""Section 4: timings on the device, side by side in one run. Figures, never verdicts: a measurement that
crashes is a failed check, a slow one is just a figure.

- the update ops: pgd_step_ per fast backend against the release's eager chain and its torch.compile, in
  GB/s of the bytes the op must move, against a device-to-device copy measured in the same run;
- launches: kernels one update and one whole PGD iteration launch (torch.profiler on a GPU, aten ops on
  the CPU);
- the CAM + budget stage against the release's per-image pipeline (part_fast.release);
- one training step of AT, PART and PART as released: the project's headline ratio.

GPU timings come from triton.testing.do_bench (L2 flushed between runs) where Triton is installed, else
CUDA events; CPU timings from perf_counter. Each figure is a median.
"""
from __future__ import annotations

import statistics
import time

import numpy as np
import torch

from .. import ops, reference
from ..attacks import PGD
from ..budget import PixelBudget
from ..models import CAM_LAYERS
from ..release import release_eps_map, release_update_pgd
from .inputs import EPS, EPS_LOW, STEP, update_inputs
from .op_count import kernels_per_call
from .runner import Context, Skipped


# ------------------------------------------------------------------------------------------- timers
def median_seconds(ctx: Context, fn, *, reps: int = 20, warmup: int = 3) -> float:
    """Median wall seconds of fn() on the device (the device drained before and after each call)."""
    if ctx.cuda:
        try:
            import triton.testing

            ms = triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=[0.5])
            return float(ms[0] if isinstance(ms, (list, tuple)) else ms) / 1e3
        except ImportError:
            pass
        times = []
        for i in range(warmup + reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            if i >= warmup:
                times.append(start.elapsed_time(end) / 1e3)
        return statistics.median(times)
    times = []
    for i in range(warmup + reps):
        t0 = time.perf_counter()
        fn()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def wall_seconds(ctx: Context, fn, reps: int) -> list[float]:
    """Wall seconds of each of `reps` calls of a long fn (a training step), the device drained around each."""
    out = []
    for _ in range(reps):
        ctx.sync()
        t0 = time.perf_counter()
        fn()
        ctx.sync()
        out.append(time.perf_counter() - t0)
    return out


# ----------------------------------------------------------------------------------------- the update
def update_shapes(ctx: Context):
    if not ctx.cuda:
        return [(128, 3, 32, 32)]
    return [(128, 3, 32, 32)] if ctx.quick else [(128, 3, 32, 32), (256, 3, 224, 224)]


def time_update(ctx: Context, shape, dtype):
    x_adv, grad, x_nat, eps = update_inputs(shape, 3, ctx.device, dtype=dtype)  # the release's (B, 3, H, W) map
    moved = x_adv.numel() * x_adv.element_size() * 4 + eps.numel() * eps.element_size()  # x_adv r+w, grad, x_nat, eps
    rows = {"copy (device to device)": median_seconds(ctx, lambda: x_adv.clone())}
    copy_gbs = 2 * x_adv.numel() * x_adv.element_size() / rows["copy (device to device)"] / 1e9
    for backend in [b for b in ops.available_backends(ctx.device) if b != "reference"]:
        with ops.use_backend(backend):
            rows[f"pgd_step_ ({backend})"] = median_seconds(ctx, lambda: ops.pgd_step_(x_adv, grad, x_nat, eps, STEP))
    rows["release eager chain"] = median_seconds(ctx, lambda: reference.pgd_step_release(x_adv, grad, x_nat, eps, STEP))
    if ctx.cuda:
        compiled = torch.compile(reference.pgd_step_release, dynamic=False)
        compiled(x_adv, grad, x_nat, eps, STEP)  # compile outside the timing
        rows["release chain, torch.compile"] = median_seconds(ctx, lambda: compiled(x_adv, grad, x_nat, eps, STEP))
    table = {name: {"us": s * 1e6, "gbs": (2 * x_adv.numel() * x_adv.element_size() if name.startswith("copy")
                                           else moved) / s / 1e9} for name, s in rows.items()}
    for name, row in table.items():
        row["pct_copy_bw"] = 100 * row["gbs"] / copy_gbs
        row["x_release"] = rows["release eager chain"] / rows[name]
    figure = "; ".join(f"{n} {r['us']:.1f} µs ({r['gbs']:.0f} GB/s, {r['pct_copy_bw']:.0f}% of copy)"
                       for n, r in table.items())
    fused = [n for n in table if n.startswith("pgd_step_")]
    best = min(fused, key=lambda n: table[n]["us"]) if fused else None
    if best is None:
        figure += "; no fused backend is usable here"
    else:
        figure += f"; fastest fused {best}: ×{table[best]['x_release']:.1f} the release's chain"
    if best is not None and "release chain, torch.compile" in table:
        figure += f", ×{rows['release chain, torch.compile'] / rows[best]:.2f} its torch.compile"
    return None, figure, {"shape": list(shape), "dtype": str(dtype), "bytes_moved": moved, "rows": table}


def count_launches(ctx: Context):
    from ..models import get_model

    shape = (128, 3, 32, 32) if ctx.cuda else (16, 3, 32, 32)

    def count(fn) -> int:
        return len(kernels_per_call(fn, ctx.device))

    x_adv, grad, x_nat, eps = update_inputs(shape, 3, ctx.device)
    fused = count(lambda: ops.pgd_step_(x_adv, grad, x_nat, eps, STEP))
    eager = count(lambda: reference.pgd_step_release(x_adv, grad, x_nat, eps, STEP))
    model = get_model("resnet18").to(ctx.device).eval()
    y = torch.zeros(shape[0], dtype=torch.long, device=ctx.device)
    ours = PGD(model, eps=EPS, alpha=STEP, steps=1, start=None)
    pgd_fused = count(lambda: ours(x_nat, y, eps_map=eps))
    pgd_release = count(lambda: release_update_pgd(ours, x_nat, y, eps))
    unit = "CUDA kernels" if ctx.cuda else "aten ops (= kernel launches on a GPU)"
    return None, (f"{unit}: one update {fused} fused vs {eager} release chain; one PGD iteration of ResNet-18 "
                  f"(forward + backward + update) {pgd_fused} vs {pgd_release}"), {
        "unit": unit, "update_fused": fused, "update_release": eager, "pgd_iteration_fused": pgd_fused,
        "pgd_iteration_release": pgd_release}


# ------------------------------------------------------------------------------------- the CAM stage
def time_budget_stage(ctx: Context):
    from ..models import get_model

    batch = 128 if ctx.cuda and not ctx.quick else (32 if ctx.cuda else 16)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = get_model("resnet18").to(ctx.device).eval()
    x = torch.rand((batch, 3, 32, 32), generator=torch.Generator().manual_seed(9)).to(ctx.device)
    budget = PixelBudget(EPS, EPS_LOW, "gradcam", "jet", layer=CAM_LAYERS["resnet18"])
    reps = 5 if ctx.cuda else 2
    ours = statistics.median(wall_seconds(ctx, lambda: budget(model, x), reps + 1)[1:])
    with np.errstate(invalid="ignore", divide="ignore"):  # the release's z-score of a constant map is 0/0
        release = statistics.median(wall_seconds(ctx, lambda: release_eps_map(model, x), 2 if ctx.cuda else 1))
    for p in model.parameters():
        p.grad = None
    detail = (f"ResNet-18, batch {batch}: PixelBudget {1e3 * ours:.1f} ms, the release's per-image pipeline "
              f"{1e3 * release:.0f} ms: ×{release / ours:.1f}")
    peaks = {}
    if ctx.cuda:
        peaks["ours"] = cuda_peak_bytes(lambda: budget(model, x), ctx.device)
        with np.errstate(invalid="ignore", divide="ignore"):
            peaks["release"] = cuda_peak_bytes(lambda: release_eps_map(model, x), ctx.device)
        for p in model.parameters():
            p.grad = None
        detail += f"; peak memory: ours {peaks['ours'] / 2**20:.0f} MB, release {peaks['release'] / 2**20:.0f} MB"
    return None, detail, {"batch": batch, "ours_s": ours, "release_s": release, "ratio": release / ours,
                          "peak_bytes": peaks}


# ------------------------------------------------------------------------------------- a training step
class _ReleaseBudget:
    """The release's per-image mask in a training step, in float32 as released (its host part reads the
    CAM with numpy, which has no bfloat16)."""

    def __init__(self, budget: PixelBudget):
        self.budget = budget

    def with_logits(self, model, x):
        with torch.autocast(x.device.type, enabled=False), np.errstate(invalid="ignore", divide="ignore"):
            return release_eps_map(model, x.float(), self.budget.eps, self.budget.eps_low), None


class _ReleaseAttack:
    """PGD with the release's global-eps start and eager update chain."""

    def __init__(self, attack: PGD):
        self.attack = attack

    def __call__(self, x, y, eps_map=None, generator=None, **_):
        return release_update_pgd(self.attack, x, y, eps_map)


def cuda_peak_bytes(fn, device: torch.device) -> int:
    """Bytes the caching allocator handed out during fn() above what was allocated before it."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


TRAIN_STEP_ROWS = (("AT", "at"), ("PART (ours)", "part"), ("PART (release)", "part"))


def _train_step_fn(ctx: Context, name: str, method: str, batch: int, steps: int, amp):
    """A closure that runs one training step of the row `name` on a fixed random batch."""
    from ..train import Distributed, TrainConfig, build_state, inner_attack, train_step

    gen = torch.Generator().manual_seed(10)
    x, y = torch.rand((batch, 3, 32, 32), generator=gen), torch.randint(0, 10, (batch,), generator=gen)
    config = TrainConfig(out="(check: no run directory)", arch="resnet18", method=method, batch_size=batch,
                         steps=steps, warmup=0, amp=amp, channels_last=ctx.cuda, device=str(ctx.device),
                         augment=False, eval_examples=0, seed=0).resolved()
    state = build_state(config, num_classes=10, device=ctx.device, ranks=Distributed())
    part_phase = method == "part"
    attack = inner_attack(state, part_phase)
    if name == "PART (release)":
        state.budget = _ReleaseBudget(state.budget)
        attack = _ReleaseAttack(PGD(state.attack_model, eps=config.eps, alpha=config.step_size, steps=config.steps,
                                    start="release", loss="ce"))
    attack_gen = torch.Generator(device=ctx.device).manual_seed(11)

    def step():
        train_step(state, x, y, part_phase=part_phase, attack=attack, attack_gen=attack_gen, augment_gen=None)

    return step


def time_train_steps(ctx: Context):
    big = ctx.cuda and not ctx.quick
    batch, steps = (128, 10) if big else ((32, 10) if ctx.cuda else (16, 2))
    amp = "bf16" if ctx.cuda else None
    results, peaks = {}, {}
    for name, method in TRAIN_STEP_ROWS:
        step = _train_step_fn(ctx, name, method, batch, steps, amp)
        times = wall_seconds(ctx, step, 4 if ctx.cuda else 2)[1:]  # the first step warms up
        results[name] = statistics.median(times)
        if ctx.cuda:  # after warm-up steps: what every later step needs above the weights and optimiser state
            peaks[name] = {batch: cuda_peak_bytes(step, ctx.device)}
            del step
            if big:
                step = _train_step_fn(ctx, name, method, 512, steps, amp)
                step()
                peaks[name][512] = cuda_peak_bytes(step, ctx.device)
                del step
            torch.cuda.empty_cache()
    at, ours, release = results["AT"], results["PART (ours)"], results["PART (release)"]
    setting = f"ResNet-18, batch {batch}, PGD-{steps}" + (", AMP bf16, channels_last" if amp else ", float32")
    detail = (f"{setting}: AT {at * 1e3:.0f} ms, PART (ours) {ours * 1e3:.0f} ms (×{ours / at:.3f} AT), "
              f"PART (release) {release * 1e3:.0f} ms (×{release / ours:.2f} ours)")
    for b in (peaks.get("AT") or {}):
        mb = {name: peaks[name][b] / 2**20 for name in peaks}
        detail += (f"; peak memory at batch {b}: AT {mb['AT']:.0f} MB, PART (ours) {mb['PART (ours)']:.0f} MB "
                   f"({100 * (mb['PART (ours)'] / mb['AT'] - 1):+.1f}%), PART (release) {mb['PART (release)']:.0f} MB")
    return None, detail, {"setting": setting, "seconds": results, "part_over_at": ours / at,
                          "release_over_part": release / ours,
                          "peak_bytes": {name: {str(b): v for b, v in by.items()} for name, by in peaks.items()}}


def _compiled_release_on_cpu():
    raise Skipped("timed on GPUs only: inductor's C++ build takes minutes on a small CPU")


def run(ctx: Context, check) -> None:
    dtypes = (torch.float32,) if not ctx.cuda else (torch.float32, torch.bfloat16)
    for shape in update_shapes(ctx):
        for dtype in dtypes:
            label = "×".join(map(str, shape)) + " " + str(dtype).replace("torch.", "")
            check(f"pgd_step_ {label}", lambda shape=shape, dtype=dtype: time_update(ctx, shape, dtype))
    if not ctx.cuda:
        check("release chain, torch.compile", _compiled_release_on_cpu)
    check("kernel launches", lambda: count_launches(ctx))
    check("CAM + budget stage vs the release", lambda: time_budget_stage(ctx))
    check("training step: AT / PART / PART as released", lambda: time_train_steps(ctx))
