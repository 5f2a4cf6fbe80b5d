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
import ctypes
import json
import os
import statistics
import tarfile
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from bench.ops_report import kernels_per_call, machine_info, time_blocks, write_json
from part_fast import ops, reference
from part_fast.attacks import PGD
from part_fast.budget import PixelBudget
from part_fast.cam import compute_cam
from part_fast.models import get_model

EPS, EPS_LOW, ALPHA, STEPS = 8 / 255, 7 / 255, 2 / 255, 10
BATCH, CALIB_IMAGES, SEED = 128, 256, 0
DEFAULT_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "cifar10-subset.tar")
DEFAULT_OUT = os.path.join("bench", "results", "stage_report.json")
CPU = torch.device("cpu")


# ------------------------------------------------------------------------------------------ data
def load_cifar_subset(tar_path: str, split: str, n: int):
    """n images of `split` ("train"/"test"), classes round-robin (ImageFolder class order), as (x, y):
    x (n, 3, 32, 32) float32 in [0, 1] (PIL RGB / 255, as ToTensor), y int64. Only those members are
    extracted, into a temporary folder that is removed afterwards."""
    from PIL import Image

    with tarfile.open(tar_path) as tf:
        members = sorted((m for m in tf.getmembers() if m.isfile() and f"/{split}/" in m.name), key=lambda m: m.name)
        classes = sorted({m.name.split("/")[-2] for m in members})
        per_class = {c: [m for m in members if m.name.split("/")[-2] == c] for c in classes}
        picked = [(per_class[c][i], label) for i in range(n) for label, c in enumerate(classes)][:n]
        with tempfile.TemporaryDirectory() as tmp:
            tf.extractall(tmp, members=[m for m, _ in picked], filter="data")
            images = [np.asarray(Image.open(os.path.join(tmp, m.name)).convert("RGB"), dtype=np.float32) / 255
                      for m, _ in picked]
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    return x, torch.tensor([label for _, label in picked])


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
    t0 = time.perf_counter()
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
                   "setup_seconds": time.perf_counter() - t0}


# ------------------------------------------------------------------------ the release's CAM stage
class ReleaseGradCAM:
    """torchcam 0.3.2's GradCAM as the release used it (utils.craft_weight_matrix): a forward hook on the
    target layer keeps `output.data` and registers a tensor hook for its gradient; __call__ zeroes the
    parameter gradients in place (`model.zero_grad()`, set_to_none=False was torch 1.13's default), runs
    a FULL backward of scores[:, class_idx].sum() (through the whole trunk; every parameter accumulates a
    .grad), then GradCAM: weights = spatial mean of the gradient, nansum(w * A), ReLU, min-max (no eps)."""

    def __init__(self, model: nn.Module, layer: nn.Module, keep_raw: bool = False):
        self.model, self.acts, self.grads, self.raw, self.keep_raw = model, None, None, None, keep_raw
        self.handles = [layer.register_forward_hook(self._hook_a), layer.register_forward_hook(self._hook_g)]

    def _hook_a(self, _module, _inputs, output):
        self.acts = output.data

    def _hook_g(self, _module, _inputs, output):
        output.register_hook(self._store_grad)

    def _store_grad(self, grad):
        self.grads = grad.data

    def __call__(self, class_idx: int, scores: torch.Tensor):
        loss = scores[:, class_idx].sum()
        self.model.zero_grad(set_to_none=False)
        loss.backward()
        weights = self.grads.flatten(2).mean(-1)
        with torch.no_grad():
            cam = torch.nansum(weights[..., None, None] * self.acts, dim=1)
            cam = F.relu(cam, inplace=True)
            if self.keep_raw:  # for the equality checks only, outside the timed runs' op counts
                self.raw = cam.clone()
            cam.sub_(cam.flatten(start_dim=-2).min(-1).values[..., None, None])
            cam.div_(cam.flatten(start_dim=-2).max(-1).values[..., None, None])
        return [cam]

    def remove_hooks(self):
        for h in self.handles:
            h.remove()
        self.handles.clear()


