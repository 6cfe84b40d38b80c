"""pcr_fast: fused kernels and a thin API for PCR backdoor-defense fine-tuning.

Public API (see README):
    two_view_stats, TwoViewStats          per-row CE/KL/entropy of two views (fused)
    TwoViewLoss, two_view_loss            the PCR objective
    PatchAugment, patch_augment           one-pass patch shuffle/mask of pixel_values
    PCRConfig (+ AugmentConfig, DetectorConfig, UnlearnConfig, InlineConfig, ObjectiveConfig, ScheduleConfig,
        ExecutionConfig)                                      the defense's settings
    compute_pcr_loss, PCRTrainer, PCRTrainerMixin         HF integration
    InlineMemory                          the inline cross-view test (mode "inline")
    BackdoorMemory, cross_view_flags, unlearning_loss, ScanSchedule, scan_dataset   scan-and-unlearn PCR
"""
from __future__ import annotations

import importlib
import logging

from .config import (AugmentConfig, DetectorConfig, ExecutionConfig, InlineConfig, ObjectiveConfig, PCRConfig,
                     ScheduleConfig, UnlearnConfig)
from .defense import (BackdoorMemory, InlineMemory, ScanSchedule, UnlearningLossOutput, cross_view_flags,
                      unlearning_loss)
from .loss import TwoViewLoss, TwoViewLossOutput, two_view_loss
from .stats import TwoViewStats, two_view_stats
from .cross_entropy import fused_linear_cross_entropy  # noqa: F401  (drop-in fused linear cross-entropy)

logging.getLogger(__name__).addHandler(logging.NullHandler())

__version__ = "0.1.0"

# Heavier pieces load on first use (transformers import is slow).
_LAZY = {
    "PatchAugment": ".augment",
    "patch_augment": ".augment",
    "AugmentResult": ".augment",
    "compute_pcr_loss": ".hf",
    "PCRTrainer": ".hf",
    "PCRTrainerMixin": ".hf",
    "PCRLossOutput": ".hf",
    "scan_dataset": ".hf",
    "scan_batch": ".hf",
}

__all__ = ["two_view_stats", "TwoViewStats", "TwoViewLoss", "TwoViewLossOutput", "two_view_loss",
           "PCRConfig", "AugmentConfig", "DetectorConfig", "UnlearnConfig", "ObjectiveConfig", "ScheduleConfig",
           "ExecutionConfig", "InlineConfig", "BackdoorMemory", "InlineMemory", "ScanSchedule", "UnlearningLossOutput", "cross_view_flags",
           "unlearning_loss", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        module = importlib.import_module(_LAZY[name], __name__)
        return getattr(module, name)
    raise AttributeError(f"module 'pcr_fast' has no attribute {name!r}")
