"""The stage benchmark's setup (bench/stage_report.py), shared by its two parts (bench/stage_cam.py,
bench/stage_pgd.py): the settings, the images, the CAM-realistic ResNet-18 and the Session one run shares.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from bench.common import Stopwatch, load_cifar_subset, wait_quiet
from part_fast.models import get_model

EPS, EPS_LOW, ALPHA, STEPS = 8 / 255, 7 / 255, 2 / 255, 10
BATCH, CALIB_IMAGES, SEED = 128, 256, 0  # the defaults: a run's own batch and steps are its Session's
CPU = torch.device("cpu")


# ------------------------------------------------------------------------------------------ data
def load_data(tar_path: str, n: int, n_calib: int):
    """(x, y, x_cal, y_cal, description): n test images and n_calib calibration images of the CIFAR-10 subset
    at tar_path, or seeded uniform random images when it is absent."""
    if tar_path and os.path.isfile(tar_path):
        x, y = load_cifar_subset(tar_path, "test", n)
        x_cal, y_cal = load_cifar_subset(tar_path, "train", n_calib)
        return x, y, x_cal, y_cal, f"CIFAR-10 subset ({os.path.basename(tar_path)}): {n} test images, {n_calib} train images for calibration"
    gen = torch.Generator().manual_seed(SEED)
    x, x_cal = torch.rand(n, 3, 32, 32, generator=gen), torch.rand(n_calib, 3, 32, 32, generator=gen)
    y, y_cal = torch.randint(0, 10, (n,), generator=gen), torch.randint(0, 10, (n_calib,), generator=gen)
    return x, y, x_cal, y_cal, f"random uniform images ({tar_path!r} not found)"


# ----------------------------------------------------------------------------------------- model
def cam_realistic_resnet18(x_cal: torch.Tensor, y_cal: torch.Tensor, chunk: int = BATCH) -> tuple[nn.Module, dict]:
    """Random-init ResNet-18 made to give non-degenerate CAMs, cheaply (a few seconds):
    1. BatchNorm running statistics recomputed on x_cal (train-mode forwards, cumulative average), so
       eval-mode activations are normalised as in a trained net (with the init statistics mean 0 / var 1
       the layer4 maps are nearly constant and the argmax is decided by the bias);
    2. the linear head fitted (L-BFGS, cross-entropy + small L2) on the pooled layer4 features of x_cal,
       so predictions spread over the classes and the predicted class is driven by features.
    The trunk stays random. No parameter keeps a .grad. chunk: the calibration forwards' batch size."""
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
        for i in range(0, len(x_cal), chunk):
            model(x_cal[i:i + chunk])
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



# ------------------------------------------------------------------------------------- the run
class Session:
    """What every part of one run shares besides its inputs: the arguments (the run's batch and steps among
    them), the start (no extra PGD run starts past --time-budget) and the time spent waiting for a quiet
    machine."""

    def __init__(self, args):
        self.args = args
        self.batch, self.steps = args.batch, args.steps
        self.watch = Stopwatch()
        self.waited_s = 0.0

    def quiet(self) -> None:
        """Called before each timed round: a round that starts on a busy machine only measures the others."""
        self.waited_s += wait_quiet(self.args.wait_quiet, self.args.quiet_cores)

    def elapsed(self) -> float:
        return self.watch.elapsed()