def release_host_part(heatmap: np.ndarray, img_size1: int, img_size2: int, device) -> torch.Tensor:
    """The host side of one image of the release's loop, from the normalised 2-D CAM (a float32 array,
    what `heatmap[0].squeeze(0).cpu().numpy()` gives): torchvision 0.14's to_pil_image of a float32 2-D
    array is a mode-"F" image (Image.fromarray), resized with PIL BICUBIC; matplotlib 3.7.2's
    cm.get_cmap("jet") is matplotlib.colormaps["jet"] today (a fresh copy per call then and now) applied
    to the squared map; then utils.process_overlay verbatim: RGB, z-score (numpy, population std),
    clamp(., 1, max), float32, CHW, to the device."""
    import matplotlib
    from PIL import Image

    mask = Image.fromarray(heatmap)
    overlay = mask.resize((img_size1, img_size2), resample=Image.BICUBIC)
    cmap_overlay = matplotlib.colormaps["jet"](np.asarray(overlay) ** 2)
    overlay = (255 * cmap_overlay[:, :, :3]).astype(np.double)
    normalized_overlay = overlay / 255
    mean, std = np.mean(normalized_overlay), np.std(normalized_overlay)
    weight_matrix = torch.from_numpy((normalized_overlay - mean) / std)
    return torch.clamp(weight_matrix, 1, weight_matrix.max()).float().permute(2, 0, 1).to(device)


def release_eps_map(model: nn.Module, data: torch.Tensor, eps: float = EPS, eps_low: float = EPS_LOW,
                    raw_cams: list | None = None, preds: list | None = None, heatmaps: list | None = None) -> torch.Tensor:
    """The release's craft_weight_matrix(gradcam, resnet) + generate_weighted_eps on one batch. Appends each
    image's raw (ReLU'd, un-normalised) CAM to raw_cams, its predicted class to preds and the normalised
    CAM handed to PIL to heatmaps, when given."""
    device = data.device
    batch, img_size1, img_size2 = data.shape[0], data.shape[-2], data.shape[-1]
    weight_matrix_tensor = torch.empty(batch, 3, img_size1, img_size2).to(device)
    cam_extractor = ReleaseGradCAM(model, model.layer4, keep_raw=raw_cams is not None)
    try:
        for i in range(batch):
            output = model(data[i].unsqueeze(0))
            class_idx = output.argmax().item()
            heatmap = cam_extractor(class_idx, output)
            host_input = heatmap[0].squeeze(0).cpu().numpy()
            if raw_cams is not None:
                raw_cams.append(cam_extractor.raw[0].detach().clone())
            if preds is not None:
                preds.append(class_idx)
            if heatmaps is not None:
                heatmaps.append(host_input.copy())
            weight_matrix_tensor[i] = release_host_part(host_input, img_size1, img_size2, device)
    finally:
        cam_extractor.remove_hooks()
    return torch.where(weight_matrix_tensor > 1, eps, eps_low)


class _TrafficCounter(TorchDispatchMode):
    """Per aten op (views excluded): its name and the bytes of its tensor operands read and results
    written, each counted once per op (an in-place op's tensor is read and written). `empty` allocates
    and counts nothing. A launch / traffic estimate for the same ops on a GPU, not a cache model."""

    def __init__(self):
        super().__init__()
        self.names, self.read, self.written = [], 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view:
            return out
        name = str(func.overloadpacket)
        self.names.append(name)
        if not name.startswith("aten.empty"):
            seen = set()
            for t in pytree.tree_leaves((args, kwargs or {})):
                if isinstance(t, torch.Tensor) and id(t) not in seen:
                    seen.add(id(t))
                    self.read += t.nbytes
            for t in pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    self.written += t.nbytes
        return out


def count_traffic(fn) -> dict:
    fn()  # lazy initialisation out of the count
    with _TrafficCounter() as c:
        fn()
    return {"ops": len(c.names), "by_op": dict(collections.Counter(c.names).most_common()),
            "bytes_read": c.read, "bytes_written": c.written}


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
def release_update_pgd(attack: PGD, x, y, eps_map):
    """part_fast.attacks.PGD's loop with the release's eager update (reference.pgd_step_release) in place
    of the fused pgd_step_; everything else (start, gradient) is PGD's own code."""
    x_nat = x.detach().float()
    budget = attack.eps if eps_map is None else eps_map
    was_training = attack.model.training
    attack.model.eval()
    try:
        x_adv = attack._start(x_nat, budget, None)
        for _ in range(attack.steps):
            grad = attack._input_gradient(x_adv, y, None)
            x_adv = reference.pgd_step_release(x_adv, grad, x_nat, budget, attack.alpha)
    finally:
        attack.model.train(was_training)
    return x_adv


def torchattacks_update(adv, grad, images, eps, alpha):
    """torchattacks 3.5.1 PGD.forward's update, verbatim."""
    adv = adv.detach() + alpha * grad.sign()
    delta = torch.clamp(adv - images, min=-eps, max=eps)
    return torch.clamp(images + delta, min=0, max=1).detach()


