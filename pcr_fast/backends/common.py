"""Plumbing every statistics backend shares: the outputs of its autograd Function and the
upstream-gradient table its backward turns into gradient coefficients.

Each backend's Function returns :data:`N_OUTPUTS` tensors, the differentiable rows of the
statistics table (``stats_table.ROWS[:N_DIFF]``) then the two argmax rows (int64, not
differentiable); :mod:`pcr_fast.stats` turns them into the public records.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..kernels.stats_table import N_DIFF, R, grad_coefficients, grad_table

N_OUTPUTS = N_DIFF + 2


class Needs:
    """Which gradients a backward must produce (``detach_b`` removes every view-b path)."""

    def __init__(self, ctx, two_views: bool, detach_b: bool, has_bias: bool):
        need = ctx.needs_input_grad
        self.h_a = bool(need[0])
        self.h_b = bool(need[1]) and two_views and not detach_b
        self.weight = bool(need[2])
        self.bias = bool(need[3]) and has_bias
        self.g_b = two_views and not detach_b and (self.h_b or self.weight or self.bias)


def function_outputs(ctx, table: Tensor, dtype: torch.dtype) -> Tuple[Tensor, ...]:
    """The Function's outputs from a statistics table (copies: autograd outputs must not
    be views of one another), argmax rows marked non-differentiable."""
    diff = tuple(table[k].to(dtype, copy=True) for k in range(N_DIFF))
    amax = (table[R["amax_a"]].to(torch.int64), table[R["amax_b"]].to(torch.int64))
    ctx.mark_non_differentiable(*amax)
    ctx.set_materialize_grads(False)
    return diff + amax


def coefficients(table: Tensor, grads: Sequence[Optional[Tensor]], labels: Tensor, vocab: int,
                 ignore_index: int) -> Tensor:
    """(2·N_COEF, N) gradient coefficients from the upstream gradients of the outputs."""
    g = grad_table(grads[:N_DIFF], table.shape[1], table.device, table.dtype)
    return grad_coefficients(table, g, labels, vocab, ignore_index)


def no_grads(grads: Sequence[Optional[Tensor]]) -> bool:
    return all(g is None for g in grads[:N_DIFF])


def library_logits(h: Tensor, weight: Tensor, bias: Optional[Tensor], cols: slice = slice(None),
                   block: int = 16384) -> Tensor:
    """Raw logits ``h @ weight[cols].T + bias[cols]`` in h's dtype by a library matmul.

    A weight of another dtype is cast to h's (as ``torch.autocast`` does for an lm_head) a
    block of ``block`` vocabulary rows at a time, so no full-size copy is made.
    """
    w = weight[cols]
    b = None if bias is None else bias[cols].to(h.dtype)
    if w.dtype == h.dtype:
        return torch.addmm(b, h, w.T) if b is not None else h @ w.T
    out = torch.empty((h.shape[0], w.shape[0]), dtype=h.dtype, device=h.device)
    for c0 in range(0, w.shape[0], block):
        part = slice(c0, min(w.shape[0], c0 + block))
        wp = w[part].to(h.dtype)
        if b is not None:
            torch.addmm(b[part], h, wp.T, out=out[:, part])
        else:
            torch.mm(h, wp.T, out=out[:, part])
    return out


def weight_matmul(g: Tensor, weight: Tensor, out: Optional[Tensor] = None, block: int = 16384) -> Tensor:
    """``g @ weight`` in g's dtype (a weight of another dtype cast a block at a time)."""
    if weight.dtype == g.dtype:
        return torch.mm(g, weight, out=out) if out is not None else g @ weight
    out = torch.zeros((g.shape[0], weight.shape[1]), dtype=g.dtype, device=g.device) if out is None else out.zero_()
    for c0 in range(0, weight.shape[0], block):
        part = slice(c0, min(weight.shape[0], c0 + block))
        out.addmm_(g[:, part], weight[part].to(g.dtype))
    return out
