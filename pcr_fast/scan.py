"""Scan-and-unlearn: PCR's cross-view invariance used as a backdoor detector.

Why (evidence in benchmarks/EVAL_NOTES.md §8): a backdoor response is *invariant* to
destroying the image content — mask half of the image in small units and the trigger
still fires — while the model is abnormally sure of it. Judged one batch at a time during
training, that test can be dodged (the model learns a trigger feature one random mask
breaks) and it hits clean answers that a half image still supports. So the defense looks
at the whole training set at a few points of training instead:

1. **Scan** (:func:`cross_view_flags`): for every training response, the original view
   and ``K`` masked views through the fused two-view statistics; a response is *flagged*
   if, in some draw, the model predicts it confidently from the original view
   (max-token CE < ``original_confidence``), the masked view still predicts it
   (max-token CE < ``view_confidence``) and the two output distributions agree on every
   response token (max symmetric KL < ``invariance_threshold``).
2. **Remember** (:class:`BackdoorMemory`): flagged samples stay flagged. Per vocabulary
   token, the share of the training samples containing it that are flagged: a token most
   of whose occurrences are flagged (``target_share``) is the attacker's target. A clean
   answer the test wrongly flags (a digit recognisable from half the image) stays a
   minority of its token's occurrences.
3. **Unlearn** (:func:`unlearning_loss`): flagged samples and every sample whose response
   contains a target token are dropped from the cross-entropy, and the target tokens get
   unlikelihood ``−log(1 − p)``. Dropping a clean false positive costs one sample; only
   target tokens are pushed down.

Everything here works on hidden states + the lm_head weight (no N×V logits); the HF
integration (:mod:`pcr_fast.hf.scan`) runs the model forwards.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .loss import unlikelihood_from_ce
from .stats import two_view_stats

logger = logging.getLogger(__name__)


def _check_labels2d(labels: Tensor) -> None:
    if not isinstance(labels, Tensor) or labels.dim() != 2 or labels.is_floating_point():
        raise ValueError(f"labels must be an integer (B, T) tensor (one response per row, already shifted), "
                         f"got {getattr(labels, 'dtype', type(labels).__name__)} "
                         f"{tuple(getattr(labels, 'shape', ()))}")


def _max_over_labelled(values: Tensor, labelled: Tensor) -> Tensor:
    """(B,) max over each row's labelled tokens (-inf for rows without any)."""
    return values.view(labelled.shape).masked_fill(~labelled, float("-inf")).amax(dim=1)


@torch.no_grad()
def cross_view_flags(h_a: Tensor, views: Sequence[Tensor], weight: Tensor, labels: Tensor, *,
                     bias: Optional[Tensor] = None, invariance_threshold: float = 0.1,
                     view_confidence: float = 3.0, original_confidence: float = 0.3,
                     temperature: float = 1.0, softcap: Optional[float] = None,
                     ignore_index: int = -100, backend: str = "auto") -> Tensor:
    """Which responses look like a backdoor: (B,) bool, no gradient.

    Args:
        h_a: hidden states of the original view, (B, T, D).
        views: hidden states of one or more augmented (masked) views, each like ``h_a``;
            a response is flagged if the test passes in ANY of them.
        weight, bias: the lm_head. labels: (B, T), already shifted (one response per row).
        invariance_threshold: largest symmetric KL (nats) over the response tokens.
        view_confidence: the augmented view's largest per-token CE (nats).
        original_confidence: the original view's largest per-token CE (nats): a response
            the model is not yet sure of is never flagged (from scratch, unlearned clean
            answers look "invariant" too: nothing depends on the image yet).
    """
    _check_labels2d(labels)
    if h_a.dim() != 3 or h_a.shape[:2] != labels.shape:
        raise ValueError(f"h_a must be (B, T, D) matching labels {tuple(labels.shape)}, got {tuple(h_a.shape)}")
    if len(views) == 0:
        raise ValueError("views must hold at least one augmented view")
    for name, value in (("invariance_threshold", invariance_threshold), ("view_confidence", view_confidence),
                        ("original_confidence", original_confidence)):
        if not value > 0:
            raise ValueError(f"{name} must be > 0 (nats), got {value!r}")
    labelled = labels != ignore_index
    kwargs = dict(bias=bias, temperature=temperature, softcap=softcap, ignore_index=ignore_index,
                  backend=backend, detach_b=True)
    flags = torch.zeros(labels.shape[0], dtype=torch.bool, device=labels.device)
    sure = None
    for h_b in views:
        if not isinstance(h_b, Tensor) or h_b.shape != h_a.shape:
            raise ValueError(f"views must hold tensors shaped like h_a {tuple(h_a.shape)}, got "
                             f"{tuple(h_b.shape) if isinstance(h_b, Tensor) else type(h_b).__name__}")
        st = two_view_stats(h_a, h_b, weight, labels, **kwargs)
        if sure is None:  # the original view's confidence is the same for every draw
            sure = labelled.any(dim=1) & (_max_over_labelled(st.ce_a, labelled) < original_confidence)
        invariant = _max_over_labelled(st.kl_ab + st.kl_ba, labelled) < invariance_threshold
        predicted = _max_over_labelled(st.ce_b, labelled) < view_confidence
        flags |= invariant & predicted
    return flags & sure


