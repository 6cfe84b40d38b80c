"""Shape checks and reductions over the response tokens of (B, T) labels (one response per row)."""
from __future__ import annotations

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
