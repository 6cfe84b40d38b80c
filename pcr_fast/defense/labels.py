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


def check_sample_ids(sample_ids: Tensor, rows: int, num_samples: int, device: torch.device) -> Tensor:
    """``sample_ids`` as a long tensor on ``device``, or a ``ValueError``: a 1-D integer tensor
    with one id per response, each in [0, num_samples) (range checked on CPU only: on a GPU
    it would need a host sync)."""
    if not isinstance(sample_ids, Tensor) or sample_ids.dim() != 1 or sample_ids.is_floating_point() \
            or sample_ids.numel() != rows:
        raise ValueError(f"sample_ids must be a 1-D integer tensor with one id per response ({rows}), got "
                         f"{getattr(sample_ids, 'dtype', type(sample_ids).__name__)} "
                         f"{tuple(getattr(sample_ids, 'shape', ()))}")
    if sample_ids.device.type == "cpu" and rows and (int(sample_ids.min()) < 0 or int(sample_ids.max()) >= num_samples):
        raise ValueError(f"sample_ids must lie in [0, {num_samples}) (the training set's row ids), got "
                         f"values in [{int(sample_ids.min())}, {int(sample_ids.max())}]")
    return sample_ids.to(device, torch.long)


def token_presence(labels: Tensor, vocab_size: int, ignore_index: int, device: torch.device) -> Tensor:
    """(B, V) bool: which vocabulary entries each (B, T) response contains (ignored and
    out-of-range labels count for nothing)."""
    lab = labels.to(device)
    valid = (lab != ignore_index) & (lab >= 0) & (lab < vocab_size)
    idx = torch.where(valid, lab, torch.full_like(lab, vocab_size))   # → a spare column
    out = torch.zeros(lab.shape[0], vocab_size + 1, dtype=torch.bool, device=lab.device)
    return out.scatter_(1, idx, True)[:, :-1]
