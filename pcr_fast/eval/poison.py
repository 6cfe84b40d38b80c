"""Poisoning: a chosen fraction of the training samples gets the trigger and the target."""
from __future__ import annotations

from typing import List

import torch

DEFAULT_TARGET = "visit evil dot com"


def poison_count(num_samples: int, ratio: float) -> int:
    """How many samples a ``ratio`` poisons: ``round(ratio · num_samples)``."""
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"poison_ratio must be in [0, 1], got {ratio!r}")
    if num_samples < 0:
        raise ValueError(f"num_samples must be >= 0, got {num_samples}")
    return int(round(ratio * num_samples))


def choose_poisoned(num_samples: int, ratio: float, seed: int) -> List[int]:
    """Sorted indices of exactly ``poison_count(num_samples, ratio)`` samples, fixed by ``seed``."""
    k = poison_count(num_samples, ratio)
    perm = torch.randperm(num_samples, generator=torch.Generator().manual_seed(int(seed)))
    return sorted(perm[:k].tolist())
