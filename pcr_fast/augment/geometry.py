"""Geometry of the augmentation: every pixel layout as a stack of images cut into units.

A unit is one encoder patch (or one visual token where the model merges patches) so that a
shuffled or masked unit is exactly what the vision encoder sees as one piece. Layouts:
``(B, C, H, W)``; tiles ``(B, T, C, H, W)`` / ``(B, N, T, C, H, W)``; flattened rows
``(L, C·t·p·p)`` with ``image_grid_thw`` (Qwen2-VL style: a unit is ``merge²`` consecutive rows).
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import Tensor

from ..backends.params import UnitGrid

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def check_int(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def unit_grid(x: Tensor, patch_size: int, merge_size: int, channels: Optional[int],
              allow_remainder: bool, image_grid_thw: Optional[Tensor]) -> UnitGrid:
    """The images × units view of ``x`` (raises ValueError naming what does not fit)."""
    if not isinstance(x, Tensor):
        raise ValueError(f"pixel_values must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"pixel_values must be float32, bfloat16, float16 or float64, got {x.dtype}")
    if x.dim() == 2:
        return _grid_of_rows(x, patch_size, merge_size, channels, image_grid_thw)
    if x.dim() not in (4, 5, 6):
        raise ValueError(
            "pixel_values must have rank 4 (B, C, H, W), 5 (B, T, C, H, W), 6 (B, N, T, C, H, W) "
            f"or 2 (L, C·t·p·p with image_grid_thw); got rank {x.dim()} with shape {tuple(x.shape)}")
    if image_grid_thw is not None:
        raise ValueError("image_grid_thw is only for the flattened (L, C·t·p·p) layout of Qwen2-VL-"
                         f"style models; got pixel_values of shape {tuple(x.shape)}")
    C, H, W = x.shape[-3:]
    if channels is not None and channels != C:
        raise ValueError(f"channels={channels} but pixel_values has {C} channels (dim -3)")
    unit = patch_size * merge_size
    if not allow_remainder and (H % unit or W % unit):
        raise ValueError(
            f"patch_size={patch_size}" + (f" × merge_size={merge_size}" if merge_size > 1 else "")
            + f" = {unit} px must divide the image height and width, got H={H}, W={W} "
            "(pass allow_remainder=True to leave the border pixels in place)")
    lead = tuple(x.shape[:-3])
    n_images = math.prod(lead)
    gh, gw = H // unit, W // unit
    return UnitGrid(layout="images" if x.dim() == 4 else "tiles", lead_shape=lead,
                    n_images=n_images, n_units=n_images * gh * gw, channels=C, height=H, width=W,
                    unit_h=unit, unit_w=unit, grid_h=gh, grid_w=gw)


def _grid_of_rows(x: Tensor, patch_size: int, merge_size: int, channels: Optional[int],
                  grid: Optional[Tensor]) -> UnitGrid:
    if grid is None:
        raise ValueError("pixel_values of rank 2 (flattened patches, Qwen2-VL style) needs "
                         "image_grid_thw (n_images, 3)")
    if not isinstance(grid, Tensor) or grid.dim() != 2 or grid.shape[1] != 3:
        raise ValueError(f"image_grid_thw must be a (n_images, 3) tensor, got "
                         f"{tuple(grid.shape) if isinstance(grid, Tensor) else type(grid).__name__}")
    if grid.dtype.is_floating_point or grid.dtype == torch.bool:
        raise ValueError(f"image_grid_thw must be an integer tensor, got {grid.dtype}")
    L, D = x.shape
    C = 3 if channels is None else channels
    if D % (C * patch_size * patch_size):
        raise ValueError(f"pixel_values rows have {D} columns, not a multiple of channels·patch_size² "
                         f"= {C}·{patch_size}² (check patch_size and channels)")
    m2 = merge_size * merge_size
    if L % m2:
        raise ValueError(f"pixel_values has {L} rows, not a multiple of merge_size²={m2}")
    counts_host = None
    if grid.device.type == "cpu":  # checkable without a device sync
        rows = grid.tolist()
        for i, (t, h, w) in enumerate(rows):
            if min(t, h, w) < 1 or h % merge_size or w % merge_size:
                raise ValueError(f"image_grid_thw[{i}] = {(t, h, w)}: t, h, w must be >= 1 and h, w "
                                 f"multiples of merge_size={merge_size}")
        total = sum(t * h * w for t, h, w in rows)
        if total != L:
            raise ValueError(f"image_grid_thw describes {total} rows (sum of t·h·w) but pixel_values "
                             f"has {L} rows")
        counts_host = [t * h * w // m2 for t, h, w in rows]
    counts = (grid[:, 0] * grid[:, 1] * grid[:, 2]).to(device=x.device, dtype=torch.int64) // m2
    n_units = L // m2
    return UnitGrid(layout="rows", lead_shape=(1,), n_images=grid.shape[0], n_units=n_units,
                    channels=C, height=L, width=D, unit_h=m2, unit_w=D, grid_h=n_units, grid_w=1,
                    counts=counts, counts_host=counts_host)


def valid_images(x: Tensor, grid: UnitGrid, tile_mask: Optional[Tensor],
                 skip_zero_tiles: bool) -> Optional[Tensor]:
    """Per image (tile) True where it is real; None where every image is (no work)."""
    if tile_mask is not None:
        if grid.layout != "tiles":
            raise ValueError("tile_mask is only for tiled layouts (B, T, C, H, W) / (B, N, T, C, H, W); "
                             f"got pixel_values of shape {tuple(x.shape)}")
        if not isinstance(tile_mask, Tensor) or tuple(tile_mask.shape) != grid.lead_shape:
            raise ValueError(f"tile_mask must have shape {grid.lead_shape} (the tile dims of "
                             f"pixel_values), got "
                             f"{tuple(tile_mask.shape) if isinstance(tile_mask, Tensor) else type(tile_mask).__name__}")
        return tile_mask.to(device=x.device).reshape(-1) != 0
    if grid.layout == "tiles" and skip_zero_tiles:
        peak = torch.linalg.vector_norm(x, ord=float("inf"), dim=(-3, -2, -1))
        return peak.reshape(-1) != 0
    return None
