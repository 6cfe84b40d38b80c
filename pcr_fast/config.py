"""``PCRConfig``: everything the PCR defense needs, in one record (augmentation + loss).

The HF integration (:mod:`pcr_fast.hf`) and the evaluation harness (:mod:`pcr_fast.eval`)
both build their ``PatchAugment`` and ``TwoViewLoss`` from it, so the defense's defaults
live here once. They come from the evaluation harness (README, "Does the defense work?",
and benchmarks/EVAL_NOTES.md): mask half the image in half-visual-token units, no shuffle;
CE + the cross-view gate (λ = 19, τ = 0.1 nats, κ = 3 nats), no per-token pull-apart (it
hurt clean quality and was satisfiable by a shortcut). With these settings no gradient
flows through the augmented view, so ``detach_augmented=True`` gives the same update for
about a third less compute; the default stays False (train both views) as the method's
literal form needs it when ``divergence_weight``/``entropy_weight`` are used.
``TwoViewLoss``'s own constructor defaults keep the literal PCR form (pull-apart on, gate
off) since the gate needs (B, T) labels.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Union

logger = logging.getLogger(__name__)


@dataclass
class PCRConfig:
    # --- augmentation (PatchAugment) ---
    patch_size: Optional[int] = None     # None: read from the model (PatchAugment.for_model, `unit`)
    unit: str = "half_token"             # with patch_size=None: "half_token", "token" or "patch"
    shuffle: bool = False
    mask_ratio: float = 0.5
    fill: Union[str, float] = "mean"
    # --- objective (TwoViewLoss) ---
    ce_weight: float = 1.0
    divergence: str = "kl"
    divergence_weight: float = 0.0
    margin: Optional[float] = 3.0
    divergence_form: str = "hinge"
    entropy_weight: float = 0.0
    entropy_view: str = "a"
    entropy_target: Optional[float] = None
    entropy_form: Optional[str] = None
    regularize: str = "labelled"
    gate_weight: float = 19.0
    gate_threshold: float = 0.1
    gate_confidence: float = 3.0
    gate_max_fraction: Optional[float] = 0.15  # at most this share of a batch's responses flagged
    gate_views: int = 3                  # augmented draws the gate's detector looks at (flag if any);
                                         # each draw after the first is one no-grad forward
    # --- execution ---
    detach_augmented: bool = False   # view b forward-only under no_grad (≈ 1/3 less compute)
    warmup_steps: int = 0            # PCRTrainer: plain SFT loss for the first steps (a model trained
                                     # from scratch must first answer from the image; 0 for pretrained)
    backend: str = "auto"
    seed: Optional[int] = None
    extra_loss_options: dict = field(default_factory=dict)

    def loss_kwargs(self) -> dict:
        return dict(ce_weight=self.ce_weight, divergence=self.divergence,
                    divergence_weight=self.divergence_weight, margin=self.margin,
                    divergence_form=self.divergence_form, entropy_weight=self.entropy_weight,
                    entropy_view=self.entropy_view, entropy_target=self.entropy_target,
                    entropy_form=self.entropy_form, regularize=self.regularize,
                    gate_weight=self.gate_weight, gate_threshold=self.gate_threshold,
                    gate_confidence=self.gate_confidence, gate_max_fraction=self.gate_max_fraction,
                    backend=self.backend, detach_view_b=self.detach_augmented,
                    **self.extra_loss_options)

    def make_loss(self):
        from .loss import TwoViewLoss

        return TwoViewLoss(**self.loss_kwargs())

    def make_augment(self, model_or_config: Any = None):
        from .augment import PatchAugment

        kw = dict(shuffle=self.shuffle, mask_ratio=self.mask_ratio, fill=self.fill, seed=self.seed)
        if self.patch_size is None:
            if model_or_config is None:
                raise ValueError("patch_size is None: pass the model (or its config) so the "
                                 "visual-token unit can be read from it")
            try:
                return PatchAugment.for_model(model_or_config, unit=self.unit, **kw)
            except ValueError as err:
                if self.unit != "half_token":
                    raise
                logger.warning("%s; falling back to unit='token'", err)
                return PatchAugment.for_model(model_or_config, unit="token", **kw)
        return PatchAugment(patch_size=self.patch_size, **kw)

    def __post_init__(self):
        if self.unit not in ("token", "half_token", "patch"):
            raise ValueError(f"unit must be 'token', 'half_token' or 'patch', got {self.unit!r}")
        if not isinstance(self.gate_views, int) or self.gate_views < 1:
            raise ValueError(f"gate_views must be an int >= 1, got {self.gate_views!r}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps!r}")

    def to_dict(self) -> dict:
        return asdict(self)
