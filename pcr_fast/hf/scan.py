"""The scan of scan-and-unlearn PCR for any HF vision-language model (see :mod:`pcr_fast.defense`).

    memory = BackdoorMemory.from_config(config.unlearn, len(train_set), model.get_output_embeddings().weight.shape[0])
    scan_dataset(model, loader, memory, config=config)      # a few times during training
    out = compute_pcr_loss(model, batch, config=config, memory=memory)   # every step

Batches must carry ``sample_ids``: a (B,) integer tensor of the training-set row ids (the
memory is indexed by them), e.g. ``dataset.map(lambda e, i: {"sample_ids": i},
with_indices=True)`` and a collator that stacks the column.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Dict, Iterable, Mapping, Optional

import torch
from torch import Tensor, nn

from ..config import PCRConfig
from ..defense import BackdoorMemory, CrossViewScores, cross_view_scores
from . import adapters
from .batch import batch_sample_ids, cached_augment, check_batch, original_view, shifted_targets

logger = logging.getLogger(__name__)


@torch.no_grad()
def scan_batch(model: nn.Module, inputs: Mapping[str, Any], memory: BackdoorMemory, *,
               config: Optional[PCRConfig] = None, augment: Optional[Callable] = None,
               generator: Optional[torch.Generator] = None,
               on_scores: Optional[Callable[[Tensor, CrossViewScores], None]] = None) -> Tensor:
    """Test one batch (original view + ``config.augment.views`` masked draws, no gradient) and
    record it in ``memory`` (between ``memory.begin_scan()`` and ``end_scan()``). Returns
    the (B,) flags; ``on_scores(sample_ids, scores)`` also receives the per-response
    :class:`~pcr_fast.defense.CrossViewScores` (an audit's report)."""
    cfg = config or PCRConfig()
    if not isinstance(memory, BackdoorMemory):
        raise ValueError(f"memory must be a BackdoorMemory (BackdoorMemory.from_config), got {type(memory).__name__}")
    check_batch(inputs)
    ids = batch_sample_ids(inputs)
    head = adapters.find_lm_head(model)
    verified, softcap = adapters.verified_softcap(model)
    if augment is None:
        augment = cached_augment(model, cfg.augment)
    view = original_view(model, head, inputs, verified, softcap)
    h_a, targets, weight, softcap = view.hidden, view.targets, view.weight, view.softcap
    model_inputs, shape = view.model_inputs, view.shape
    pixels = model_inputs[adapters.PIXEL_KEY]
    views = []
    for _ in range(cfg.augment.views):
        inputs_k = dict(model_inputs)
        inputs_k[adapters.PIXEL_KEY] = adapters.call_augment(augment, pixels, model_inputs, generator)
        h_k, _ = adapters.forward_hidden(model, head, inputs_k, shape)
        views.append(shifted_targets(h_k, inputs)[0])
    bias = getattr(head, "bias", None)
    with adapters.gathered_weight(weight):
        scores = cross_view_scores(h_a, views, weight, targets, bias=bias, softcap=softcap,
                                   backend=cfg.execution.backend, view_confidence=cfg.detector.view_confidence)
    flags = scores.flags(**dataclasses.asdict(cfg.detector))
    if on_scores is not None:
        on_scores(ids, scores)
    memory.record(ids, targets, flags)
    return flags


def scan_dataset(model: nn.Module, batches: Iterable[Mapping[str, Any]], memory: BackdoorMemory, *,
                 config: Optional[PCRConfig] = None, augment: Optional[Callable] = None,
                 generator: Optional[torch.Generator] = None, prepare: Optional[Callable] = None,
                 progress: bool = False,
                 on_scores: Optional[Callable[[Tensor, CrossViewScores], None]] = None) -> Dict[str, object]:
    """One scan of the training set: every batch through :func:`scan_batch` (model in eval
    mode, restored after), then ``memory.end_scan()``. ``prepare(batch)`` moves a batch to
    the device (default: the model's); ``on_scores`` goes to :func:`scan_batch`. Returns
    :meth:`BackdoorMemory.summary`."""
    cfg = config or PCRConfig()
    if augment is None:
        augment = cached_augment(model, cfg.augment)
    if prepare is None:
        device = next(adapters.unwrap_model(model).parameters()).device

        def prepare(batch):
            return {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in batch.items()}
    was_training = model.training
    model.eval()
    memory.begin_scan()
    try:
        iterator = batches
        if progress:
            from tqdm.auto import tqdm

            iterator = tqdm(batches, desc=f"PCR scan {memory.scans + 1}", leave=False, dynamic_ncols=True)
        for batch in iterator:
            scan_batch(model, prepare(batch), memory, config=cfg, augment=augment, generator=generator,
                       on_scores=on_scores)
    finally:
        model.train(was_training)
    memory.end_scan()
    return memory.summary()
