"""``PCRConfig``: everything the PCR defense needs, in one record (augmentation, detector,
objective).

The HF integration (:mod:`pcr_fast.hf`) and the evaluation harness (:mod:`pcr_fast.eval`)
both build their ``PatchAugment``, ``BackdoorMemory`` and ``TwoViewLoss`` from it, so the
defense's defaults live here once. They come from the evaluation harness (README, "Does the
defense work?", and benchmarks/EVAL_NOTES.md §8):

* ``mode="scan"`` (default): scan-and-unlearn (:mod:`pcr_fast.scan`). Scans of the whole
  training set at ``scan_at`` (40/50/60/70 % of training) with ``gate_views`` masked draws
  (half-visual-token units, 50 % masked, mean fill, no shuffle); a response is flagged when
  the original view is sure of it (CE < ``scan_original_confidence``) and a masked view
  predicts it the same way (symmetric KL < ``gate_threshold``, CE < ``gate_confidence``);
  tokens whose samples are ≥ ``target_share`` flagged are unlearned (``unlearn_weight``),
  flagged samples leave the CE.
* ``mode="online"``: the per-batch ``TwoViewLoss`` (literal pull-apart and/or the
  cross-view gate: ``gate_weight`` λ = 19, τ, κ, ``gate_max_fraction``), measured weaker.

``TwoViewLoss``'s own constructor defaults keep the literal PCR form (pull-apart on, gate
off) since the gate needs (B, T) labels.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Tuple, Union

logger = logging.getLogger(__name__)


MODES = ("scan", "online")


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
    # --- scan-and-unlearn (mode="scan"; pcr_fast.scan): the detector reuses gate_threshold (τ),
    # gate_confidence (κ) and gate_views (K) above ---
    mode: str = "scan"                   # "scan": scan the training set, drop flagged samples, unlearn the
                                         # target tokens; "online": the per-batch TwoViewLoss objective
    scan_at: Tuple[float, ...] = (0.4, 0.5, 0.6, 0.7)  # scans, as fractions of the training steps
    scan_original_confidence: float = 0.3  # only responses the model already predicts with every token's
                                           # CE below this (nats) can be flagged
    target_share: float = 0.6            # a token is a target when this share of its samples is flagged
    min_support: int = 8                 # ... and at least this many samples contain it
    unlearn_weight: float = 1.0          # λ of the unlikelihood on target tokens
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

    def make_memory(self, num_samples: int, vocab_size: int, device=None):
        """A :class:`~pcr_fast.scan.BackdoorMemory` with this config's target rule."""
        from .scan import BackdoorMemory

        return BackdoorMemory(num_samples, vocab_size, target_share=self.target_share,
                              min_support=self.min_support, device=device)

    def scan_steps(self, total_steps: int) -> Tuple[int, ...]:
        """The optimisation steps (0-based) before which a scan runs, for a run of ``total_steps``."""
        if not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(f"total_steps must be a positive int, got {total_steps!r}")
        return tuple(sorted({min(total_steps - 1, int(round(f * total_steps))) for f in self.scan_at}))

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
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        try:
            self.scan_at = tuple(float(f) for f in self.scan_at)
        except TypeError:
            raise ValueError(f"scan_at must be a sequence of fractions in [0, 1), got {self.scan_at!r}") from None
        if self.mode == "scan" and not self.scan_at:
            raise ValueError("scan_at must hold at least one fraction of training when mode='scan'")
        if any(not 0.0 <= f < 1.0 for f in self.scan_at):
            raise ValueError(f"scan_at must hold fractions of training in [0, 1), got {self.scan_at!r}")
        if not self.scan_original_confidence > 0:
            raise ValueError(f"scan_original_confidence must be > 0 (nats), got {self.scan_original_confidence!r}")
        if not 0.0 < self.target_share <= 1.0:
            raise ValueError(f"target_share must be in (0, 1], got {self.target_share!r}")
        if not isinstance(self.min_support, int) or self.min_support < 1:
            raise ValueError(f"min_support must be an int >= 1, got {self.min_support!r}")
        if self.unlearn_weight < 0:
            raise ValueError(f"unlearn_weight must be >= 0, got {self.unlearn_weight!r}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps!r}")

    def to_dict(self) -> dict:
        return asdict(self)
