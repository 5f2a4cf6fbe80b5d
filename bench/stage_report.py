"""Stage benchmark: the PART budget (CAM -> per-pixel eps) and PGD-10, part_fast vs the release, in ONE process.

    python -m bench.stage_report                                   # ~4-5 min on an idle 2-core CPU
    python -m bench.stage_report --out bench/results/stage_report.json --cam-reps 3 --pgd-reps 3

ResNet-18 (part_fast.models.get_model("resnet18")), batch 128 of real CIFAR-10 test images (from
../shared/data/cifar10-subset.tar; random images when it is absent), float32, eval mode. Random-init
weights give degenerate GradCAMs, so the model is made "CAM-realistic" first: BatchNorm statistics
recalibrated on 256 training images and the linear head fitted on their pooled layer4 features (see
bench/STAGE.md). Then:

1. CAM + budget stage: `PixelBudget(mask="jet")(model, x)` vs a faithful emulation of the release's
   `craft_weight_matrix` + `generate_weighted_eps` (per-image forward, torchcam-0.3.2-style GradCAM with
   a full backward through the trunk, PIL bicubic, matplotlib jet, numpy z-score). The two masks are
   compared element by element.
2. PGD-10 (eps 8/255, step 2/255, start at x for all, so the three runs do identical work and are
   deterministic): part_fast.attacks.PGD (fused pgd_step_), the same loop with the release's eager
   update, torchattacks 3.5.1 PGD (scalar eps only); plus the update phase alone (10 calls).

Markdown on stdout, JSON to --out. Figures are reported, never asserted (see bench/STAGE.md).
"""
from __future__ import annotations

import argparse
import collections
import functools
import json
import os
import statistics
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bench.common import (
    DEFAULT_DATA,
    Runs,
    Stopwatch,
    keep_freed_memory,
    kernels_per_call,
    load_average,
    load_cifar_subset,
    machine_info,
    wait_quiet,
    write_json,
)
from part_fast.release import release_eps_map, release_host_part, release_update_pgd
from part_fast import ops, reference
from part_fast.attacks import PGD
from part_fast.budget import PixelBudget
from part_fast.cam import compute_cam
from part_fast.check.op_count import OpCounter
from part_fast.models import get_model

EPS, EPS_LOW, ALPHA, STEPS = 8 / 255, 7 / 255, 2 / 255, 10
BATCH, CALIB_IMAGES, SEED = 128, 256, 0
DEFAULT_OUT = os.path.join("bench", "results", "stage_report.json")
CPU = torch.device("cpu")


# ------------------------------------------------------------------------------------------ data
def load_data(tar_path: str, n: int, n_calib: int):
    if tar_path and os.path.isfile(tar_path):
        x, y = load_cifar_subset(tar_path, "test", n)
        x_cal, y_cal = load_cifar_subset(tar_path, "train", n_calib)
        return x, y, x_cal, y_cal, f"CIFAR-10 subset ({os.path.basename(tar_path)}): {n} test images, {n_calib} train images for calibration"
    gen = torch.Generator().manual_seed(SEED)
    x, x_cal = torch.rand(n, 3, 32, 32, generator=gen), torch.rand(n_calib, 3, 32, 32, generator=gen)
    y, y_cal = torch.randint(0, 10, (n,), generator=gen), torch.randint(0, 10, (n_calib,), generator=gen)
    return x, y, x_cal, y_cal, f"random uniform images ({tar_path!r} not found)"


# ----------------------------------------------------------------------------------------- model
def cam_realistic_resnet18(x_cal: torch.Tensor, y_cal: torch.Tensor) -> tuple[nn.Module, dict]:
    """Random-init ResNet-18 made to give non-degenerate CAMs, cheaply (a few seconds):
    1. BatchNorm running statistics recomputed on x_cal (train-mode forwards, cumulative average), so
       eval-mode activations are normalised as in a trained net (with the init statistics mean 0 / var 1
       the layer4 maps are nearly constant and the argmax is decided by the bias);
    2. the linear head fitted (L-BFGS, cross-entropy + small L2) on the pooled layer4 features of x_cal,
       so predictions spread over the classes and the predicted class is driven by features.
    The trunk stays random. No parameter keeps a .grad."""
    torch.manual_seed(SEED)
    model = get_model("resnet18")
    watch = Stopwatch()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative moving average over the calibration batches
    pooled = []
    hook = model.layer4.register_forward_hook(lambda _m, _i, out: pooled.append(out.mean((2, 3))))
    model.train()
    with torch.no_grad():
        for i in range(0, len(x_cal), BATCH):
            model(x_cal[i:i + BATCH])
    hook.remove()
    model.eval()
    feats = torch.cat(pooled)
    head = model.linear
    opt = torch.optim.LBFGS(head.parameters(), max_iter=50)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(head(feats), y_cal) + 1e-3 * head.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    for p in model.parameters():
        p.grad = None
    with torch.no_grad():
        calib_acc = (head(feats).argmax(1) == y_cal).float().mean().item()
    return model, {"setup": "BN statistics recalibrated + linear head fitted (L-BFGS, 50 it) on the calibration images; trunk random",
                   "calibration_images": len(x_cal), "calibration_accuracy": calib_acc,
                   "setup_seconds": watch.elapsed()}


