"""shapes: the generated dataset with known object masks (no files).

10 silhouettes (`SHAPE_CLASSES`) whose colour, size, position and rotation are drawn independently of the
class, drawn over cluttered backgrounds whose statistics do not depend on the class either. The class is
therefore only in the object's pixels, and `ShapesDataset.masks` says exactly which pixels those are. This
module holds the silhouettes, the numpy renderer (bit-for-bit the same on every machine and in every batch)
and `ShapesDataset`, which draws each item's parameters and stores the rendered images as uint8.
"""
from __future__ import annotations

import math
import operator

import numpy as np
import torch
from torch import Tensor

from ..errors import ConfigError
from .containers import InMemoryImageDataset

SHAPE_CLASSES = ("disc", "square", "triangle", "cross", "ring", "star", "diamond", "crescent", "arrow", "bar")
SHAPES_DEFAULT_SIZES = {"train": 5000, "test": 1000}


def _half_planes_inside(u, v, angles_deg, offset):
    """How many of the half-planes {p : p . (cos a, sin a) <= offset} contain each point."""
    count = np.zeros(u.shape, np.uint8)
    for angle in angles_deg:
        c, s = np.float32(math.cos(math.radians(angle))), np.float32(math.sin(math.radians(angle)))
        count += (u * c + v * s <= offset)
    return count


def _shape_inside(shape: str, u, v):
    """Boolean silhouette in object coordinates (u, v), scaled so the shape reaches about radius 1."""
    au, av = np.abs(u), np.abs(v)
    if shape == "disc":
        return u * u + v * v <= 0.85 ** 2
    if shape == "square":
        return np.maximum(au, av) <= 0.72
    if shape == "triangle":  # equilateral, inradius 0.6 (circumradius 1.2: its area is small for its reach)
        return _half_planes_inside(u, v, (0, 120, 240), 0.6) == 3
    if shape == "cross":
        return (np.minimum(au, av) <= 0.3) & (np.maximum(au, av) <= 0.95)
    if shape == "ring":
        r2 = u * u + v * v
        return (r2 <= 0.95 ** 2) & (r2 >= 0.55 ** 2)
    if shape == "star":
        # A pentagram is bounded by 5 lines; its points lie outside at most one of their half-planes.
        # Tips at radius 1.1: the lines are at distance 1.1 * cos(72 deg) from the centre.
        return _half_planes_inside(u, v, (0, 72, 144, 216, 288), 1.1 * math.cos(math.radians(72))) >= 4
    if shape == "diamond":
        return au * 0.6 + av <= 0.6  # rhombus with half-diagonals 1.0 and 0.6
    if shape == "crescent":
        return (u * u + v * v <= 0.9 ** 2) & ((u - 0.45) ** 2 + v * v > 0.7 ** 2)
    if shape == "arrow":
        shaft = (av <= 0.22) & (u >= -0.95) & (u <= 0.2)
        head = (u >= 0.1) & (av <= (0.95 - u) * 0.8)
        return shaft | head
    if shape == "bar":
        return (au <= 0.95) & (av <= 0.32)
    raise ValueError(f"unknown shape {shape!r}")


def _triangle_wave(t):
    """Period-1 wave in [-1, 1], made of exactly rounded operations only (see ShapesDataset: bit-for-bit)."""
    return 4 * np.abs(t - np.floor(t) - 0.5) - 1


