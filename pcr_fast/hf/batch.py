"""Batch helpers shared by the training hook and the scan: input checks, the causal shift,
sample ids and the cached default augmentation."""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import torch
from torch import Tensor, nn

from ..augment import PatchAugment
from ..config import AugmentConfig
from . import adapters


def check_batch(inputs: Any) -> None:
    """Raise a ValueError unless ``inputs`` is a processor/collator batch the hook can use:
    a Mapping with tensor ``input_ids`` (non-empty), ``pixel_values`` (finite, where that
    costs no device sync) and targets (``labels`` or ``shift_labels``)."""
    if not isinstance(inputs, Mapping):
        raise ValueError(f"inputs must be the batch dict (a Mapping), got {type(inputs).__name__}")
    for key in ("input_ids", "pixel_values"):
        if not isinstance(inputs.get(key), Tensor):
            raise ValueError(f"inputs[{key!r}] must be a tensor (the processor's output); keys: {sorted(inputs)}")
    if inputs["input_ids"].dim() < 2 or inputs["input_ids"].shape[0] == 0:
        raise ValueError(f"inputs['input_ids'] must be a non-empty (B, T) batch, got shape "
                         f"{tuple(inputs['input_ids'].shape)}")
    if not isinstance(inputs.get("labels"), Tensor) and not isinstance(inputs.get("shift_labels"), Tensor):
        raise ValueError("inputs must contain 'labels' (B, T) (or 'shift_labels'): PCR needs targets")
    pixels = inputs["pixel_values"]
    if pixels.device.type == "cpu" and pixels.is_floating_point() and not bool(torch.isfinite(pixels).all()):
        raise ValueError("inputs['pixel_values'] holds NaN or inf values: check the image loading/processor")


def shifted(hidden: Tensor, labels: Optional[Tensor], shift_labels: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """Causal shift: position t predicts token t+1 (or the collator's ``shift_labels`` as given)."""
    if shift_labels is not None:
        return hidden, shift_labels
    return hidden[:, :-1, :], labels[:, 1:]


def shifted_targets(hidden: Tensor, inputs: Mapping[str, Any]) -> Tuple[Tensor, Tensor]:
    """(hidden, labels) of a batch aligned for a causal LM (see :func:`shifted`)."""
    shift_labels = inputs.get("shift_labels")
    labels = inputs.get("labels")
    if not isinstance(labels, Tensor) and not isinstance(shift_labels, Tensor):
        raise ValueError("inputs must contain 'labels' (B, T) (or 'shift_labels'): PCR needs targets")
    return shifted(hidden, labels, shift_labels if isinstance(shift_labels, Tensor) else None)


def shifted_token_mask(inputs: Mapping[str, Any]) -> Optional[Tensor]:
    """The attention mask aligned with the shifted targets (True on real tokens), if any."""
    attention_mask = inputs.get("attention_mask")
    if not isinstance(attention_mask, Tensor) or attention_mask.shape != inputs["input_ids"].shape:
        return None
    if isinstance(inputs.get("shift_labels"), Tensor):
        return attention_mask.to(torch.bool)
    return attention_mask[:, 1:].to(torch.bool)


def batch_sample_ids(inputs: Mapping[str, Any]) -> Tensor:
    """The batch's (B,) training-set row ids, or a ValueError saying how to provide them."""
    ids = inputs.get(adapters.SAMPLE_IDS_KEY)
    rows = inputs["input_ids"].shape[0] if isinstance(inputs.get("input_ids"), Tensor) else None
    if not isinstance(ids, Tensor) or ids.dim() != 1 or ids.is_floating_point() \
            or (rows is not None and ids.numel() != rows):
        raise ValueError(f"scan-and-unlearn PCR needs inputs['{adapters.SAMPLE_IDS_KEY}']: a ({rows},) integer "
                         f"tensor of training-set row ids (e.g. dataset.map(lambda e, i: {{'sample_ids': i}}, "
                         f"with_indices=True) and a collator that stacks it); got "
                         f"{tuple(ids.shape) if isinstance(ids, Tensor) else type(ids).__name__}")
    return ids


_AUGMENTS: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def cached_augment(model: nn.Module, config: AugmentConfig) -> Callable:
    """``PatchAugment.from_config(config, model)``, built once per (model, augmentation config).

    Why: a seeded PatchAugment advances its generator with every call; rebuilding it per
    batch would give every batch the same permutation and mask. The key is the whole
    (frozen) config, so no setting can be left out of it.
    """
    inner = adapters.unwrap_model(model)
    cached = _AUGMENTS.get(inner)
    if cached is None or cached[0] != config:
        cached = (config, PatchAugment.from_config(config, inner))
        _AUGMENTS[inner] = cached
    return cached[1]


def check_first_batch(inputs: Any, *, needs_sample_ids: bool, num_samples: Optional[int] = None) -> None:
    """The Trainer's check of its first batch, before the first step (one host sync, once).

    Beyond :func:`check_batch`: every float pixel tensor finite on any device, at least one
    labelled token in the batch, and — for scan-and-unlearn — ``sample_ids`` that are row ids
    of the training set (in ``[0, num_samples)``). Why here: without it a missing column
    fails at the first scan, far into training."""
    check_batch(inputs)
    for key, value in inputs.items():
        if "pixel" in key and isinstance(value, Tensor) and value.is_floating_point() \
                and not bool(torch.isfinite(value).all()):
            raise ValueError(f"the first training batch's {key!r} holds NaN or inf values: check the image "
                             "loading/processor (e.g. an image_std of 0)")
    labels = inputs.get("labels") if isinstance(inputs.get("labels"), Tensor) else inputs.get("shift_labels")
    if not bool((labels != -100).any()):
        raise ValueError("the first training batch has no labelled token (labels are all -100): the collator must "
                         "put the answer tokens in 'labels'")
    if needs_sample_ids:
        ids = batch_sample_ids(inputs)
        if num_samples is not None and ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= num_samples):
            raise ValueError(f"the first training batch's sample_ids lie in [{int(ids.min())}, {int(ids.max())}], "
                             f"outside the training set's row ids [0, {num_samples})")


@dataclass
class OriginalView:
    """The original view's forward of a batch, as every PCR step reads it."""

    model_inputs: Dict[str, Any]    # the batch without pcr_fast's own keys
    shape: Tuple[int, int]          # (B, T) of input_ids
    hidden: Tensor                  # last hidden states, shifted for the causal LM
    targets: Tensor                 # the labels, shifted alike
    weight: Tensor                  # the lm_head weight
    softcap: Optional[float]        # the logit softcap, verified on the first batch


def original_view(model: nn.Module, head: nn.Module, inputs: Mapping[str, Any], verified: bool,
                  softcap: Optional[float]) -> OriginalView:
    """One forward of the batch's original view (no N×V logits); on a model not yet
    ``verified`` its logits are checked against ``softcap(lm_head(h))`` and the softcap read."""
    model_inputs = adapters.model_inputs_of(inputs)
    shape = tuple(inputs["input_ids"].shape[:2])
    hidden, weight = adapters.forward_hidden(model, head, model_inputs, shape, verify=not verified)
    if not verified:
        softcap = adapters.verified_softcap(model)[1]
    hidden, targets = shifted_targets(hidden, inputs)
    return OriginalView(model_inputs, shape, hidden, targets, weight, softcap)
