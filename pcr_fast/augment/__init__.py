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
  element read once (:mod:`pcr_fast.kernels.patch_gather`, launched by
  :mod:`pcr_fast.backends.triton`).
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
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

from ..backends import OPS, select_backend
from ..config import AugmentConfig
from ..backends import pytorch as torch_backend
from .draws import draw, masked_bound
from .families import model_unit
from .fills import FILL_MODES, FillSpec, check_fill, fill_table, noise_buffer, nonzero
from .geometry import check_int, unit_grid, valid_images

logger = logging.getLogger(__name__)

BACKENDS = OPS["augment"][0]

__all__ = ["AugmentResult", "FILL_MODES", "PatchAugment", "model_unit", "patch_augment"]


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


def _check_ratio(mask_ratio: float) -> float:
    if isinstance(mask_ratio, bool) or not isinstance(mask_ratio, (int, float)) \
            or not (0.0 <= mask_ratio < 1.0):
        raise ValueError(f"mask_ratio must be a number in [0, 1), got {mask_ratio!r}")
    return float(mask_ratio)


def patch_augment(
    pixel_values: Tensor,
    *,
    patch_size: int,
    shuffle: bool = AugmentConfig.shuffle,
    mask_ratio: float = AugmentConfig.mask_ratio,
    fill: FillSpec = AugmentConfig.fill,
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
    patch_size = check_int("patch_size", patch_size)
    merge_size = check_int("merge_size", merge_size)
    if channels is not None:
        check_int("channels", channels)
    mask_ratio = _check_ratio(mask_ratio)
    fill = check_fill(fill)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if seed is not None and generator is None:
        check_int("seed", seed, minimum=0)
        generator = torch.Generator(device=pixel_values.device if isinstance(pixel_values, Tensor)
                                    else "cpu").manual_seed(seed)
    grid = unit_grid(pixel_values, patch_size, merge_size, channels, allow_remainder, image_grid_thw)
    x = pixel_values
    device = x.device
    chosen = select_backend("augment", backend, device)
    logger.debug("patch_augment: layout=%s images=%d units=%d unit=%dx%d backend=%s", grid.layout,
                 grid.n_images, grid.n_units, grid.unit_h, grid.unit_w, chosen)
    if isinstance(fill, (Tensor, list, tuple)) and torch.as_tensor(fill).numel() not in (1, grid.channels):
        raise ValueError(f"fill has {torch.as_tensor(fill).numel()} values but pixel_values has "
                         f"{grid.channels} channels")

    valid_image = valid_images(x, grid, tile_mask, skip_zero_tiles)
    perm, mask, image, local, _ = draw(grid, device, shuffle, mask_ratio, generator, valid_image)
    noise = slot = table = None
    if mask_ratio > 0:  # "shuffle only" needs no fill values (and no statistics pass)
        table, std = fill_table(x, grid, fill)
    if table is not None and isinstance(fill, str) and fill == "noise":
        k_bound = masked_bound(grid, mask_ratio)
        if k_bound > 0:
            noise, slot = noise_buffer(grid, table, std, mask, image, k_bound, x.dtype, generator,
                                       device)
        table = nonzero(table.to(x.dtype))
    if grid.n_units == 0 or (not shuffle and mask_ratio == 0):
        out = x.clone(memory_format=torch.contiguous_format)
    elif chosen == "triton":
        from ..backends import triton as triton_backend

        out = triton_backend.gather_units(x, grid, perm, mask, image, table, noise, slot)
    else:
        out = torch_backend.gather_units(x, grid, perm, mask, image, table, noise, slot)

    # perm is global (same image as the destination); make it local to its image.
    perm_local = local + (perm - torch.arange(grid.n_units, device=device))
    if grid.layout == "rows":
        shape, per_image = (grid.n_units,), None
    else:
        shape, per_image = (*grid.lead_shape, grid.grid_h * grid.grid_w), (grid.grid_h, grid.grid_w)
    return AugmentResult(pixel_values=out, permutation=perm_local.reshape(shape),
                         mask=mask.reshape(shape), fill=table, unit_grid=per_image)


class PatchAugment:
    """Callable patch shuffle/mask for PCR's augmented view (see :func:`patch_augment`).

    Defaults are the defense's measured view (:class:`~pcr_fast.config.AugmentConfig`): no
    shuffle, half of the units masked with the image's mean.

    ``seed`` seeds a private generator (one per device) that advances with every call, so
    a training run is reproducible and successive batches still get fresh draws; a
    ``generator`` passed to a call takes precedence.
    """

    def __init__(self, patch_size: int, shuffle: bool = AugmentConfig.shuffle,
                 mask_ratio: float = AugmentConfig.mask_ratio, fill: FillSpec = AugmentConfig.fill,
                 seed: Optional[int] = None, *, merge_size: int = 1,
                 channels: Optional[int] = None, allow_remainder: bool = False,
                 skip_zero_tiles: bool = True, backend: str = "auto"):
        self.patch_size = check_int("patch_size", patch_size)
        self.merge_size = check_int("merge_size", merge_size)
        self.channels = None if channels is None else check_int("channels", channels)
        self.mask_ratio = _check_ratio(mask_ratio)
        self.fill = check_fill(fill)
        if seed is not None:
            check_int("seed", seed, minimum=0)
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

    @classmethod
    def from_config(cls, config: AugmentConfig, model_or_config: Any = None, *,
                    seed: Optional[int] = None) -> "PatchAugment":
        """The augmentation an :class:`~pcr_fast.config.AugmentConfig` describes.

        With ``config.patch_size=None`` the unit is read from the model (``config.unit``);
        ``half_token`` falls back to ``token`` where a model's unit cannot be halved.
        ``seed`` overrides ``config.augment_seed`` (e.g. a run's seed).
        """
        if not isinstance(config, AugmentConfig):
            raise ValueError(f"config must be an AugmentConfig, got {type(config).__name__}")
        kw = dict(shuffle=config.shuffle, mask_ratio=config.mask_ratio, fill=config.fill,
                  seed=config.augment_seed if seed is None else seed)
        if config.patch_size is not None:
            return cls(patch_size=config.patch_size, **kw)
        if model_or_config is None:
            raise ValueError("patch_size is None: pass the model (or its config) so the "
                             "visual-token unit can be read from it")
        try:
            return cls.for_model(model_or_config, unit=config.unit, **kw)
        except ValueError as err:
            if config.unit != "half_token":
                raise
            logger.warning("%s; falling back to unit='token'", err)
            return cls.for_model(model_or_config, unit="token", **kw)

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
