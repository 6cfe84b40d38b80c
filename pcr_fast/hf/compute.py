"""``compute_pcr_loss``: the PCR objective for any HF vision-language model batch, fused.

The model runs on the original and the patch-augmented view (one batched forward where
the layout allows), its last hidden states are taken without computing logits, and the
fused :class:`~pcr_fast.TwoViewLoss` turns them into the objective with no N×V tensor.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, Optional

import torch
from torch import Tensor, nn

from ..augment import PatchAugment
from ..config import PCRConfig
from ..defense import BackdoorMemory, InlineMemory, cross_view_scores, unlearning_loss
from ..defense.unlearning import original_view_ce, unlearning_objective
from ..loss import TwoViewLoss, TwoViewLossOutput
from . import adapters
from .batch import batch_sample_ids, cached_augment, check_batch, original_view, shifted_targets, shifted_token_mask
from .rows import select_rows

logger = logging.getLogger(__name__)


@dataclass
class PCRLossOutput:
    """The loss to backpropagate and detached per-term values (no host sync)."""

    loss: Tensor
    ce: Tensor
    divergence: Optional[Tensor]              # None in scan-and-unlearn mode (one view per step)
    divergence_term: Optional[Tensor]
    entropy: Optional[Tensor]
    num_tokens: Tensor
    one_forward: bool                         # both views went through one batched forward
    details: Optional[TwoViewLossOutput] = None
    gated_fraction: Optional[Tensor] = None   # responses flagged by the cross-view gate
    unlikelihood: Optional[Tensor] = None     # scan/inline mode: mean unlikelihood on target tokens
    dropped_fraction: Optional[Tensor] = None  # scan/inline mode: responses left out of the CE
    tested_rows: Optional[Tensor] = None      # inline mode: rows whose masked views ran this step
    flagged_rows: Optional[Tensor] = None     # inline mode: ... of which flagged

    def log_dict(self, prefix: str = "pcr/") -> Dict[str, Tensor]:
        """Detached scalars keyed for a logger (call ``.item()`` off the hot path)."""
        keys = ("ce", "divergence", "divergence_term", "entropy", "gated_fraction", "unlikelihood",
                "dropped_fraction", "tested_rows", "flagged_rows")
        return {f"{prefix}{k}": getattr(self, k) for k in keys if getattr(self, k) is not None}


def _resolve_loss(loss_fn: Optional[Callable], cfg: PCRConfig, softcap: Optional[float]):
    if loss_fn is None:
        return TwoViewLoss.from_config(cfg, softcap=softcap)
    if not callable(loss_fn):
        raise ValueError(f"loss_fn must be callable (a TwoViewLoss), got {type(loss_fn).__name__}")
    if isinstance(loss_fn, TwoViewLoss):
        if loss_fn.softcap != softcap:
            raise ValueError(f"the model soft-caps its logits at {softcap} but loss_fn.softcap="
                             f"{loss_fn.softcap}: build the loss with TwoViewLoss(..., softcap={softcap})")
        if cfg.execution.detach_b and not loss_fn.detach_b:
            # the augmented view is a constant target: no gradient into W through it either
            loss_fn = copy.copy(loss_fn)
            loss_fn.detach_b = True
    return loss_fn


def _extra_views(model, head, model_inputs, pixels_a, augment, generator, loss_fn, views: int,
                 shape, inputs) -> list:
    """Hidden states of further augmented draws for the gate's detector (no grad)."""
    gate_weight = loss_fn.objective.gate_weight if isinstance(loss_fn, TwoViewLoss) else 0.0
    if views <= 1 or gate_weight == 0.0:
        return []
    if augment is None:
        raise ValueError("views > 1 needs an augment callable (a precomputed "
                         "'augmented_pixel_values' gives only one draw)")
    out = []
    with torch.no_grad():
        for _ in range(views - 1):
            inputs_k = dict(model_inputs)
            inputs_k[adapters.PIXEL_KEY] = adapters.call_augment(augment, pixels_a, model_inputs, generator)
            h_k, _ = adapters.forward_hidden(model, head, inputs_k, shape)
            out.append(shifted_targets(h_k, inputs)[0])
    return out