def _render_shapes(params: dict, size: int, supersample: int):
    """Images (B, 3, S, S) float32 in [0, 1] and masks (B, S, S) from per-image parameter arrays.

    Only elementwise +, -, *, /, abs, floor, sqrt, comparisons and gathers touch the arrays (no libm
    transcendental, no BLAS): those are exactly rounded, so a pixel's value does not depend on the batch it
    was rendered in, nor on the machine."""
    n = params["label"].shape[0]
    pix = np.arange(size, dtype=np.float32) + np.float32(0.5)  # pixel centres, in pixel units
    x_pix, y_pix = pix[None, None, :], pix[None, :, None]

    # background 1: smooth colour field, bilinear interpolation of a coarse random grid
    grid = params["bg_grid"]  # (B, 3, g, g)
    g = grid.shape[-1]
    t = pix / np.float32(size) * np.float32(g - 1)
    i0 = np.minimum(np.floor(t).astype(np.int64), g - 2)
    w1 = (t - i0).astype(np.float32)
    w0 = np.float32(1) - w1
    rows = grid[:, :, i0, :] * w0[:, None] + grid[:, :, i0 + 1, :] * w1[:, None]  # (B, 3, S, g)
    smooth = rows[..., i0] * w0 + rows[..., i0 + 1] * w1  # (B, 3, S, S)

    # background 2: a faint stripe pattern at a random orientation, period and colour
    st = params["stripes"]  # (B, 7): cos, sin, 1/period, phase, amplitude per channel (3)
    phase = (x_pix * st[:, 0, None, None] + y_pix * st[:, 1, None, None]) * st[:, 2, None, None] + st[:, 3, None, None]
    image = smooth + _triangle_wave(phase)[:, None] * st[:, 4:7, None, None]

    # background 3: thin lines (at 35% opacity) and small blobs of random colours, anti-aliased analytically
    # (coverage from the distance to the line / blob edge in pixels)
    for line in np.moveaxis(params["lines"], 1, 0):  # each (B, 8): x0, y0, cos, sin, width, r, g, b
        dist = np.abs((x_pix - line[:, 0, None, None]) * line[:, 3, None, None]
                      - (y_pix - line[:, 1, None, None]) * line[:, 2, None, None])
        cover = np.clip(line[:, 4, None, None] * 0.5 + 0.5 - dist, 0, 1)[:, None] * np.float32(0.35)
        image = image * (1 - cover) + line[:, 5:8, None, None] * cover
    for blob in np.moveaxis(params["blobs"], 1, 0):  # each (B, 6): x, y, radius, r, g, b
        dist = np.sqrt((x_pix - blob[:, 0, None, None]) ** 2 + (y_pix - blob[:, 1, None, None]) ** 2)
        cover = np.clip(blob[:, 2, None, None] + 0.5 - dist, 0, 1)[:, None]
        image = image * (1 - cover) + blob[:, 3:6, None, None] * cover

    # the object: silhouette sampled on a supersample x supersample grid per pixel -> coverage in 1/s^2 steps
    sub = (np.arange(size * supersample, dtype=np.float32) + np.float32(0.5)) / np.float32(supersample)
    ob = params["object"]  # (B, 5): centre x, centre y, cos/radius, sin/radius, radius
    dx = sub[None, None, :] - ob[:, 0, None, None]
    dy = sub[None, :, None] - ob[:, 1, None, None]
    coverage = np.zeros((n, size, size), np.float32)
    for k, shape in enumerate(SHAPE_CLASSES):
        idx = np.flatnonzero(params["label"] == k)
        if idx.size == 0:
            continue
        c, s = ob[idx, 2, None, None], ob[idx, 3, None, None]
        u = dx[idx] * c + dy[idx] * s
        v = dy[idx] * c - dx[idx] * s
        inside = _shape_inside(shape, u, v).reshape(idx.size, size, supersample, size, supersample)
        coverage[idx] = inside.sum(axis=(2, 4), dtype=np.float32) / np.float32(supersample * supersample)
    cover = coverage[:, None]
    image = image * (1 - cover) + params["colour"][:, :, None, None] * cover
    image = image + params["noise"]
    return np.clip(image, 0, 1), coverage >= 0.5


