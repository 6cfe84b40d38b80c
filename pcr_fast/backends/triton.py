"""The Triton backend: autograd Functions over the kernels of :mod:`pcr_fast.kernels`, and
the launch of the patch gather.

Two modes behind :func:`pcr_fast.two_view_stats` (and :func:`pcr_fast.stats.single_view_stats`,
where view b is compiled out):

* ``triton`` (:class:`TritonFusedStats`): the fused forward (one kernel, O(N) memory) and a
  backward that walks the (rows × vocabulary) plane within
  ``MEMORY_BUDGET["triton"]`` (:func:`pcr_fast.kernels.launch.backward_plan`): a fused kernel
  recomputes each logit block and stores its gradient in a bounded scratch buffer, then two
  GEMM kernels that own their output tiles produce dh (fp32 over vocabulary slabs) and dW
  (per vocabulary slab from all rows, written once in the weight's dtype). No atomics.
* ``triton_chunked`` (:class:`TritonChunkedStats`): logits by a library matmul (cuBLAS on
  GPU) per row chunk in the forward and per vocabulary slab in the backward, a Triton
  kernel for the statistics and one that overwrites the logit slab with its gradient
  before the library GEMMs. Memory within ``MEMORY_BUDGET["triton_chunked"]``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..kernels import launch
from ..kernels.grad_matmul import grad_dh, grad_dw
from ..kernels.patch_gather import patch_gather
from ..kernels.stats_table import N_STATE, finalize
from ..kernels.two_view_chunked import chunk_grad_in_place, chunk_states
from ..kernels.two_view_fwd import two_view_forward
from ..kernels.two_view_grad import two_view_grad_tiles
from .common import Needs, coefficients, function_outputs, library_logits, no_grads, weight_matmul
from .params import StatsParams, TwoViewStats, UnitGrid, ViewExtras


def _fused_backward(h_a, h_b, weight, bias, labels, coef, p: StatsParams, needs: Needs):
    n, d = h_a.shape
    v = weight.shape[0]
    dt = h_a.dtype
    esize = h_a.element_size()
    n_g = 1 + int(needs.g_b)
    dh_views = int(needs.h_a) + int(needs.h_b)
    acc_is_grad = dt == torch.float32
    plan = launch.backward_plan(
        n, v, d, slab_bytes_per_cell=n_g * esize,
        dh_bytes_per_row=0 if acc_is_grad else dh_views * d * 4,
        need_dh=dh_views > 0, need_dw=needs.weight or needs.bias, budget=launch.MEMORY_BUDGET["triton"])
    d_ha = torch.empty_like(h_a, memory_format=torch.contiguous_format) if needs.h_a else None
    d_hb = torch.empty_like(h_b, memory_format=torch.contiguous_format) if needs.h_b else None
    d_w = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device) if needs.weight else None
    d_bias = torch.zeros(v, dtype=torch.float32, device=weight.device) if needs.bias else None
    kw = dict(inv_temp=1.0 / p.temperature, softcap=p.softcap)

    def columns(slab):
        return (slice(c0, min(v, c0 + slab)) for c0 in range(0, v, slab))

    def dw_step(ga: Tensor, gb: Optional[Tensor], cols: slice) -> None:
        if d_w is not None:
            grad_dw(ga, h_a, gb, h_b, d_w[cols])
        if d_bias is not None:
            d_bias[cols] += ga.sum(0, dtype=torch.float32)
            if gb is not None:
                d_bias[cols] += gb.sum(0, dtype=torch.float32)

    def dh_pass(rows: slice, slab: int, with_dw: bool) -> None:
        nr = rows.stop - rows.start
        accs = []
        for need, out in ((needs.h_a, d_ha), (needs.h_b, d_hb)):
            if not need:
                accs.append(None)
            else:
                accs.append(out[rows] if acc_is_grad else torch.empty((nr, d), dtype=torch.float32, device=h_a.device))
        ga_buf = torch.empty((nr, slab), dtype=dt, device=h_a.device)
        gb_buf = torch.empty((nr, slab), dtype=dt, device=h_a.device) if needs.g_b else None
        for i, cols in enumerate(columns(slab)):
            nc = cols.stop - cols.start
            ga = ga_buf[:, :nc]
            gb = gb_buf[:, :nc] if gb_buf is not None else None
            two_view_grad_tiles(h_a, h_b, weight, bias, labels, coef, ga, gb, rows=rows, cols=cols, **kw)
            for g, acc in ((ga, accs[0]), (gb, accs[1])):
                if acc is not None:
                    grad_dh(g, weight[cols], acc, accumulate=i > 0)
            if with_dw:
                dw_step(ga, gb, cols)
        for acc, out in zip(accs, (d_ha, d_hb)):
            if acc is not None and not acc_is_grad:
                out[rows] = acc

    if plan.fused:
        dh_pass(slice(0, n), plan.slab_dh, with_dw=True)
    else:
        for r0 in range(0, n, plan.rows_per_group):
            dh_pass(slice(r0, min(n, r0 + plan.rows_per_group)), plan.slab_dh, with_dw=False)
        if d_w is not None or d_bias is not None:
            ga_buf = torch.empty((n, plan.slab_dw), dtype=dt, device=h_a.device)
            gb_buf = torch.empty((n, plan.slab_dw), dtype=dt, device=h_a.device) if needs.g_b else None
            for cols in columns(plan.slab_dw):
                nc = cols.stop - cols.start
                ga = ga_buf[:, :nc]
                gb = gb_buf[:, :nc] if gb_buf is not None else None
                two_view_grad_tiles(h_a, h_b, weight, bias, labels, coef, ga, gb, rows=slice(0, n), cols=cols, **kw)
                dw_step(ga, gb, cols)
    return d_ha, d_hb, d_w, None if d_bias is None else d_bias.to(bias.dtype)


class TritonFusedStats(torch.autograd.Function):
    """Fused forward + budgeted recompute backward (see module docstring). ``h_b=None``: one view."""

    @staticmethod
    def forward(ctx, h_a, h_b, weight, bias, labels, params: StatsParams):
        table = two_view_forward(h_a, h_b, weight, bias, labels, inv_temp=1.0 / params.temperature,
                                 softcap=params.softcap, ignore_index=params.ignore_index)
        ctx.save_for_backward(h_a, h_b, weight, bias, labels, table)
        ctx.params = params
        return function_outputs(ctx, table, torch.float32)

    @staticmethod
    def backward(ctx, *grads):
        if no_grads(grads):
            return None, None, None, None, None, None
        h_a, h_b, weight, bias, labels, table = ctx.saved_tensors
        p: StatsParams = ctx.params
        needs = Needs(ctx, h_b is not None, p.detach_b, bias is not None)
        coef = coefficients(table, grads, labels, weight.shape[0], p.ignore_index)
        d_ha, d_hb, d_w, d_bias = _fused_backward(h_a, h_b, weight, bias, labels, coef, p, needs)
        return d_ha, d_hb, d_w, d_bias, None, None


# --------------------------------------------------------------------------- chunked
def _chunked_forward_rows(n: int, v: int, esize: int, views: int, params: StatsParams) -> int:
    if params.chunk_size is not None:
        return int(params.chunk_size)
    return launch.forward_rows(n, v, bytes_per_cell=views * esize, budget=launch.MEMORY_BUDGET["triton_chunked"])


class TritonChunkedStats(torch.autograd.Function):
    """Library-matmul logits + Triton statistics/gradient kernels (see module docstring)."""

    @staticmethod
    def forward(ctx, h_a, h_b, weight, bias, labels, params: StatsParams):
        n = h_a.shape[0]
        v = weight.shape[0]
        two = h_b is not None
        states = torch.zeros((2 * N_STATE, n), dtype=torch.float32, device=h_a.device)
        step = _chunked_forward_rows(n, v, h_a.element_size(), 1 + int(two), params)
        for r0 in range(0, n, step):
            rows = slice(r0, min(n, r0 + step))
            s_a = library_logits(h_a[rows], weight, bias)
            s_b = library_logits(h_b[rows], weight, bias) if two else None
            chunk_states(s_a, s_b, labels[rows], states[:, rows], inv_temp=1.0 / params.temperature,
                         softcap=params.softcap, ignore_index=params.ignore_index)
            del s_a, s_b
        table = finalize(states, labels, v, params.ignore_index, two_views=two)
        ctx.save_for_backward(h_a, h_b, weight, bias, labels, table)
        ctx.params = params
        return function_outputs(ctx, table, torch.float32)

    @staticmethod
    def backward(ctx, *grads):
        if no_grads(grads):
            return None, None, None, None, None, None
        h_a, h_b, weight, bias, labels, table = ctx.saved_tensors
        p: StatsParams = ctx.params
        two = h_b is not None
        needs = Needs(ctx, two, p.detach_b, bias is not None)
        n, d = h_a.shape
        v = weight.shape[0]
        coef = coefficients(table, grads, labels, v, p.ignore_index)
        acc_is_grad = h_a.dtype == torch.float32
        dh_views = int(needs.h_a) + int(needs.h_b)
        # temporaries per (row, column): the logit slabs, plus the GEMM output of dh (N × D)
        plan = launch.backward_plan(
            n, v, d, slab_bytes_per_cell=(1 + int(two)) * h_a.element_size(),
            dh_bytes_per_row=(0 if acc_is_grad else dh_views * d * 4) + d * h_a.element_size(),
            need_dh=dh_views > 0, need_dw=needs.weight or needs.bias,
            budget=launch.MEMORY_BUDGET["triton_chunked"])
        fp32 = torch.float32
        d_ha = torch.zeros((n, d), dtype=fp32, device=h_a.device) if needs.h_a else None
        d_hb = torch.zeros((n, d), dtype=fp32, device=h_a.device) if needs.h_b else None
        d_w = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device) if needs.weight else None
        d_bias = torch.zeros(v, dtype=fp32, device=weight.device) if needs.bias else None
        # one pass over vocabulary slabs of all rows (dh of all rows in fp32: cuBLAS cannot
        # accumulate bf16 products into fp32 in place, so no row groups here)
        slab = plan.slab_dw or plan.slab_dh
        for c0 in range(0, v, slab):
            cols = slice(c0, min(v, c0 + slab))
            s_a = library_logits(h_a, weight, bias, cols)
            s_b = library_logits(h_b, weight, bias, cols) if two else None
            chunk_grad_in_place(s_a, s_b, labels, coef, v0=c0, inv_temp=1.0 / p.temperature, softcap=p.softcap,
                                need_b=needs.g_b)
            g_b = s_b if needs.g_b else None
            _slab_grad_matmuls(s_a, g_b, h_a, h_b, weight, cols, d_ha, d_hb, d_w, d_bias)
            del s_a, s_b, g_b
        cast = lambda t, like: None if t is None else t.to(like.dtype)  # noqa: E731
        return cast(d_ha, h_a), cast(d_hb, h_b), d_w, cast(d_bias, bias), None, None


def _slab_grad_matmuls(g_a: Tensor, g_b: Optional[Tensor], h_a: Tensor, h_b: Optional[Tensor], weight: Tensor,
                       cols: slice, d_ha, d_hb, d_w, d_bias) -> None:
    """Library GEMMs of one vocabulary slab: dh (fp32) += g W[slab]; dW[slab] = gᵀ h written
    once (both views in one output); dbias[slab] = Σ g."""
    if d_ha is not None or d_hb is not None:
        w = weight[cols].to(g_a.dtype)
        if d_ha is not None:
            d_ha.add_(g_a @ w)
        if d_hb is not None and g_b is not None:
            d_hb.add_(g_b @ w)
    if d_w is not None:
        out = d_w[cols]
        if out.dtype == g_a.dtype:
            torch.mm(g_a.T, h_a, out=out)
            if g_b is not None:
                out.addmm_(g_b.T, h_b)
        else:
            part = g_a.T @ h_a
            if g_b is not None:
                part.addmm_(g_b.T, h_b)
            out.copy_(part)
    if d_bias is not None:
        d_bias[cols] += g_a.sum(0, dtype=torch.float32)
        if g_b is not None:
            d_bias[cols] += g_b.sum(0, dtype=torch.float32)


def _accumulate_dw(d_w: Tensor, g: Tensor, h: Tensor) -> None:
    """``d_w += gᵀ h`` in the weight's dtype (one rounding per call)."""
    if d_w.dtype == g.dtype:
        d_w.addmm_(g.T, h)
    else:
        d_w.add_(g.T @ h)


