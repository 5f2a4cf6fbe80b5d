"""Part 1 of the stage benchmark (bench/stage_report.py): the CAM + budget stage, ours (one batched
`PixelBudget`) against the release's per-image pipeline (part_fast.release): timed in interleaved rounds,
counted (aten ops and operand bytes, part_fast.check.op_count) and compared mask element by mask element.
"""
from __future__ import annotations

import collections
import functools
import logging
from dataclasses import dataclass

import torch
from torch import nn

from bench.common import Runs
from bench.stage_setup import CPU, EPS, EPS_LOW, Session
from part_fast import ops
from part_fast.budget import PixelBudget
from part_fast.cam import compute_cam
from part_fast.check.op_count import OpCounter
from part_fast.release import release_eps_map, release_host_part

logger = logging.getLogger(__name__)


def clear_grads(model: nn.Module) -> None:
    for p in model.parameters():
        p.grad = None


# ------------------------------------------------------------ counted: aten ops and bytes
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


# --------------------------------------------------------------------------------- measured
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
        logger.info("cam round %d: ours %s release %s others %s", r, ours.seconds[-1:], rel.seconds[-1:], rel.others[-1:])
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
        "release_per_batch": {k: fixed[k] + len(x) * per_img[k] for k in ("ops", "bytes_read", "bytes_written")},
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