# ------------------------------------------------- the release's stage, counted: aten ops and bytes
def count_traffic(fn) -> dict:
    """aten ops of one call of fn (after a first call: lazy initialisation out of the count) and their
    operand bytes, counted by part_fast.check.op_count.OpCounter."""
    fn()
    with OpCounter() as c:
        fn()
    return {"ops": len(c.names), "by_op": dict(collections.Counter(c.names).most_common()),
            "bytes_read": c.bytes_read, "bytes_written": c.bytes_written}


def release_counts(model: nn.Module, x: torch.Tensor) -> dict:
    """aten ops and operand bytes of the release's loop: per image (2 images minus 1 image) and the fixed
    part per batch (the empty + copy of the batch tensor, the final torch.where)."""
    one, two = (count_traffic(lambda n=n: release_eps_map(model, x[:n])) for n in (1, 2))
    for p in model.parameters():
        p.grad = None
    per_image = {k: two[k] - one[k] for k in ("ops", "bytes_read", "bytes_written")}
    per_image["by_op"] = {k: two["by_op"][k] - one["by_op"].get(k, 0) for k in two["by_op"]}
    per_image["by_op"] = {k: v for k, v in per_image["by_op"].items() if v}
    fixed = {k: one[k] - per_image[k] for k in ("ops", "bytes_read", "bytes_written")}
    return {"per_image": per_image, "fixed_per_batch": fixed}


# ------------------------------------------------------------------------------------------ PGD
def torchattacks_update(adv, grad, images, eps, alpha):
    """torchattacks 3.5.1 PGD.forward's update, verbatim."""
    adv = adv.detach() + alpha * grad.sign()
    delta = torch.clamp(adv - images, min=-eps, max=eps)
    return torch.clamp(images + delta, min=0, max=1).detach()


# ------------------------------------------------------------------------------------- the run
class Session:
    """What every part of one run shares besides its inputs: the arguments, the progress log, the start
    (no extra PGD run starts past --time-budget) and the time spent waiting for a quiet machine."""

    def __init__(self, args):
        self.args = args
        self.log = (lambda *a: print(*a, flush=True)) if args.verbose else (lambda *a: None)
        self.watch = Stopwatch()
        self.waited_s = 0.0

    def quiet(self) -> None:
        """Called before each timed round: a round that starts on a busy machine only measures the others."""
        self.waited_s += wait_quiet(self.args.wait_quiet, self.args.quiet_cores)

    def elapsed(self) -> float:
        return self.watch.elapsed()


def choose_malloc(args) -> str:
    if args.system_malloc:
        return "system default"
    return "glibc: no mmap, no trim (freed memory kept)" if keep_freed_memory() else "system default (mallopt unavailable)"


def import_torchattacks():
    """The torchattacks module, or None: its PGD is a comparison the report can do without."""
    try:
        import torchattacks
    except ImportError:
        return None
    return torchattacks


def describe_machine(malloc: str, torchattacks) -> dict:
    """machine_info plus what the release emulation's figures depend on: the allocator and the versions
    of the libraries its host part calls."""
    import matplotlib
    import PIL

    machine = machine_info(CPU)
    machine["malloc"] = malloc
    machine["load_average_before"] = load_average()
    machine["torchattacks"] = getattr(torchattacks, "__version__", None)
    machine["matplotlib"], machine["pillow"], machine["numpy"] = matplotlib.__version__, PIL.__version__, np.__version__
    return machine


def run_config(args) -> dict:
    return {"batch": BATCH, "steps": STEPS, "eps": EPS, "eps_low": EPS_LOW, "alpha": ALPHA,
            "cam_reps": args.cam_reps, "release_reps": args.release_reps, "pgd_reps": args.pgd_reps,
            "update_rounds": args.update_rounds}


def clear_grads(model: nn.Module) -> None:
    for p in model.parameters():
        p.grad = None


def eps_label(eps_form: str) -> str:
    return "(B,3,H,W) budget map" if eps_form == "map" else "scalar 8/255"


# ------------------------------------------------------------------------ 1. CAM + budget stage
@dataclass
class CamRounds:
    """The timed runs of the CAM stage and what the release's first run left for the checks."""

    ours: Runs
    compute_cam: Runs
    release: Runs
    release_map: torch.Tensor
    raw_cams: list  # per image: the release's ReLU'd, un-normalised CAM
    preds: list  # per image: the release's predicted class
    heatmaps: list  # per image: the normalised CAM the release hands to PIL
    grads_left: int  # parameters the release's loop left a .grad on


