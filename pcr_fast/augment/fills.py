"""Fill values of masked units, shared by both backends.

A fill never writes an exact ``0``: a zero fill is written as the dtype's smallest normal
number, so a masked tile is never taken for a padding tile (Idefics3/SmolVLM and LLaVA-NeXT
treat an all-zero tile as padding).
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from ..backends.params import UnitGrid

FILL_MODES = ("zero", "mean", "noise")
FillSpec = Union[str, float, int, Tensor]


def nonzero(t: Tensor) -> Tensor:
    """Replace exact zeros by the dtype's smallest normal number (never an all-zero tile)."""
    return torch.where(t == 0, torch.full_like(t, torch.finfo(t.dtype).tiny), t)


def image_stats(x: Tensor, grid: UnitGrid, with_std: bool) -> tuple[Tensor, Optional[Tensor]]:
    """Per-image, per-channel mean (and population std) in float32: (n_images, C)."""
    if grid.layout != "rows":
        if with_std:
            std, mean = torch.std_mean(x, dim=(-2, -1), correction=0)
            return mean.float().reshape(grid.n_images, -1), std.float().reshape(grid.n_images, -1)
        return x.mean(dim=(-2, -1), dtype=torch.float32).reshape(grid.n_images, -1), None
    L, D = x.shape
    C = grid.channels
    per_row = x.unflatten(1, (C, D // C))
    row_image = torch.repeat_interleave(torch.arange(grid.n_images, device=x.device),
                                        grid.counts * grid.unit_h, output_size=L)
    sums = torch.zeros(grid.n_images, C, dtype=torch.float32, device=x.device)
    sums.index_add_(0, row_image, per_row.sum(-1, dtype=torch.float32))
    n_elem = (grid.counts * grid.unit_h * (D // C)).clamp(min=1).to(torch.float32)[:, None]
    mean = sums / n_elem
    if not with_std:
        return mean, None
    centred = per_row.float() - mean[row_image][:, :, None]
    sq = torch.zeros_like(sums).index_add_(0, row_image, centred.square().sum(-1))
    return mean, (sq / n_elem).sqrt()


def fill_table(x: Tensor, grid: UnitGrid, fill: FillSpec) -> tuple[Tensor, Optional[Tensor]]:
    """The (n_images, C) fill table in x.dtype, and the float32 std for "noise"."""
    C = grid.channels
    if isinstance(fill, str):
        if fill == "zero":
            table = torch.zeros(grid.n_images, C, dtype=x.dtype, device=x.device)
            return nonzero(table), None
        mean, std = image_stats(x, grid, with_std=fill == "noise")
        return (nonzero(mean.to(x.dtype)) if fill == "mean" else mean), std
    value = torch.as_tensor(fill, dtype=torch.float32, device=x.device)
    table = value.reshape(1, -1).expand(grid.n_images, C) if value.numel() == C else \
        value.reshape(1, 1).expand(grid.n_images, C)
    return nonzero(table.to(x.dtype).contiguous()), None


def noise_buffer(grid: UnitGrid, mean: Tensor, std: Tensor, mask: Tensor, image: Tensor,
                  k_bound: int, dtype: torch.dtype, generator: Optional[torch.Generator],
                  device: torch.device) -> tuple[Tensor, Tensor]:
    """Gaussian fill values per masked unit, generated once in torch for both backends.

    Returns the (slots, C, UH, UW) buffer and the slot of each unit (-1 where unmasked).
    """
    C = grid.channels
    if grid.layout == "rows":
        shape = (k_bound, grid.unit_h, C, grid.width // C)
    else:
        shape = (k_bound, C, grid.unit_h, grid.unit_w)
    gen_device = generator.device if generator is not None else device
    z = torch.randn(shape, generator=generator, device=gen_device).to(device)
    slot = torch.where(mask, torch.cumsum(mask, 0) - 1, -1)
    slot_image = torch.zeros(k_bound + 1, dtype=torch.int64, device=device)
    slot_image.scatter_(0, torch.where(mask, slot, k_bound), image)
    slot_image = slot_image[:k_bound]
    if grid.layout == "rows":
        m, s = mean[slot_image][:, None, :, None], std[slot_image][:, None, :, None]
    else:
        m, s = mean[slot_image][:, :, None, None], std[slot_image][:, :, None, None]
    noise = nonzero((m + s * z).to(dtype))
    if grid.layout == "rows":
        noise = noise.reshape(k_bound, 1, grid.unit_h, grid.width)  # (slots, "C"=1, m², D)
    return noise.contiguous(), slot


def check_fill(fill: FillSpec) -> FillSpec:
    if isinstance(fill, str):
        if fill not in FILL_MODES:
            raise ValueError(f"fill must be one of {FILL_MODES}, a number or a per-channel tensor; "
                             f"got {fill!r}")
        return fill
    if isinstance(fill, bool) or not isinstance(fill, (int, float, Tensor, list, tuple)):
        raise ValueError(f"fill must be one of {FILL_MODES}, a number or a per-channel tensor; "
                         f"got {type(fill).__name__}")
    value = torch.as_tensor(fill)
    if value.dim() > 1 or value.dtype.is_complex or value.dtype == torch.bool:
        raise ValueError(f"fill must be a real number or a 1-D per-channel tensor, got {fill!r}")
    # A CUDA tensor is not inspected further: checking its values would sync the device.
    if value.device.type == "cpu" and not torch.isfinite(value.float()).all():
        raise ValueError(f"fill must be finite, got {fill!r}")
    return fill