def _unlearning_step(model, inputs, head, verified, softcap, cfg, memory, num_items_in_batch) -> PCRLossOutput:
    """Scan-and-unlearn training step: one forward of the original view."""
    if not isinstance(memory, BackdoorMemory):
        raise ValueError(f"memory must be a BackdoorMemory (BackdoorMemory.from_config), got {type(memory).__name__}")
    ids = batch_sample_ids(inputs)
    view = original_view(model, head, inputs, verified, softcap)
    h_a, targets, weight, softcap = view.hidden, view.targets, view.weight, view.softcap
    drop, unlearn = memory.treatment(ids, targets)
    with adapters.gathered_weight(weight):
        out = unlearning_loss(h_a, weight, targets, drop, unlearn, bias=getattr(head, "bias", None),
                              num_items_in_batch=num_items_in_batch, unlearn_weight=cfg.unlearn.unlearn_weight,
                              softcap=softcap, backend=cfg.execution.backend)
    return PCRLossOutput(loss=out.loss, ce=out.ce, divergence=None, divergence_term=None, entropy=None,
                         num_tokens=out.num_tokens, one_forward=True, unlikelihood=out.unlikelihood,
                         dropped_fraction=out.dropped_fraction)


def _inline_step(model, inputs, head, verified, softcap, cfg, memory, num_items_in_batch, augment,
                 generator) -> PCRLossOutput:
    """Inline training step: the training forward, its per-token CE, masked no-grad views of
    the few rows the memory picks (within its budget), then CE + unlikelihood."""
    if not isinstance(memory, InlineMemory):
        raise ValueError(f"mode 'inline' needs an InlineMemory (InlineMemory.from_config), got "
                         f"{type(memory).__name__}")
    ids = batch_sample_ids(inputs)
    view = original_view(model, head, inputs, verified, softcap)
    h_a, targets, weight, softcap = view.hidden, view.targets, view.weight, view.softcap
    model_inputs, shape = view.model_inputs, view.shape
    bias = getattr(head, "bias", None)
    stats = dict(bias=bias, softcap=softcap, backend=cfg.execution.backend)
    with adapters.gathered_weight(weight):
        ce = original_view_ce(h_a, weight, targets, **stats)
        memory.observe(targets, ce)
        k = memory.rows_to_test(targets.shape[0])
        tested = flagged = torch.zeros((), device=ce.device)
        if k > 0:
            rows, eligible = memory.select(ids, targets, ce, k, generator=generator)
            rows = rows.to(targets.device)
            views = _masked_views(model, head, model_inputs, rows, augment, generator, cfg.augment.views, shape,
                                  inputs)
            scores = cross_view_scores(h_a.detach()[rows], views, weight, targets[rows],
                                       view_confidence=cfg.detector.view_confidence, **stats)
            flags = memory.record(ids.to(memory.device)[rows.to(memory.device)], targets[rows], eligible, scores)
            tested, flagged = eligible.sum(), flags.sum()
        drop, unlearn = memory.treatment(ids, targets)
        out = unlearning_objective(ce, targets, drop, unlearn, num_items_in_batch=num_items_in_batch,
                                   unlearn_weight=cfg.unlearn.unlearn_weight)
    memory.commit()
    return PCRLossOutput(loss=out.loss, ce=out.ce, divergence=None, divergence_term=None, entropy=None,
                         num_tokens=out.num_tokens, one_forward=True, unlikelihood=out.unlikelihood,
                         dropped_fraction=out.dropped_fraction, tested_rows=tested.float(),
                         flagged_rows=flagged.float())


@torch.no_grad()
def _masked_views(model, head, model_inputs, rows, augment, generator, views: int, shape, inputs) -> list:
    """Shifted hidden states of ``views`` masked draws of the batch's ``rows`` (no grad); the
    whole batch goes through where its layout cannot be cut per sample."""
    sub = select_rows(model_inputs, rows)
    whole = sub is None
    if whole:
        logger.debug("inline test: this batch layout cannot be cut per sample; masking the whole batch")
        sub = model_inputs
    sub_shape = (shape[0] if whole else rows.numel(), shape[1])
    out = []
    for _ in range(views):
        inputs_k = dict(sub)
        inputs_k[adapters.PIXEL_KEY] = adapters.call_augment(augment, sub[adapters.PIXEL_KEY], sub, generator)
        h_k, _ = adapters.forward_hidden(model, head, inputs_k, sub_shape)
        if not isinstance(inputs.get("shift_labels"), Tensor):
            h_k = h_k[:, :-1, :]   # the causal shift of shifted_targets
        out.append(h_k[rows] if whole else h_k)
    return out


