"""The Triton backend: autograd Functions over the kernels of :mod:`pcr_fast.kernels`, and
the launch of the patch gather.

Two modes behind :func:`pcr_fast.two_view_stats`:

* ``triton`` (:class:`TritonFusedStats`): the fused forward and the fused recompute
  backward; extra memory O(N) plus the fp32 gradient accumulators.
* ``triton_chunked`` (:class:`TritonChunkedStats`): per row chunk, logits by a library
  matmul (cuBLAS on GPU), a Triton kernel for the statistics, and in the backward a Triton
  kernel that overwrites the recomputed logits with their gradient before the two gradient
  matmuls. Memory O(chunk·V); the matmuls run at library speed.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..kernels.patch_gather import patch_gather
from ..kernels.two_view_bwd import two_view_backward
from ..kernels.two_view_chunked import chunk_grad_in_place, chunk_stats
from ..kernels.two_view_fwd import N_STATS, two_view_forward
from .params import StatsParams, TwoViewStats, UnitGrid


def _stack_grads(grads, n: int, device) -> Tensor:
    """Upstream gradients of the six statistics as one (6, N) float32 table (None -> 0)."""
    cols = [torch.zeros(n, dtype=torch.float32, device=device) if g is None else g.to(torch.float32)
            for g in grads]
    return torch.stack(cols)


def _split(stats: Tensor):
    return tuple(stats[k].clone() for k in range(6))


def _cast(t: Optional[Tensor], like: Optional[Tensor]):
    return None if t is None or like is None else t.to(like.dtype)


class TritonFusedStats(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_a, h_b, weight, bias, labels, params: StatsParams):
        labels = labels.contiguous()
        stats = two_view_forward(h_a, h_b, weight, bias, labels, inv_temp=1.0 / params.temperature,
                                 softcap=params.softcap, ignore_index=params.ignore_index)
        _save_stats_ctx(ctx, (h_a, h_b, weight, bias, labels, stats), params)
        return _split(stats)

    @staticmethod
    def backward(ctx, *grads):
        if all(g is None for g in grads):
            return None, None, None, None, None, None
        (h_a, h_b, weight, bias, labels, stats), p, g = _unpack_backward(ctx, grads)
        need_ha, need_hb, need_w, need_bias = ctx.needs_input_grad[:4]
        out = two_view_backward(h_a, h_b, weight, bias, labels, stats, g,
                                inv_temp=1.0 / p.temperature, softcap=p.softcap,
                                ignore_index=p.ignore_index, need_b=not p.detach_b,
                                need_h_a=need_ha, need_h_b=need_hb, need_weight=need_w,
                                need_bias=need_bias)
        # with detach_b no gradient reaches h_b (None, as a detached input would get)
        return (_cast(out.d_h_a, h_a), _cast(out.d_h_b, h_b), _cast(out.d_weight, weight),
                _cast(out.d_bias, bias), None, None)


def _chunk_grad_matmuls(g_a: Tensor, g_b: Optional[Tensor], rows: slice, h_a: Tensor, h_b: Tensor,
                        w: Tensor, d_ha, d_hb, d_w, d_bias) -> None:
    """dh = g W for the chunk's rows; dW += gᵀ h and dbias += Σ g (fp32 accumulators)."""
    if d_ha is not None:
        d_ha[rows] = g_a @ w
    if d_hb is not None and g_b is not None:
        d_hb[rows] = g_b @ w
    if d_w is not None:
        d_w += (g_a.T @ h_a[rows]).float()
        if g_b is not None:
            d_w += (g_b.T @ h_b[rows]).float()
    if d_bias is not None:
        d_bias += g_a.float().sum(0)
        if g_b is not None:
            d_bias += g_b.float().sum(0)


def _chunk_grad_buffers(h_a, h_b, weight, need_ha, need_hb, need_w, need_bias, need_b):
    return (torch.empty_like(h_a) if need_ha else None,
            torch.zeros_like(h_b) if need_hb and need_b else None,
            torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None,
            torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_bias else None)


