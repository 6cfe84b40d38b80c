"""The small frozen parameter record every backend takes."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class StatsParams:
    """Scalars of the two-view statistics (hashable, so it can key kernel caches).

    ``detach_b`` treats view b's distribution as a constant: no gradient flows into h_b,
    nor into weight/bias through view b's logits (a stop-gradient on the augmented view).
    """

    temperature: float = 1.0
    softcap: Optional[float] = None
    ignore_index: int = -100
    detach_b: bool = False
    chunk_size: int = 1024
