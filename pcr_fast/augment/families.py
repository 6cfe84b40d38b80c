"""The unit of each model family, read from its HF config (the model-family table)."""
from __future__ import annotations

import math
from typing import Any

from ..config import UNITS

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
    units hides part of every token's content without erasing whole tokens
    (benchmarks/EVAL_NOTES.md §8).
    """
    if unit not in UNITS:
        raise ValueError(f"unit must be one of {UNITS}, got {unit!r}")
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
