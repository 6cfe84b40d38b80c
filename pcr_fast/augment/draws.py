"""Randomness of the augmentation, shared by both backends (same seed, same output).

MAE-style argsort of uniform keys per image: one key row gives the permutation, an
independent one the exact-``k`` mask (``k = floor(ratio·n + 1/2)`` per image), so the mask
drawn for a seed does not depend on ``shuffle``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ..backends.params import UnitGrid


def unit_images(grid: UnitGrid, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Per unit: its image id, the first unit of its image; per image: its unit count."""
    n = grid.n_units
    if grid.layout == "rows":
        counts = grid.counts
        image = torch.repeat_interleave(torch.arange(grid.n_images, device=device), counts,
                                        output_size=n)
        starts = torch.cumsum(counts, 0) - counts
    else:
        per = grid.grid_h * grid.grid_w
        counts = torch.full((grid.n_images,), per, dtype=torch.int64, device=device)
        image = torch.arange(n, device=device) // max(per, 1)
        starts = torch.arange(grid.n_images, device=device) * per
    return image, starts[image], counts


def draw(grid: UnitGrid, device: torch.device, shuffle: bool, mask_ratio: float,
         generator: Optional[torch.Generator], valid_image: Optional[Tensor]):
    """Global-unit permutation (source unit of each unit), mask, unit image ids, local index."""
    n = grid.n_units
    image, start, counts = unit_images(grid, device)
    gen_device = generator.device if generator is not None else device
    keys = torch.rand((2, n), dtype=torch.float64, generator=generator, device=gen_device).to(device)
    local = torch.arange(n, device=device) - start
    image_f = image.to(torch.float64)
    if valid_image is not None:
        # Padding images keep their order (keys rise with the position) and get no mask.
        unit_valid = valid_image[image]
        ordered = local.to(torch.float64) / counts[image].clamp(min=1).to(torch.float64)
        keys = torch.where(unit_valid, keys, ordered)
    arange = torch.arange(n, device=device)
    if shuffle:
        # Sorting image + key (key in [0, 1)) sorts within each image's contiguous segment,
        # so position g of the sorted order is unit g's source: MAE-style argsort of keys.
        perm = torch.sort(image_f + keys[0], stable=True).indices
    else:
        perm = arange
    k_per_image = torch.floor(mask_ratio * counts.to(torch.float64) + 0.5).to(torch.int64)
    if valid_image is not None:
        k_per_image = torch.where(valid_image, k_per_image, 0)
    if mask_ratio > 0:
        order = torch.sort(image_f + keys[1], stable=True).indices
        rank = torch.empty_like(order).scatter_(0, order, arange) - start
        mask = rank < k_per_image[image]
    else:
        mask = torch.zeros(n, dtype=torch.bool, device=device)
    return perm, mask, image, local, k_per_image


def masked_bound(grid: UnitGrid, mask_ratio: float) -> int:
    """An upper bound, known on the host, of the total masked units (noise buffer size)."""
    if grid.layout != "rows":
        per = grid.grid_h * grid.grid_w
        return grid.n_images * int(math.floor(mask_ratio * per + 0.5))
    if grid.counts_host is not None:
        return sum(int(math.floor(mask_ratio * c + 0.5)) for c in grid.counts_host)
    return int(math.floor(mask_ratio * grid.n_units + 0.5 * grid.n_images))
