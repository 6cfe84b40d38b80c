"""``PCRConfig``: everything the PCR defense needs, in one record (augmentation + loss).

The HF integration (:mod:`pcr_fast.hf`) and the evaluation harness (:mod:`pcr_fast.eval`)
both build their ``PatchAugment`` and ``TwoViewLoss`` from it, so defaults live here once.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Union


@dataclass
class PCRConfig:
    # --- augmentation (PatchAugment) ---
    patch_size: Optional[int] = None     # None: the model's visual-token unit (PatchAugment.for_model)
    shuffle: bool = True
    mask_ratio: float = 0.25
    fill: Union[str, float] = "mean"
    # --- objective (TwoViewLoss) ---
    ce_weight: float = 1.0
    divergence: str = "kl"
    divergence_weight: float = 1.0
    margin: Optional[float] = 3.0
    divergence_form: str = "hinge"
    entropy_weight: float = 0.0
    entropy_view: str = "a"
    entropy_target: Optional[float] = None
    entropy_form: Optional[str] = None
    regularize: str = "labelled"
    # --- execution ---
    detach_augmented: bool = False   # view b forward-only under no_grad (≈ 1/3 less compute)
    backend: str = "auto"
    seed: Optional[int] = None
    extra_loss_options: dict = field(default_factory=dict)

    def loss_kwargs(self) -> dict:
        return dict(ce_weight=self.ce_weight, divergence=self.divergence,
                    divergence_weight=self.divergence_weight, margin=self.margin,
                    divergence_form=self.divergence_form, entropy_weight=self.entropy_weight,
                    entropy_view=self.entropy_view, entropy_target=self.entropy_target,
                    entropy_form=self.entropy_form, regularize=self.regularize,
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
            return PatchAugment.for_model(model_or_config, **kw)
        return PatchAugment(patch_size=self.patch_size, **kw)

    def to_dict(self) -> dict:
        return asdict(self)
