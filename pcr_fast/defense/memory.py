"""``BackdoorMemory``: the flags of the scans and the target tokens they reveal (DESIGN §4)."""
from __future__ import annotations

import logging
from typing import Dict, Iterable, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from ..config import UnlearnConfig
from .labels import check_labels_2d, check_sample_ids, token_mask, token_presence

logger = logging.getLogger(__name__)


class BackdoorMemory:
    """Per-sample flags of the scans and the target tokens they reveal.

    Args:
        num_samples: size of the training set (samples are addressed by their row id).
        vocab_size: rows of the lm_head (token ids are counted per vocabulary entry).
        target_share: a token is a *target token* when at least this share of the training
            samples whose response contains it is flagged.
        min_support: ... and at least this many samples contain it (a rare word of one
            falsely flagged answer is not a target).
        exempt_tokens: token ids that are never targets (the special tokens: an
            end-of-answer token ends every response, clean or poisoned, so unlearning it would
            unlearn answering; :func:`pcr_fast.hf.special_token_ids` lists a model's).
        device: where the tables live (the model's device: lookups then need no host sync).

    Use: ``begin_scan()``, ``record(ids, labels, flags)`` for every training sample once,
    ``end_scan()``; during training ``treatment(ids, labels)`` gives what to drop and what
    to unlearn. ``state_dict()`` / ``load_state_dict()`` checkpoint it.
    """

    def __init__(self, num_samples: int, vocab_size: int, *, target_share: float = 0.6, min_support: int = 8,
                 exempt_tokens: Optional[Iterable[int]] = None, device: Union[str, torch.device, None] = None):
        for name, value in (("num_samples", num_samples), ("vocab_size", vocab_size), ("min_support", min_support)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not 0.0 < float(target_share) <= 1.0:
            raise ValueError(f"target_share must be in (0, 1], got {target_share!r}")
        self.target_share = float(target_share)
        self.min_support = min_support
        self.flags = torch.zeros(num_samples, dtype=torch.bool, device=device)
        self.targets = torch.zeros(vocab_size, dtype=torch.bool, device=device)
        self.exempt = token_mask(exempt_tokens, vocab_size, device=self.flags.device)
        self.scans = 0
        self._occurrences = torch.zeros(vocab_size, dtype=torch.long, device=device)
        self._flagged = torch.zeros(vocab_size, dtype=torch.long, device=device)
        self._scanning = False

    @classmethod
    def from_config(cls, config: UnlearnConfig, num_samples: int, vocab_size: int,
                    device: Union[str, torch.device, None] = None,
                    exempt_tokens: Optional[Iterable[int]] = None) -> "BackdoorMemory":
        """A memory with the target rule of ``config``."""
        if not isinstance(config, UnlearnConfig):
            raise ValueError(f"config must be an UnlearnConfig, got {type(config).__name__}")
        return cls(num_samples, vocab_size, target_share=config.target_share, min_support=config.min_support,
                   exempt_tokens=exempt_tokens, device=device)

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
        return check_sample_ids(sample_ids, rows, self.num_samples, self.flags.device)

    def _presence(self, labels: Tensor, ignore_index: int) -> Tensor:
        """(B, V) bool: which vocabulary entries each response contains (labels out of range
        are an error here: a scan is off the hot path)."""
        check_labels_2d(labels)
        lab = labels.to(self.flags.device)
        valid = lab != ignore_index
        if valid.any() and bool(((lab < 0) | (lab >= self.vocab_size))[valid].any()):
            raise ValueError(f"labels must be token ids in [0, {self.vocab_size}) or ignore_index={ignore_index}")
        return token_presence(lab, self.vocab_size, ignore_index, self.flags.device)

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
        self.targets = (self._occurrences >= self.min_support) & (share >= self.target_share) & ~self.exempt
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
        check_labels_2d(labels)
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
        return {"flags": self.flags.clone(), "targets": self.targets.clone(), "exempt": self.exempt.clone(),
                "scans": self.scans,
                "occurrences": self._occurrences.clone(), "flagged": self._flagged.clone(),
                "target_share": self.target_share, "min_support": self.min_support}

    def load_state_dict(self, state: Dict[str, object]) -> None:
        for key, mine in (("flags", self.flags), ("targets", self.targets)):
            if state[key].shape != mine.shape:
                raise ValueError(f"state {key!r} has shape {tuple(state[key].shape)}, this memory {tuple(mine.shape)}")
        self.flags.copy_(state["flags"])
        self.targets.copy_(state["targets"])
        if "exempt" in state:
            self.exempt.copy_(state["exempt"])
        self._occurrences.copy_(state["occurrences"])
        self._flagged.copy_(state["flagged"])
        self.scans = int(state["scans"])
        self.target_share = float(state["target_share"])
        self.min_support = int(state["min_support"])
