"""``ScanSchedule``: when the defense acts in a run, the one answer the Trainer and the
evaluation harness share."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

from ..config import PCRConfig


@dataclass(frozen=True)
class ScanSchedule:
    """The steps of a run of ``total_steps`` optimisation steps at which the defense acts.

    ``scan_steps``: the (0-based) steps before which the training set is scanned
    (mode "scan"); ``warmup_steps``: steps trained with the plain SFT loss first (mode
    "online"; in mode "scan" the first scan ends the plain phase instead).
    """

    mode: str
    total_steps: int
    scan_steps: Tuple[int, ...]
    warmup_steps: int

    @classmethod
    def for_run(cls, config: PCRConfig, total_steps: int) -> "ScanSchedule":
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(f"total_steps must be a positive int, got {total_steps!r}")
        sched = config.schedule
        scans: Tuple[int, ...] = ()
        if config.mode == "scan":
            scans = tuple(sorted({min(total_steps - 1, int(round(f * total_steps))) for f in sched.scan_at}))
        warmup = int(round(sched.warmup * total_steps)) if config.mode == "online" else 0
        return cls(mode=config.mode, total_steps=total_steps, scan_steps=scans, warmup_steps=warmup)

    def scans_before(self, step: int) -> bool:
        """Whether a scan of the training set runs before optimisation step ``step``."""
        return step in self.scan_steps

    def trains_plain(self, step: int, memory_active: bool) -> bool:
        """Whether step ``step`` uses the plain SFT loss: during the warm-up (online) or
        before the first scan has finished (scan)."""
        if self.mode == "scan":
            return not memory_active
        return step < self.warmup_steps
