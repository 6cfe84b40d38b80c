"""``PCRTrainerMixin`` / ``PCRTrainer``: the PCR loss inside ``transformers.Trainer`` (and TRL).

The mixin overrides ``compute_loss`` only, so it composes with any Trainer subclass::

    class MySFT(PCRTrainerMixin, trl.SFTTrainer): ...

Gradient accumulation: the loss is normalised by the Trainer's ``num_items_in_batch``
(labelled tokens over all accumulated micro-batches and, with
``average_tokens_across_devices``, all processes), exactly like a HF model's own loss, so
accumulating k micro-batches gives the gradient of the big batch. The per-term values
(``pcr/ce``, ``pcr/divergence``, ``pcr/divergence_term``, ``pcr/entropy``) are averaged
over the steps since the last log and added to the Trainer's logs.

Use ``remove_unused_columns=False`` (the batch carries family-specific keys) and, with
gradient checkpointing, ``gradient_checkpointing_kwargs={"use_reentrant": False}``.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Dict, Optional

import torch
from torch import Tensor, nn

from ..config import PCRConfig
from . import adapters
from .compute import compute_pcr_loss

logger = logging.getLogger(__name__)

_LOG_KEYS = ("ce", "divergence", "divergence_term", "entropy", "gated_fraction")


class PCRTrainerMixin:
    """Adds the PCR objective to a ``transformers.Trainer`` subclass (put it first in the bases).

    Extra keyword arguments:
        pcr: :class:`~pcr_fast.PCRConfig` (defaults to ``PCRConfig()``).
        pcr_augment: a custom ``pixel_values -> pixel_values`` callable (default:
            ``pcr.make_augment(model)``).
        pcr_loss: a custom :class:`~pcr_fast.TwoViewLoss` (default: ``pcr.make_loss()``).
    """

    def __init__(self, *args, pcr: Optional[PCRConfig] = None, pcr_augment: Optional[Callable] = None,
                 pcr_loss: Optional[nn.Module] = None, **kwargs):
        super().__init__(*args, **kwargs)
        if pcr is not None and not isinstance(pcr, PCRConfig):
            raise ValueError(f"pcr must be a PCRConfig, got {type(pcr).__name__}")
        self.pcr_config = pcr or PCRConfig()
        self.pcr_augment = pcr_augment
        self.pcr_loss = pcr_loss
        # our loss is normalised by num_items_in_batch like a HF model's: make the Trainer
        # count it and not divide by the accumulation steps again
        self.model_accepts_loss_kwargs = True
        if getattr(self.args, "remove_unused_columns", False):
            logger.warning("PCRTrainer: set TrainingArguments(remove_unused_columns=False) so the "
                           "family-specific batch keys reach compute_loss")
        gc_kwargs = getattr(self.args, "gradient_checkpointing_kwargs", None) or {}
        if getattr(self.args, "gradient_checkpointing", False) and gc_kwargs.get("use_reentrant") is True:
            raise ValueError("PCRTrainer needs non-reentrant gradient checkpointing: "
                             "gradient_checkpointing_kwargs={'use_reentrant': False}")
        self._pcr_sums: Dict[str, Tensor] = {}
        self._pcr_count = 0
        self._pcr_generator: Optional[torch.Generator] = None

    def _pcr_augment_for(self, model: nn.Module) -> Callable:
        # built lazily: the model is only final once the Trainer has wrapped it
        if self.pcr_augment is None:
            self.pcr_augment = self.pcr_config.make_augment(adapters.unwrap_model(model))
        return self.pcr_augment

    def compute_loss(self, model: nn.Module, inputs: Dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch=None):
        if model.training and self.state.global_step < self.pcr_config.warmup_steps:
            # warm-up: the plain SFT loss of the model itself (one view, HF loss)
            plain = {k: v for k, v in inputs.items() if k != adapters.AUGMENTED_KEY}
            return super().compute_loss(model, plain, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        augment = None if "augmented_pixel_values" in inputs else self._pcr_augment_for(model)
        out = compute_pcr_loss(model, inputs, augment=augment, loss_fn=self.pcr_loss, config=self.pcr_config,
                               num_items_in_batch=num_items_in_batch)
        loss = out.loss
        if (num_items_in_batch is not None and getattr(self.args, "average_tokens_across_devices", False)):
            # num_items_in_batch counts every process's tokens while DDP averages gradients
            loss = loss * self.accelerator.num_processes
        if model.training:
            with torch.no_grad():
                for key in _LOG_KEYS:
                    value = getattr(out, key, None)
                    if value is None:
                        continue
                    self._pcr_sums[key] = self._pcr_sums.get(key, 0) + value.detach().float()
                self._pcr_count += 1
        if return_outputs:
            return loss, {"loss": loss}
        return loss

    def log(self, logs: Dict[str, float], *args, **kwargs) -> None:
        if self._pcr_count and "loss" in logs:
            keys = list(self._pcr_sums)
            stacked = torch.stack([self._pcr_sums[k] for k in keys]) / self._pcr_count
            gather = getattr(self, "_nested_gather", None)
            if getattr(self.args, "world_size", 1) > 1 and callable(gather):
                stacked = gather(stacked[None]).reshape(-1, len(keys)).mean(0)
            for key, value in zip(keys, stacked.tolist()):
                logs[f"pcr/{key}"] = round(value, 6)
            self._pcr_sums, self._pcr_count = {}, 0
        super().log(logs, *args, **kwargs)


def _trainer_base():
    from transformers import Trainer

    return Trainer


class PCRTrainer(PCRTrainerMixin, _trainer_base()):
    """``transformers.Trainer`` with the PCR objective: ``PCRTrainer(model=..., args=..., pcr=PCRConfig())``."""
