"""Section 3: the model-level path on the device. A CAM computed there against the CPU's, and one PART
training step there (AMP bf16, channels_last) whose loss is finite and whose budget is exactly the
PixelBudget recomputed from the weights and images the step saw."""
from __future__ import annotations

import contextlib
import copy

import torch

from .. import ops
from ..budget import PixelBudget
from ..cam import compute_cam
from ..models import CAM_LAYERS, get_model
from .inputs import EPS, EPS_LOW
from .runner import Context, Skipped

# A CAM is a sum over channels of products of activations: float32 on two devices agrees to ~1e-6 of its
# scale (cuDNN and oneDNN sum in other orders). TF32 is switched off for the comparison.
CAM_RTOL = 1e-4
# A CAM that moves by ~1e-6 can still flip an element whose colour sits on a jet bin edge or whose z-score
# sits on the cut: a handful per batch, never more than this share.
MASK_FLIP_LIMIT = 1e-3


@contextlib.contextmanager
def exact_float32():
    """No TF32 in convolutions or matmuls inside the block (the CAM comparison needs float32 products).
    torch.set_float32_matmul_precision("highest") covers matmuls in every torch; cuDNN's convolutions have
    their own switch (allow_tf32, which newer torch also exposes as conv.fp32_precision)."""
    matmul = torch.get_float32_matmul_precision()
    conv = getattr(getattr(torch.backends.cudnn, "conv", None), "fp32_precision", None)
    torch.set_float32_matmul_precision("highest")
    if conv is not None:
        torch.backends.cudnn.conv.fp32_precision = "ieee"
    else:
        allow = torch.backends.cudnn.allow_tf32
        torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(matmul)
        if conv is not None:
            torch.backends.cudnn.conv.fp32_precision = conv
        else:
            torch.backends.cudnn.allow_tf32 = allow


def _seeded_model(arch: str = "resnet18"):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return get_model(arch).eval()


def check_cam_matches_cpu(ctx: Context):
    if not ctx.cuda:
        raise Skipped("the device is the CPU: nothing to compare with")
    model = _seeded_model()
    x = torch.rand((32, 3, 32, 32), generator=torch.Generator().manual_seed(5))
    with exact_float32():
        cam_cpu = compute_cam(model, x, "gradcam")
        cam_dev = compute_cam(copy.deepcopy(model).to(ctx.device), x.to(ctx.device), "gradcam").cpu()
    scale = float(cam_cpu.abs().max())
    error = float((cam_dev - cam_cpu).abs().max()) / scale
    # The masks come from the two CAMs through the same op, so they differ only through the CAMs.
    mask_cpu = ops.cam_eps_map(cam_cpu, (32, 32), EPS, EPS_LOW)
    mask_dev = ops.cam_eps_map(cam_dev.to(ctx.device), (32, 32), EPS, EPS_LOW).cpu()
    flips = int((mask_cpu != mask_dev).sum())
    ok = error <= CAM_RTOL and flips <= MASK_FLIP_LIMIT * mask_cpu.numel()
    return ok, (f"ResNet-18 GradCAM, 32 images: max |CAM_gpu - CAM_cpu| = {error:.2e} of the CAM's scale (limit "
                f"{CAM_RTOL:g}); jet masks from them differ in {flips} of {mask_cpu.numel():,} elements"), {
        "relative_error": error, "mask_flips": flips, "elements": mask_cpu.numel()}


class _RecordingBudget:
    """Wraps the run's PixelBudget: the step's budget map is kept for the comparison."""

    def __init__(self, budget: PixelBudget):
        self.budget, self.maps = budget, []

    def with_logits(self, model, x):
        eps_map, logits = self.budget.with_logits(model, x)
        self.maps.append(eps_map.detach().clone())
        return eps_map, logits

    def __getattr__(self, name):
        return getattr(self.budget, name)


def check_part_step(ctx: Context):
    from ..train import Distributed, TrainConfig, build_state, inner_attack, train_step

    # On a CPU without bf16 units, bf16 autocast is an order of magnitude slower than float32 (this check took
    # 38 s at batch 16 on one AMD EPYC core, the float32 step 2 s): 4 images prove the path as well as 16.
    batch = 4 if not ctx.cuda else 16 if ctx.quick else 128
    steps = 2 if ctx.quick or not ctx.cuda else 10
    config = TrainConfig(out="(check: no run directory)", arch="resnet18", method="part", batch_size=batch, steps=steps,
                         warmup=0, amp="bf16", channels_last=True, device=str(ctx.device), augment=False,
                         eval_examples=0, seed=0).resolved()
    state = build_state(config, num_classes=10, device=ctx.device, ranks=Distributed())
    recorder = _RecordingBudget(state.budget)
    state.budget = recorder
    gen = torch.Generator().manual_seed(6)
    x, y = torch.rand((batch, 3, 32, 32), generator=gen), torch.randint(0, 10, (batch,), generator=gen)
    before = copy.deepcopy(state.model)
    attack_gen = torch.Generator(device=ctx.device).manual_seed(7)
    result = train_step(state, x, y, part_phase=True, attack=inner_attack(state, True), attack_gen=attack_gen,
                        augment_gen=None)
    loss = result.loss
    x_dev = x.to(ctx.device).contiguous(memory_format=torch.channels_last)
    with state.autocast():
        recomputed = PixelBudget(config.eps, config.eps_low, config.cam, config.mask, layer=CAM_LAYERS["resnet18"])(before, x_dev)
    used = recorder.maps[0]
    flips = int((used != recomputed).sum())
    moved = any(not torch.equal(a, b) for a, b in zip(before.parameters(), state.model.parameters()))
    ok = result.finite and flips == 0 and moved and 0 < result.eps_high < 1
    return ok, (f"ResNet-18, batch {batch}, PGD-{steps}, AMP bf16, channels_last: loss {loss:.4f} "
                f"({'finite' if result.finite else 'NOT FINITE'}), weights {'moved' if moved else 'DID NOT MOVE'}; "
                f"budget vs recomputation: {flips} of {used.numel():,} elements differ; "
                f"{100 * result.eps_high:.1f}% of elements at full eps"), {
        "loss": loss, "finite": result.finite, "budget_differs": flips, "eps_high": result.eps_high, "batch": batch}


def run(ctx: Context, check) -> None:
    check("CAM on the device vs the CPU", lambda: check_cam_matches_cpu(ctx))
    check("PART training step (AMP bf16, channels_last)", lambda: check_part_step(ctx))
