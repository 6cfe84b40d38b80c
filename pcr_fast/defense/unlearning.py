"""The unlearning objective: CE on the kept responses + unlikelihood on target tokens."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from ..loss import unlikelihood_from_ce
from ..stats import single_view_stats
from .labels import check_labels_2d


@dataclass
class UnlearningLossOutput:
    """The loss and detached per-term values for logging (no host sync)."""

    loss: Tensor
    ce: Tensor                  # mean CE over the kept labelled tokens
    unlikelihood: Tensor        # mean unlikelihood over the unlearned tokens (0 if none)
    dropped_fraction: Tensor    # share of the batch's responses left out of the CE
    num_tokens: Tensor          # labelled tokens in the batch


def original_view_ce(h: Tensor, weight: Tensor, labels: Tensor, *, bias: Optional[Tensor] = None,
                     temperature: float = 1.0, softcap: Optional[float] = None, ignore_index: int = -100,
                     backend: str = "auto") -> Tensor:
    """Per-token CE of one view, (N,) flattened like ``labels``, differentiable (0 on ignored
    tokens): what a training step of the defense needs from its one forward.

    Runs :func:`~pcr_fast.stats.single_view_stats`: no N×V tensor, and the lm_head matmul
    once per row (the fused kernels compile the second view out).
    """
    return single_view_stats(h, weight, labels, bias=bias, temperature=temperature, softcap=softcap,
                             ignore_index=ignore_index, backend=backend).ce


def unlearning_objective(ce: Tensor, labels: Tensor, drop: Tensor, unlearn: Tensor, *, num_items_in_batch=None,
                         unlearn_weight: float = 1.0, ignore_index: int = -100) -> UnlearningLossOutput:
    """``(Σ_kept CE + λ Σ_unlearn −log(1 − p)) / n`` from per-token CE ``ce`` (N,), flattened
    like the (B, T) ``labels``; ``n`` the labelled tokens (or ``num_items_in_batch``)."""
    check_labels_2d(labels)
    if not isinstance(drop, Tensor) or drop.dtype != torch.bool or drop.shape != labels.shape[:1]:
        raise ValueError(f"drop must be a bool tensor of shape ({labels.shape[0]},), got "
                         f"{getattr(drop, 'dtype', type(drop).__name__)} {tuple(getattr(drop, 'shape', ()))}")
    if not isinstance(unlearn, Tensor) or unlearn.dtype != torch.bool or unlearn.shape != labels.shape:
        raise ValueError(f"unlearn must be a bool tensor shaped like labels {tuple(labels.shape)}, got "
                         f"{getattr(unlearn, 'dtype', type(unlearn).__name__)} {tuple(getattr(unlearn, 'shape', ()))}")
    if unlearn_weight < 0:
        raise ValueError(f"unlearn_weight must be >= 0, got {unlearn_weight!r}")
    dtype = ce.dtype
    labelled = (labels != ignore_index).reshape(-1)
    keep = (labelled & ~drop[:, None].expand_as(labels).reshape(-1)).to(dtype)
    unl = (unlearn.reshape(-1) & labelled).to(dtype)
    n_lab = labelled.to(dtype).sum()
    den = (torch.as_tensor(num_items_in_batch, dtype=dtype, device=n_lab.device)
           if num_items_in_batch is not None else n_lab.clamp_min(1))
    ce_sum = (ce * keep).sum()
    ul_sum = (unlikelihood_from_ce(ce) * unl).sum()
    loss = (ce_sum + unlearn_weight * ul_sum) / den
    with torch.no_grad():
        return UnlearningLossOutput(
            loss=loss, ce=ce_sum.detach() / keep.sum().clamp_min(1), unlikelihood=ul_sum.detach() / unl.sum().clamp_min(1),
            dropped_fraction=drop.to(dtype).mean(), num_tokens=n_lab)


def unlearning_loss(h_a: Tensor, weight: Tensor, labels: Tensor, drop: Tensor, unlearn: Tensor, *,
                    bias: Optional[Tensor] = None, num_items_in_batch=None, unlearn_weight: float = 1.0,
                    temperature: float = 1.0, softcap: Optional[float] = None, ignore_index: int = -100,
                    backend: str = "auto") -> UnlearningLossOutput:
    """CE on the kept responses + ``unlearn_weight`` × unlikelihood on the ``unlearn`` tokens.

    ``(Σ_kept CE + λ Σ_unlearn −log(1 − p)) / n`` with ``n`` the batch's labelled tokens
    (or ``num_items_in_batch``), so an all-kept batch gives exactly the plain SFT loss.
    ``drop``: (B,) bool; ``unlearn``: (B, T) bool. Per-token CE comes from
    :func:`original_view_ce` (no N×V tensor).
    """
    check_labels_2d(labels)
    if h_a.dim() != 3 or h_a.shape[:2] != labels.shape:
        raise ValueError(f"h_a must be (B, T, D) matching labels {tuple(labels.shape)}, got {tuple(h_a.shape)}")
    if unlearn_weight < 0:
        raise ValueError(f"unlearn_weight must be >= 0, got {unlearn_weight!r}")
    ce = original_view_ce(h_a, weight, labels, bias=bias, temperature=temperature, softcap=softcap,
                          ignore_index=ignore_index, backend=backend)
    return unlearning_objective(ce, labels, drop, unlearn, num_items_in_batch=num_items_in_batch,
                                unlearn_weight=unlearn_weight, ignore_index=ignore_index)