# --------------------------------------------------------------------------------------- timing
_HZ = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _cpu_jiffies():
    """(busy jiffies of the whole machine, jiffies of this process), or None off Linux."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        with open("/proc/self/stat") as f:
            own = f.read().rsplit(")", 1)[1].split()
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return sum(fields[:8]) - idle, int(own[11]) + int(own[12])  # utime + stime (all threads)
    except (OSError, ValueError, IndexError):
        return None


class Interference:
    """CPU time other processes used while the block ran, in cores (0 = we had the machine; 1 = another
    process kept one of the 2 cores busy the whole time). From /proc/stat minus this process's own time."""

    def __enter__(self):
        self.t0, self.j0 = time.perf_counter(), _cpu_jiffies()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
        j1 = _cpu_jiffies()
        if self.j0 is None or j1 is None:
            self.others = float("nan")
        else:
            others = (j1[0] - self.j0[0]) - (j1[1] - self.j0[1])
            self.others = max(0.0, others / _HZ / max(self.seconds, 1e-9))
        return False


def others_now(interval: float = 1.0) -> float:
    with Interference() as it:
        time.sleep(interval)
    return it.others


def wait_quiet(max_wait: float, threshold: float) -> float:
    """Wait (up to max_wait s) until other processes use < threshold cores over a 1-s sample; returns
    the seconds waited."""
    t0 = time.perf_counter()
    while max_wait > 0 and time.perf_counter() - t0 < max_wait and others_now() >= threshold:
        pass
    return time.perf_counter() - t0


class Runs:
    """Timed runs of one case: wall seconds and the other processes' CPU use (cores) during each."""

    def __init__(self):
        self.seconds, self.others, self.faults = [], [], []

    def time(self, fn):
        faults = _minor_faults()
        with Interference() as it:
            out = fn()
        self.faults.append(_minor_faults() - faults)
        self.seconds.append(it.seconds)
        self.others.append(it.others)
        return out

    def add(self, seconds: float, others: float):
        self.seconds.append(seconds)
        self.others.append(others)

    def best(self) -> int:
        return min(range(len(self.seconds)), key=self.seconds.__getitem__)

    def summary(self) -> dict:
        b = self.best()
        out = {"min_s": self.seconds[b], "median_s": statistics.median(self.seconds), "runs_s": self.seconds,
               "others_cores_runs": self.others, "others_cores_best": self.others[b]}
        if self.faults:
            out |= {"minor_faults_runs": self.faults, "minor_faults_best": self.faults[b]}
        return out


def _loadavg():
    return list(os.getloadavg())