def _unpack_backward(ctx, grads):
    """Saved tensors, params and the (6, N) upstream-gradient table of a stats Function."""
    saved = ctx.saved_tensors
    h_a = saved[0]
    return saved, ctx.params, _stack_grads(grads, h_a.shape[0], h_a.device)


def _save_stats_ctx(ctx, tensors, params):
    ctx.save_for_backward(*tensors)
    ctx.params = params
    ctx.set_materialize_grads(False)


def _chunk_logits(h: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """Raw logits of a row chunk in the input precision (a library matmul)."""
    w = weight.to(h.dtype)
    if bias is not None:
        return torch.addmm(bias.to(h.dtype), h, w.T)
    return h @ w.T


class TritonChunkedStats(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_a, h_b, weight, bias, labels, params: StatsParams):
        n = h_a.shape[0]
        labels = labels.contiguous()
        stats = torch.empty((N_STATS, n), dtype=torch.float32, device=h_a.device)
        for start in range(0, n, params.chunk_size):
            end = min(n, start + params.chunk_size)
            s_a = _chunk_logits(h_a[start:end], weight, bias)
            s_b = _chunk_logits(h_b[start:end], weight, bias)
            chunk_stats(s_a, s_b, labels[start:end], stats[:, start:end],
                        inv_temp=1.0 / params.temperature, softcap=params.softcap,
                        ignore_index=params.ignore_index)
        _save_stats_ctx(ctx, (h_a, h_b, weight, bias, labels, stats), params)
        return _split(stats)

    @staticmethod
    def backward(ctx, *grads):
        if all(g is None for g in grads):
            return None, None, None, None, None, None
        (h_a, h_b, weight, bias, labels, stats), p, g = _unpack_backward(ctx, grads)
        need_ha, need_hb, need_w, need_bias = ctx.needs_input_grad[:4]
        need_b = not p.detach_b
        n = h_a.shape[0]
        d_ha, d_hb, d_w, d_bias = _chunk_grad_buffers(h_a, h_b, weight, need_ha, need_hb, need_w,
                                                      need_bias, need_b)
        w = weight.to(h_a.dtype)
        for start in range(0, n, p.chunk_size):
            rows = slice(start, min(n, start + p.chunk_size))
            s_a = _chunk_logits(h_a[rows], weight, bias)
            s_b = _chunk_logits(h_b[rows], weight, bias)
            chunk_grad_in_place(s_a, s_b, labels[rows], stats[:, rows], g[:, rows],
                                inv_temp=1.0 / p.temperature, softcap=p.softcap,
                                ignore_index=p.ignore_index, need_b=need_b)
            _chunk_grad_matmuls(s_a, s_b if need_b else None, rows, h_a, h_b, w, d_ha, d_hb, d_w, d_bias)
        return (d_ha, d_hb, _cast(d_w, weight), _cast(d_bias, bias), None, None)


class TritonChunkedObjective(torch.autograd.Function):
    """Forward computes the loss AND its gradients chunk by chunk (no recompute).

    See :func:`pcr_fast.stats.fused_chunked_objective`. Saved for the backward: dh_a, dh_b,
    dW (fp32), dbias — the gradients themselves, scaled there by the upstream scalar.
    """

    @staticmethod
    def forward(ctx, h_a, h_b, weight, bias, labels, params: StatsParams, row_losses):
        need_ha, need_hb, need_w, need_bias = ctx.needs_input_grad[:4]
        need_b = not params.detach_b
        n = h_a.shape[0]
        labels = labels.contiguous()
        table = torch.empty((N_STATS, n), dtype=torch.float32, device=h_a.device)
        total = torch.zeros((), dtype=torch.float32, device=h_a.device)
        d_ha, d_hb, d_w, d_bias = _chunk_grad_buffers(h_a, h_b, weight, need_ha, need_hb, need_w,
                                                      need_bias, need_b)
        w = weight.to(h_a.dtype)
        for start in range(0, n, params.chunk_size):
            rows = slice(start, min(n, start + params.chunk_size))
            s_a = _chunk_logits(h_a[rows], weight, bias)
            s_b = _chunk_logits(h_b[rows], weight, bias)
            chunk_table = table[:, rows]
            chunk_stats(s_a, s_b, labels[rows], chunk_table, inv_temp=1.0 / params.temperature,
                        softcap=params.softcap, ignore_index=params.ignore_index)
            with torch.enable_grad():
                leaves = chunk_table[:6].detach().clone().requires_grad_()
                part = row_losses(TwoViewStats(*leaves.unbind(0)), rows).sum()
                (g,) = torch.autograd.grad(part, [leaves])
            total = total + part.detach()
            chunk_grad_in_place(s_a, s_b, labels[rows], chunk_table, g, inv_temp=1.0 / params.temperature,
                                softcap=params.softcap, ignore_index=params.ignore_index, need_b=need_b)
            _chunk_grad_matmuls(s_a, s_b if need_b else None, rows, h_a, h_b, w, d_ha, d_hb, d_w, d_bias)
        ctx.save_for_backward(d_ha, d_hb, d_w, d_bias)
        ctx.dtypes = (h_a.dtype, h_b.dtype, weight.dtype, None if bias is None else bias.dtype)
        stats6 = table[:6].clone()
        ctx.mark_non_differentiable(stats6)
        return total, stats6

    @staticmethod
    def backward(ctx, grad_loss, _grad_table):
        d_ha, d_hb, d_w, d_bias = ctx.saved_tensors
        dts = ctx.dtypes

        def scaled(t, dt):
            return None if t is None else (t * grad_loss).to(dt)

        return (scaled(d_ha, dts[0]), scaled(d_hb, dts[1]), scaled(d_w, dts[2]),
                scaled(d_bias, dts[3]) if dts[3] is not None else None, None, None, None)


def gather_units(x: Tensor, grid: UnitGrid, perm: Tensor, mask: Tensor, image: Tensor,
                 table: Optional[Tensor], noise: Optional[Tensor], slot: Optional[Tensor]) -> Tensor:
    """``out[u] = fill if mask[u] else x[perm[u]]`` over the units of ``grid``, in one launch.

    The permutation reaches the kernel as an address delta per unit, so the input is read
    through its own strides (no reshaped copy).
    """
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    arange = torch.arange(grid.n_units, device=x.device)
    if grid.layout == "rows":
        delta = (perm - arange) * (grid.unit_h * x.stride(0))
        lead, src_lead, dst_lead = (1, 1, 1), (0, 0, 0), (0, 0, 0)
        src_chw = (0, x.stride(0), x.stride(1))
        dst_chw = (0, out.stride(0), out.stride(1))
        channels, fill_div = 1, grid.width // grid.channels
    else:
        per = grid.grid_h * grid.grid_w
        su, u = perm % per, arange % per
        dy = (su // grid.grid_w - u // grid.grid_w) * grid.unit_h
        dx = (su % grid.grid_w - u % grid.grid_w) * grid.unit_w
        delta = dy * x.stride(-2) + dx * x.stride(-1)
        k = len(grid.lead_shape)
        lead = (1,) * (3 - k) + grid.lead_shape
        src_lead = (0,) * (3 - k) + tuple(x.stride()[:k])
        dst_lead = (0,) * (3 - k) + tuple(out.stride()[:k])
        src_chw, dst_chw = tuple(x.stride()[-3:]), tuple(out.stride()[-3:])
        channels, fill_div = grid.channels, 0
    if noise is not None:
        code, fill = slot, noise
    elif table is not None:
        code, fill = torch.where(mask, image, -1), table
    else:  # nothing masked: every code is -1 and the fill table is never read
        code = torch.full((grid.n_units,), -1, dtype=torch.int32, device=x.device)
        fill = torch.zeros(1, grid.channels, dtype=x.dtype, device=x.device)
    patch_gather(
        x, out, delta.to(torch.int64).contiguous(), code.to(torch.int32).contiguous(),
        fill.contiguous(), lead_shape=lead, src_lead_strides=src_lead, dst_lead_strides=dst_lead,
        channels=channels, height=grid.height, width=grid.width, src_chw_strides=src_chw,
        dst_chw_strides=dst_chw, unit_h=grid.unit_h, unit_w=grid.unit_w, grid_h=grid.grid_h,
        grid_w=grid.grid_w, noise=noise is not None, fill_channel_div=fill_div)
    return out
