"""``fused_linear_cross_entropy``: a drop-in ``F.cross_entropy(h @ W.T + b, labels)`` that never
builds the (N × V) logits.

It is the single-view case of the library's kernel contract: :func:`pcr_fast.stats.single_view_stats`
gives per-token ``ce``, ``lse``, mean logit and argmax from one pass over the vocabulary
(view b compiled out of the fused kernels), and every option composes on those in plain
PyTorch, per token::

    loss_t = (1 − ε)·ce_t + ε·(lse_t − mean_v z_tv) + z_loss·lse_t²      (labelled tokens)

which is ``F.cross_entropy(z, y, label_smoothing=ε)`` plus PaLM's z-loss, with
``z = softcap·tanh((h Wᵀ + b)/softcap)/temperature``.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Union

import torch
from torch import Tensor

from .stats import single_view_stats

REDUCTIONS = ("mean", "sum", "none")

__all__ = ["fused_linear_cross_entropy", "CrossEntropyOutput", "REDUCTIONS", "check_options"]


class CrossEntropyOutput(NamedTuple):
    """What ``fused_linear_cross_entropy(..., return_aux=True)`` returns.

    ``loss`` is the objective (differentiable); ``lse`` the per-token log-sum-exp
    (differentiable, input's leading shape); ``z_loss`` the z-loss part of ``loss`` (detached,
    reduced like the loss); ``accuracy`` the share of labelled tokens whose argmax is the
    label (detached scalar); ``predictions`` the per-token argmax (int64, leading shape);
    ``num_tokens`` the labelled tokens of this call.
    """

    loss: Tensor
    lse: Tensor
    z_loss: Tensor
    accuracy: Tensor
    predictions: Tensor
    num_tokens: Tensor


def check_options(label_smoothing: float = 0.0, z_loss: float = 0.0, reduction: str = "mean",
                  num_items_in_batch=None) -> None:
    """Raise ValueError, naming the argument, for an invalid option of the fused CE."""
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)) \
            or not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be a float in [0, 1], got {label_smoothing!r}")
    if isinstance(z_loss, bool) or not isinstance(z_loss, (int, float)) or not (z_loss >= 0 and math.isfinite(z_loss)):
        raise ValueError(f"z_loss must be a finite float >= 0, got {z_loss!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, bool) or not isinstance(num_items_in_batch, (int, float, Tensor)):
            raise ValueError(f"num_items_in_batch must be a number, a tensor or None, got "
                             f"{type(num_items_in_batch).__name__}")
        if isinstance(num_items_in_batch, Tensor) and num_items_in_batch.numel() != 1:
            raise ValueError(f"num_items_in_batch must be a scalar, got shape {tuple(num_items_in_batch.shape)}")
        if isinstance(num_items_in_batch, (int, float)) and not num_items_in_batch > 0:
            raise ValueError(f"num_items_in_batch must be > 0, got {num_items_in_batch!r}")
        if reduction != "mean":
            raise ValueError("num_items_in_batch divides the summed loss: use it with reduction='mean'")


def fused_linear_cross_entropy(h: Tensor, weight: Tensor, labels: Tensor, *, bias: Optional[Tensor] = None,
                               softcap: Optional[float] = None, temperature: float = 1.0,
                               ignore_index: int = -100, label_smoothing: float = 0.0, z_loss: float = 0.0,
                               reduction: str = "mean", num_items_in_batch=None, backend: str = "auto",
                               return_aux: bool = False) -> Union[Tensor, CrossEntropyOutput]:
    """Cross-entropy of ``softcap(h @ weight.T + bias)/temperature`` against ``labels``, fused.

    Args:
        h: hidden states ``(..., D)`` (already aligned with ``labels``: for a causal LM,
            ``h[:, :-1]`` with ``labels[:, 1:]``). Any float dtype; the matmul runs in h's dtype.
        weight: the lm_head weight ``(V, D)``. bias: optional ``(V,)``.
        labels: ``h``'s leading shape, int64/int32; ``ignore_index`` tokens count nothing.
        softcap, temperature: logit soft-capping (Gemma) and temperature (``None``/``inf``: no cap).
        label_smoothing: ε of ``F.cross_entropy`` (uniform target mass ε/V).
        z_loss: coefficient of ``lse²`` per labelled token (PaLM z-loss; Liger's ``lse_square_scale``).
        reduction: ``mean`` (over labelled tokens, or ``num_items_in_batch``), ``sum`` or ``none``
            (per token, ``labels``' shape; 0 on ignored tokens).
        num_items_in_batch: labelled tokens over all gradient-accumulation micro-batches (the
            HF Trainer convention): the loss is then ``sum / num_items_in_batch``.
        backend: as :func:`pcr_fast.stats.single_view_stats`.
        return_aux: return a :class:`CrossEntropyOutput` (loss, lse, z-loss, accuracy, …).
    Returns:
        The loss (float32; float64 for float64 inputs; ``mean`` over no labelled token is NaN,
        as in ``F.cross_entropy``), or a :class:`CrossEntropyOutput`.
    """
    check_options(label_smoothing, z_loss, reduction, num_items_in_batch)
    if not isinstance(h, Tensor) or h.dim() < 1:
        raise ValueError(f"h must be a tensor of shape (..., D), got "
                         f"{tuple(h.shape) if isinstance(h, Tensor) else type(h).__name__}")
    if not isinstance(labels, Tensor) or labels.shape != h.shape[:-1]:
        raise ValueError(f"labels must have h's leading shape {tuple(h.shape[:-1])}, got "
                         f"{tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__}")
    lead = labels.shape
    st = single_view_stats(h.reshape(-1, h.shape[-1]), weight, labels.reshape(-1), bias=bias,
                           temperature=temperature, softcap=softcap, ignore_index=ignore_index, backend=backend)
    valid = labels.reshape(-1) != ignore_index
    per_token = st.ce
    if label_smoothing > 0:
        smooth = torch.where(valid, st.lse - st.logit_mean, torch.zeros_like(st.lse))
        per_token = (1.0 - label_smoothing) * per_token + label_smoothing * smooth
    z_term = None
    if z_loss > 0:
        z_term = torch.where(valid, z_loss * st.lse.square(), torch.zeros_like(st.lse))
        per_token = per_token + z_term
    num_tokens = valid.sum()
    if reduction == "none":
        def reduce(x: Tensor) -> Tensor:
            return x.reshape(lead)
    elif reduction == "sum":
        def reduce(x: Tensor) -> Tensor:
            return x.sum()
    else:
        denom = (num_tokens.to(per_token.dtype) if num_items_in_batch is None
                 else torch.as_tensor(num_items_in_batch, dtype=per_token.dtype, device=per_token.device))

        def reduce(x: Tensor) -> Tensor:
            return x.sum() / denom
    loss = reduce(per_token)
    if not return_aux:
        return loss
    with torch.no_grad():
        hits = (st.argmax == labels.reshape(-1)) & valid
        accuracy = hits.sum().to(per_token.dtype) / num_tokens.to(per_token.dtype)
        zl = reduce(z_term.detach()) if z_term is not None else torch.zeros_like(loss.detach())
    return CrossEntropyOutput(loss=loss, lse=st.lse.reshape(lead), z_loss=zl, accuracy=accuracy,
                              predictions=st.argmax.reshape(lead), num_tokens=num_tokens)