def _minor_faults() -> int:
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    except (ImportError, OSError):
        return 0


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


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    malloc = "system default" if args.system_malloc else (
        "glibc: no mmap, no trim (freed memory kept)" if keep_freed_memory() else "system default (mallopt unavailable)")
    t_start = time.perf_counter()
    machine = machine_info(CPU)
    machine["malloc"] = malloc
    machine["load_average_before"] = _loadavg()
    try:
        import torchattacks
    except ImportError:
        torchattacks = None
    machine["torchattacks"] = getattr(torchattacks, "__version__", None)
    import matplotlib
    import PIL

    machine["matplotlib"], machine["pillow"], machine["numpy"] = matplotlib.__version__, PIL.__version__, np.__version__
    log = (lambda *a: print(*a, flush=True)) if args.verbose else (lambda *a: None)
    waited = [0.0]

    def quiet():  # before each timed round
        waited[0] += wait_quiet(args.wait_quiet, args.quiet_cores)

    x, y, x_cal, y_cal, data_desc = load_data(args.data, BATCH, CALIB_IMAGES)
    model, model_info = cam_realistic_resnet18(x_cal, y_cal)
    model_info["data"] = data_desc
    result = {"config": {"batch": BATCH, "steps": STEPS, "eps": EPS, "eps_low": EPS_LOW, "alpha": ALPHA,
                         "cam_reps": args.cam_reps, "release_reps": args.release_reps, "pgd_reps": args.pgd_reps,
                         "update_rounds": args.update_rounds},
              "machine": machine, "model": model_info, "cam_stage": {}, "pgd": {}, "checks": {}}

    # -------------------------------------------------------------- 1. CAM + budget stage
    budget = PixelBudget(EPS, EPS_LOW, "gradcam", "jet")
    ours_map = budget(model, x)  # warm-up
    cam, logits = compute_cam(model, x, return_logits=True)
    with torch.no_grad():
        model_info["test_accuracy"] = (logits.argmax(1) == y).float().mean().item()
        model_info["predicted_classes"] = torch.bincount(logits.argmax(1), minlength=10).tolist()
        model_info["degenerate_cams"] = int((cam.flatten(1).amax(1) == 0).sum())
    release_eps_map(model, x[:4])  # warm-up of the per-image path (batch-1 kernels, PIL, matplotlib)
    for p in model.parameters():
        p.grad = None

    ours_runs, cc_runs, rel_runs = Runs(), Runs(), Runs()
    raw_cams: list[torch.Tensor] = []
    release_preds: list[int] = []
    heatmaps: list[np.ndarray] = []
    release_map = None
    for r in range(max(args.cam_reps, args.release_reps)):  # interleaved rounds
        quiet()
        if r < args.cam_reps:
            ours_runs.time(lambda: budget(model, x))
            cc_runs.time(lambda: compute_cam(model, x))
        if r < args.release_reps:
            # the first round also keeps each image's raw CAM (one 4x4 clone per image: ~0.3 ms of ~5 s)
            capture = r == 0
            release_map = rel_runs.time(lambda: release_eps_map(
                model, x, raw_cams=raw_cams if capture else None, preds=release_preds if capture else None,
                heatmaps=heatmaps if capture else None))
        log(f"cam round {r}: ours {ours_runs.seconds[-1:]} release {rel_runs.seconds[-1:]} others {rel_runs.others[-1:]}")
    grads_left = sum(p.grad is not None for p in model.parameters())
    for p in model.parameters():
        p.grad = None

    # the release's host part alone (PIL + matplotlib + numpy + copy back), on its own normalised CAMs
    host_runs = Runs()
    for _ in range(3):
        host_runs.time(lambda: [release_host_part(hm, x.shape[-2], x.shape[-1], CPU) for hm in heatmaps])

    cam_cpu = cam.contiguous()
    eps_map_runs = {"cpu": Runs(), "reference": Runs()}
    for _ in range(3):
        for backend, runs in eps_map_runs.items():
            if backend not in ops.available_backends(CPU):
                continue
            with ops.use_backend(backend), Interference() as it:
                blocks = time_blocks(lambda: ops.cam_eps_map(cam_cpu, (32, 32), EPS, EPS_LOW, "jet"), CPU, 0.3)
            runs.add(statistics.median(blocks), it.others)

    # equality: end to end, and on the release's own per-image CAMs (isolates the post-CAM pipeline)
    release_raw = torch.stack(raw_cams)
    ours_on_release_cams = ops.cam_eps_map(release_raw, (32, 32), EPS, EPS_LOW, "jet")
    differs = ours_map != release_map
    result["checks"]["cam_stage"] = {
        "mask_elements": ours_map.numel(),
        "mask_mismatch_end_to_end": int(differs.sum()),
        "images_with_mismatch_end_to_end": int(differs.flatten(1).any(1).sum()),
        "mismatch_positions_end_to_end": differs.nonzero().tolist()[:20],
        "mask_mismatch_on_release_cams": int((ours_on_release_cams != release_map).sum()),
        "max_abs_diff_batched_vs_per_image_cam": (cam - release_raw).abs().max().item(),
        "predicted_class_differs_batched_vs_per_image": int((logits.argmax(1) != torch.tensor(release_preds)).sum()),
        "eps_fraction_high": (release_map == EPS).float().mean().item(),
        "parameter_grads_left_by_release_loop": grads_left,
        "parameter_grads_left_by_ours": sum(p.grad is not None for p in model.parameters()),
    }

    # aten ops (= kernel launches on a GPU) and operand bytes: the release's loop vs our whole batch
    rel_counts = release_counts(model, x)
    ours_counts = count_traffic(lambda: budget(model, x))
    cc_counts = count_traffic(lambda: compute_cam(model, x))
    cs = result["cam_stage"]
    cs["ours"] = ours_runs.summary()
    cs["ours_compute_cam"] = cc_runs.summary()
    cs["ours_cam_eps_map_cpu"] = eps_map_runs["cpu"].summary() if eps_map_runs["cpu"].seconds else None
    cs["reference_cam_eps_map"] = eps_map_runs["reference"].summary()
    cs["release"] = rel_runs.summary()
    cs["release_host_part"] = host_runs.summary()
    cs["speedup"] = cs["release"]["min_s"] / cs["ours"]["min_s"]
    cs["speedup_median"] = cs["release"]["median_s"] / cs["ours"]["median_s"]
    per_img, fixed = rel_counts["per_image"], rel_counts["fixed_per_batch"]
    cs["counts"] = {
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
    machine["load_average_after_cam_stage"] = _loadavg()

    # ------------------------------------------------------------------------------ 2. PGD-10
    attack = PGD(model, eps=EPS, alpha=ALPHA, steps=STEPS, start=None)
    ta = torchattacks.PGD(model, eps=EPS, alpha=ALPHA, steps=STEPS, random_start=False) if torchattacks else None
    configs = [
        ("part_fast PGD (fused pgd_step_)", "map", lambda: attack(x, y, eps_map=ours_map)),
        ("same loop, release eager update", "map", lambda: release_update_pgd(attack, x, y, ours_map)),
        ("part_fast PGD (fused pgd_step_)", "scalar", lambda: attack(x, y)),
        ("same loop, release eager update", "scalar", lambda: release_update_pgd(attack, x, y, None)),
    ]
    if ta is not None:
        configs.append(("torchattacks 3.5.1 PGD", "scalar", lambda: ta(x, y)))
    # warm-up: one step of each loop (allocator, oneDNN primitives for the batch-128 forward/backward)
    attack.steps = 1
    release_update_pgd(attack, x, y, ours_map)
    attack(x, y, eps_map=ours_map)
    attack.steps = STEPS
    if ta is not None:
        ta.steps = 1
        ta(x, y)
        ta.steps = STEPS
    pgd_runs = [Runs() for _ in configs]
    outputs = {}

    def pgd_round(indices, label):
        quiet()
        for i in indices:
            outputs[i] = pgd_runs[i].time(configs[i][2])
            log(f"pgd {label} {configs[i][:2]}: {pgd_runs[i].seconds[-1]:.2f}s, others {pgd_runs[i].others[-1]:.2f} cores")

    for r in range(args.pgd_reps):  # the order rotates from round to round: no case always runs first
        pgd_round([(i + r) % len(configs) for i in range(len(configs))], f"round {r}")
    # extra runs, while the time budget lasts, for the cases whose quickest run was disturbed
    while True:
        noisy = [i for i, runs in enumerate(pgd_runs) if runs.others[runs.best()] > args.noisy_cores]
        per_run = statistics.median(s for runs in pgd_runs for s in runs.seconds)
        if not noisy or time.perf_counter() - t_start + per_run * len(noisy) + 30 > args.time_budget:
            break
        pgd_round(noisy, "extra")
    rows = []
    for i, (name, eps_form, _) in enumerate(configs):
        s = pgd_runs[i].summary()
        rows.append({"impl": name, "eps": "(B,3,H,W) budget map" if eps_form == "map" else "scalar 8/255",
                     **s, "images_per_s": BATCH / s["min_s"], "images_per_s_median": BATCH / s["median_s"]})
    result["pgd"]["attacks"] = rows
    x_fused_map, x_rel_map, x_fused_s, x_rel_s = (outputs[i] for i in range(4))

    def diff(a, b):
        return {"max_abs_diff": (a - b).abs().max().item(), "elements_differing": int((a != b).sum()),
                "images_differing": int((a != b).flatten(1).any(1).sum())}

    # One update from the SAME iterate and gradient: the implementations agree to float32 rounding (the
    # release computes x_nat + clamp(x - x_nat), the fused op clamp(x, x_nat - eps, x_nat + eps)). Over ten
    # steps those 1-ulp differences flip the sign of a few near-zero gradient elements and the trajectories
    # part (PGD is chaotic at that scale): the end-to-end figures measure that, not an error.
    x_it = outputs[0]
    g_it = attack._input_gradient(x_it, y, None)
    one = {}
    for name, eps in (("map", ours_map), ("scalar", EPS)):
        fused_one = ops.pgd_step_(x_it.clone(), g_it, x, eps, ALPHA)
        ref_one = reference.pgd_step_(x_it.clone(), g_it, x, eps, ALPHA)
        one[f"fused_vs_release_update_{name}"] = diff(fused_one, reference.pgd_step_release(x_it, g_it, x, eps, ALPHA))
        one[f"fused_vs_reference_backend_{name}"] = diff(fused_one, ref_one)
        if name == "scalar":
            one["fused_vs_torchattacks_update_scalar"] = diff(fused_one, torchattacks_update(x_it, g_it, x, EPS, ALPHA))
    result["checks"]["pgd_one_update_same_iterate"] = one
    result["checks"]["pgd_end_to_end"] = {
        "fused_vs_release_update_map": diff(x_fused_map, x_rel_map),
        "fused_vs_release_update_scalar": diff(x_fused_s, x_rel_s),
        "fused_map_within_budget": bool(((x_fused_map - x).abs() <= ours_map + 1e-6).all()),
    }
    if ta is not None:
        result["checks"]["pgd_end_to_end"]["release_update_vs_torchattacks_scalar"] = diff(x_rel_s, outputs[4])
        result["checks"]["pgd_end_to_end"]["fused_vs_torchattacks_scalar"] = diff(x_fused_s, outputs[4])

    # the update phase alone: STEPS calls on a real gradient at a real iterate
    x_nat = x.clone()
    x_mid = outputs[0].clone()
    grad = g_it

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

    update_cases = [
        ("x.clone() (subtracted from the rows below)", "—", x_mid.clone),
        ("fused pgd_step_ (cpu backend)", "map", fused(ours_map)),
        ("release eager chain", "map", eager(ours_map, reference.pgd_step_release)),
        ("fused pgd_step_ (cpu backend)", "scalar", fused(EPS)),
        ("release eager chain", "scalar", eager(EPS, reference.pgd_step_release)),
        ("torchattacks eager update", "scalar", eager(EPS, torchattacks_update)),
    ]
    upd = [Runs() for _ in update_cases]
    for _ in range(args.update_rounds):
        quiet()
        for i, (_, _, fn) in enumerate(update_cases):
            with Interference() as it:
                blocks = time_blocks(fn, CPU, 0.3)
            upd[i].add(statistics.median(blocks), it.others)
    clone_s = upd[0].summary()["min_s"]
    update_rows = []
    for i, (name, eps_form, fn) in enumerate(update_cases[1:], start=1):
        s = upd[i].summary()
        update_rows.append({"impl": name, "eps": "(B,3,H,W) budget map" if eps_form == "map" else "scalar 8/255",
                            "ten_calls_s": s["min_s"] - clone_s, "raw_min_s": s["min_s"], "round_s": s["runs_s"],
                            "others_cores_best": s["others_cores_best"],
                            "aten_ops_10_calls": len(kernels_per_call(fn, CPU)) - 1})  # minus the clone
    for row in update_rows:
        fused_row = next(r for r in update_rows if r["eps"] == row["eps"] and r["impl"].startswith("fused"))
        row["slower_than_fused"] = row["ten_calls_s"] / fused_row["ten_calls_s"]
    for row in rows:  # share of the attack spent in the update, from the isolated timings
        kind = "fused" if "fused" in row["impl"] else ("torchattacks" if "torchattacks" in row["impl"] else "release")
        urow = next(u for u in update_rows if u["eps"] == row["eps"] and u["impl"].startswith(kind))
        row["update_s"] = urow["ten_calls_s"]
        row["update_share_pct"] = 100 * urow["ten_calls_s"] / row["min_s"]
    result["pgd"]["update_phase"] = update_rows
    result["pgd"]["clone_s"] = clone_s

    # ----------------------------------------------------------------------------- targets
    by = {(r["impl"], r["eps"]): r for r in rows}
    fmap, fs = by[("part_fast PGD (fused pgd_step_)", "(B,3,H,W) budget map")], by[("part_fast PGD (fused pgd_step_)", "scalar 8/255")]
    rmap, rs = by[("same loop, release eager update", "(B,3,H,W) budget map")], by[("same loop, release eager update", "scalar 8/255")]
    upd_map = next(u for u in update_rows if u["eps"].startswith("(B") and u["impl"].startswith("release"))
    # "No slower": the update is < 0.5 % of a PGD run on this CPU, while whole runs of the same attack vary by a
    # few % on a quiet machine (their spread is reported), so the measured ratio is compared with 1 - 3 %.
    parity = 0.97
    spreads = [max(r["runs_s"]) / min(r["runs_s"]) - 1 for r in rows]
    result["pgd"]["run_spread_pct_median"] = 100 * statistics.median(spreads)
    common = statistics.median(r["min_s"] - r["update_s"] for r in rows)  # the model's share, the same in all
    result["pgd"]["model_part_s"] = common
    for r in rows:
        r["derived_s"] = common + r["update_s"]
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
    if ta is not None:
        tar = by[("torchattacks 3.5.1 PGD", "scalar 8/255")]
        targets.append({"target": f"PGD-{STEPS} images/s: fused ÷ torchattacks, scalar eps (idem)", "value": fs["images_per_s"] / tar["images_per_s"],
                        "goal": parity, "derived": tar["derived_s"] / fs["derived_s"]})
    for t in targets:
        t.setdefault("op", "≥")
        t["met"] = t["value"] == t["goal"] if t["op"] == "=" else t["value"] >= t["goal"]
    result["targets"] = targets
    machine["load_average_after"] = _loadavg()
    machine["waited_for_quiet_s"] = waited[0]
    machine["total_seconds"] = time.perf_counter() - t_start
    return result


# -------------------------------------------------------------------------------------- output
def _mb(nbytes: float) -> str:
    return f"{nbytes / 1e6:,.1f}"


def markdown(res: dict) -> str:
    m, cs, ck = res["machine"], res["cam_stage"], res["checks"]
    BATCH, STEPS = res["config"]["batch"], res["config"]["steps"]  # noqa: N806 (the run's, not this module's)
    cnt = cs["counts"]
    c = ck["cam_stage"]

    def ms(d, k="min_s", f=".0f"):
        return format(1e3 * d[k], f)

    def oth(d):
        return f"{d['others_cores_best']:.2f}"

    def mb(counts):
        return _mb(counts["bytes_read"] + counts["bytes_written"])

    la = lambda k: f"{m[k][0]:.1f}"  # noqa: E731
    lines = [
        f"{m['cpu']} ({m['logical_cores']} cores, {m['cpu_capability']}), torch {m['torch']}, {m['torch_threads']} threads, "
        f"float32, no GPU, {m['date']}; torchattacks {m['torchattacks']}, matplotlib {m['matplotlib']}, Pillow {m['pillow']}, "
        f"numpy {m['numpy']}; malloc: {m.get('malloc', 'system default')}. Total {m['total_seconds']:.0f} s, "
        f"{m['waited_for_quiet_s']:.0f} s of it waiting for quiet.",
        f"Load average (1 min) at start / after the CAM stage / at the end: {la('load_average_before')} / "
        f"{la('load_average_after_cam_stage')} / {la('load_average_after')} (the later two include this run's own 2 threads). Every figure is the quickest of its runs; "
        "\"others\" = CPU cores other processes used during that run (/proc/stat; 0 = quiet machine, 2 = both cores taken).",
        f"ResNet-18, batch {BATCH}, 32×32, {res['model']['data']}; {res['model']['setup']} "
        f"(test accuracy {res['model']['test_accuracy']:.2f}, degenerate CAMs {res['model']['degenerate_cams']}/{BATCH}).",
        "",
        "### CAM + budget stage (GradCAM at layer4, jet mask, eps 8/255, eps_low 7/255)",
        "",
        "| impl | ms / batch | median ms | others | aten ops / batch | operand MB / batch | × release |",
        "|---|---:|---:|---:|---:|---:|---:|",
        f"| release, emulated: per image fwd + full bwd (torchcam-style GradCAM), PIL bicubic, matplotlib jet, numpy z-score "
        f"| {ms(cs['release'])} | {ms(cs['release'], 'median_s')} | {oth(cs['release'])} "
        f"| {cnt['release_per_batch']['ops']:,} ({cnt['release_per_image']['ops']}/image) | {mb(cnt['release_per_batch'])} | 1.0 |",
        f"| ↳ its host part alone (PIL + matplotlib + numpy + copy back, {BATCH} images) | {ms(cs['release_host_part'])} "
        f"| {ms(cs['release_host_part'], 'median_s')} | {oth(cs['release_host_part'])} | — | — | — |",
        f"| **part_fast** `PixelBudget(mask=\"jet\")(model, x)` | {ms(cs['ours'])} | {ms(cs['ours'], 'median_s')} | {oth(cs['ours'])} "
        f"| {cnt['ours_per_batch']['ops']} | {mb(cnt['ours_per_batch'])} | **{cs['speedup']:.1f}** |",
        f"| ↳ `compute_cam` (one batched eval forward + head-only grad) | {ms(cs['ours_compute_cam'])} "
        f"| {ms(cs['ours_compute_cam'], 'median_s')} | {oth(cs['ours_compute_cam'])} | {cnt['ours_compute_cam_per_batch']['ops']} "
        f"| {mb(cnt['ours_compute_cam_per_batch'])} | — |",
    ]
    if cs["ours_cam_eps_map_cpu"]:
        lines.append(f"| ↳ `cam_eps_map`, cpu backend (one fused op) | {ms(cs['ours_cam_eps_map_cpu'], f='.2f')} "
                     f"| {ms(cs['ours_cam_eps_map_cpu'], 'median_s', '.2f')} | {oth(cs['ours_cam_eps_map_cpu'])} | 1 | — | — |")
    lines += [
        f"| `cam_eps_map`, reference backend (comparison) | {ms(cs['reference_cam_eps_map'], f='.2f')} "
        f"| {ms(cs['reference_cam_eps_map'], 'median_s', '.2f')} | {oth(cs['reference_cam_eps_map'])} | — | — | — |",
        "",
        f"Masks ({c['mask_elements']:,} elements): **{c['mask_mismatch_on_release_cams']} differ** when `cam_eps_map` is fed the "
        f"release's own per-image CAMs (the post-CAM pipeline is exact); end to end {c['mask_mismatch_end_to_end']} differ "
        f"({c['images_with_mismatch_end_to_end']} images), from the CAMs themselves: batched vs per-image forward max |ΔCAM| = "
        f"{c['max_abs_diff_batched_vs_per_image_cam']:.1e}, predicted class differs for {c['predicted_class_differs_batched_vs_per_image']} images. "
        f"{100 * c['eps_fraction_high']:.1f}% of elements get eps. Parameter `.grad` tensors left by the release's loop: "
        f"{c['parameter_grads_left_by_release_loop']}; by ours: {c['parameter_grads_left_by_ours']}.",
        "",
        f"### PGD-{STEPS} (eps 8/255, step 2/255, start at x, batch {BATCH}, CE loss)",
        "",
        "| attack | eps | s / run | median s | others | minor faults | images/s | update share |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in res["pgd"]["attacks"]:
        lines.append(f"| {r['impl']} | {r['eps']} | {r['min_s']:.2f} | {r['median_s']:.2f} | {r['others_cores_best']:.2f} "
                     f"| {r.get('minor_faults_best', 0):,} | {r['images_per_s']:.2f} | {r['update_share_pct']:.2f}% |")
    lines += ["", f"Update phase alone ({STEPS} calls on a real iterate and gradient, {BATCH}×3×32×32; the x.clone() each "
              f"repetition starts from ({1e3 * res['pgd']['clone_s']:.3f} ms) is subtracted):", "",
              f"| update | eps | ms / {STEPS} calls | others | aten ops / {STEPS} calls | × fused |", "|---|---|---:|---:|---:|---:|"]
    for u in res["pgd"]["update_phase"]:
        lines.append(f"| {u['impl']} | {u['eps']} | {1e3 * u['ten_calls_s']:.3f} | {u['others_cores_best']:.2f} "
                     f"| {u['aten_ops_10_calls']} | {u['slower_than_fused']:.1f} |")
    one, e2e = ck["pgd_one_update_same_iterate"], ck["pgd_end_to_end"]
    fmt = lambda d: f"max |Δ| {d['max_abs_diff']:.1e} ({d['elements_differing']} elements)"  # noqa: E731
    lines += ["", "One update from the same iterate and gradient: fused vs release chain "
              f"{fmt(one['fused_vs_release_update_map'])} (map), {fmt(one['fused_vs_release_update_scalar'])} (scalar); "
              f"fused vs torchattacks' update {fmt(one['fused_vs_torchattacks_update_scalar'])}; fused vs reference backend "
              f"{fmt(one['fused_vs_reference_backend_map'])}. After {STEPS} steps those float32-rounding differences have flipped "
              f"near-zero gradient signs and the trajectories part: fused vs release update {fmt(e2e['fused_vs_release_update_map'])} "
              f"in {e2e['fused_vs_release_update_map']['images_differing']} images (map)"
              + (f"; release update vs torchattacks {fmt(e2e['release_update_vs_torchattacks_scalar'])}" if "release_update_vs_torchattacks_scalar" in e2e else "")
              + f". Fused run inside its budget: {e2e['fused_map_within_budget']}.",
              "", f"Whole PGD runs of one attack varied by {res['pgd']['run_spread_pct_median']:.1f}% (median max/min − 1) on this "
              f"machine. \"derived\" = (model part {res['pgd']['model_part_s']:.2f} s, the same in every loop, + each loop's own "
              "update-phase time) ratio: what the update alone changes.",
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


def run_with(argv) -> dict:
    """Run the report with these command-line arguments (the harness's entry point); returns the result."""
    global BATCH, STEPS
    args = build_parser().parse_args(argv)
    BATCH, STEPS = args.batch, args.steps
    return run(args)


def main(argv=None) -> None:
    global BATCH, STEPS
    args = build_parser().parse_args(argv)
    if args.render:
        with open(args.render) as f:
            print(markdown(json.load(f)))
        return
    BATCH, STEPS = args.batch, args.steps
    res = run(args)
    print(markdown(res))
    if args.out:
        write_json(args.out, res)


if __name__ == "__main__":
    main()
