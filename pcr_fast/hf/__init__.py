"""Hugging Face integration: the PCR loss for any HF vision-language model, fused.

    out = compute_pcr_loss(model, batch, augment=aug, loss_fn=loss_fn)   # plain loops (online mode)
    scan_dataset(model, loader, memory, config=cfg)                      # scan-and-unlearn mode
    out = compute_pcr_loss(model, batch, config=cfg, memory=memory)
    trainer = PCRTrainer(model=model, args=args, train_dataset=ds, pcr=PCRConfig())
    class MySFT(PCRTrainerMixin, trl.SFTTrainer): ...
    use_fused_cross_entropy(model)     # plain fine-tuning: the model's own loss, fused, no logits

``pcr_fast.testing.build_tiny_model(family)`` builds tiny random models of every supported
family with realistic batches (tests, benchmarks, the evaluation harness).
"""
from __future__ import annotations

import importlib

from .adapters import special_token_ids
from .audit import scan_report
from .compute import PCRLossOutput, compute_pcr_loss
from .fused_ce import remove_fused_cross_entropy, use_fused_cross_entropy
from .scan import scan_batch, scan_dataset

# the Trainer classes import transformers.Trainer (slow): load them on first use
_LAZY = {"PCRTrainer": ".trainer", "PCRTrainerMixin": ".trainer"}

__all__ = ["compute_pcr_loss", "PCRLossOutput", "scan_batch", "scan_dataset", "scan_report", "PCRTrainer",
           "PCRTrainerMixin", "special_token_ids", "use_fused_cross_entropy", "remove_fused_cross_entropy"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'pcr_fast.hf' has no attribute {name!r}")
