"""``InlineMemory``: the cross-view test inside the training step (mode "inline", DESIGN §4).

Why (evidence in benchmarks/EVAL_NOTES.md §9): a pretrained model fine-tuned on poisoned
data is already sure of most clean answers, so "sure" no longer singles out the backdoor,
and a clean answer that survives the mask (a colour, the masked view's default digit) looks
as invariant as a trigger. What the clean answers are not is *new*: the model predicted
them before fine-tuning. A backdoor's target is a response the model never gave until the
poisoned rows taught it. So, for the price of a few no-grad rows per step:

1. **Novelty** (:meth:`InlineMemory.observe`, free): the training forward's per-token CE
   says, per vocabulary token, whether the model predicted any of its first
   ``novelty_window`` occurrences (CE < ``novelty_confidence``); a token it never predicted
   is *novel*.
2. **Test** (:meth:`InlineMemory.select`, :meth:`InlineMemory.record`): each step, within
   ``test_budget``, the rows the model is sure of (every response token CE <
   ``original_confidence``) that contain a novel token and were never tested get the masked
   views (no grad); the cross-view scores decide the flag.
3. **Name** (:meth:`InlineMemory.commit`, every step, on device): a novel token is a
   *target* once ``min_support`` tested samples containing it are flagged and they are at
   least ``flagged_share`` of its tested samples. Unlearning starts at the next step.
4. **Unlearn** (:meth:`InlineMemory.treatment`): flagged rows and rows containing a
   target leave the CE; target tokens get unlikelihood.

Everything stays on the device (no host sync); under torch.distributed every step merges
the ranks' counts (one all-reduce) and tested rows (one all-gather of a fixed size), so
every rank holds the same memory.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from ..config import PCRConfig
from .detector import CrossViewScores
from .labels import check_labels_2d, check_sample_ids, token_mask, token_presence

logger = logging.getLogger(__name__)

# rows of the per-token delta table merged every step
_SEEN, _PREDICTED, _TESTED, _FLAGGED = range(4)
# columns of a tested-row record: id, tested, confidence, invariance, view CE
_RECORD_COLUMNS = 5


class InlineMemory:
    """What the inline cross-view test has seen over a run, and the targets it named.

    Args:
        num_samples: size of the training set (rows are addressed by their id).
        vocab_size: rows of the lm_head.
        test_budget, novelty_confidence, novelty_window, flagged_share: see
            :class:`~pcr_fast.config.InlineConfig`.
        min_support: flagged tested samples a target needs at least.
        views: masked draws per tested row (to turn the budget into rows).
        invariance_threshold, view_confidence, original_confidence: the detector's
            thresholds (:class:`~pcr_fast.config.DetectorConfig`).
        exempt_tokens: token ids that are never novel, so never targets (the special tokens:
            trained from scratch, an end-of-answer token is as new as any word, and it ends
            every response; :func:`pcr_fast.hf.special_token_ids` lists a model's).
        device: where the tables live (the model's device).
        group: the torch.distributed process group whose ranks share this memory (default:
            all ranks, when a process group is initialised).

    Per training step: ``observe(labels, ce)``; ``k = rows_to_test(batch_rows)``;
    ``rows, eligible = select(ids, labels, ce, k)``; the masked views of ``rows`` →
    ``record(ids[rows], labels[rows], eligible, scores)``; ``treatment(ids, labels)``;
    ``commit()``. ``report()`` / ``sample_records()`` describe it; ``state_dict()`` /
    ``load_state_dict()`` checkpoint it.
    """

    def __init__(self, num_samples: int, vocab_size: int, *, test_budget: float = 0.1,
                 novelty_confidence: float = 4.6, novelty_window: int = 16, flagged_share: float = 0.1,
                 min_support: int = 8, views: int = 3, invariance_threshold: float = 0.1,
                 view_confidence: float = 3.0, original_confidence: float = 0.3,
                 exempt_tokens: Optional[Iterable[int]] = None,
                 device: Union[str, torch.device, None] = None, group: Any = None):
        for name, value in (("num_samples", num_samples), ("vocab_size", vocab_size), ("min_support", min_support),
                            ("novelty_window", novelty_window), ("views", views)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name, value in (("novelty_confidence", novelty_confidence), ("invariance_threshold", invariance_threshold),
                            ("view_confidence", view_confidence), ("original_confidence", original_confidence)):
            if not value > 0:
                raise ValueError(f"{name} must be > 0 (nats), got {value!r}")
        if not 0.0 < float(flagged_share) <= 1.0:
            raise ValueError(f"flagged_share must be in (0, 1], got {flagged_share!r}")
        if not float(test_budget) >= 0.0:
            raise ValueError(f"test_budget must be >= 0, got {test_budget!r}")
        self.thresholds: Dict[str, float] = {
            "test_budget": float(test_budget), "novelty_confidence": float(novelty_confidence),
            "novelty_window": int(novelty_window), "flagged_share": float(flagged_share),
            "min_support": int(min_support), "views": int(views),
            "invariance_threshold": float(invariance_threshold), "view_confidence": float(view_confidence),
            "original_confidence": float(original_confidence)}
        dev = torch.device(device) if device is not None else torch.device("cpu")
        nan = float("nan")
        # per-sample tables hold one spare slot at the end: rows recorded but not tested (the
        # padding of a short batch) are written there, so no two writes of a step collide
        self._tested = torch.zeros(num_samples + 1, dtype=torch.bool, device=dev)
        self._flags = torch.zeros(num_samples + 1, dtype=torch.bool, device=dev)
        self._scores = torch.full((3, num_samples + 1), nan, device=dev)   # confidence, invariance, view CE
        self.tested, self.flags = self._tested[:num_samples], self._flags[:num_samples]
        self.confidence, self.invariance, self.view_ce = (self._scores[i, :num_samples] for i in range(3))
        self.counts = torch.zeros(4, vocab_size, dtype=torch.long, device=dev)   # seen, predicted, tested, flagged
        self.targets = torch.zeros(vocab_size, dtype=torch.bool, device=dev)
        # the step (1-based, the commit that named it) each token first became a target; -1: never
        self.named_at = torch.full((vocab_size,), -1, dtype=torch.long, device=dev)
        self.exempt = token_mask(exempt_tokens, vocab_size, device=dev)
        self.steps = 0
        self._credit = 0.0
        self._nominal_rows: Optional[int] = None
        self._pending = torch.zeros_like(self.counts)
        self._records: List[Tensor] = []
        self.group = group

    @classmethod
    def from_config(cls, config: PCRConfig, num_samples: int, vocab_size: int,
                    device: Union[str, torch.device, None] = None, group: Any = None,
                    exempt_tokens: Optional[Iterable[int]] = None) -> "InlineMemory":
        """A memory with the budget, novelty and target rule of ``config`` (its
        ``inline``, ``unlearn.min_support``, ``augment.views`` and ``detector``)."""
        if not isinstance(config, PCRConfig):
            raise ValueError(f"config must be a PCRConfig, got {type(config).__name__}")
        ic, det = config.inline, config.detector
        return cls(num_samples, vocab_size, test_budget=ic.test_budget, novelty_confidence=ic.novelty_confidence,
                   novelty_window=ic.novelty_window, flagged_share=ic.flagged_share,
                   min_support=config.unlearn.min_support, views=config.augment.views,
                   invariance_threshold=det.invariance_threshold, view_confidence=det.view_confidence,
                   original_confidence=det.original_confidence, exempt_tokens=exempt_tokens,
                   device=device, group=group)

    # ---- sizes and derived tables ---------------------------------------------------------
    @property
    def num_samples(self) -> int:
        return self.flags.numel()

    @property
    def vocab_size(self) -> int:
        return self.targets.numel()

    @property
    def device(self) -> torch.device:
        return self.flags.device

    @property
    def active(self) -> bool:
        """Always True: the inline test trains with the defense from the first step."""
        return True

    @property
    def novel(self) -> Tensor:
        """(V,) bool: tokens whose first ``novelty_window`` occurrences the model never predicted
        (exempt tokens never are)."""
        seen, predicted = self.counts[_SEEN], self.counts[_PREDICTED]
        return (seen >= self.thresholds["novelty_window"]) & (predicted == 0) & ~self.exempt

    def token_shares(self) -> Tensor:
        """(V,) flagged share among the tested samples containing each token."""
        return self.counts[_FLAGGED].float() / self.counts[_TESTED].clamp_min(1).float()

    # ---- inputs ----------------------------------------------------------------------------
    def _ids(self, sample_ids: Tensor, rows: int) -> Tensor:
        return check_sample_ids(sample_ids, rows, self.num_samples, self.device)

    def _presence(self, labels: Tensor, ignore_index: int) -> Tensor:
        """(B, V) bool: which vocabulary entries each response contains."""
        return token_presence(labels, self.vocab_size, ignore_index, self.device)

    @staticmethod
    def _token_ce(labels: Tensor, ce: Tensor) -> Tensor:
        if not isinstance(ce, Tensor) or ce.numel() != labels.numel():
            raise ValueError(f"ce must hold one CE per label position ({labels.numel()}), got "
                             f"{tuple(ce.shape) if isinstance(ce, Tensor) else type(ce).__name__}")
        return ce.detach().reshape(labels.shape).float()

    # ---- the step --------------------------------------------------------------------------
    def observe(self, labels: Tensor, ce: Tensor, ignore_index: int = -100) -> None:
        """Count this batch's occurrences of each token and how many the model predicted
        (per-token CE ``ce`` of the training forward, (N,) or (B, T))."""
        check_labels_2d(labels)
        lab = labels.to(self.device)
        valid = (lab != ignore_index) & (lab >= 0) & (lab < self.vocab_size)
        idx = torch.where(valid, lab, torch.full_like(lab, self.vocab_size)).flatten()
        ce = self._token_ce(labels, ce).to(self.device)
        predicted = valid & (ce < self.thresholds["novelty_confidence"])
        size = self.vocab_size + 1
        self._pending[_SEEN] += torch.zeros(size, dtype=torch.long, device=self.device).scatter_add_(
            0, idx, valid.flatten().long())[:-1]
        self._pending[_PREDICTED] += torch.zeros(size, dtype=torch.long, device=self.device).scatter_add_(
            0, idx, predicted.flatten().long())[:-1]

    def rows_to_test(self, batch_rows: int) -> int:
        """Rows to test this step: ``test_budget × rows / views``, fractions carried over
        (host arithmetic on the first batch's size, so every rank gets the same sequence)."""
        if self._nominal_rows is None:
            self._nominal_rows = int(batch_rows)
        self._credit += self.thresholds["test_budget"] * self._nominal_rows / self.thresholds["views"]
        k = int(math.floor(self._credit + 1e-9))
        self._credit -= k
        return k

    def select(self, sample_ids: Tensor, labels: Tensor, ce: Tensor, k: int, *,
               generator: Optional[torch.Generator] = None, ignore_index: int = -100) -> Tuple[Tensor, Tensor]:
        """The ``k`` rows of the batch to test and which of them are eligible (sure, holding a
        novel token, never tested); eligible rows first, at random among them. Returns
        ``(rows (k,), eligible (k,))`` on the device (a batch shorter than ``k`` is padded with
        ineligible repeats)."""
        check_labels_2d(labels)
        ids = self._ids(sample_ids, labels.shape[0])
        lab = labels.to(self.device)
        valid = lab != ignore_index
        ce = self._token_ce(labels, ce).to(self.device)
        sure = valid.any(dim=1) & (ce.masked_fill(~valid, 0.0).amax(dim=1) < self.thresholds["original_confidence"])
        has_novel = (self._presence(labels, ignore_index) & self.novel).any(dim=1)
        eligible = sure & has_novel & ~self.tested[ids]
        noise = torch.rand(labels.shape[0], device=self.device, generator=generator)
        rows = (eligible.float() + noise).topk(min(int(k), labels.shape[0])).indices
        chosen = eligible[rows]
        if rows.numel() < k:   # a short batch: pad (not eligible) so every rank records k rows
            pad = int(k) - rows.numel()
            rows = torch.cat([rows, rows[-1:].expand(pad)])
            chosen = torch.cat([chosen, torch.zeros(pad, dtype=torch.bool, device=self.device)])
        return rows, chosen

    def record(self, sample_ids: Tensor, labels: Tensor, tested: Tensor, scores: CrossViewScores,
               ignore_index: int = -100) -> Tensor:
        """Record the tested rows (their ids, labels, ``tested`` (k,) bool — the eligible ones —
        and their :class:`~pcr_fast.defense.CrossViewScores`); returns their (k,) flags. The
        local tables change now; the counts and the other ranks' rows at :meth:`commit`."""
        check_labels_2d(labels)
        ids = self._ids(sample_ids, labels.shape[0])
        if not isinstance(tested, Tensor) or tested.dtype != torch.bool or tested.shape != ids.shape:
            raise ValueError(f"tested must be a bool tensor of shape {tuple(ids.shape)}")
        tested = tested.to(self.device)
        flags = tested & scores.flags(**{k: self.thresholds[k] for k in
                                        ("invariance_threshold", "view_confidence", "original_confidence")}
                                     ).to(self.device)
        present = self._presence(labels, ignore_index)
        self._pending[_TESTED] += (present & tested[:, None]).sum(0)
        self._pending[_FLAGGED] += (present & flags[:, None]).sum(0)
        record = torch.stack([ids.double(), tested.double(), scores.confidence.to(self.device).double(),
                              scores.invariance.to(self.device).double(),
                              scores.view_ce.to(self.device).double()], dim=1)
        self._apply_records(record)
        self._records.append(record)
        return flags

    def _apply_records(self, record: Tensor) -> None:
        tested = record[:, 1] > 0
        ids = torch.where(tested, record[:, 0].long(), torch.full_like(record[:, 0].long(), self.num_samples))
        scores = record[:, 2:].T.float()
        flags = tested & (scores[0] < self.thresholds["original_confidence"]) \
            & (scores[1] < self.thresholds["invariance_threshold"]) & (scores[2] < self.thresholds["view_confidence"])
        # a tested row's id appears once per step; untested rows all go to the spare slot
        self._tested[ids] = self._tested[ids] | tested
        self._flags[ids] = self._flags[ids] | flags
        self._scores[:, ids] = scores

    def commit(self) -> None:
        """End of a training step: merge every rank's counts and tested rows, apply the
        novelty window, recompute the targets (all on the device)."""
        pending = self._pending
        records = torch.cat(self._records) if self._records else torch.zeros(0, _RECORD_COLUMNS, dtype=torch.double,
                                                                            device=self.device)
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_world_size(self.group) > 1:
            dist.all_reduce(pending, group=self.group)
            if records.shape[0]:   # every rank records the same number of rows per step
                parts = [torch.empty_like(records) for _ in range(dist.get_world_size(self.group))]
                dist.all_gather(parts, records.contiguous(), group=self.group)
                self._apply_records(torch.cat(parts))
        open_window = self.counts[_SEEN] < self.thresholds["novelty_window"]
        self.counts[_SEEN] += torch.where(open_window, pending[_SEEN], torch.zeros_like(pending[_SEEN]))
        self.counts[_PREDICTED] += torch.where(open_window, pending[_PREDICTED], torch.zeros_like(pending[_PREDICTED]))
        self.counts[_TESTED] += pending[_TESTED]
        self.counts[_FLAGGED] += pending[_FLAGGED]
        flagged = self.counts[_FLAGGED]
        self.targets = self.novel & (flagged >= self.thresholds["min_support"]) & \
            (flagged.float() >= self.thresholds["flagged_share"] * self.counts[_TESTED].float())
        self._pending = torch.zeros_like(self.counts)
        self._records = []
        self.steps += 1
        self.named_at = torch.where(self.targets & (self.named_at < 0), self.steps, self.named_at)

    def treatment(self, sample_ids: Tensor, labels: Tensor, ignore_index: int = -100) -> Tuple[Tensor, Tensor]:
        """For a training batch: (drop (B,) bool, unlearn (B, T) bool): flagged rows and rows
        holding a target leave the CE; their target-token positions get unlikelihood."""
        check_labels_2d(labels)
        ids = self._ids(sample_ids, labels.shape[0])
        lab = labels.to(self.device)
        valid = (lab != ignore_index) & (lab >= 0) & (lab < self.vocab_size)
        is_target = self.targets[lab.clamp(0, self.vocab_size - 1)] & valid
        drop = self.flags[ids] | is_target.any(dim=1)
        return drop.to(labels.device), (is_target & drop[:, None]).to(labels.device)

    # ---- reports (host syncs: off the hot path) -------------------------------------------------
    def report(self, tokenizer: Any = None) -> Dict[str, Any]:
        """Counts, thresholds, novel tokens and targets (id, share, tested, flagged; the
        token's text if ``tokenizer`` is given): what a report is built from."""
        shares = self.token_shares()

        def token(t: int) -> Dict[str, Any]:
            named = int(self.named_at[t])
            row = {"token_id": t, "tested": int(self.counts[_TESTED, t]), "flagged": int(self.counts[_FLAGGED, t]),
                   "share": round(float(shares[t]), 4), "named_at_step": named if named >= 0 else None}
            if tokenizer is not None:
                row["token"] = tokenizer.convert_ids_to_tokens(t)
            return row

        novel = torch.nonzero(self.novel).flatten().tolist()
        targets = torch.nonzero(self.targets).flatten().tolist()
        return {"thresholds": dict(self.thresholds),
                "counts": {"samples": self.num_samples, "tested": int(self.tested.sum()),
                           "flagged": int(self.flags.sum()), "steps": self.steps,
                           "novel_tokens": len(novel), "targets": len(targets)},
                "targets": [token(t) for t in targets], "novel_tokens": [token(t) for t in novel]}

    def sample_records(self, tested_only: bool = True) -> List[Dict[str, Any]]:
        """Per sample: id, tested, flagged and the test's scores (None where untested)."""
        ids = torch.nonzero(self.tested).flatten() if tested_only else torch.arange(self.num_samples)
        out = []
        for i, t, f, c, v, b in zip(ids.tolist(), self.tested[ids].tolist(), self.flags[ids].tolist(),
                                    self.confidence[ids].tolist(), self.invariance[ids].tolist(),
                                    self.view_ce[ids].tolist()):
            nan = lambda x: None if x != x else round(x, 5)  # noqa: E731
            out.append({"id": i, "tested": t, "flagged": f, "confidence": nan(c), "invariance": nan(v),
                        "view_ce": nan(b)})
        return out

    def summary(self, poisoned: Optional[Sequence[int]] = None) -> Dict[str, object]:
        """Counts for a result record; with the true ``poisoned`` ids (evaluation only), how the
        tests and flags split between poisoned and clean samples."""
        out: Dict[str, object] = {"steps": self.steps, "tested": int(self.tested.sum()), "flagged": int(self.flags.sum()),
                                  "target_tokens": torch.nonzero(self.targets).flatten().tolist(),
                                  "novel_tokens": torch.nonzero(self.novel).flatten().tolist(),
                                  "first_named_at_step": (int(self.named_at[self.named_at >= 0].min())
                                                          if bool((self.named_at >= 0).any()) else None)}
        if poisoned is not None:
            mask = torch.zeros_like(self.flags)
            if len(poisoned):
                mask[torch.as_tensor(list(poisoned), device=mask.device)] = True
            out.update(tested_poisoned=int((self.tested & mask).sum()), tested_clean=int((self.tested & ~mask).sum()),
                       flagged_poisoned=int((self.flags & mask).sum()), flagged_clean=int((self.flags & ~mask).sum()))
        return out

    # ---- checkpoints -----------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        if self._records or bool(self._pending.any()):
            raise RuntimeError("InlineMemory.state_dict() between record() and commit(): commit the step first")
        return {"tested": self.tested.clone(), "flags": self.flags.clone(), "confidence": self.confidence.clone(),
                "invariance": self.invariance.clone(), "view_ce": self.view_ce.clone(), "counts": self.counts.clone(),
                "targets": self.targets.clone(), "named_at": self.named_at.clone(), "exempt": self.exempt.clone(),
                "steps": self.steps,
                "credit": self._credit,
                "nominal_rows": self._nominal_rows, "thresholds": dict(self.thresholds)}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        for key in ("tested", "flags", "confidence", "invariance", "view_ce", "counts", "targets"):
            mine = getattr(self, key)   # views of the tables: copy_ writes through
            if tuple(state[key].shape) != tuple(mine.shape):
                raise ValueError(f"state {key!r} has shape {tuple(state[key].shape)}, this memory {tuple(mine.shape)}")
            mine.copy_(state[key].to(mine.device))
        for key in ("exempt", "named_at"):   # absent from checkpoints of older versions
            if key in state:
                getattr(self, key).copy_(state[key].to(self.device))
        self.steps = int(state["steps"])
        self._credit = float(state["credit"])
        self._nominal_rows = state["nominal_rows"]
        self.thresholds = dict(state["thresholds"])
        self._pending.zero_()
        self._records = []
