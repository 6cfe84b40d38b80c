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

Scan-and-unlearn (``PCRConfig(mode="scan")``, the default): plain SFT until the first scan;
before the optimisation steps of ``ScanSchedule.for_run(config, max_steps).scan_steps`` the
whole training set is scanned (:func:`pcr_fast.hf.scan_dataset`, through
``get_train_dataloader()``) into ``trainer.pcr_memory``; afterwards flagged samples are
dropped from the CE and target tokens unlearned. Batches must carry ``sample_ids``
(training-set row ids). Evaluation uses the model's own loss. With ``mode="online"`` every
step after the warm-up (``config.schedule.warmup``) runs the two-view ``TwoViewLoss``.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Dict, Optional

import torch
from torch import Tensor, nn

from ..config import PCRConfig
from ..augment import PatchAugment
from ..defense import BackdoorMemory, ScanSchedule
from . import adapters
from .batch import check_first_batch
from .checkpoint import DefenseCheckpointCallback, load_defense_state, resolve_checkpoint, restore_memory
from .compute import compute_pcr_loss
from .scan import scan_dataset

logger = logging.getLogger(__name__)


class PCRTrainerMixin:
    """Adds the PCR objective to a ``transformers.Trainer`` subclass (put it first in the bases).

    Extra keyword arguments:
        pcr: :class:`~pcr_fast.PCRConfig` (defaults to ``PCRConfig()``).
        pcr_augment: a custom ``pixel_values -> pixel_values`` callable (default:
            ``PatchAugment.from_config(pcr.augment, model)``).
        pcr_loss: a custom :class:`~pcr_fast.TwoViewLoss` (``mode="online"``; default:
            ``TwoViewLoss.from_config(pcr)``).
        pcr_memory: a :class:`~pcr_fast.BackdoorMemory` to fill (``mode="scan"``; default: one
            sized from the training set and the lm_head, made at the first scan).
    """

    def __init__(self, *args, pcr: Optional[PCRConfig] = None, pcr_augment: Optional[Callable] = None,
                 pcr_loss: Optional[nn.Module] = None, pcr_memory: Optional[BackdoorMemory] = None, **kwargs):
        super().__init__(*args, **kwargs)
        if pcr is not None and not isinstance(pcr, PCRConfig):
            raise ValueError(f"pcr must be a PCRConfig, got {type(pcr).__name__}")
        self.pcr_config = pcr or PCRConfig()
        if self.pcr_config.mode == "scan" and pcr_loss is not None:
            raise ValueError("pcr_loss is the per-batch objective of PCRConfig(mode='online'); "
                             "mode='scan' trains with CE + unlikelihood from its scans")
        if pcr_memory is not None and not isinstance(pcr_memory, BackdoorMemory):
            raise ValueError(f"pcr_memory must be a BackdoorMemory, got {type(pcr_memory).__name__}")
        self.pcr_memory = pcr_memory
        self._pcr_scanned: set = set()
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
        self._pcr_batch_checked = False
        self.add_callback(DefenseCheckpointCallback(self))   # the defense's state in every checkpoint

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        """``Trainer.train``; on resume the defense's state comes back from the checkpoint."""
        folder = resolve_checkpoint(resume_from_checkpoint, self.args.output_dir)
        state = load_defense_state(folder) if folder else None
        if state is not None:
            head = adapters.find_lm_head(self.model)
            self.pcr_memory = restore_memory(state, self.pcr_config, len(self.train_dataset), head.weight.device)
            logger.info("PCR: defense state restored from %s: %s", folder,
                        self.pcr_memory.summary() if self.pcr_memory is not None else "no scan yet")
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def pcr_report(self, **kwargs) -> Dict[str, Any]:
        """What the defense found so far (:func:`pcr_fast.hf.report.build_report`: flags, target
        phrases decoded to text, counts, thresholds); ``kwargs`` go to ``build_report``."""
        from .report import build_report, sample_records

        kwargs.setdefault("records", sample_records(self.train_dataset, self.data_collator))
        kwargs.setdefault("tokenizer", getattr(self.processing_class, "tokenizer", self.processing_class))
        kwargs.setdefault("num_samples", len(self.train_dataset))
        return build_report(self.pcr_memory, config=self.pcr_config, kind="train", defense="pcr", **kwargs)

    def _pcr_augment_for(self, model: nn.Module) -> Callable:
        # built lazily: the model is only final once the Trainer has wrapped it
        if self.pcr_augment is None:
            self.pcr_augment = PatchAugment.from_config(self.pcr_config.augment, adapters.unwrap_model(model))
        return self.pcr_augment

    def pcr_scan(self, model: Optional[nn.Module] = None) -> Dict[str, object]:
        """Scan the whole training set now (what the scan schedule calls); returns the summary."""
        model = model if model is not None else self.model
        if self.pcr_memory is None:
            head = adapters.find_lm_head(model)
            self.pcr_memory = BackdoorMemory.from_config(self.pcr_config.unlearn, len(self.train_dataset),
                                                         head.weight.shape[0], device=head.weight.device)
        summary = scan_dataset(model, self.get_train_dataloader(), self.pcr_memory, config=self.pcr_config,
                               augment=self._pcr_augment_for(model), prepare=self._prepare_inputs,
                               progress=not self.args.disable_tqdm and self.is_world_process_zero())
        logger.info("PCR scan at step %d: %s", self.state.global_step, summary)
        return summary

    def _plain_loss(self, model, inputs, return_outputs, num_items_in_batch):
        """The plain SFT loss of the model itself (one view, HF loss)."""
        plain = {k: v for k, v in inputs.items() if k not in (adapters.AUGMENTED_KEY, adapters.SAMPLE_IDS_KEY)}
        return super().compute_loss(model, plain, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)

    def pcr_schedule(self) -> ScanSchedule:
        """When the defense acts in this run (from the Trainer's ``max_steps``)."""
        return ScanSchedule.for_run(self.pcr_config, max(1, self.state.max_steps))

    def compute_loss(self, model: nn.Module, inputs: Dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch=None):
        step = self.state.global_step
        if not self._pcr_batch_checked and model.training:   # once, before the first step
            check_first_batch(inputs, needs_sample_ids=self.pcr_config.mode == "scan",
                              num_samples=len(self.train_dataset) if self.train_dataset is not None else None)
            self._pcr_batch_checked = True
        schedule = self.pcr_schedule()
        if model.training and schedule.scans_before(step) and step not in self._pcr_scanned:
            self._pcr_scanned.add(step)
            self.pcr_scan(model)
        # the model's own SFT loss: the warm-up, scan mode before its first scan, scan-mode evaluation
        scans_ready = self.pcr_memory is not None and self.pcr_memory.active
        scan_mode = self.pcr_config.mode == "scan"
        if (model.training and schedule.trains_plain(step, scans_ready)) or (scan_mode and not model.training):
            return self._plain_loss(model, inputs, return_outputs, num_items_in_batch)
        if scan_mode:
            out = compute_pcr_loss(model, inputs, config=self.pcr_config, memory=self.pcr_memory,
                                   num_items_in_batch=num_items_in_batch)
        else:
            augment = None if adapters.AUGMENTED_KEY in inputs else self._pcr_augment_for(model)
            out = compute_pcr_loss(model, inputs, config=self.pcr_config, augment=augment, loss_fn=self.pcr_loss,
                                   num_items_in_batch=num_items_in_batch)
        loss = out.loss
        if (num_items_in_batch is not None and getattr(self.args, "average_tokens_across_devices", False)):
            # num_items_in_batch counts every process's tokens while DDP averages gradients
            loss = loss * self.accelerator.num_processes
        if model.training:
            with torch.no_grad():
                for key, value in out.log_dict(prefix="").items():
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
