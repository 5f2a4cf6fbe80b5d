"""The released PART code's budget stage and PGD update, emulated line by line (docs/method.md says what
the release did; bench/STAGE.md how faithfully this follows it): what the benchmark harness and
`part-fast check` time part_fast against. Nothing in the training path uses it. PIL and matplotlib are
imported only when the host part runs.

- release_eps_map: `utils.craft_weight_matrix` + `generate_weighted_eps` on one batch: per image a forward,
  torchcam-0.3.2-style GradCAM with a full backward through the trunk (ReleaseGradCAM), then the host part
  (release_host_part: PIL bicubic, matplotlib jet, numpy z-score, copy back to the device);
- release_update_pgd: part_fast.attacks.PGD's loop with the release's eager update chain
  (reference.pgd_step_release) in place of the fused pgd_step_.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from part_fast import reference
from part_fast.attacks import PGD
from part_fast.extras import require

# The release's budget: eps for the pixels its mask marks, eps_low for the others.
EPS, EPS_LOW = 8 / 255, 7 / 255
# What needs PIL and matplotlib, as a MissingExtraError names it (the extra [plots] installs both).
RELEASE_PIPELINE = "the released PART code's host part (part_fast.release)"


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
    matplotlib = require("matplotlib", RELEASE_PIPELINE)
    Image = require("PIL.Image", RELEASE_PIPELINE, extra="plots")  # matplotlib's own dependency

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

