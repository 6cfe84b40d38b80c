"""Shape checks and reductions over the response tokens of (B, T) labels (one response per row)."""
from __future__ import annotations

from typing import Iterable, Optional, Union

import torch
from torch import Tensor


def check_labels_2d(labels: Tensor) -> None:
    """Raise unless ``labels`` is an integer (B, T) tensor."""
    if not isinstance(labels, Tensor) or labels.dim() != 2 or labels.is_floating_point():
        raise ValueError(f"labels must be an integer (B, T) tensor (one response per row, already shifted), "
                         f"got {getattr(labels, 'dtype', type(labels).__name__)} "
                         f"{tuple(getattr(labels, 'shape', ()))}")


def max_over_labelled(values: Tensor, labelled: Tensor) -> Tensor:
    """(B,) max over each row's labelled tokens (-inf for rows without any)."""
    return values.view(labelled.shape).masked_fill(~labelled, float("-inf")).amax(dim=1)


def token_mask(token_ids: Optional[Iterable[int]], vocab_size: int, name: str = "exempt_tokens",
               device: Union[str, torch.device, None] = None) -> Tensor:
    """(V,) bool mask of ``token_ids`` (``None`` or empty: all False); raises a ``ValueError``
    naming ``name`` for an id outside [0, vocab_size)."""
    ids = sorted({int(t) for t in (token_ids if token_ids is not None else ())})
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"{name} must be token ids in [0, {vocab_size}), got {bad[:5]}")
    mask = torch.zeros(vocab_size, dtype=torch.bool, device=device)
    if ids:
        mask[torch.tensor(ids, dtype=torch.long, device=mask.device)] = True
    return mask