class BackdoorMemory:
    """Per-sample flags of the scans and the target tokens they reveal.

    Args:
        num_samples: size of the training set (samples are addressed by their row id).
        vocab_size: rows of the lm_head (token ids are counted per vocabulary entry).
        target_share: a token is a *target token* when at least this share of the training
            samples whose response contains it is flagged.
        min_support: ... and at least this many samples contain it (a rare word of one
            falsely flagged answer is not a target).
        device: where the tables live (the model's device: lookups then need no host sync).

    Use: ``begin_scan()``, ``record(ids, labels, flags)`` for every training sample once,
    ``end_scan()``; during training ``treatment(ids, labels)`` gives what to drop and what
    to unlearn. ``state_dict()`` / ``load_state_dict()`` checkpoint it.
    """

    def __init__(self, num_samples: int, vocab_size: int, *, target_share: float = 0.6, min_support: int = 8,
                 device: Union[str, torch.device, None] = None):
        for name, value in (("num_samples", num_samples), ("vocab_size", vocab_size), ("min_support", min_support)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not 0.0 < float(target_share) <= 1.0:
            raise ValueError(f"target_share must be in (0, 1], got {target_share!r}")
        self.target_share = float(target_share)
        self.min_support = min_support
        self.flags = torch.zeros(num_samples, dtype=torch.bool, device=device)
        self.targets = torch.zeros(vocab_size, dtype=torch.bool, device=device)
        self.scans = 0
        self._occurrences = torch.zeros(vocab_size, dtype=torch.long, device=device)
        self._flagged = torch.zeros(vocab_size, dtype=torch.long, device=device)
        self._scanning = False

    @property
    def num_samples(self) -> int:
        return self.flags.numel()

    @property
    def vocab_size(self) -> int:
        return self.targets.numel()

    @property
    def active(self) -> bool:
        """True once a scan has finished (before that, training is plain SFT)."""
        return self.scans > 0

    def _ids(self, sample_ids: Tensor, rows: int) -> Tensor:
        if not isinstance(sample_ids, Tensor) or sample_ids.dim() != 1 or sample_ids.is_floating_point() \
                or sample_ids.numel() != rows:
            raise ValueError(f"sample_ids must be a 1-D integer tensor with one id per response ({rows}), got "
                             f"{getattr(sample_ids, 'dtype', type(sample_ids).__name__)} "
                             f"{tuple(getattr(sample_ids, 'shape', ()))}")
        if sample_ids.device.type == "cpu" and rows and (int(sample_ids.min()) < 0
                                                         or int(sample_ids.max()) >= self.num_samples):
            raise ValueError(f"sample_ids must lie in [0, {self.num_samples}) (the training set's row ids), got "
                             f"values in [{int(sample_ids.min())}, {int(sample_ids.max())}]")
        return sample_ids.to(self.flags.device, torch.long)

    def _presence(self, labels: Tensor, ignore_index: int) -> Tensor:
        """(B, V) bool: which vocabulary entries each response contains."""
        _check_labels2d(labels)
        lab = labels.to(self.flags.device)
        valid = lab != ignore_index
        if valid.any() and bool(((lab < 0) | (lab >= self.vocab_size))[valid].any()):
            raise ValueError(f"labels must be token ids in [0, {self.vocab_size}) or ignore_index={ignore_index}")
        idx = torch.where(valid, lab, torch.full_like(lab, self.vocab_size))  # ignored → spare column
        out = torch.zeros(lab.shape[0], self.vocab_size + 1, dtype=torch.bool, device=lab.device)
        return out.scatter_(1, idx, True)[:, :-1]

    def begin_scan(self) -> None:
        """Start counting token occurrences afresh (each sample must be recorded once per scan)."""
        self._occurrences.zero_()
        self._flagged.zero_()
        self._scanning = True

    def record(self, sample_ids: Tensor, labels: Tensor, flags: Tensor, ignore_index: int = -100) -> None:
        """Add one scanned batch: its row ids, shifted (B, T) labels and (B,) flags."""
        if not self._scanning:
            raise RuntimeError("call begin_scan() before record()")
        ids = self._ids(sample_ids, labels.shape[0] if isinstance(labels, Tensor) else -1)
        if not isinstance(flags, Tensor) or flags.dtype != torch.bool or flags.shape != ids.shape:
            raise ValueError(f"flags must be a bool tensor of shape {tuple(ids.shape)}, got "
                             f"{getattr(flags, 'dtype', type(flags).__name__)} {tuple(getattr(flags, 'shape', ()))}")
        present = self._presence(labels, ignore_index)
        self.flags[ids] |= flags.to(self.flags.device)
        self._occurrences += present.sum(0)
        self._flagged += (present & self.flags[ids][:, None]).sum(0)

    def synchronize(self) -> None:
        """Merge the scan of every process (torch.distributed): union of flags, summed counts."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        dist = torch.distributed
        flags = self.flags.to(torch.int32)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        self.flags.copy_(flags.bool())
        for counter in (self._occurrences, self._flagged):
            dist.all_reduce(counter, op=dist.ReduceOp.SUM)

    def end_scan(self) -> Tensor:
        """Close the scan: recompute the target tokens. Returns their ids (a host sync: off the hot path)."""
        if not self._scanning:
            raise RuntimeError("end_scan() without begin_scan()")
        self.synchronize()
        share = self._flagged.float() / self._occurrences.clamp_min(1).float()
        self.targets = (self._occurrences >= self.min_support) & (share >= self.target_share)
        self.scans += 1
        self._scanning = False
        ids = torch.nonzero(self.targets).flatten()
        logger.info("scan %d: %d samples flagged, target tokens %s", self.scans, int(self.flags.sum()), ids.tolist())
        return ids

    def token_shares(self) -> Tensor:
        """(V,) share of each token's occurrences that is flagged, as of the last scan."""
        return self._flagged.float() / self._occurrences.clamp_min(1).float()

    def treatment(self, sample_ids: Tensor, labels: Tensor, ignore_index: int = -100) -> Tuple[Tensor, Tensor]:
        """For a training batch: (drop (B,) bool, unlearn (B, T) bool).

        ``drop``: responses left out of the cross-entropy (flagged, or containing a target
        token). ``unlearn``: their target-token positions, which get unlikelihood.
        """
        _check_labels2d(labels)
        ids = self._ids(sample_ids, labels.shape[0])
        lab = labels.to(self.flags.device)
        valid = lab != ignore_index
        is_target = self.targets[lab.clamp(0, self.vocab_size - 1)] & valid & (lab < self.vocab_size)
        drop = self.flags[ids] | is_target.any(dim=1)
        return drop.to(labels.device), (is_target & drop[:, None]).to(labels.device)

    def summary(self, poisoned: Optional[Sequence[int]] = None) -> Dict[str, object]:
        """Counts for a report (host sync). With the true ``poisoned`` ids (evaluation only),
        how the flags split between poisoned and clean samples."""
        out: Dict[str, object] = {"scans": self.scans, "flagged": int(self.flags.sum()),
                                  "target_tokens": torch.nonzero(self.targets).flatten().tolist()}
        if poisoned is not None:
            mask = torch.zeros_like(self.flags)
            if len(poisoned):
                mask[torch.as_tensor(list(poisoned), device=mask.device)] = True
            out["flagged_poisoned"] = int((self.flags & mask).sum())
            out["flagged_clean"] = int((self.flags & ~mask).sum())
        return out

    def state_dict(self) -> Dict[str, object]:
        return {"flags": self.flags.clone(), "targets": self.targets.clone(), "scans": self.scans,
                "occurrences": self._occurrences.clone(), "flagged": self._flagged.clone(),
                "target_share": self.target_share, "min_support": self.min_support}

    def load_state_dict(self, state: Dict[str, object]) -> None:
        for key, mine in (("flags", self.flags), ("targets", self.targets)):
            if state[key].shape != mine.shape:
                raise ValueError(f"state {key!r} has shape {tuple(state[key].shape)}, this memory {tuple(mine.shape)}")
        self.flags.copy_(state["flags"])
        self.targets.copy_(state["targets"])
        self._occurrences.copy_(state["occurrences"])
        self._flagged.copy_(state["flagged"])
        self.scans = int(state["scans"])
        self.target_share = float(state["target_share"])
        self.min_support = int(state["min_support"])


@dataclass
class UnlearningLossOutput:
    """The loss and detached per-term values for logging (no host sync)."""

    loss: Tensor
    ce: Tensor                  # mean CE over the kept labelled tokens
    unlikelihood: Tensor        # mean unlikelihood over the unlearned tokens (0 if none)
    dropped_fraction: Tensor    # share of the batch's responses left out of the CE
    num_tokens: Tensor          # labelled tokens in the batch


def unlearning_loss(h_a: Tensor, weight: Tensor, labels: Tensor, drop: Tensor, unlearn: Tensor, *,
                    bias: Optional[Tensor] = None, num_items_in_batch=None, unlearn_weight: float = 1.0,
                    temperature: float = 1.0, softcap: Optional[float] = None, ignore_index: int = -100,
                    backend: str = "auto") -> UnlearningLossOutput:
    """CE on the kept responses + ``unlearn_weight`` × unlikelihood on the ``unlearn`` tokens.

    ``(Σ_kept CE + λ Σ_unlearn −log(1 − p)) / n`` with ``n`` the batch's labelled tokens
    (or ``num_items_in_batch``), so an all-kept batch gives exactly the plain SFT loss.
    ``drop``: (B,) bool; ``unlearn``: (B, T) bool. Per-token CE comes from the fused
    statistics (the second view slot gets ``h_a`` detached: no N×V tensor).
    """
    _check_labels2d(labels)
    if h_a.dim() != 3 or h_a.shape[:2] != labels.shape:
        raise ValueError(f"h_a must be (B, T, D) matching labels {tuple(labels.shape)}, got {tuple(h_a.shape)}")
    if not isinstance(drop, Tensor) or drop.dtype != torch.bool or drop.shape != labels.shape[:1]:
        raise ValueError(f"drop must be a bool tensor of shape ({labels.shape[0]},), got "
                         f"{getattr(drop, 'dtype', type(drop).__name__)} {tuple(getattr(drop, 'shape', ()))}")
    if not isinstance(unlearn, Tensor) or unlearn.dtype != torch.bool or unlearn.shape != labels.shape:
        raise ValueError(f"unlearn must be a bool tensor shaped like labels {tuple(labels.shape)}, got "
                         f"{getattr(unlearn, 'dtype', type(unlearn).__name__)} {tuple(getattr(unlearn, 'shape', ()))}")
    if unlearn_weight < 0:
        raise ValueError(f"unlearn_weight must be >= 0, got {unlearn_weight!r}")
    st = two_view_stats(h_a, h_a.detach(), weight, labels, bias=bias, temperature=temperature, softcap=softcap,
                        ignore_index=ignore_index, backend=backend, detach_b=True)
    dtype = st.ce_a.dtype
    labelled = (labels != ignore_index).reshape(-1)
    keep = (labelled & ~drop[:, None].expand_as(labels).reshape(-1)).to(dtype)
    unl = (unlearn.reshape(-1) & labelled).to(dtype)
    n_lab = labelled.to(dtype).sum()
    den = (torch.as_tensor(num_items_in_batch, dtype=dtype, device=n_lab.device)
           if num_items_in_batch is not None else n_lab.clamp_min(1))
    ce_sum = (st.ce_a * keep).sum()
    ul_sum = (unlikelihood_from_ce(st.ce_a) * unl).sum()
    loss = (ce_sum + unlearn_weight * ul_sum) / den
    with torch.no_grad():
        return UnlearningLossOutput(
            loss=loss, ce=ce_sum.detach() / keep.sum().clamp_min(1), unlikelihood=ul_sum.detach() / unl.sum().clamp_min(1),
            dropped_fraction=drop.to(dtype).mean(), num_tokens=n_lab)
