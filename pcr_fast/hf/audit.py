"""``scan_report``: audit a dataset with a model — one cross-view scan of every sample, per-
sample scores kept — and return the report of :mod:`pcr_fast.hf.report`.

Typically the model was just fine-tuned on the same data: a backdoor it learned answers
from the trigger alone, so masking half of the image leaves that answer unchanged.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Dict, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from ..config import PCRConfig
from ..defense import BackdoorMemory, CrossViewScores
from . import adapters
from .report import SCORE_KEYS, build_report, sample_records
from .scan import scan_dataset

logger = logging.getLogger(__name__)


def scan_report(model: nn.Module, dataset: Any, collator: Callable, *, config: Optional[PCRConfig] = None,
                batch_size: int = 8, progress: bool = True, tokenizer: Any = None, skipped: Sequence[Any] = (),
                meta: Optional[Mapping[str, Any]] = None, num_workers: int = 0) -> Dict[str, Any]:
    """Scan ``dataset`` once with ``model`` and return the report (a dict; write it with
    :func:`pcr_fast.hf.report.write_report`).

    Args:
        model: a HF vision-language model (peft-wrapped is fine), on its device.
        dataset: a map-style dataset whose collated batches carry ``sample_ids`` equal to the
            item positions (e.g. :class:`pcr_fast.data.ConversationDataset`).
        collator: turns a list of items into a batch (:class:`pcr_fast.data.ConversationCollator`).
        config: the detector's thresholds, the masked views and the target rule (``PCRConfig()``).
        batch_size: samples per forward.
        tokenizer: decodes the target phrase (default: the collator's ``tokenizer``).
        skipped, meta: passed to :func:`~pcr_fast.hf.report.build_report`.
    """
    cfg = config or PCRConfig()
    n = len(dataset)
    if n == 0:
        raise ValueError("dataset is empty: nothing to scan")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    head = adapters.find_lm_head(model)
    tokenizer = tokenizer if tokenizer is not None else getattr(collator, "tokenizer", None)
    special = adapters.special_token_ids(model, tokenizer, vocab_size=head.weight.shape[0])
    memory = BackdoorMemory.from_config(cfg.unlearn, n, head.weight.shape[0], device=head.weight.device,
                                        exempt_tokens=special)
    columns = {k: torch.full((n,), float("nan")) for k in SCORE_KEYS}

    def keep(ids: Tensor, scores: CrossViewScores) -> None:
        idx = ids.detach().cpu().long()
        for key in columns:
            columns[key][idx] = getattr(scores, key).detach().float().cpu()

    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collator,
                                         num_workers=num_workers)
    scan_dataset(model, loader, memory, config=cfg, progress=progress, on_scores=keep)
    missing = int((~torch.isfinite(columns["confidence"])).sum())
    if missing:
        logger.warning("scan_report: %d of %d samples got no score (no labelled answer token)", missing, n)
    records = sample_records(dataset, collator)
    return build_report(memory, records=records, scores=columns, config=cfg, kind="scan", skipped=skipped,
                        tokenizer=tokenizer, meta=meta)