class ShapesDataset(InMemoryImageDataset):
    """`n` generated images of 10 silhouettes (`SHAPE_CLASSES`) on cluttered backgrounds, with object masks.

    Item i depends only on (seed, split, i): `ShapesDataset(m, ...)` is a prefix of `ShapesDataset(n, ...)`
    for m < n, bit for bit, and train and test use different random streams. Labels are balanced in every
    block of 10 consecutive items. Per item, independently of the class: object radius 8/32-12/32 of the
    image side (8-12 px at 32), position (object inside the image), rotation, colour (at a random contrast
    from the background behind it); background = smooth random colour field + faint stripes + 2 thin lines
    + 4 small blobs, then Gaussian pixel noise (sd 0.03). Rendered with numpy (object edges anti-aliased by 4x4
    supersampling) and stored as uint8, like a real dataset.

    `masks` (N, H, W) bool: pixels at least half covered by the object. `object_mask(i)` is one of them."""

    _SPLIT_IDS = {"train": 0, "test": 1}
    _CHUNK = 256  # images rendered per vectorised pass: bounds the (chunk, 4S, 4S) temporaries

    def __init__(self, n: int, seed: int = 0, split: str = "train", image_size: int = 32):
        n, seed, image_size = operator.index(n), operator.index(seed), operator.index(image_size)
        if n < 0:
            raise ConfigError(f"n must be >= 0, got {n}")
        if seed < 0:
            raise ConfigError(f"seed must be >= 0 (it seeds numpy's SeedSequence), got {seed}")
        if split not in self._SPLIT_IDS:
            raise ConfigError(f"split must be one of {tuple(self._SPLIT_IDS)}, got {split!r}")
        if image_size < 8:
            raise ConfigError(f"image_size must be >= 8, got {image_size}")
        self.seed, self.split = seed, split
        images = np.empty((n, 3, image_size, image_size), np.uint8)
        masks = np.empty((n, image_size, image_size), bool)
        labels = self._labels(n, seed, split)
        for start in range(0, n, self._CHUNK):
            stop = min(start + self._CHUNK, n)
            params = self._draw_params(range(start, stop), labels[start:stop], seed, self._SPLIT_IDS[split], image_size)
            chunk_images, masks[start:stop] = _render_shapes(params, image_size, supersample=4)
            images[start:stop] = np.rint(chunk_images * 255).astype(np.uint8)
        super().__init__(torch.from_numpy(images), torch.from_numpy(labels), SHAPE_CLASSES)
        self.masks = torch.from_numpy(masks)

    def object_mask(self, index: int) -> Tensor:
        return self.masks[index]

    @classmethod
    def _labels(cls, n: int, seed: int, split: str) -> np.ndarray:
        # one permutation of the 10 classes per block of 10 items: balanced, yet not periodic
        split_id, k = cls._SPLIT_IDS[split], len(SHAPE_CLASSES)
        blocks = [np.random.default_rng([seed, split_id, 0, b]).permutation(k) for b in range((n + k - 1) // k)]
        return np.concatenate(blocks or [np.empty(0, np.int64)])[:n].astype(np.int64)

    @classmethod
    def _draw_params(cls, indices: range, labels: np.ndarray, seed: int, split_id: int, size: int) -> dict:
        """Per-image parameters, each image from its own stream [seed, split, 1, i]. The trigonometry of these
        scalars uses Python's math, one image at a time, so no vectorised routine whose last bit may depend
        on the array length (the chunk size) is involved."""
        b, grid, n_lines, n_blobs = len(indices), 4, 2, 4
        p = {"label": labels,
             "bg_grid": np.empty((b, 3, grid, grid), np.float32),
             "stripes": np.empty((b, 7), np.float32),
             "lines": np.empty((b, n_lines, 8), np.float32),
             "blobs": np.empty((b, n_blobs, 6), np.float32),
             "object": np.empty((b, 5), np.float32),
             "colour": np.empty((b, 3), np.float32),
             "noise": np.empty((b, 3, size, size), np.float32)}
        scale = size / 32
        for j, i in enumerate(indices):
            rng = np.random.default_rng([seed, split_id, 1, i])
            bg_grid = rng.uniform(0.2, 0.8, (3, grid, grid))
            p["bg_grid"][j] = bg_grid
            angle, period, phase = rng.uniform(0, math.pi), rng.uniform(3, 8) * scale, rng.random()
            p["stripes"][j] = (math.cos(angle), math.sin(angle), 1 / period, phase, *rng.uniform(-0.05, 0.05, 3))
            for line in p["lines"][j]:
                angle = rng.uniform(0, math.pi)
                line[:] = (*rng.uniform(0, size, 2), math.cos(angle), math.sin(angle), rng.uniform(0.5, 1.0),
                           *rng.uniform(0, 1, 3))
            for blob in p["blobs"][j]:
                blob[:] = (*rng.uniform(0, size, 2), rng.uniform(1.0, 2.0) * scale, *rng.uniform(0, 1, 3))
            radius = rng.uniform(8, 12) * scale
            margin = 1.2 * radius  # the largest silhouette reaches 1.2 x radius (triangle)
            cx, cy = rng.uniform(margin, size - margin, 2)
            angle = rng.uniform(0, 2 * math.pi)
            p["object"][j] = (cx, cy, math.cos(angle) / radius, math.sin(angle) / radius, radius)
            # Colour = the smooth background at the grid node nearest the centre, moved by a random contrast in
            # a random colour direction; a channel that would leave [0, 1] moves the other way (then clipped),
            # so the contrast does not depend on how bright the background is.
            node_x, node_y = (min(int(c / size * (grid - 1) + 0.5), grid - 1) for c in (cx, cy))
            base = bg_grid[:, node_y, node_x]
            direction = rng.standard_normal(3)
            step = rng.uniform(0.6, 0.85) * direction / max(math.hypot(*direction), 1e-12)
            colour = base + step
            p["colour"][j] = np.clip(np.where((colour < 0) | (colour > 1), base - step, colour), 0, 1)
            p["noise"][j] = rng.standard_normal((3, size, size), dtype=np.float32) * np.float32(0.03)
        return p
