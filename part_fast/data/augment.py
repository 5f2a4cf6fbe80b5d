"""The release's train augmentation (random crop with zero padding, horizontal flip) as a pure batch function."""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import Tensor


def augment_batch(x: Tensor, generator: torch.Generator, padding: int = 4) -> Tensor:
    """RandomCrop(size, padding, zero fill) then RandomHorizontalFlip(0.5), per image, as one gather.

    Random numbers, all from `generator` (on its device, normally the CPU; then moved to x's device), in
    this order: top = randint(0, 2*padding + 1, (B,)), left = randint(0, 2*padding + 1, (B,)),
    flip = rand(B) < 0.5. Image b is then the window [top, top + H) x [left, left + W) of x[b] zero-padded
    by `padding` on each side, mirrored left-right if flip[b] -- torchvision's RandomCrop / RandomHorizontalFlip
    distribution. The output is a pure function of (x, generator state); the generator advances."""
    if x.dim() != 4:
        raise ValueError(f"x must be (B, C, H, W), got shape {tuple(x.shape)}")
    padding = operator.index(padding)
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    b, c, h, w = x.shape
    top = torch.randint(0, 2 * padding + 1, (b,), generator=generator, device=generator.device)
    left = torch.randint(0, 2 * padding + 1, (b,), generator=generator, device=generator.device)
    flip = torch.rand(b, generator=generator, device=generator.device) < 0.5
    top, left, flip = top.to(x.device), left.to(x.device), flip.to(x.device)
    padded = F.pad(x, (padding, padding, padding, padding))  # zeros
    rows = top[:, None] + torch.arange(h, device=x.device)  # (B, H)
    col = torch.arange(w, device=x.device)
    cols = left[:, None] + torch.where(flip[:, None], w - 1 - col, col)  # (B, W): mirrored window if flipped
    batch_index = torch.arange(b, device=x.device)[:, None, None, None]
    channel_index = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch_index, channel_index, rows[:, None, :, None], cols[:, None, None, :]]
