"""``PCRConfig``: everything the PCR defense needs, as small typed records validated at
construction.

One name per concept, from here down to the kernel launchers: every leaf field name is
unique across the records (``PCRConfig.override(mask_ratio=0.3)`` and the command-line
flags ``--mask-ratio`` address it directly), and the same name is used by the function
that consumes it (``PatchAugment(mask_ratio=…)``, ``cross_view_flags(invariance_threshold=…)``,
``two_view_stats(detach_b=…)``).

The records:

* :class:`AugmentConfig` — the augmented (masked) view: unit, mask, fill, draws per test;
* :class:`DetectorConfig` — the cross-view test of a response (DESIGN §4): thresholds;
* :class:`UnlearnConfig` — the memory of flags and the unlearning objective (modes "inline", "scan");
* :class:`InlineConfig` — the inline test's budget and target rule (mode "inline");
* :class:`ObjectiveConfig` — the per-batch two-view objective ``TwoViewLoss`` (mode "online");
* :class:`ScheduleConfig` — when the defense acts: warm-up and scan points;
* :class:`ExecutionConfig` — backend and stop-gradient.

The defaults of the defense are the measured ones (benchmarks/EVAL_NOTES.md §8, §9): the
inline test (mode "inline": a pretrained model fine-tuned on untrusted data), half-visual-token
units, half of the image masked with its mean, no shuffle, three draws. Scan-and-unlearn
(mode "scan") is the mode for training from scratch. :class:`ObjectiveConfig`'s defaults are the literal PCR objective
(pull apart the two views, bounded), the same as ``TwoViewLoss()``.

This module imports nothing from the rest of the package: every layer reads it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple, Union

MODES = ("inline", "scan", "online")
UNITS = ("half_token", "token", "patch")
FILL_MODES = ("zero", "mean", "noise")
DIVERGENCES = ("kl", "reverse_kl", "symmetric_kl", "jsd")
DIVERGENCE_FORMS = ("hinge", "clip")
ENTROPY_VIEWS = ("a", "b", "both")
ENTROPY_FORMS = ("linear", "below", "above", "square")
TOKEN_SELECTIONS = ("labelled", "all")
BACKENDS = ("auto", "triton", "triton_chunked", "torch", "reference")


def _choice(name: str, value: Any, allowed: Tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def _number(name: str, value: Any, *, low: float = float("-inf"), high: float = float("inf"),
            low_open: bool = False, high_open: bool = False, integer: bool = False) -> None:
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type or value != value:
        kind = "an int" if integer else "a number"
        raise ValueError(f"{name} must be {kind}, got {value!r}")
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if too_low or too_high:
        lo = "(" if low_open else "["
        hi = ")" if high_open else "]"
        raise ValueError(f"{name} must be in {lo}{low}, {high}{hi}, got {value!r}")


@dataclass(frozen=True)
class AugmentConfig:
    """The augmented view: the image cut along the vision encoder's grid, units masked.

    Args:
        patch_size: unit side in pixels; ``None``: read from the model (``unit``).
        unit: with ``patch_size=None``: ``half_token`` (half a visual token per side, the
            measured default), ``token`` or ``patch`` (one encoder patch).
        shuffle: permute the units within each image (moves position-bound triggers: off).
        mask_ratio: share of units replaced by the fill, in [0, 1).
        fill: ``mean`` (per image and channel), ``zero``, ``noise`` or a number.
        views: augmented draws per cross-view test; a response is flagged if it looks
            invariant under any (each draw after the first is one more no-grad forward).
        augment_seed: seeds the augmentation's own generator (``None``: torch's default RNG,
            or the run's seed where a harness sets one).
    """

    patch_size: Optional[int] = None
    unit: str = field(default="half_token", metadata={"choices": UNITS})
    shuffle: bool = False
    mask_ratio: float = 0.5
    fill: Union[str, float] = "mean"
    views: int = 3
    augment_seed: Optional[int] = None

    def __post_init__(self):
        if self.patch_size is not None:
            _number("patch_size", self.patch_size, low=1, integer=True)
        _choice("unit", self.unit, UNITS)
        if not isinstance(self.shuffle, bool):
            raise ValueError(f"shuffle must be a bool, got {self.shuffle!r}")
        _number("mask_ratio", self.mask_ratio, low=0.0, high=1.0, high_open=True)
        if isinstance(self.fill, str):
            _choice("fill", self.fill, FILL_MODES)
        else:
            _number("fill", self.fill)
            if self.fill in (float("inf"), float("-inf")):
                raise ValueError(f"fill must be finite, got {self.fill!r}")
        _number("views", self.views, low=1, integer=True)
        if self.augment_seed is not None:
            _number("augment_seed", self.augment_seed, low=0, integer=True)


@dataclass(frozen=True)
class DetectorConfig:
    """The cross-view test: a response looks like a backdoor when the model is sure of it
    on the original view, a masked view still predicts it, and the two views agree.

    Args:
        invariance_threshold: largest symmetric KL (nats) over the response tokens.
        view_confidence: the masked view's largest per-token CE (nats).
        original_confidence: the original view's largest per-token CE (nats): a response
            the model is not yet sure of is never flagged.
    """

    invariance_threshold: float = 0.1
    view_confidence: float = 3.0
    original_confidence: float = 0.3

    def __post_init__(self):
        for name in ("invariance_threshold", "view_confidence", "original_confidence"):
            _number(name, getattr(self, name), low=0.0, low_open=True)


@dataclass(frozen=True)
class UnlearnConfig:
    """The memory of flags and the unlearning objective (modes "scan" and "inline").

    Args:
        target_share: a token is a *target* when at least this share of the training
            samples whose response contains it is flagged (mode "scan"; the inline test uses
            ``InlineConfig.flagged_share`` among its tested samples instead).
        min_support: ... and at least this many (flagged, in mode "inline") samples contain it.
        unlearn_weight: λ of the unlikelihood on target tokens.
    """

    target_share: float = 0.6
    min_support: int = 8
    unlearn_weight: float = 1.0

    def __post_init__(self):
        _number("target_share", self.target_share, low=0.0, high=1.0, low_open=True)
        _number("min_support", self.min_support, low=1, integer=True)
        _number("unlearn_weight", self.unlearn_weight, low=0.0)


@dataclass(frozen=True)
class InlineConfig:
    """The cross-view test inside the training step (mode "inline", DESIGN §4).

    Args:
        test_budget: extra no-grad forward rows per training row for the masked views: each
            step tests ``test_budget × batch rows / views`` rows (fractions carry over to the
            next steps), the eligible ones first. The cost of a run is then about
            ``1 + test_budget / 3`` times plain SFT (a backward costs two forwards).
        novelty_confidence: a token is *novel* when the model predicted none of its first
            ``novelty_window`` occurrences in fine-tuning with a CE below this (nats): a
            backdoor's target is a response the model did not give before it was taught.
        novelty_window: occurrences of a token that decide whether it is novel.
        flagged_share: a novel token is a *target* when at least this share of the tested
            samples containing it is flagged (and at least ``min_support`` are).
    """

    test_budget: float = 0.1
    novelty_confidence: float = 4.6
    novelty_window: int = 16
    flagged_share: float = 0.1

    def __post_init__(self):
        _number("test_budget", self.test_budget, low=0.0)
        _number("novelty_confidence", self.novelty_confidence, low=0.0, low_open=True)
        _number("novelty_window", self.novelty_window, low=1, integer=True)
        _number("flagged_share", self.flagged_share, low=0.0, high=1.0, low_open=True)


@dataclass(frozen=True)
class ObjectiveConfig:
    """The per-batch two-view objective (:class:`pcr_fast.TwoViewLoss`, mode "online").

    Per token: ``ce_weight·CE(p_a, y) + divergence_weight·φ(D) + entropy_weight·ψ(H)``
    (DESIGN §3), plus the optional cross-view gate (``gate_weight``: unlikelihood at the
    decisive token of responses the detector flags within the batch).

    Args:
        ce_weight: weight of the next-token CE on the original view.
        label_smoothing: ε of that CE (``F.cross_entropy``'s: uniform target mass ε/V).
        z_loss: coefficient of log-sum-exp² of the original view per labelled token (PaLM z-loss).
        divergence: ``kl`` = KL(p_a‖p_b), ``reverse_kl`` = KL(p_b‖p_a), ``symmetric_kl``, or
            ``jsd``: β·KL(p_a‖m) + (1−β)·KL(p_b‖m), m = β·p_a + (1−β)·p_b (its own chunked
            pass: about twice the FLOPs of a KL).
        jsd_beta: β of ``jsd``, in (0, 1).
        divergence_weight: weight of the bounded pull-apart term φ.
        margin: bound of φ in nats (``None``: unbounded −D).
        divergence_form: ``hinge`` = relu(margin − D) or ``clip`` = −min(D, margin).
        entropy_weight: weight of the entropy term ψ.
        entropy_view: ``a`` (original), ``b`` (augmented) or ``both``.
        entropy_target: level for the ``below``/``above``/``square`` forms.
        entropy_form: ``linear`` (+H), ``below`` (relu(H − target)), ``above``
            (relu(target − H)), ``square``; default ``linear`` without a target, ``below`` with.
        regularize: rows the divergence/entropy act on: ``labelled`` or ``all``.
        gate_weight: weight λ of the cross-view gate (0: off).
        gate_max_fraction: at most this share of a batch's responses is flagged by the gate,
            the most invariant ones (``None``: no cap).
    """

    ce_weight: float = 1.0
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    divergence: str = field(default="kl", metadata={"choices": DIVERGENCES})
    jsd_beta: float = 0.5
    divergence_weight: float = 1.0
    margin: Optional[float] = 3.0
    divergence_form: str = field(default="hinge", metadata={"choices": DIVERGENCE_FORMS})
    entropy_weight: float = 0.0
    entropy_view: str = field(default="a", metadata={"choices": ENTROPY_VIEWS})
    entropy_target: Optional[float] = None
    entropy_form: Optional[str] = field(default=None, metadata={"choices": ENTROPY_FORMS})
    regularize: str = field(default="labelled", metadata={"choices": TOKEN_SELECTIONS})
    gate_weight: float = 0.0
    gate_max_fraction: Optional[float] = None

    def __post_init__(self):
        _number("ce_weight", self.ce_weight)
        _number("label_smoothing", self.label_smoothing, low=0.0, high=1.0)
        _number("z_loss", self.z_loss, low=0.0)
        _choice("divergence", self.divergence, DIVERGENCES)
        _number("jsd_beta", self.jsd_beta, low=0.0, high=1.0, low_open=True, high_open=True)
        _number("divergence_weight", self.divergence_weight)
        if self.margin is not None:
            _number("margin", self.margin, low=0.0, low_open=True)
        _choice("divergence_form", self.divergence_form, DIVERGENCE_FORMS)
        _number("entropy_weight", self.entropy_weight)
        _choice("entropy_view", self.entropy_view, ENTROPY_VIEWS)
        if self.entropy_target is not None:
            _number("entropy_target", self.entropy_target)
        if self.entropy_form is not None:
            _choice("entropy_form", self.entropy_form, ENTROPY_FORMS)
            if self.entropy_form != "linear" and self.entropy_target is None:
                raise ValueError(f"entropy_target is required with entropy_form={self.entropy_form!r}")
        _choice("regularize", self.regularize, TOKEN_SELECTIONS)
        _number("gate_weight", self.gate_weight, low=0.0)
        if self.gate_max_fraction is not None:
            _number("gate_max_fraction", self.gate_max_fraction, low=0.0, high=1.0, low_open=True)

    @property
    def resolved_entropy_form(self) -> str:
        """``entropy_form``, or its default (``linear`` without a target, ``below`` with one)."""
        if self.entropy_form is not None:
            return self.entropy_form
        return "linear" if self.entropy_target is None else "below"

    @classmethod
    def cross_view_gate(cls) -> "ObjectiveConfig":
        """The tuned per-batch gate of EVAL_NOTES §3–§7 (no pull-apart; λ = 19, ≤ 15 % of a batch)."""
        return cls(divergence_weight=0.0, gate_weight=19.0, gate_max_fraction=0.15)


@dataclass(frozen=True)
class ScheduleConfig:
    """When the defense acts, as fractions of the run's optimisation steps.

    Args:
        warmup: share of the steps trained with the plain SFT loss first (mode "online";
            a model trained from scratch must first answer from the image; 0 for a
            pretrained model). Mode "scan" trains plain SFT until its first scan.
        scan_at: mode "scan": the scans of the training set, e.g. (0.4, 0.5, 0.6, 0.7).
    """

    warmup: float = 0.0
    scan_at: Tuple[float, ...] = (0.4, 0.5, 0.6, 0.7)

    def __post_init__(self):
        _number("warmup", self.warmup, low=0.0, high=1.0, high_open=True)
        try:
            scan_at = tuple(float(f) for f in self.scan_at)
        except (TypeError, ValueError):
            raise ValueError(f"scan_at must be a sequence of fractions in [0, 1), got {self.scan_at!r}") from None
        if any(not 0.0 <= f < 1.0 for f in scan_at):
            raise ValueError(f"scan_at must hold fractions of training in [0, 1), got {self.scan_at!r}")
        object.__setattr__(self, "scan_at", tuple(sorted(set(scan_at))))


@dataclass(frozen=True)
class ExecutionConfig:
    """How the statistics run.

    Args:
        backend: of :func:`pcr_fast.two_view_stats` (``auto``: the torch backend, or Triton on a
            CUDA architecture a GPU run has validated — none yet; ``triton`` opts in).
        detach_b: stop-gradient through view b, the augmented view (forward-only under
            ``no_grad`` in the HF hook: about a third less compute).
    """

    backend: str = field(default="auto", metadata={"choices": BACKENDS})
    detach_b: bool = False

    def __post_init__(self):
        _choice("backend", self.backend, BACKENDS)
        if not isinstance(self.detach_b, bool):
            raise ValueError(f"detach_b must be a bool, got {self.detach_b!r}")


_SECTIONS = {"augment": AugmentConfig, "detector": DetectorConfig, "unlearn": UnlearnConfig,
             "inline": InlineConfig, "objective": ObjectiveConfig, "schedule": ScheduleConfig,
             "execution": ExecutionConfig}


@dataclass(frozen=True)
class PCRConfig:
    """The whole defense: ``mode`` and one record per concern.

    ``mode="inline"``: the cross-view test inside the training step (:class:`~pcr_fast.InlineMemory`):
    within ``inline.test_budget`` the rows the model is sure of that hold a *novel* token get
    masked no-grad views; a novel token most of whose tested rows look invariant is the
    target, unlearned from the next step on (about ``1 + test_budget / 3`` times the cost of
    plain SFT). ``mode="scan"``: scan-and-unlearn (:mod:`pcr_fast.defense`): scans of the
    whole training set at ``schedule.scan_at``, flagged samples dropped from the CE, target
    tokens unlearned. ``mode="online"``: the per-batch :class:`~pcr_fast.TwoViewLoss` every step.

    ``PCRConfig.override(**values)`` returns a copy with leaf fields replaced by name
    (``cfg.override(mode="online", mask_ratio=0.3)``); :meth:`leaves` lists them.
    """

    mode: str = field(default="inline", metadata={"choices": MODES})
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    unlearn: UnlearnConfig = field(default_factory=UnlearnConfig)
    inline: InlineConfig = field(default_factory=InlineConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    execution: ExecutionConfig = field(default_factory=ExecutionConfig)

    def __post_init__(self):
        _choice("mode", self.mode, MODES)
        for name, cls in _SECTIONS.items():
            value = getattr(self, name)
            if not isinstance(value, cls):
                raise ValueError(f"{name} must be a {cls.__name__}, got {type(value).__name__}")
        if self.mode == "scan" and not self.schedule.scan_at:
            raise ValueError("scan_at must hold at least one fraction of training when mode='scan'")

    @staticmethod
    def leaf_sections() -> Dict[str, str]:
        """Every leaf field name → the record holding it (``mode`` → ``""``)."""
        out = {"mode": ""}
        for section, cls in _SECTIONS.items():
            for f in dataclasses.fields(cls):
                out[f.name] = section
        return out

    @classmethod
    def leaves_read(cls, mode: str) -> Tuple[str, ...]:
        """The leaf fields ``mode`` reads; the others are kept (one config can be switched
        between modes) but have no effect there. The CLI refuses a changed unread leaf."""
        _choice("mode", mode, MODES)
        sections = cls.leaf_sections()
        whole = {"inline": ("augment", "detector", "inline", "execution"),
                 "scan": ("augment", "detector", "unlearn", "execution"),
                 "online": ("augment", "objective", "execution")}[mode]
        extra = {"inline": ("min_support", "unlearn_weight"), "scan": ("scan_at",),
                 "online": ("warmup", "invariance_threshold", "view_confidence")}[mode]
        return tuple(n for n, s in sections.items() if not s or s in whole or n in extra)

    def leaves(self) -> Dict[str, Any]:
        """Every leaf field name → its value (the flat view the CLI and logs use)."""
        return {name: (self.mode if not section else getattr(getattr(self, section), name))
                for name, section in self.leaf_sections().items()}

    def override(self, **values: Any) -> "PCRConfig":
        """A copy with leaf fields replaced by name (validated like a new config)."""
        sections = self.leaf_sections()
        unknown = sorted(set(values) - set(sections))
        if unknown:
            raise ValueError(f"unknown PCRConfig field(s) {unknown}; known: {sorted(sections)}")
        changes: Dict[str, Dict[str, Any]] = {}
        for name, value in values.items():
            changes.setdefault(sections[name], {})[name] = value
        top = changes.pop("", {})
        for section, fields_ in changes.items():
            top[section] = dataclasses.replace(getattr(self, section), **fields_)
        return dataclasses.replace(self, **top)

    def to_dict(self) -> Dict[str, Any]:
        """Nested plain dict (for results.json)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "PCRConfig":
        """Inverse of :meth:`to_dict` (unknown keys raise, naming them)."""
        data = dict(data)
        kwargs: Dict[str, Any] = {}
        if "mode" in data:
            kwargs["mode"] = data.pop("mode")
        for name, sub in _SECTIONS.items():
            if name in data:
                kwargs[name] = sub(**data.pop(name))
        if data:
            raise ValueError(f"unknown PCRConfig section(s) {sorted(data)}; known: {['mode', *_SECTIONS]}")
        return cls(**kwargs)
