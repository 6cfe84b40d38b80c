"""``PatchAugment``: the patch-shuffled / patch-masked view of a batch of ``pixel_values``.

The augmented view for PCR must be cut along the vision encoder's own grid, so that a
shuffled or masked *unit* is exactly one encoder patch, or one visual token where the
model merges patches (Qwen2-VL merge, InternVL pixel shuffle, Idefics3 scale factor,
Gemma 3 pooling). Every Hugging Face pixel layout is reduced to one problem: a stack of
*images* (an image, a tile, or one ``image_grid_thw`` segment of flattened rows), each cut
into ``n`` units, with

    out[unit u of image i] = fill(i)            if mask[i, u]
                             x[unit perm[i, u] of image i]   otherwise.

Two implementations of that function share the randomness and the fill values:

* ``backend="triton"``: one kernel launch for the whole batch, addressing the input
  through its strides (no reshaped copy): every output element written once, every copied
  element read once (:mod:`pcr_fast.kernels.patch_gather`).
* ``backend="torch"``: unfold into units, gather, ``where``; the CPU fallback and the
  test oracle.

Rules worth knowing (all tested):

* Randomness is drawn on the tensor's device (or the generator's) with MAE-style argsort
  of uniform keys: one key row gives the permutation, an independent one the exact-``k``
  mask (``k = floor(ratio·n + 1/2)`` per image), so the mask drawn for a seed does not
  depend on ``shuffle``. Both backends use the same draws: same seed, same output.
* A fill never writes an exact ``0``: a zero fill value is written as the dtype's smallest
  normal number, so a masked tile is never taken for a padding tile (Idefics3/SmolVLM and
  LLaVA-NeXT treat an all-zero tile as padding).
* Padding tiles are copied unchanged: those with ``tile_mask == 0`` (e.g. Mllama's
  ``aspect_ratio_mask``) or, for tiled layouts without a mask, the all-zero ones.
* ``fill="mean"``/``"noise"`` need per-image statistics: one extra read of the input
  (a torch reduction) before the gather. ``"zero"`` and constants need none (except the
  padding-tile check of tiled layouts without ``tile_mask``).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from torch import Tensor

from .backend_select import select_backend

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "triton", "torch")
BACKEND_ENV = "PCR_FAST_AUGMENT_BACKEND"
FILL_MODES = ("zero", "mean", "noise")
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

FillSpec = Union[str, float, int, Tensor]


@dataclass
class AugmentResult:
    """The augmented view and the draws that made it.

    ``permutation[..., u]`` is the index (row-major over the unit grid of its own image) of
    the source unit copied to unit ``u``; ``mask[..., u]`` is True where unit ``u`` was
    filled instead. Their leading shape is the image dims of ``pixel_values`` (``(B,)``,
    ``(B, T)``, ``(B, N, T)``) followed by the units per image; for flattened rows both
    are 1-D over all units of all images (each image's slice indexes its own units).
    ``fill`` is the per-image, per-channel fill table that was written (``(images, C)`` in
    the output dtype; for ``"noise"`` the per-channel means).
    """

    pixel_values: Tensor
    permutation: Tensor
    mask: Tensor
    fill: Optional[Tensor]
    """None when ``mask_ratio == 0`` (nothing filled, no statistics computed)."""
    unit_grid: Optional[tuple[int, int]]
    """Units per image as (rows, cols) for pixel layouts; None for flattened rows."""


# --------------------------------------------------------------------------------------
# Geometry: every layout as images × units
# --------------------------------------------------------------------------------------

@dataclass
class _Plan:
    layout: str                    # "images" (B,C,H,W) | "tiles" (B,T,..)/(B,N,T,..) | "rows"
    lead_shape: tuple[int, ...]    # image dims of the pixel layouts; (1,) for rows
    n_images: int                  # images the randomness and the fill are per
    n_units: int                   # total units over all images
    channels: int
    height: int                    # pixel layouts: H; rows: L
    width: int                     # pixel layouts: W; rows: C·t·p·p
    unit_h: int                    # pixel rows per unit (rows layout: merge²)
    unit_w: int                    # pixel cols per unit (rows layout: all columns)
    grid_h: int
    grid_w: int
    counts: Optional[Tensor] = None       # rows layout: units per image (device, int64)
    counts_host: Optional[list[int]] = None


def _check_int(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _plan(x: Tensor, patch_size: int, merge_size: int, channels: Optional[int],
          allow_remainder: bool, image_grid_thw: Optional[Tensor]) -> _Plan:
    if not isinstance(x, Tensor):
        raise ValueError(f"pixel_values must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"pixel_values must be float32, bfloat16, float16 or float64, got {x.dtype}")
    if x.dim() == 2:
        return _plan_rows(x, patch_size, merge_size, channels, image_grid_thw)
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
    return _Plan(layout="images" if x.dim() == 4 else "tiles", lead_shape=lead,
                 n_images=n_images, n_units=n_images * gh * gw, channels=C, height=H, width=W,
                 unit_h=unit, unit_w=unit, grid_h=gh, grid_w=gw)


def _plan_rows(x: Tensor, patch_size: int, merge_size: int, channels: Optional[int],
               grid: Optional[Tensor]) -> _Plan:
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
    return _Plan(layout="rows", lead_shape=(1,), n_images=grid.shape[0], n_units=n_units,
                 channels=C, height=L, width=D, unit_h=m2, unit_w=D, grid_h=n_units, grid_w=1,
                 counts=counts, counts_host=counts_host)


# --------------------------------------------------------------------------------------
# Randomness (shared by both backends)
# --------------------------------------------------------------------------------------

def _unit_image(plan: _Plan, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Per unit: its image id, the first unit of its image; per image: its unit count."""
    n = plan.n_units
    if plan.layout == "rows":
        counts = plan.counts
        image = torch.repeat_interleave(torch.arange(plan.n_images, device=device), counts,
                                        output_size=n)
        starts = torch.cumsum(counts, 0) - counts
    else:
        per = plan.grid_h * plan.grid_w
        counts = torch.full((plan.n_images,), per, dtype=torch.int64, device=device)
        image = torch.arange(n, device=device) // max(per, 1)
        starts = torch.arange(plan.n_images, device=device) * per
    return image, starts[image], counts



def _draw(plan: _Plan, device: torch.device, shuffle: bool, mask_ratio: float,
          generator: Optional[torch.Generator], valid_image: Optional[Tensor]):
    """Global-unit permutation (source unit of each unit), mask, unit image ids, local index."""
    n = plan.n_units
    image, start, counts = _unit_image(plan, device)
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


def _k_bound(plan: _Plan, mask_ratio: float) -> int:
    """An upper bound, known on the host, of the total masked units (noise buffer size)."""
    if plan.layout != "rows":
        per = plan.grid_h * plan.grid_w
        return plan.n_images * int(math.floor(mask_ratio * per + 0.5))
    if plan.counts_host is not None:
        return sum(int(math.floor(mask_ratio * c + 0.5)) for c in plan.counts_host)
    return int(math.floor(mask_ratio * plan.n_units + 0.5 * plan.n_images))


# --------------------------------------------------------------------------------------
# Fill values (shared by both backends)
# --------------------------------------------------------------------------------------

def _nonzero(t: Tensor) -> Tensor:
    """Replace exact zeros by the dtype's smallest normal number (never an all-zero tile)."""
    return torch.where(t == 0, torch.full_like(t, torch.finfo(t.dtype).tiny), t)


def _image_stats(x: Tensor, plan: _Plan, with_std: bool) -> tuple[Tensor, Optional[Tensor]]:
    """Per-image, per-channel mean (and population std) in float32: (n_images, C)."""
    if plan.layout != "rows":
        if with_std:
            std, mean = torch.std_mean(x, dim=(-2, -1), correction=0)
            return mean.float().reshape(plan.n_images, -1), std.float().reshape(plan.n_images, -1)
        return x.mean(dim=(-2, -1), dtype=torch.float32).reshape(plan.n_images, -1), None
    L, D = x.shape
    C = plan.channels
    per_row = x.unflatten(1, (C, D // C))
    row_image = torch.repeat_interleave(torch.arange(plan.n_images, device=x.device),
                                        plan.counts * plan.unit_h, output_size=L)
    sums = torch.zeros(plan.n_images, C, dtype=torch.float32, device=x.device)
    sums.index_add_(0, row_image, per_row.sum(-1, dtype=torch.float32))
    n_elem = (plan.counts * plan.unit_h * (D // C)).clamp(min=1).to(torch.float32)[:, None]
    mean = sums / n_elem
    if not with_std:
        return mean, None
    centred = per_row.float() - mean[row_image][:, :, None]
    sq = torch.zeros_like(sums).index_add_(0, row_image, centred.square().sum(-1))
    return mean, (sq / n_elem).sqrt()


def _fill_table(x: Tensor, plan: _Plan, fill: FillSpec) -> tuple[Tensor, Optional[Tensor]]:
    """The (n_images, C) fill table in x.dtype, and the float32 std for "noise"."""
    C = plan.channels
    if isinstance(fill, str):
        if fill == "zero":
            table = torch.zeros(plan.n_images, C, dtype=x.dtype, device=x.device)
            return _nonzero(table), None
        mean, std = _image_stats(x, plan, with_std=fill == "noise")
        return (_nonzero(mean.to(x.dtype)) if fill == "mean" else mean), std
    value = torch.as_tensor(fill, dtype=torch.float32, device=x.device)
    table = value.reshape(1, -1).expand(plan.n_images, C) if value.numel() == C else \
        value.reshape(1, 1).expand(plan.n_images, C)
    return _nonzero(table.to(x.dtype).contiguous()), None


def _noise_buffer(plan: _Plan, mean: Tensor, std: Tensor, mask: Tensor, image: Tensor,
                  k_bound: int, dtype: torch.dtype, generator: Optional[torch.Generator],
                  device: torch.device) -> tuple[Tensor, Tensor]:
    """Gaussian fill values per masked unit, generated once in torch for both backends.

    Returns the (slots, C, UH, UW) buffer and the slot of each unit (-1 where unmasked).
    """
    C = plan.channels
    if plan.layout == "rows":
        shape = (k_bound, plan.unit_h, C, plan.width // C)
    else:
        shape = (k_bound, C, plan.unit_h, plan.unit_w)
    gen_device = generator.device if generator is not None else device
    z = torch.randn(shape, generator=generator, device=gen_device).to(device)
    slot = torch.where(mask, torch.cumsum(mask, 0) - 1, -1)
    slot_image = torch.zeros(k_bound + 1, dtype=torch.int64, device=device)
    slot_image.scatter_(0, torch.where(mask, slot, k_bound), image)
    slot_image = slot_image[:k_bound]
    if plan.layout == "rows":
        m, s = mean[slot_image][:, None, :, None], std[slot_image][:, None, :, None]
    else:
        m, s = mean[slot_image][:, :, None, None], std[slot_image][:, :, None, None]
    noise = _nonzero((m + s * z).to(dtype))
    if plan.layout == "rows":
        noise = noise.reshape(k_bound, 1, plan.unit_h, plan.width)  # (slots, "C"=1, m², D)
    return noise.contiguous(), slot


# --------------------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------------------

def _apply_torch(x: Tensor, plan: _Plan, perm: Tensor, mask: Tensor, image: Tensor,
                 table: Tensor, noise: Optional[Tensor], slot: Optional[Tensor]) -> Tensor:
    """Reference gather: unfold into units, index, where, fold back."""
    if plan.layout == "rows":
        L, D = x.shape
        units = x.reshape(plan.n_units, plan.unit_h, D)[perm]
        if noise is not None:
            fills = noise.reshape(-1, plan.unit_h, D)[slot.clamp(min=0)]
        elif table is not None:
            fills = table[image].repeat_interleave(D // plan.channels, dim=1)[:, None, :]
        if noise is not None or table is not None:
            units = torch.where(mask[:, None, None], fills, units)
        return units.reshape(L, D)
    C, H, W = plan.channels, plan.height, plan.width
    uh, uw, gh, gw = plan.unit_h, plan.unit_w, plan.grid_h, plan.grid_w
    out = x.reshape(plan.n_images, C, H, W).clone(memory_format=torch.contiguous_format)
    core = out[:, :, :gh * uh, :gw * uw]
    units = (core.reshape(plan.n_images, C, gh, uh, gw, uw).permute(0, 2, 4, 1, 3, 5)
             .reshape(plan.n_units, C, uh, uw))
    units = units[perm]
    if noise is not None:
        units = torch.where(mask[:, None, None, None], noise[slot.clamp(min=0)], units)
    elif table is not None:
        units = torch.where(mask[:, None, None, None], table[image][:, :, None, None], units)
    core.copy_(units.reshape(plan.n_images, gh, gw, C, uh, uw).permute(0, 3, 1, 4, 2, 5)
               .reshape(plan.n_images, C, gh * uh, gw * uw))
    return out.reshape(x.shape)


def _apply_triton(x: Tensor, plan: _Plan, perm: Tensor, mask: Tensor, image: Tensor,
                  table: Tensor, noise: Optional[Tensor], slot: Optional[Tensor]) -> Tensor:
    from .kernels.patch_gather import patch_gather

    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    arange = torch.arange(plan.n_units, device=x.device)
    if plan.layout == "rows":
        delta = (perm - arange) * (plan.unit_h * x.stride(0))
        lead, src_lead, dst_lead = (1, 1, 1), (0, 0, 0), (0, 0, 0)
        src_chw = (0, x.stride(0), x.stride(1))
        dst_chw = (0, out.stride(0), out.stride(1))
        channels, fill_div = 1, plan.width // plan.channels
    else:
        per = plan.grid_h * plan.grid_w
        su, u = perm % per, arange % per
        dy = (su // plan.grid_w - u // plan.grid_w) * plan.unit_h
        dx = (su % plan.grid_w - u % plan.grid_w) * plan.unit_w
        delta = dy * x.stride(-2) + dx * x.stride(-1)
        k = len(plan.lead_shape)
        lead = (1,) * (3 - k) + plan.lead_shape
        src_lead = (0,) * (3 - k) + tuple(x.stride()[:k])
        dst_lead = (0,) * (3 - k) + tuple(out.stride()[:k])
        src_chw, dst_chw = tuple(x.stride()[-3:]), tuple(out.stride()[-3:])
        channels, fill_div = plan.channels, 0
    if noise is not None:
        code, fill = slot, noise
    elif table is not None:
        code, fill = torch.where(mask, image, -1), table
    else:  # nothing masked: every code is -1 and the fill table is never read
        code = torch.full((plan.n_units,), -1, dtype=torch.int32, device=x.device)
        fill = torch.zeros(1, plan.channels, dtype=x.dtype, device=x.device)
    patch_gather(
        x, out, delta.to(torch.int64).contiguous(), code.to(torch.int32).contiguous(),
        fill.contiguous(), lead_shape=lead, src_lead_strides=src_lead, dst_lead_strides=dst_lead,
        channels=channels, height=plan.height, width=plan.width, src_chw_strides=src_chw,
        dst_chw_strides=dst_chw, unit_h=plan.unit_h, unit_w=plan.unit_w, grid_h=plan.grid_h,
        grid_w=plan.grid_w, noise=noise is not None, fill_channel_div=fill_div)
    return out


def _resolve_backend(backend: str, device: torch.device) -> str:
    return select_backend(backend, device, allowed=BACKENDS, env_var=BACKEND_ENV)


# --------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------

def _check_fill(fill: FillSpec) -> FillSpec:
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


def _check_ratio(mask_ratio: float) -> float:
    if isinstance(mask_ratio, bool) or not isinstance(mask_ratio, (int, float)) \
            or not (0.0 <= mask_ratio < 1.0):
        raise ValueError(f"mask_ratio must be a number in [0, 1), got {mask_ratio!r}")
    return float(mask_ratio)


def patch_augment(
    pixel_values: Tensor,
    *,
    patch_size: int,
    shuffle: bool = True,
    mask_ratio: float = 0.25,
    fill: FillSpec = "mean",
    merge_size: int = 1,
    image_grid_thw: Optional[Tensor] = None,
    tile_mask: Optional[Tensor] = None,
    skip_zero_tiles: bool = True,
    channels: Optional[int] = None,
    allow_remainder: bool = False,
    seed: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    backend: str = "auto",
) -> AugmentResult:
    """Patch-shuffled and/or patch-masked copy of ``pixel_values`` (input untouched).

    Args:
        pixel_values: ``(B, C, H, W)``, tiles ``(B, T, C, H, W)`` / ``(B, N, T, C, H, W)``,
            or flattened rows ``(L, C·t·p·p)`` with ``image_grid_thw``.
        patch_size: the encoder's patch side in pixels; a unit is ``patch_size·merge_size``
            pixels square (rows layout: ``merge_size²`` consecutive rows).
        shuffle: permute the units within each image (tile, grid segment).
        mask_ratio: fraction in ``[0, 1)`` of units per image replaced by the fill
            (``floor(ratio·n + 1/2)`` of them, exactly).
        fill: ``"zero"``, ``"mean"`` (per image and channel), ``"noise"`` (Gaussian with the
            image's per-channel mean and std), a number, or a per-channel sequence/tensor.
        merge_size: patches per side merged into one visual token (Qwen2-VL 2, …).
        image_grid_thw: ``(n_images, 3)`` for the rows layout (also ``video_grid_thw``).
        tile_mask: for tiled layouts, nonzero where a tile is real (e.g. Mllama's
            ``aspect_ratio_mask``); padding tiles are copied unchanged.
        skip_zero_tiles: tiled layouts without ``tile_mask``: treat all-zero tiles as
            padding (LLaVA-NeXT, Idefics3) — one reduction over the input.
        channels: channel count of the rows layout (default 3).
        allow_remainder: units need not divide H, W; border pixels stay in place.
        seed / generator: the randomness; ``generator`` wins; neither → torch's default RNG
            of the device. Same seed → same output on either backend of a device.
        backend: ``"auto"`` (Triton on CUDA, torch otherwise; env ``PCR_FAST_AUGMENT_BACKEND``
            overrides), ``"triton"``, ``"torch"``.
    """
    patch_size = _check_int("patch_size", patch_size)
    merge_size = _check_int("merge_size", merge_size)
    if channels is not None:
        _check_int("channels", channels)
    mask_ratio = _check_ratio(mask_ratio)
    fill = _check_fill(fill)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if seed is not None and generator is None:
        _check_int("seed", seed, minimum=0)
        generator = torch.Generator(device=pixel_values.device if isinstance(pixel_values, Tensor)
                                    else "cpu").manual_seed(seed)
    plan = _plan(pixel_values, patch_size, merge_size, channels, allow_remainder, image_grid_thw)
    x = pixel_values
    device = x.device
    chosen = _resolve_backend(backend, device)
    logger.debug("patch_augment: layout=%s images=%d units=%d unit=%dx%d backend=%s", plan.layout,
                 plan.n_images, plan.n_units, plan.unit_h, plan.unit_w, chosen)
    if isinstance(fill, (Tensor, list, tuple)) and torch.as_tensor(fill).numel() not in (1, plan.channels):
        raise ValueError(f"fill has {torch.as_tensor(fill).numel()} values but pixel_values has "
                         f"{plan.channels} channels")

    valid_image = _valid_images(x, plan, tile_mask, skip_zero_tiles)
    perm, mask, image, local, _ = _draw(plan, device, shuffle, mask_ratio, generator, valid_image)
    noise = slot = table = None
    if mask_ratio > 0:  # "shuffle only" needs no fill values (and no statistics pass)
        table, std = _fill_table(x, plan, fill)
    if table is not None and isinstance(fill, str) and fill == "noise":
        k_bound = _k_bound(plan, mask_ratio)
        if k_bound > 0:
            noise, slot = _noise_buffer(plan, table, std, mask, image, k_bound, x.dtype, generator,
                                        device)
        table = _nonzero(table.to(x.dtype))
    if plan.n_units == 0 or (not shuffle and mask_ratio == 0):
        out = x.clone(memory_format=torch.contiguous_format)
    elif chosen == "triton":
        out = _apply_triton(x, plan, perm, mask, image, table, noise, slot)
    else:
        out = _apply_torch(x, plan, perm, mask, image, table, noise, slot)

    # perm is global (same image as the destination); make it local to its image.
    perm_local = local + (perm - torch.arange(plan.n_units, device=device))
    if plan.layout == "rows":
        shape, grid = (plan.n_units,), None
    else:
        shape, grid = (*plan.lead_shape, plan.grid_h * plan.grid_w), (plan.grid_h, plan.grid_w)
    return AugmentResult(pixel_values=out, permutation=perm_local.reshape(shape),
                         mask=mask.reshape(shape), fill=table, unit_grid=grid)


def _valid_images(x: Tensor, plan: _Plan, tile_mask: Optional[Tensor],
                  skip_zero_tiles: bool) -> Optional[Tensor]:
    """Per image (tile) True where it is real; None where every image is (no work)."""
    if tile_mask is not None:
        if plan.layout != "tiles":
            raise ValueError("tile_mask is only for tiled layouts (B, T, C, H, W) / (B, N, T, C, H, W); "
                             f"got pixel_values of shape {tuple(x.shape)}")
        if not isinstance(tile_mask, Tensor) or tuple(tile_mask.shape) != plan.lead_shape:
            raise ValueError(f"tile_mask must have shape {plan.lead_shape} (the tile dims of "
                             f"pixel_values), got "
                             f"{tuple(tile_mask.shape) if isinstance(tile_mask, Tensor) else type(tile_mask).__name__}")
        return tile_mask.to(device=x.device).reshape(-1) != 0
    if plan.layout == "tiles" and skip_zero_tiles:
        peak = torch.linalg.vector_norm(x, ord=float("inf"), dim=(-3, -2, -1))
        return peak.reshape(-1) != 0
    return None


# --------------------------------------------------------------------------------------
# Model families: unit size and layout from the HF config
# --------------------------------------------------------------------------------------

_NO_MERGE = ("llava", "llava_next", "llava_onevision", "paligemma", "mllama", "clip",
             "siglip", "clip_vision_model", "siglip_vision_model")
_QWEN = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe")


def _as_int_side(name: str, value: Any) -> int:
    if isinstance(value, (tuple, list)):
        if len(set(value)) != 1:
            raise ValueError(f"{name}={value!r} is not square; PatchAugment needs square units")
        value = value[0]
    return int(value)


def model_unit(model_or_config: Any, unit: str = "token") -> dict:
    """``patch_size``, ``merge_size`` and ``channels`` of a model family, read from its config.

    ``unit="token"`` makes one shuffled unit one visual token of the language model (the
    encoder's merge/pool/pixel-shuffle factor applied); ``unit="patch"`` one encoder patch;
    ``unit="half_token"`` half a visual token per side (merge/2 patches where the model
    merges an even number, else half an encoder patch) — PCR's default: masking sub-token
    units hides part of every token's content without erasing whole tokens (see README,
    "Does the defense work?").
    """
    if unit not in ("token", "patch", "half_token"):
        raise ValueError(f"unit must be 'token', 'patch' or 'half_token', got {unit!r}")
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type is None:
        raise ValueError(f"model_or_config has no config.model_type (got {type(model_or_config).__name__})")
    vision = getattr(config, "vision_config", None)
    if vision is None and model_type in ("clip_vision_model", "siglip_vision_model"):
        vision = config
    if vision is None or getattr(vision, "patch_size", None) is None:
        raise ValueError(f"config of model_type={model_type!r} has no vision_config.patch_size")
    patch = _as_int_side("vision_config.patch_size", vision.patch_size)
    channels = next((getattr(vision, a) for a in ("num_channels", "in_channels", "in_chans")
                     if getattr(vision, a, None) is not None), 3)
    if model_type in _QWEN:
        merge = int(vision.spatial_merge_size)
    elif model_type in ("idefics3", "smolvlm"):
        merge = int(config.scale_factor)
    elif model_type == "internvl":
        ratio = float(config.downsample_ratio)
        merge = round(1 / ratio)
        if abs(merge * ratio - 1) > 1e-6:
            raise ValueError(f"internvl downsample_ratio={ratio} is not 1/integer")
    elif model_type == "gemma3":
        per_side = _as_int_side("vision_config.image_size", vision.image_size) // patch
        tokens_side = math.isqrt(int(config.mm_tokens_per_image))
        if tokens_side < 1 or tokens_side ** 2 != int(config.mm_tokens_per_image) or per_side % tokens_side:
            raise ValueError(f"gemma3 config: mm_tokens_per_image={config.mm_tokens_per_image} is not a "
                             f"square dividing the {per_side}×{per_side} patch grid")
        merge = per_side // tokens_side
    elif model_type in _NO_MERGE:
        merge = 1
    else:
        raise ValueError(
            f"PatchAugment.for_model does not know model_type={model_type!r} (known: "
            f"{sorted(set(_NO_MERGE + _QWEN + ('idefics3', 'smolvlm', 'internvl', 'gemma3')))}); "
            "construct PatchAugment(patch_size=..., merge_size=...) directly")
    if unit == "half_token":
        if merge % 2 == 0:
            return dict(patch_size=patch, merge_size=merge // 2, channels=int(channels))
        if merge == 1 and patch % 2 == 0 and model_type not in _QWEN:
            return dict(patch_size=patch // 2, merge_size=1, channels=int(channels))
        raise ValueError(f"unit='half_token' is not expressible for model_type={model_type!r} "
                         f"(patch {patch}, merge {merge}); use unit='token' or 'patch'")
    return dict(patch_size=patch, merge_size=merge if unit == "token" else 1, channels=int(channels))


class PatchAugment:
    """Callable patch shuffle/mask for PCR's augmented view (see :func:`patch_augment`).

    ``seed`` seeds a private generator (one per device) that advances with every call, so
    a training run is reproducible and successive batches still get fresh draws; a
    ``generator`` passed to a call takes precedence.
    """

    def __init__(self, patch_size: int, shuffle: bool = True, mask_ratio: float = 0.25,
                 fill: FillSpec = "mean", seed: Optional[int] = None, *, merge_size: int = 1,
                 channels: Optional[int] = None, allow_remainder: bool = False,
                 skip_zero_tiles: bool = True, backend: str = "auto"):
        self.patch_size = _check_int("patch_size", patch_size)
        self.merge_size = _check_int("merge_size", merge_size)
        self.channels = None if channels is None else _check_int("channels", channels)
        self.mask_ratio = _check_ratio(mask_ratio)
        self.fill = _check_fill(fill)
        if seed is not None:
            _check_int("seed", seed, minimum=0)
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.shuffle = bool(shuffle)
        self.seed = seed
        self.allow_remainder = bool(allow_remainder)
        self.skip_zero_tiles = bool(skip_zero_tiles)
        self.backend = backend
        self._generators: dict[str, torch.Generator] = {}

    @classmethod
    def for_model(cls, model_or_config: Any, *, unit: str = "token", **kwargs: Any) -> "PatchAugment":
        """Unit size (and rows-layout channels) read from an HF model or its config.

        Known ``model_type``s: llava, llava_next, llava_onevision, paligemma, mllama (encoder
        patch), qwen2_vl, qwen2_5_vl, qwen3_vl (merge), idefics3, smolvlm (scale factor),
        internvl (pixel shuffle), gemma3 (pooling).
        """
        geometry = model_unit(model_or_config, unit)
        geometry.update(kwargs)
        return cls(**geometry)

    def _generator(self, device: torch.device) -> Optional[torch.Generator]:
        if self.seed is None:
            return None
        key = str(device)
        if key not in self._generators:
            self._generators[key] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[key]

    def apply(self, pixel_values: Tensor, image_grid_thw: Optional[Tensor] = None,
              generator: Optional[torch.Generator] = None, *,
              tile_mask: Optional[Tensor] = None) -> AugmentResult:
        """The augmented view with its permutation, mask and fill table."""
        if generator is None and isinstance(pixel_values, Tensor):
            generator = self._generator(pixel_values.device)
        return patch_augment(
            pixel_values, patch_size=self.patch_size, shuffle=self.shuffle,
            mask_ratio=self.mask_ratio, fill=self.fill, merge_size=self.merge_size,
            image_grid_thw=image_grid_thw, tile_mask=tile_mask,
            skip_zero_tiles=self.skip_zero_tiles, channels=self.channels,
            allow_remainder=self.allow_remainder, generator=generator, backend=self.backend)

    def __call__(self, pixel_values: Tensor, image_grid_thw: Optional[Tensor] = None,
                 generator: Optional[torch.Generator] = None, *,
                 tile_mask: Optional[Tensor] = None) -> Tensor:
        """The augmented ``pixel_values``: same shape, dtype and device; input untouched."""
        return self.apply(pixel_values, image_grid_thw, generator, tile_mask=tile_mask).pixel_values

    def __repr__(self) -> str:
        return (f"PatchAugment(patch_size={self.patch_size}, merge_size={self.merge_size}, "
                f"shuffle={self.shuffle}, mask_ratio={self.mask_ratio}, fill={self.fill!r}, "
                f"seed={self.seed}, backend={self.backend!r})")