def model_quality(cam: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> dict:
    """Whether the CAM-realistic model is realistic enough: its accuracy, the classes it predicts and the
    CAMs that are all zero (a degenerate CAM gives every pixel eps_low)."""
    with torch.no_grad():
        return {"test_accuracy": (logits.argmax(1) == y).float().mean().item(),
                "predicted_classes": torch.bincount(logits.argmax(1), minlength=10).tolist(),
                "degenerate_cams": int((cam.flatten(1).amax(1) == 0).sum())}


def time_cam_rounds(session: Session, budget: PixelBudget, model: nn.Module, x: torch.Tensor) -> CamRounds:
    """Ours, compute_cam alone and the release's loop in interleaved rounds, so a busy spell of the machine
    falls on all three."""
    args = session.args
    ours, cc, rel = Runs(count_faults=True), Runs(count_faults=True), Runs(count_faults=True)
    raw_cams, preds, heatmaps = [], [], []
    release_map = None
    for r in range(max(args.cam_reps, args.release_reps)):
        session.quiet()
        if r < args.cam_reps:
            ours.time(lambda: budget(model, x))
            cc.time(lambda: compute_cam(model, x))
        if r < args.release_reps:
            # the first round also keeps each image's raw CAM (one 4x4 clone per image: ~0.3 ms of ~5 s)
            keep = {"raw_cams": raw_cams, "preds": preds, "heatmaps": heatmaps} if r == 0 else {}
            release_map = rel.time(functools.partial(release_eps_map, model, x, **keep))
        session.log(f"cam round {r}: ours {ours.seconds[-1:]} release {rel.seconds[-1:]} others {rel.others[-1:]}")
    grads_left = sum(p.grad is not None for p in model.parameters())
    clear_grads(model)
    return CamRounds(ours, cc, rel, release_map, raw_cams, preds, heatmaps, grads_left)


def time_release_host_part(heatmaps: list, x: torch.Tensor) -> Runs:
    """The release's host part alone (PIL + matplotlib + numpy + copy back), on its own normalised CAMs."""
    runs = Runs(count_faults=True)
    for _ in range(3):
        runs.time(lambda: [release_host_part(hm, x.shape[-2], x.shape[-1], CPU) for hm in heatmaps])
    return runs


def time_cam_eps_map(cam: torch.Tensor) -> dict[str, Runs]:
    """The fused op alone per backend; a backend this build lacks keeps no runs."""
    cam_cpu = cam.contiguous()
    runs = {"cpu": Runs(), "reference": Runs()}

    def one_map():
        return ops.cam_eps_map(cam_cpu, (32, 32), EPS, EPS_LOW, "jet")

    for _ in range(3):
        for backend, backend_runs in runs.items():
            if backend not in ops.available_backends(CPU):
                continue
            with ops.use_backend(backend):
                backend_runs.time_blocks(one_map, CPU, 0.3)
    return runs


def cam_stage_checks(model: nn.Module, cam, logits, ours_map, rounds: CamRounds) -> dict:
    """Our masks against the release's: end to end, and on the release's own per-image CAMs, which
    isolates the post-CAM pipeline from the batched-vs-per-image CAM differences."""
    release_map = rounds.release_map
    release_raw = torch.stack(rounds.raw_cams)
    ours_on_release_cams = ops.cam_eps_map(release_raw, (32, 32), EPS, EPS_LOW, "jet")
    differs = ours_map != release_map
    return {
        "mask_elements": ours_map.numel(),
        "mask_mismatch_end_to_end": int(differs.sum()),
        "images_with_mismatch_end_to_end": int(differs.flatten(1).any(1).sum()),
        "mismatch_positions_end_to_end": differs.nonzero().tolist()[:20],
        "mask_mismatch_on_release_cams": int((ours_on_release_cams != release_map).sum()),
        "max_abs_diff_batched_vs_per_image_cam": (cam - release_raw).abs().max().item(),
        "predicted_class_differs_batched_vs_per_image": int((logits.argmax(1) != torch.tensor(rounds.preds)).sum()),
        "eps_fraction_high": (release_map == EPS).float().mean().item(),
        "parameter_grads_left_by_release_loop": rounds.grads_left,
        "parameter_grads_left_by_ours": sum(p.grad is not None for p in model.parameters()),
    }


def cam_stage_counts(model: nn.Module, budget: PixelBudget, x: torch.Tensor) -> dict:
    """aten ops (= kernel launches on a GPU) and operand bytes: the release's loop vs our whole batch."""
    rel_counts = release_counts(model, x)
    ours_counts = count_traffic(lambda: budget(model, x))
    cc_counts = count_traffic(lambda: compute_cam(model, x))
    per_img, fixed = rel_counts["per_image"], rel_counts["fixed_per_batch"]
    return {
        "release_per_image": per_img,
        "release_fixed_per_batch": fixed,
        "release_per_batch": {k: fixed[k] + BATCH * per_img[k] for k in ("ops", "bytes_read", "bytes_written")},
        "ours_per_batch": ours_counts,
        "ours_compute_cam_per_batch": cc_counts,
        "parameter_bytes": sum(p.nbytes for p in model.parameters()),
        "release_host_transfers_per_image_on_gpu": {
            "d2h_syncs": 2, "d2h_bytes": 8 + 4 * (x.shape[-2] // 8) * (x.shape[-1] // 8),
            "h2d_bytes": 3 * x.shape[-2] * x.shape[-1] * 4,
            "note": "output.argmax().item() (8 B + sync), heatmap.cpu() (the 4x4 float32 CAM, 64 B + sync), "
                    "process_overlay's .to(device) of the 3xHxW float32 map (12,288 B at 32x32)"},
    }


def measure_cam_stage(session: Session, model: nn.Module, x, y, model_info: dict) -> tuple[dict, dict, torch.Tensor]:
    """(the stage's figures, its checks, our budget map for the PGD part); adds the model's quality to
    model_info."""
    budget = PixelBudget(EPS, EPS_LOW, "gradcam", "jet")
    ours_map = budget(model, x)  # also the warm-up
    cam, logits = compute_cam(model, x, return_logits=True)
    model_info.update(model_quality(cam, logits, y))
    release_eps_map(model, x[:4])  # warm-up of the per-image path (batch-1 kernels, PIL, matplotlib)
    clear_grads(model)

    rounds = time_cam_rounds(session, budget, model, x)
    host_runs = time_release_host_part(rounds.heatmaps, x)
    eps_map_runs = time_cam_eps_map(cam)
    checks = cam_stage_checks(model, cam, logits, ours_map, rounds)
    counts = cam_stage_counts(model, budget, x)
    cs = {
        "ours": rounds.ours.summary(),
        "ours_compute_cam": rounds.compute_cam.summary(),
        "ours_cam_eps_map_cpu": eps_map_runs["cpu"].summary() if eps_map_runs["cpu"].seconds else None,
        "reference_cam_eps_map": eps_map_runs["reference"].summary(),
        "release": rounds.release.summary(),
        "release_host_part": host_runs.summary(),
    }
    cs["speedup"] = cs["release"]["min_s"] / cs["ours"]["min_s"]
    cs["speedup_median"] = cs["release"]["median_s"] / cs["ours"]["median_s"]
    cs["counts"] = counts
    return cs, checks, ours_map


# ------------------------------------------------------------------------------------ 2. PGD-10
def attack_loops(model: nn.Module, x, y, ours_map, torchattacks) -> tuple[PGD, object, list]:
    """(our PGD, torchattacks' or None, the loops compared as (name, eps form, run))."""
    attack = PGD(model, eps=EPS, alpha=ALPHA, steps=STEPS, start=None)
    ta = torchattacks.PGD(model, eps=EPS, alpha=ALPHA, steps=STEPS, random_start=False) if torchattacks else None
    loops = [
        ("part_fast PGD (fused pgd_step_)", "map", lambda: attack(x, y, eps_map=ours_map)),
        ("same loop, release eager update", "map", lambda: release_update_pgd(attack, x, y, ours_map)),
        ("part_fast PGD (fused pgd_step_)", "scalar", lambda: attack(x, y)),
        ("same loop, release eager update", "scalar", lambda: release_update_pgd(attack, x, y, None)),
    ]
    if ta is not None:
        loops.append(("torchattacks 3.5.1 PGD", "scalar", lambda: ta(x, y)))
    return attack, ta, loops


def warm_up_attacks(attack: PGD, ta, x, y, ours_map) -> None:
    """One step of each loop: the allocator and oneDNN's primitives for the batch-128 forward/backward."""
    attack.steps = 1
    release_update_pgd(attack, x, y, ours_map)
    attack(x, y, eps_map=ours_map)
    attack.steps = STEPS
    if ta is not None:
        ta.steps = 1
        ta(x, y)
        ta.steps = STEPS


def time_attacks(session: Session, loops: list) -> tuple[list[Runs], dict]:
    """(runs per loop, each loop's last adversarial batch) from interleaved rounds, then extra runs of
    the loops whose quickest run was disturbed, while the time budget lasts."""
    args = session.args
    runs = [Runs(count_faults=True) for _ in loops]
    outputs = {}

    def timed_round(indices, label):
        session.quiet()
        for i in indices:
            outputs[i] = runs[i].time(loops[i][2])
            session.log(f"pgd {label} {loops[i][:2]}: {runs[i].seconds[-1]:.2f}s, others {runs[i].others[-1]:.2f} cores")

    for r in range(args.pgd_reps):  # the order rotates from round to round: no loop always runs first
        timed_round([(i + r) % len(loops) for i in range(len(loops))], f"round {r}")
    while True:
        noisy = [i for i, loop_runs in enumerate(runs) if loop_runs.others[loop_runs.best()] > args.noisy_cores]
        per_run = statistics.median(s for loop_runs in runs for s in loop_runs.seconds)
        if not noisy or session.elapsed() + per_run * len(noisy) + 30 > args.time_budget:
            break
        timed_round(noisy, "extra")
    return runs, outputs


def attack_rows(loops: list, runs: list[Runs]) -> list[dict]:
    rows = []
    for (name, eps_form, _), loop_runs in zip(loops, runs):
        s = loop_runs.summary()
        rows.append({"impl": name, "eps": eps_label(eps_form), **s, "images_per_s": BATCH / s["min_s"],
                     "images_per_s_median": BATCH / s["median_s"]})
    return rows


def diff(a: torch.Tensor, b: torch.Tensor) -> dict:
    return {"max_abs_diff": (a - b).abs().max().item(), "elements_differing": int((a != b).sum()),
            "images_differing": int((a != b).flatten(1).any(1).sum())}


def one_update_checks(x_it, g_it, x, ours_map) -> dict:
    """One update from the SAME iterate and gradient: the implementations agree to float32 rounding (the
    release computes x_nat + clamp(x - x_nat), the fused op clamp(x, x_nat - eps, x_nat + eps))."""
    one = {}
    for name, eps in (("map", ours_map), ("scalar", EPS)):
        fused_one = ops.pgd_step_(x_it.clone(), g_it, x, eps, ALPHA)
        ref_one = reference.pgd_step_(x_it.clone(), g_it, x, eps, ALPHA)
        one[f"fused_vs_release_update_{name}"] = diff(fused_one, reference.pgd_step_release(x_it, g_it, x, eps, ALPHA))
        one[f"fused_vs_reference_backend_{name}"] = diff(fused_one, ref_one)
        if name == "scalar":
            one["fused_vs_torchattacks_update_scalar"] = diff(fused_one, torchattacks_update(x_it, g_it, x, EPS, ALPHA))
    return one


def end_to_end_checks(outputs: dict, x, ours_map, has_torchattacks: bool) -> dict:
    """Whole runs: over ten steps the 1-ulp differences of one update flip the sign of a few near-zero
    gradient elements and the trajectories part (PGD is chaotic at that scale); these figures measure
    that, not an error."""
    x_fused_map, x_rel_map, x_fused_s, x_rel_s = (outputs[i] for i in range(4))
    e2e = {
        "fused_vs_release_update_map": diff(x_fused_map, x_rel_map),
        "fused_vs_release_update_scalar": diff(x_fused_s, x_rel_s),
        "fused_map_within_budget": bool(((x_fused_map - x).abs() <= ours_map + 1e-6).all()),
    }
    if has_torchattacks:
        e2e["release_update_vs_torchattacks_scalar"] = diff(x_rel_s, outputs[4])
        e2e["fused_vs_torchattacks_scalar"] = diff(x_fused_s, outputs[4])
    return e2e


def update_phase_loops(x, x_mid, grad, ours_map) -> list:
    """STEPS update calls on a real gradient at a real iterate, per implementation, each from a clone of
    the iterate; the clone alone comes first, to be subtracted."""
    x_nat = x.clone()

    def fused(eps):
        def fn():
            xa = x_mid.clone()
            for _ in range(STEPS):
                ops.pgd_step_(xa, grad, x_nat, eps, ALPHA)
        return fn

    def eager(eps, update):
        def fn():
            xa = x_mid.clone()
            for _ in range(STEPS):
                xa = update(xa, grad, x_nat, eps, ALPHA)
        return fn

    return [
        ("x.clone() (subtracted from the rows below)", "—", x_mid.clone),
        ("fused pgd_step_ (cpu backend)", "map", fused(ours_map)),
        ("release eager chain", "map", eager(ours_map, reference.pgd_step_release)),
        ("fused pgd_step_ (cpu backend)", "scalar", fused(EPS)),
        ("release eager chain", "scalar", eager(EPS, reference.pgd_step_release)),
        ("torchattacks eager update", "scalar", eager(EPS, torchattacks_update)),
    ]


def time_update_phase(session: Session, loops: list) -> tuple[list[dict], float]:
    """(a row per implementation, the clone's seconds): interleaved rounds of time_blocks, the clone
    subtracted from every row."""
    runs = [Runs() for _ in loops]
    for _ in range(session.args.update_rounds):
        session.quiet()
        for (_, _, fn), loop_runs in zip(loops, runs):
            loop_runs.time_blocks(fn, CPU, 0.3)
    clone_s = runs[0].summary()["min_s"]
    rows = []
    for (name, eps_form, fn), loop_runs in zip(loops[1:], runs[1:]):
        s = loop_runs.summary()
        rows.append({"impl": name, "eps": eps_label(eps_form), "ten_calls_s": s["min_s"] - clone_s,
                     "raw_min_s": s["min_s"], "round_s": s["runs_s"], "others_cores_best": s["others_cores_best"],
                     "aten_ops_10_calls": len(kernels_per_call(fn, CPU)) - 1})  # minus the clone
    for row in rows:
        fused_row = next(r for r in rows if r["eps"] == row["eps"] and r["impl"].startswith("fused"))
        row["slower_than_fused"] = row["ten_calls_s"] / fused_row["ten_calls_s"]
    return rows, clone_s


def add_update_shares(attacks: list[dict], update_rows: list[dict]) -> None:
    """Each attack's share spent in its update, from the isolated update-phase timings."""
    for row in attacks:
        kind = "fused" if "fused" in row["impl"] else ("torchattacks" if "torchattacks" in row["impl"] else "release")
        urow = next(u for u in update_rows if u["eps"] == row["eps"] and u["impl"].startswith(kind))
        row["update_s"] = urow["ten_calls_s"]
        row["update_share_pct"] = 100 * urow["ten_calls_s"] / row["min_s"]


def add_derived_times(pgd: dict) -> None:
    """Whole runs of one attack vary by a few % on a quiet machine while the update is < 0.5 % of a run:
    "derived" = the model's part (the same in every loop) + each loop's own update time says what the
    update alone changes."""
    rows = pgd["attacks"]
    spreads = [max(r["runs_s"]) / min(r["runs_s"]) - 1 for r in rows]
    pgd["run_spread_pct_median"] = 100 * statistics.median(spreads)
    common = statistics.median(r["min_s"] - r["update_s"] for r in rows)
    pgd["model_part_s"] = common
    for r in rows:
        r["derived_s"] = common + r["update_s"]


def measure_pgd(session: Session, model: nn.Module, x, y, ours_map, torchattacks) -> tuple[dict, dict, dict]:
    """(the PGD figures, the one-update checks, the end-to-end checks)."""
    attack, ta, loops = attack_loops(model, x, y, ours_map, torchattacks)
    warm_up_attacks(attack, ta, x, y, ours_map)
    runs, outputs = time_attacks(session, loops)
    pgd = {"attacks": attack_rows(loops, runs)}
    g_it = attack._input_gradient(outputs[0], y, None)
    one = one_update_checks(outputs[0], g_it, x, ours_map)
    e2e = end_to_end_checks(outputs, x, ours_map, ta is not None)
    update_rows, clone_s = time_update_phase(session, update_phase_loops(x, outputs[0].clone(), g_it, ours_map))
    add_update_shares(pgd["attacks"], update_rows)
    pgd["update_phase"] = update_rows
    pgd["clone_s"] = clone_s
    add_derived_times(pgd)
    return pgd, one, e2e


# -------------------------------------------------------------------------------------- targets
def stage_targets(result: dict) -> list[dict]:
    """The issue's targets, reported as met / not met, never asserted."""
    cs, rows, update_rows = result["cam_stage"], result["pgd"]["attacks"], result["pgd"]["update_phase"]
    by = {(r["impl"], r["eps"]): r for r in rows}
    fused, release = "part_fast PGD (fused pgd_step_)", "same loop, release eager update"
    fmap, fs = by[(fused, eps_label("map"))], by[(fused, eps_label("scalar"))]
    rmap, rs = by[(release, eps_label("map"))], by[(release, eps_label("scalar"))]
    upd_map = next(u for u in update_rows if u["eps"].startswith("(B") and u["impl"].startswith("release"))
    # "No slower": the update is < 0.5 % of a PGD run on this CPU, while whole runs of the same attack vary by a
    # few % on a quiet machine (their spread is reported), so the measured ratio is compared with 1 - 3 %.
    parity = 0.97
    targets = [
        {"target": "CAM+budget stage: release time ÷ ours", "value": cs["speedup"], "goal": 6.0},
        {"target": "budget mask vs the release's, given the release's CAMs: mismatching elements",
         "value": result["checks"]["cam_stage"]["mask_mismatch_on_release_cams"], "goal": 0, "op": "="},
        {"target": f"update phase ({STEPS} calls): release eager chain ÷ fused, (B,3,H,W) eps", "value": upd_map["slower_than_fused"], "goal": 10.0},
        {"target": f"PGD-{STEPS} images/s: fused ÷ release update, (B,3,H,W) eps (no slower, 3 % noise allowance)",
         "value": fmap["images_per_s"] / rmap["images_per_s"], "goal": parity, "derived": rmap["derived_s"] / fmap["derived_s"]},
        {"target": f"PGD-{STEPS} images/s: fused ÷ release update, scalar eps (idem)", "value": fs["images_per_s"] / rs["images_per_s"],
         "goal": parity, "derived": rs["derived_s"] / fs["derived_s"]},
    ]
    tar = by.get(("torchattacks 3.5.1 PGD", eps_label("scalar")))
    if tar is not None:
        targets.append({"target": f"PGD-{STEPS} images/s: fused ÷ torchattacks, scalar eps (idem)", "value": fs["images_per_s"] / tar["images_per_s"],
                        "goal": parity, "derived": tar["derived_s"] / fs["derived_s"]})
    for t in targets:
        t.setdefault("op", "≥")
        t["met"] = t["value"] == t["goal"] if t["op"] == "=" else t["value"] >= t["goal"]
    return targets


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    malloc = choose_malloc(args)  # before any allocation worth timing
    session = Session(args)
    torchattacks = import_torchattacks()
    machine = describe_machine(malloc, torchattacks)
    x, y, x_cal, y_cal, data_desc = load_data(args.data, BATCH, CALIB_IMAGES)
    model, model_info = cam_realistic_resnet18(x_cal, y_cal)
    model_info["data"] = data_desc
    result = {"config": run_config(args), "machine": machine, "model": model_info, "cam_stage": {}, "pgd": {},
              "checks": {}}
    result["cam_stage"], result["checks"]["cam_stage"], ours_map = measure_cam_stage(session, model, x, y, model_info)
    machine["load_average_after_cam_stage"] = load_average()
    result["pgd"], one, e2e = measure_pgd(session, model, x, y, ours_map, torchattacks)
    result["checks"]["pgd_one_update_same_iterate"] = one
    result["checks"]["pgd_end_to_end"] = e2e
    result["targets"] = stage_targets(result)
    machine["load_average_after"] = load_average()
    machine["waited_for_quiet_s"] = session.waited_s
    machine["total_seconds"] = session.elapsed()
    return result


# -------------------------------------------------------------------------------------- output
def _mb(nbytes: float) -> str:
    return f"{nbytes / 1e6:,.1f}"


def markdown(res: dict) -> str:
    m, cs, ck = res["machine"], res["cam_stage"], res["checks"]
    BATCH, STEPS = res["config"]["batch"], res["config"]["steps"]  # the run's sizes, not this module's
    cnt = cs["counts"]
    c = ck["cam_stage"]

    def ms(d, k="min_s", f=".0f"):
        return format(1e3 * d[k], f)

    def oth(d):
        return f"{d['others_cores_best']:.2f}"

    def mb(counts):
        return _mb(counts["bytes_read"] + counts["bytes_written"])

    la = lambda k: f"{m[k][0]:.1f}"
    lines = [
        (f"{m['cpu']} ({m['logical_cores']} cores, {m['cpu_capability']}), torch {m['torch']}, {m['torch_threads']} threads, "
         f"float32, no GPU, {m['date']}; torchattacks {m['torchattacks']}, matplotlib {m['matplotlib']}, Pillow {m['pillow']}, "
         f"numpy {m['numpy']}; malloc: {m.get('malloc', 'system default')}. Total {m['total_seconds']:.0f} s, "
         f"{m['waited_for_quiet_s']:.0f} s of it waiting for quiet."),
        (f"Load average (1 min) at start / after the CAM stage / at the end: {la('load_average_before')} / "
         f"{la('load_average_after_cam_stage')} / {la('load_average_after')} (the later two include this run's own 2 threads). Every figure is the quickest of its runs; "
         "\"others\" = CPU cores other processes used during that run (/proc/stat; 0 = quiet machine, 2 = both cores taken)."),
        (f"ResNet-18, batch {BATCH}, 32×32, {res['model']['data']}; {res['model']['setup']} "
         f"(test accuracy {res['model']['test_accuracy']:.2f}, degenerate CAMs {res['model']['degenerate_cams']}/{BATCH})."),
        "",
        "### CAM + budget stage (GradCAM at layer4, jet mask, eps 8/255, eps_low 7/255)",
        "",
        "| impl | ms / batch | median ms | others | aten ops / batch | operand MB / batch | × release |",
        "|---|---:|---:|---:|---:|---:|---:|",
        (f"| release, emulated: per image fwd + full bwd (torchcam-style GradCAM), PIL bicubic, matplotlib jet, numpy z-score "
         f"| {ms(cs['release'])} | {ms(cs['release'], 'median_s')} | {oth(cs['release'])} "
         f"| {cnt['release_per_batch']['ops']:,} ({cnt['release_per_image']['ops']}/image) | {mb(cnt['release_per_batch'])} | 1.0 |"),
        (f"| ↳ its host part alone (PIL + matplotlib + numpy + copy back, {BATCH} images) | {ms(cs['release_host_part'])} "
         f"| {ms(cs['release_host_part'], 'median_s')} | {oth(cs['release_host_part'])} | — | — | — |"),
        (f"| **part_fast** `PixelBudget(mask=\"jet\")(model, x)` | {ms(cs['ours'])} | {ms(cs['ours'], 'median_s')} | {oth(cs['ours'])} "
         f"| {cnt['ours_per_batch']['ops']} | {mb(cnt['ours_per_batch'])} | **{cs['speedup']:.1f}** |"),
        (f"| ↳ `compute_cam` (one batched eval forward + head-only grad) | {ms(cs['ours_compute_cam'])} "
         f"| {ms(cs['ours_compute_cam'], 'median_s')} | {oth(cs['ours_compute_cam'])} | {cnt['ours_compute_cam_per_batch']['ops']} "
         f"| {mb(cnt['ours_compute_cam_per_batch'])} | — |"),
    ]
    if cs["ours_cam_eps_map_cpu"]:
        lines.append(f"| ↳ `cam_eps_map`, cpu backend (one fused op) | {ms(cs['ours_cam_eps_map_cpu'], f='.2f')} "
                     f"| {ms(cs['ours_cam_eps_map_cpu'], 'median_s', '.2f')} | {oth(cs['ours_cam_eps_map_cpu'])} | 1 | — | — |")
    lines += [
        (f"| `cam_eps_map`, reference backend (comparison) | {ms(cs['reference_cam_eps_map'], f='.2f')} "
         f"| {ms(cs['reference_cam_eps_map'], 'median_s', '.2f')} | {oth(cs['reference_cam_eps_map'])} | — | — | — |"),
        "",
        (f"Masks ({c['mask_elements']:,} elements): **{c['mask_mismatch_on_release_cams']} differ** when `cam_eps_map` is fed the "
         f"release's own per-image CAMs (the post-CAM pipeline is exact); end to end {c['mask_mismatch_end_to_end']} differ "
         f"({c['images_with_mismatch_end_to_end']} images), from the CAMs themselves: batched vs per-image forward max |ΔCAM| = "
         f"{c['max_abs_diff_batched_vs_per_image_cam']:.1e}, predicted class differs for {c['predicted_class_differs_batched_vs_per_image']} images. "
         f"{100 * c['eps_fraction_high']:.1f}% of elements get eps. Parameter `.grad` tensors left by the release's loop: "
         f"{c['parameter_grads_left_by_release_loop']}; by ours: {c['parameter_grads_left_by_ours']}."),
        "",
        f"### PGD-{STEPS} (eps 8/255, step 2/255, start at x, batch {BATCH}, CE loss)",
        "",
        "| attack | eps | s / run | median s | others | minor faults | images/s | update share |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in res["pgd"]["attacks"]:
        lines.append(f"| {r['impl']} | {r['eps']} | {r['min_s']:.2f} | {r['median_s']:.2f} | {r['others_cores_best']:.2f} "
                     f"| {r.get('minor_faults_best', 0):,} | {r['images_per_s']:.2f} | {r['update_share_pct']:.2f}% |")
    lines += ["", (f"Update phase alone ({STEPS} calls on a real iterate and gradient, {BATCH}×3×32×32; the x.clone() each "
              f"repetition starts from ({1e3 * res['pgd']['clone_s']:.3f} ms) is subtracted):"), "",
              f"| update | eps | ms / {STEPS} calls | others | aten ops / {STEPS} calls | × fused |", "|---|---|---:|---:|---:|---:|"]
    for u in res["pgd"]["update_phase"]:
        lines.append(f"| {u['impl']} | {u['eps']} | {1e3 * u['ten_calls_s']:.3f} | {u['others_cores_best']:.2f} "
                     f"| {u['aten_ops_10_calls']} | {u['slower_than_fused']:.1f} |")
    one, e2e = ck["pgd_one_update_same_iterate"], ck["pgd_end_to_end"]
    fmt = lambda d: f"max |Δ| {d['max_abs_diff']:.1e} ({d['elements_differing']} elements)"
    lines += ["", "One update from the same iterate and gradient: fused vs release chain "
              f"{fmt(one['fused_vs_release_update_map'])} (map), {fmt(one['fused_vs_release_update_scalar'])} (scalar); "
              f"fused vs torchattacks' update {fmt(one['fused_vs_torchattacks_update_scalar'])}; fused vs reference backend "
              f"{fmt(one['fused_vs_reference_backend_map'])}. After {STEPS} steps those float32-rounding differences have flipped "
              f"near-zero gradient signs and the trajectories part: fused vs release update {fmt(e2e['fused_vs_release_update_map'])} "
              f"in {e2e['fused_vs_release_update_map']['images_differing']} images (map)"
              + (f"; release update vs torchattacks {fmt(e2e['release_update_vs_torchattacks_scalar'])}" if "release_update_vs_torchattacks_scalar" in e2e else "")
              + f". Fused run inside its budget: {e2e['fused_map_within_budget']}.",
              "", (f"Whole PGD runs of one attack varied by {res['pgd']['run_spread_pct_median']:.1f}% (median max/min − 1) on this "
              f"machine. \"derived\" = (model part {res['pgd']['model_part_s']:.2f} s, the same in every loop, + each loop's own "
              "update-phase time) ratio: what the update alone changes."),
              "", "| target | measured | derived | goal | met |", "|---|---:|---:|---:|---|"]
    for t in res["targets"]:
        value = f"{t['value']}" if t["op"] == "=" else f"{t['value']:.2f}"
        derived = f"{t['derived']:.4f}" if "derived" in t else "—"
        lines.append(f"| {t['target']} | {value} | {derived} | {t['op']} {t['goal']:g} | {'yes' if t['met'] else 'NO'} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--data", default=DEFAULT_DATA, help="cifar10-subset.tar (random images when absent)")
    parser.add_argument("--cam-reps", type=int, default=3, help="timed runs of our CAM stage (and of compute_cam)")
    parser.add_argument("--release-reps", type=int, default=2, help="timed runs of the release's per-image CAM stage")
    parser.add_argument("--pgd-reps", type=int, default=3, help="timed runs of each PGD-10 attack (interleaved rounds), plus extra runs of disturbed cases")
    parser.add_argument("--update-rounds", type=int, default=5, help="interleaved rounds of the update-phase timings")
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"JSON output (default {DEFAULT_OUT})")
    parser.add_argument("--verbose", action="store_true", help="progress lines on stdout")
    parser.add_argument("--wait-quiet", type=float, default=0.0, metavar="S",
                        help="before each timed round wait up to S s until other processes use < --quiet-cores")
    parser.add_argument("--quiet-cores", type=float, default=0.2, help="CPU use of other processes counted as quiet (cores)")
    parser.add_argument("--noisy-cores", type=float, default=0.25,
                        help="a PGD case whose quickest run saw more other CPU use than this is re-run while --time-budget lasts")
    parser.add_argument("--time-budget", type=float, default=330.0, help="seconds after which no extra PGD runs start (default 330)")
    parser.add_argument("--batch", type=int, default=BATCH, help=f"batch size (default {BATCH}; smaller only for smoke tests)")
    parser.add_argument("--steps", type=int, default=STEPS, help=f"PGD steps and update calls (default {STEPS})")
    parser.add_argument("--system-malloc", action="store_true",
                        help="keep glibc's default malloc (mmap + trim: page faults in every forward); see keep_freed_memory")
    parser.add_argument("--render", metavar="JSON", help="print the table of a previous run's JSON and exit")
    return parser


def run_sized(args) -> dict:
    """run(args) at the size the arguments ask for: the module's BATCH and STEPS are what every part reads."""
    global BATCH, STEPS
    BATCH, STEPS = args.batch, args.steps
    return run(args)


def run_with(argv) -> dict:
    """Run the report with these command-line arguments (the harness's entry point); returns the result."""
    return run_sized(build_parser().parse_args(argv))


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    if args.render:
        with open(args.render) as f:
            print(markdown(json.load(f)))
        return
    res = run_sized(args)
    print(markdown(res))
    if args.out:
        write_json(args.out, res)


if __name__ == "__main__":
    main()
