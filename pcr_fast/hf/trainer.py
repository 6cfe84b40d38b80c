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

The inline test (``PCRConfig(mode="inline")``, the default): every step tests a few rows
inside the training step (:class:`pcr_fast.InlineMemory` in ``trainer.pcr_memory``, built at
the first step, saved in every checkpoint) and unlearns the targets it names. Batches must
carry ``sample_ids`` (training-set row ids).

Scan-and-unlearn (``PCRConfig(mode="scan")``): plain SFT until the first scan;
before the optimisation steps of ``ScanSchedule.for_run(config, max_steps).scan_steps`` the
whole training set is scanned (:func:`pcr_fast.hf.scan_dataset`, through
``get_train_dataloader()``) into ``trainer.pcr_memory``; afterwards flagged samples are
dropped from the CE and target tokens unlearned. Batches must carry ``sample_ids``
(training-set row ids). Evaluation uses the model's own loss. With ``mode="online"`` every
step after the warm-up (``config.schedule.warmup``) runs the two-view ``TwoViewLoss``.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Callable, Dict, Optional

import torch
from torch import Tensor, nn

from ..config import PCRConfig
from ..augment import PatchAugment
from ..defense import BackdoorMemory, InlineMemory, ScanSchedule
from . import adapters
from .batch import check_first_batch
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
        pcr_memory: the defense's memory: an :class:`~pcr_fast.InlineMemory` (``mode="inline"``)
            or a :class:`~pcr_fast.BackdoorMemory` (``mode="scan"``); default: one sized from
            the training set and the lm_head, made when first needed.

    Mode "inline": every training step runs :func:`compute_pcr_loss` with the memory (the
    masked views of a few rows within ``test_budget``, no scans). The memory (and in mode
    "scan" the scans already run) is saved in every Trainer checkpoint
    (``checkpoint-N/pcr_memory.pt``) and restored by ``train(resume_from_checkpoint=...)``,
    so a resumed run goes on from what it knew (no row is tested twice).
    """

    PCR_STATE_NAME = "pcr_memory.pt"

    def __init__(self, *args, pcr: Optional[PCRConfig] = None, pcr_augment: Optional[Callable] = None,
                 pcr_loss: Optional[nn.Module] = None, pcr_memory: Optional[BackdoorMemory] = None, **kwargs):
        super().__init__(*args, **kwargs)
        if pcr is not None and not isinstance(pcr, PCRConfig):
            raise ValueError(f"pcr must be a PCRConfig, got {type(pcr).__name__}")
        self.pcr_config = pcr or PCRConfig()
        if self.pcr_config.mode != "online" and pcr_loss is not None:
            raise ValueError(f"pcr_loss is the per-batch objective of PCRConfig(mode='online'); "
                             f"mode={self.pcr_config.mode!r} trains with CE + unlikelihood from its memory")
        memory_type = InlineMemory if self.pcr_config.mode == "inline" else BackdoorMemory
        if pcr_memory is not None and not isinstance(pcr_memory, memory_type):
            raise ValueError(f"pcr_memory must be a {memory_type.__name__} for mode={self.pcr_config.mode!r}, got "
                             f"{type(pcr_memory).__name__}")
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
        self._pcr_pending_state: Optional[Dict[str, Any]] = None
        self._pcr_batch_checked = False
        from transformers import TrainerCallback

        class _SavePCRState(TrainerCallback):
            """Writes the defense's state into each checkpoint folder the Trainer saves."""

            def on_save(cb, args, state, control, **kwargs):
                self.pcr_save_state(os.path.join(args.output_dir, f"checkpoint-{state.global_step}"))

        self.add_callback(_SavePCRState())

    def _pcr_augment_for(self, model: nn.Module) -> Callable:
        # built lazily: the model is only final once the Trainer has wrapped it
        if self.pcr_augment is None:
            self.pcr_augment = PatchAugment.from_config(self.pcr_config.augment, adapters.unwrap_model(model))
        return self.pcr_augment

    def _pcr_inline_memory(self, model: nn.Module) -> InlineMemory:
        if self.pcr_memory is None:
            head = adapters.find_lm_head(model)
            self.pcr_memory = InlineMemory.from_config(self.pcr_config, len(self.train_dataset), head.weight.shape[0],
                                                       device=head.weight.device,
                                                       exempt_tokens=self._pcr_special_ids(model))
            if self._pcr_pending_state is not None:
                self.pcr_memory.load_state_dict(self._pcr_pending_state)
                self._pcr_pending_state = None
        return self.pcr_memory

    def _pcr_special_ids(self, model: nn.Module) -> list:
        # never targets: the model's and the tokenizer's special tokens
        return adapters.special_token_ids(model, self.processing_class,
                                          vocab_size=adapters.find_lm_head(model).weight.shape[0])

    def _pcr_test_generator(self, device: torch.device) -> torch.Generator:
        # seeded by the run's seed: the inline test picks and masks the same rows run after run
        if self._pcr_generator is None:
            self._pcr_generator = torch.Generator(device=device).manual_seed(int(self.args.seed) + 2)
        return self._pcr_generator

    def pcr_save_state(self, folder: str) -> Optional[str]:
        """Write the defense's state (memory, scans done) to ``folder/pcr_memory.pt`` (on the
        main process; every rank holds the same memory). Returns the path, if written."""
        if self.pcr_memory is None or not self.is_world_process_zero():
            return None
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, self.PCR_STATE_NAME)
        torch.save({"mode": self.pcr_config.mode, "memory": self.pcr_memory.state_dict(),
                    "scanned": sorted(self._pcr_scanned)}, path)
        return path

    def pcr_load_state(self, folder: str) -> bool:
        """Restore what :meth:`pcr_save_state` wrote (False if the folder has none)."""
        path = os.path.join(folder, self.PCR_STATE_NAME)
        if not os.path.exists(path):
            return False
        state = torch.load(path, map_location="cpu", weights_only=False)
        if state["mode"] != self.pcr_config.mode:
            raise ValueError(f"the checkpoint's PCR state is for mode={state['mode']!r}, this Trainer runs "
                             f"mode={self.pcr_config.mode!r}")
        self._pcr_scanned = set(state["scanned"])
        if self.pcr_memory is not None:
            self.pcr_memory.load_state_dict(state["memory"])
        elif self.pcr_config.mode == "inline":
            self._pcr_pending_state = state["memory"]   # sized when the model is known
        else:
            memory = state["memory"]
            self.pcr_memory = BackdoorMemory(memory["flags"].numel(), memory["targets"].numel(),
                                             target_share=memory["target_share"], min_support=memory["min_support"])
            self.pcr_memory.load_state_dict(memory)
        logger.info("PCR: restored the defense's state from %s", path)
        return True

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        """``Trainer.train``; a resumed run also restores the defense's state of that checkpoint."""
        if resume_from_checkpoint:
            folder = resume_from_checkpoint
            if folder is True:
                from transformers.trainer_utils import get_last_checkpoint

                folder = get_last_checkpoint(self.args.output_dir)
            if isinstance(folder, str):
                self.pcr_load_state(folder)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def pcr_report(self, **kwargs) -> Dict[str, Any]:
        """What the defense found so far (:func:`pcr_fast.hf.report.build_report`: flags, target
        phrases decoded to text, counts, thresholds); ``kwargs`` go to ``build_report``."""
        from .report import build_report, sample_records

        kwargs.setdefault("records", sample_records(self.train_dataset, self.data_collator))
        kwargs.setdefault("tokenizer", getattr(self.processing_class, "tokenizer", self.processing_class))
        kwargs.setdefault("num_samples", len(self.train_dataset))
        return build_report(self.pcr_memory, config=self.pcr_config, kind="train", defense="pcr", **kwargs)

    def pcr_scan(self, model: Optional[nn.Module] = None) -> Dict[str, object]:
        """Scan the whole training set now (what the scan schedule calls); returns the summary."""
        model = model if model is not None else self.model
        if self.pcr_memory is None:
            head = adapters.find_lm_head(model)
            self.pcr_memory = BackdoorMemory.from_config(self.pcr_config.unlearn, len(self.train_dataset),
                                                         head.weight.shape[0], device=head.weight.device,
                                                         exempt_tokens=self._pcr_special_ids(model))
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
            check_first_batch(inputs, needs_sample_ids=self.pcr_config.mode != "online",
                              num_samples=len(self.train_dataset) if self.train_dataset is not None else None)
            self._pcr_batch_checked = True
        schedule = self.pcr_schedule()
        if model.training and schedule.scans_before(step) and step not in self._pcr_scanned:
            self._pcr_scanned.add(step)
            self.pcr_scan(model)
        # the model's own SFT loss: the warm-up, scan mode before its first scan, evaluation
        # with a memory-based defense
        scans_ready = self.pcr_memory is not None and self.pcr_memory.active
        scan_mode = self.pcr_config.mode == "scan"
        memory_mode = self.pcr_config.mode in ("scan", "inline")
        if (model.training and schedule.trains_plain(step, scans_ready)) or (memory_mode and not model.training):
            return self._plain_loss(model, inputs, return_outputs, num_items_in_batch)
        if self.pcr_config.mode == "inline":
            memory = self._pcr_inline_memory(model)
            out = compute_pcr_loss(model, inputs, config=self.pcr_config, memory=memory,
                                   augment=self._pcr_augment_for(model),
                                   generator=self._pcr_test_generator(memory.device),
                                   num_items_in_batch=num_items_in_batch)
        elif scan_mode:
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
