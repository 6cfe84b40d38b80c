"""``use_fused_cross_entropy(model)``: one line that makes a Hugging Face model's training
forward compute its loss with :func:`pcr_fast.fused_linear_cross_entropy`, never building the
(B, T, V) logits.

How: the unwrapped model's ``forward`` is wrapped (an instance attribute, so DDP, peft and
accelerate wrappers still reach it). When called with ``labels`` (or ``shift_labels``) while
gradients are enabled — a training step — it runs the model's own forward without the
labels, with the lm_head capture of :mod:`pcr_fast.hf.adapters` (the lm_head receives an
empty slice; its input, the post-norm hidden states, is recorded), then computes the HF
causal-LM loss from the hidden states and the lm_head weight: shifted labels, ``ignore_index``
-100, sum / ``num_items_in_batch`` when the Trainer passes it, mean over labelled tokens
otherwise, and the model's logit soft-capping (checked against its own logits on the first
batch). The output's ``loss`` is that loss and its ``logits`` is None. Without labels, or
under ``torch.no_grad()`` (evaluation, generation), the original forward runs unchanged.
"""
from __future__ import annotations

import functools
import logging
from typing import Any, Optional

import torch
from torch import nn

from ..cross_entropy import check_options, fused_linear_cross_entropy
from . import adapters

logger = logging.getLogger(__name__)

_ORIGINAL = "_pcr_fast_original_forward"

__all__ = ["use_fused_cross_entropy", "remove_fused_cross_entropy"]


def use_fused_cross_entropy(model: nn.Module, *, backend: str = "auto", label_smoothing: float = 0.0,
                            z_loss: float = 0.0) -> nn.Module:
    """Patch ``model`` (in place, idempotent) so its training forward uses the fused CE.

    Args:
        model: a Hugging Face causal LM or vision-language ``*ForConditionalGeneration``
            model, possibly wrapped by peft, DDP or accelerate.
        backend: the statistics backend (:func:`pcr_fast.stats.single_view_stats`).
        label_smoothing, z_loss: as :func:`pcr_fast.fused_linear_cross_entropy`.
    Returns:
        ``model`` (for chaining).
    """
    inner = adapters.unwrap_model(model)
    head = adapters.find_lm_head(inner)
    adapters.softcap_candidates(inner)   # refuses logit transforms the fused loss cannot model
    if getattr(inner.config, "is_encoder_decoder", False):
        raise ValueError("encoder-decoder models are not supported: the fused CE hooks a decoder-only lm_head")
    original = getattr(inner, _ORIGINAL, None) or inner.forward
    check_options(label_smoothing, z_loss)
    options = dict(backend=backend, label_smoothing=label_smoothing, z_loss=z_loss)

    @functools.wraps(original)
    def forward(*args: Any, **kwargs: Any):
        labels = kwargs.get("labels")
        shift_labels = kwargs.get("shift_labels")
        if (labels is None and shift_labels is None) or not torch.is_grad_enabled():
            return original(*args, **kwargs)
        return _fused_forward(inner, head, original, args, kwargs, options)

    setattr(inner, _ORIGINAL, original)
    inner.forward = forward
    return model


def remove_fused_cross_entropy(model: nn.Module) -> nn.Module:
    """Undo :func:`use_fused_cross_entropy` (no-op on an unpatched model)."""
    inner = adapters.unwrap_model(model)
    original = getattr(inner, _ORIGINAL, None)
    if original is not None:
        inner.forward = original
        delattr(inner, _ORIGINAL)
    return model


def _fused_forward(inner: nn.Module, head: nn.Module, original, args, kwargs, options):
    kwargs = dict(kwargs)
    labels = kwargs.pop("labels", None)
    shift_labels = kwargs.pop("shift_labels", None)
    num_items: Optional[Any] = kwargs.pop("num_items_in_batch", None)
    verified, softcap = adapters.verified_softcap(inner)
    with adapters.capture_last_hidden(head, keep_last=not verified) as capture:
        output = original(*args, **kwargs)
    if len(capture.hidden) != 1:
        raise ValueError(f"the model called its lm_head {len(capture.hidden)} times in one forward (expected once): "
                         f"{type(inner).__name__} computes logits in a way the fused CE cannot intercept")
    hidden, weight = capture.hidden[0], capture.weights[0]
    adapters.check_weight_usable(weight)
    if not verified:
        logits = getattr(output, "logits", None)
        adapters.verify_logits(inner, head, hidden[..., -1:, :].detach(), logits, weight)
        softcap = adapters.verified_softcap(inner)[1]
    if shift_labels is not None:
        targets = shift_labels
    else:
        if labels.shape != hidden.shape[:-1]:
            raise ValueError(f"labels must have shape {tuple(hidden.shape[:-1])} (the input positions), got "
                             f"{tuple(labels.shape)}")
        hidden, targets = hidden[..., :-1, :], labels[..., 1:]
    with adapters.gathered_weight(weight):
        loss = fused_linear_cross_entropy(hidden, weight, targets.to(hidden.device), bias=getattr(head, "bias", None),
                                          softcap=softcap, num_items_in_batch=num_items, **options)
    if isinstance(output, dict):   # a ModelOutput: rebuild it with the loss first, no logits
        fields = {k: v for k, v in output.items() if k not in ("loss", "logits")}
        return type(output)(loss=loss, logits=None, **fields)
    return (loss,) + tuple(output[1:]) if isinstance(output, tuple) else output