def compute_pcr_loss(model: nn.Module, inputs: Mapping[str, Any], *, config: Optional[PCRConfig] = None,
                     augment: Optional[Callable] = None, loss_fn: Optional[Callable] = None,
                     memory: Optional[BackdoorMemory] = None, num_items_in_batch=None,
                     generator: Optional[torch.Generator] = None,
                     one_forward: Optional[bool] = None) -> PCRLossOutput:
    """The PCR loss of one batch, for plain loops, accelerate and the Trainer.

    ``mode="inline"`` (the default; needs ``memory``, an :class:`~pcr_fast.InlineMemory`,
    and ``inputs['sample_ids']``): one training forward, its per-token CE, masked no-grad
    views of the few rows the memory picks, then CE + unlikelihood on what it named.
    ``mode="scan"`` (needs ``memory``, the :class:`~pcr_fast.BackdoorMemory` that
    :func:`pcr_fast.hf.scan_dataset` fills): one forward of the original view; responses
    the scans flagged are dropped from the CE and target tokens get unlikelihood (needs
    ``inputs['sample_ids']``). ``mode="online"``: the per-batch two-view objective of
    ``loss_fn``. Without ``config`` the mode follows ``memory`` (an InlineMemory: inline; a
    BackdoorMemory: scan; none: online).

    Args:
        model: a HF vision-language ``*ForConditionalGeneration`` model, possibly wrapped by
            peft, DDP, accelerate or ``torch.compile``.
        inputs: the processor/collator batch dict: ``input_ids``, ``attention_mask``, ``labels``
            (unshifted, HF convention; or ``shift_labels``), ``pixel_values`` and the family's
            extras (``image_grid_thw``, ``image_sizes``, ``pixel_attention_mask`` …). An
            ``augmented_pixel_values`` entry, if present, is used as the augmented view as is.
        config: :class:`~pcr_fast.PCRConfig` (augmentation, objective, ``detach_b``,
            ``views`` — the gate's augmented draws, each after the first one no-grad forward).
        augment: ``pixel_values -> pixel_values`` of the same shape (called with
            ``image_grid_thw=`` and ``generator=`` when those exist). Default:
            ``PatchAugment.from_config(config.augment, model)``.
        loss_fn: a :class:`~pcr_fast.TwoViewLoss`. Default: ``TwoViewLoss.from_config(config)``.
        memory: an :class:`~pcr_fast.InlineMemory` (mode "inline") or the scans'
            :class:`~pcr_fast.BackdoorMemory` (mode "scan").
        num_items_in_batch: labelled tokens over all gradient-accumulation micro-batches (and
            devices), the HF Trainer convention; the loss is then ``sum / num_items_in_batch``.
        generator: RNG for the augmentation.
        one_forward: force (True) or forbid (False) the single batched forward of both views;
            default: batched whenever every input can be concatenated along the batch and
            view b is trained (``detach_b=False``).
    Returns:
        :class:`PCRLossOutput` (``.loss`` to backpropagate, detached per-term values).
    """
    check_batch(inputs)
    if config is not None and not isinstance(config, PCRConfig):
        raise ValueError(f"config must be a PCRConfig or None, got {type(config).__name__}")
    if config is None:
        cfg = PCRConfig(mode=("inline" if isinstance(memory, InlineMemory) else "scan") if memory is not None
                        else "online")
    else:
        cfg = config
    if cfg.mode == "scan" and memory is None:
        raise ValueError("config.mode='scan' needs memory= (the BackdoorMemory that scan_dataset fills, "
                         "e.g. PCRTrainer.pcr_memory); for the per-batch objective use PCRConfig(mode='online')")
    if cfg.mode == "inline" and not isinstance(memory, InlineMemory):
        raise ValueError("config.mode='inline' needs memory= an InlineMemory (InlineMemory.from_config(config, "
                         "len(train_set), vocab_size), e.g. PCRTrainer.pcr_memory)")
    if cfg.mode == "scan" and memory is not None and not isinstance(memory, BackdoorMemory):
        raise ValueError(f"memory must be a BackdoorMemory for config.mode='scan', got {type(memory).__name__}")
    if cfg.mode == "online" and memory is not None:
        raise ValueError("memory= is for config.mode='scan'; got config.mode='online'")
    if num_items_in_batch is None and "num_items_in_batch" in inputs:
        num_items_in_batch = inputs["num_items_in_batch"]
    if getattr(adapters.model_config(adapters.unwrap_model(model)), "is_encoder_decoder", False):
        raise ValueError("encoder-decoder models are not supported: pcr_fast hooks a decoder-only LM head")

    adapters.check_gradient_checkpointing(model)
    head = adapters.find_lm_head(model)
    verified, softcap = adapters.verified_softcap(model)
    if cfg.mode == "inline":
        if augment is None:
            augment = cached_augment(model, cfg.augment)
        return _inline_step(model, inputs, head, verified, softcap, cfg, memory, num_items_in_batch, augment,
                            generator)
    if memory is not None:
        return _unlearning_step(model, inputs, head, verified, softcap, cfg, memory, num_items_in_batch)
    precomputed = inputs.get(adapters.AUGMENTED_KEY)
    detach = cfg.execution.detach_b
    if augment is None and precomputed is None:
        augment = cached_augment(model, cfg.augment)
    if augment is not None and not callable(augment):
        raise ValueError(f"augment must be callable (pixel_values -> pixel_values), got {type(augment).__name__}")

    model_inputs = adapters.model_inputs_of(inputs)
    pixels_a: Tensor = model_inputs[adapters.PIXEL_KEY]
    with torch.no_grad():
        if precomputed is not None:
            if not isinstance(precomputed, Tensor) or precomputed.shape != pixels_a.shape:
                raise ValueError(f"inputs['augmented_pixel_values'] must be shaped like pixel_values "
                                 f"{tuple(pixels_a.shape)}")
            pixels_b = precomputed.to(pixels_a.dtype)
        else:
            pixels_b = adapters.call_augment(augment, pixels_a, model_inputs, generator)
        if not isinstance(augment, PatchAugment):  # PatchAugment keeps padding tiles itself
            pixels_b = adapters.keep_padding_images(pixels_a, pixels_b)
    batch, length = inputs["input_ids"].shape[:2]
    ok, why = adapters.can_concatenate(model_inputs)
    if one_forward is None:
        one_forward = ok and not detach
        if not ok:
            logger.debug("two forwards for the two views: %s", why)
    elif one_forward and not ok:
        raise ValueError(f"one_forward=True but the views cannot share a forward: {why}")
    elif one_forward and detach:
        raise ValueError("one_forward=True is incompatible with detach_b=True "
                         "(the augmented view runs in its own no_grad forward)")

    if one_forward:
        both = adapters.concatenate_views(model_inputs, pixels_b)
        hidden, weight = adapters.forward_hidden(model, head, both, (2 * batch, length), verify=not verified)
        h_a, h_b = hidden[:batch], hidden[batch:]
    else:
        inputs_b = dict(model_inputs)
        inputs_b[adapters.PIXEL_KEY] = pixels_b
        if detach:
            with torch.no_grad():
                h_b, _ = adapters.forward_hidden(model, head, inputs_b, (batch, length))
        else:
            h_b, _ = adapters.forward_hidden(model, head, inputs_b, (batch, length))
        h_a, weight = adapters.forward_hidden(model, head, model_inputs, (batch, length), verify=not verified)
    if not verified:
        softcap = adapters.verified_softcap(model)[1]
    loss_fn = _resolve_loss(loss_fn, cfg, softcap)

    h_a, targets = shifted_targets(h_a, inputs)
    h_b, _ = shifted_targets(h_b, inputs)
    extra_views = _extra_views(model, head, model_inputs, pixels_a, augment, generator, loss_fn,
                               cfg.augment.views, (batch, length), inputs)
    token_mask = shifted_token_mask(inputs)
    bias = getattr(head, "bias", None)
    with adapters.gathered_weight(weight):
        kwargs = {"extra_views": extra_views} if extra_views else {}
        out = loss_fn(h_a, h_b, weight, targets, bias=bias, num_items_in_batch=num_items_in_batch,
                      token_mask=token_mask, **kwargs)
    return PCRLossOutput(loss=out.loss, ce=out.ce, divergence=out.divergence,
                         divergence_term=out.divergence_term, entropy=out.entropy,
                         num_tokens=out.num_tokens, one_forward=bool(one_forward), details=out,
                         gated_fraction=getattr(out, "gated_fraction", None))