class TritonChunkedObjective(torch.autograd.Function):
    """Forward computes the loss AND its gradients, row chunk by row chunk (no recompute).

    See :func:`pcr_fast.stats.fused_chunked_objective`. dh is written once per row in the
    input dtype; dW accumulates over row chunks in the weight's dtype (one rounding per
    chunk: the price of not recomputing the logits). The backward scales the stored
    gradients in place by the upstream scalar (no copies), so it can run once.
    """

    @staticmethod
    def forward(ctx, h_a, h_b, weight, bias, labels, params: StatsParams, row_losses, with_extras=False):
        from ..kernels.stats_table import N_DIFF, R, grad_coefficients

        need_ha, need_hb, need_w, need_bias = ctx.needs_input_grad[:4]
        need_b = not params.detach_b
        n = h_a.shape[0]
        v = weight.shape[0]
        table = torch.empty((16, n), dtype=torch.float32, device=h_a.device)
        total = torch.zeros((), dtype=torch.float32, device=h_a.device)
        d_ha = torch.empty_like(h_a) if need_ha else None
        d_hb = torch.empty_like(h_b) if need_hb and need_b else None
        d_w = torch.zeros(weight.shape, dtype=weight.dtype, device=weight.device) if need_w else None
        d_bias = torch.zeros(v, dtype=torch.float32, device=weight.device) if need_bias and bias is not None else None
        step = _chunked_forward_rows(n, v, h_a.element_size(), 2, params)
        for r0 in range(0, n, step):
            rows = slice(r0, min(n, r0 + step))
            s_a = library_logits(h_a[rows], weight, bias)
            s_b = library_logits(h_b[rows], weight, bias)
            states = torch.zeros((2 * N_STATE, rows.stop - rows.start), dtype=torch.float32, device=h_a.device)
            chunk_states(s_a, s_b, labels[rows], states, inv_temp=1.0 / params.temperature,
                         softcap=params.softcap, ignore_index=params.ignore_index)
            table[:, rows] = finalize(states, labels[rows], v, params.ignore_index)
            with torch.enable_grad():
                leaves = table[:N_DIFF, rows].detach().clone().requires_grad_()
                stats6 = TwoViewStats(*leaves[:6].unbind(0))
                if with_extras:
                    extras = ViewExtras(leaves[R["lse_a"]], leaves[R["zmean_a"]], table[R["amax_a"], rows].long())
                    part = row_losses(stats6, rows, extras=extras).sum()
                else:
                    part = row_losses(stats6, rows).sum()
                (g_rows,) = torch.autograd.grad(part, [leaves])
            total = total + part.detach()
            coef = grad_coefficients(table[:, rows], g_rows, labels[rows], v, params.ignore_index)
            chunk_grad_in_place(s_a, s_b, labels[rows], coef, v0=0, inv_temp=1.0 / params.temperature,
                                softcap=params.softcap, need_b=need_b)
            g_b = s_b if need_b else None
            if d_ha is not None:
                weight_matmul(s_a, weight, out=d_ha[rows])
            if d_hb is not None:
                weight_matmul(g_b, weight, out=d_hb[rows])
            if d_w is not None:
                _accumulate_dw(d_w, s_a, h_a[rows])
                if g_b is not None:
                    _accumulate_dw(d_w, g_b, h_b[rows])
            if d_bias is not None:
                d_bias += s_a.sum(0, dtype=torch.float32)
                if g_b is not None:
                    d_bias += g_b.sum(0, dtype=torch.float32)
            del s_a, s_b, g_b
        ctx.grads = [d_ha, d_hb, d_w, None if d_bias is None else d_bias.to(bias.dtype)]
        ctx.mark_non_differentiable(table)
        return total, table

    @staticmethod
    def backward(ctx, grad_loss, _grad_table):
        grads, ctx.grads = ctx.grads, None
        if grads is None:
            raise RuntimeError("fused_chunked_objective supports one backward per forward")
        if grad_loss is None:
            return (None,) * 8
        return tuple(None if t is None else t.mul_(grad_loss.to(t.dtype)) for t in grads) + (None, None, None, None)


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


__all__ = ["TritonFusedStats", "TritonChunkedStats", "TritonChunkedObjective", "gather_units"]
