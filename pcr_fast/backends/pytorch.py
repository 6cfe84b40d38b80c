"""The torch backend: the two-view (or single-view) statistics in plain PyTorch, any device,
and the patch gather.

Same contract and math as the Triton kernels (:mod:`pcr_fast.kernels.stats_table`): the
forward reduces row chunks of materialised scaled logits to online states; the backward
walks vocabulary slabs of all rows, evaluates the closed-form logit gradient from the saved
per-row statistics, and runs the two GEMMs in the hidden states' dtype: dW per slab, written
once in the weight's dtype, and dh accumulated over slabs (fp32, or float64 for float64
inputs). Row chunks and slabs are sized to ``MEMORY_BUDGET["torch"]``
(:mod:`pcr_fast.kernels.launch`).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..kernels import launch
from ..kernels.stats_table import N_STATE, finalize, grad_from_logits, state_from_logits
from .common import Needs, coefficients, function_outputs, library_logits, no_grads
from .params import StatsParams, UnitGrid

# bytes of torch temporaries per (row, vocabulary column) and view: logits in the input dtype
# and fp32, their scale factor, the probabilities and the gradient's intermediates
_FWD_BYTES_PER_CELL = 26
_BWD_BYTES_PER_CELL = 40


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def scaled_logits(h: Tensor, weight: Tensor, bias: Optional[Tensor], params: StatsParams,
                  cols: slice = slice(None)):
    """``(z, dz/draw)`` of ``raw = h @ weight[cols].T + bias[cols]`` (matmul in h's dtype,
    the rest in the compute dtype): ``z = softcap·tanh(raw/softcap)/T``."""
    dt = compute_dtype(h.dtype)
    raw = library_logits(h, weight, None, cols).to(dt)
    if bias is not None:
        raw += bias[cols].to(dt)
    inv_t = 1.0 / params.temperature
    if params.softcap is None:
        return raw.mul_(inv_t), None if inv_t == 1.0 else torch.full((), inv_t, dtype=dt, device=h.device)
    u = raw.div_(params.softcap)
    e = torch.exp(-2.0 * u.abs())
    dz = (4.0 * inv_t) * e / (1.0 + e).square_()   # sech² without cancellation
    z = torch.tanh(u).mul_(params.softcap * inv_t)
    return z, dz


def _rows_per_chunk(n: int, v: int, views: int, params: StatsParams) -> int:
    if params.chunk_size is not None:
        return int(params.chunk_size)
    return launch.forward_rows(n, v, bytes_per_cell=views * _FWD_BYTES_PER_CELL,
                               budget=launch.MEMORY_BUDGET["torch"])


class TorchChunkedStats(torch.autograd.Function):
    """Autograd Function of the torch backend (see module docstring). ``h_b=None``: one view."""

    @staticmethod
    def forward(ctx, h_a, h_b, weight, bias, labels, params: StatsParams):
        n = h_a.shape[0]
        v = weight.shape[0]
        two = h_b is not None
        dt = compute_dtype(h_a.dtype)
        states = torch.zeros((2 * N_STATE, n), dtype=dt, device=h_a.device)
        step = _rows_per_chunk(n, v, 1 + int(two), params)
        for r0 in range(0, n, step):
            rows = slice(r0, min(n, r0 + step))
            z_a = scaled_logits(h_a[rows], weight, bias, params)[0]
            z_b = scaled_logits(h_b[rows], weight, bias, params)[0] if two else None
            states[:, rows] = state_from_logits(z_a, z_b, labels[rows])
            del z_a, z_b
        table = finalize(states, labels, v, params.ignore_index, two_views=two)
        ctx.save_for_backward(h_a, h_b, weight, bias, labels, table)
        ctx.params = params
        return function_outputs(ctx, table, dt)

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
        dt = table.dtype
        coef = coefficients(table, grads, labels, v, p.ignore_index)
        dh_views = int(needs.h_a) + int(needs.h_b)
        plan = launch.backward_plan(
            n, v, d, slab_bytes_per_cell=(1 + int(two)) * _BWD_BYTES_PER_CELL,
            dh_bytes_per_row=(0 if dt == h_a.dtype else dh_views * d * 4) + d * h_a.element_size(),
            need_dh=dh_views > 0, need_dw=needs.weight or needs.bias, budget=launch.MEMORY_BUDGET["torch"])
        slab = plan.slab_dw or plan.slab_dh   # one pass over vocabulary slabs of all rows
        d_ha = torch.zeros((n, d), dtype=dt, device=h_a.device) if needs.h_a else None
        d_hb = torch.zeros((n, d), dtype=dt, device=h_a.device) if needs.h_b else None
        d_w = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device) if needs.weight else None
        d_bias = torch.zeros(v, dtype=dt, device=weight.device) if needs.bias else None
        for c0 in range(0, v, slab):
            cols = slice(c0, min(v, c0 + slab))
            z_a, dz_a = scaled_logits(h_a, weight, bias, p, cols)
            z_b, dz_b = scaled_logits(h_b, weight, bias, p, cols) if two else (None, None)
            g_a, g_b = grad_from_logits(z_a, z_b, coef, labels - c0, needs.g_b)
            del z_a, z_b
            g_a = (g_a if dz_a is None else g_a.mul_(dz_a)).to(h_a.dtype)
            if g_b is not None:
                g_b = (g_b if dz_b is None else g_b.mul_(dz_b)).to(h_a.dtype)
            if d_ha is not None or d_hb is not None:
                w = weight[cols].to(h_a.dtype)
                if d_ha is not None:
                    d_ha.add_(g_a @ w)
                if d_hb is not None and g_b is not None:
                    d_hb.add_(g_b @ w)
                del w
            if d_w is not None:
                part = g_a.T @ h_a
                if g_b is not None:
                    part.addmm_(g_b.T, h_b)
                d_w[cols] = part
                del part
            if d_bias is not None:
                d_bias[cols] += g_a.sum(0, dtype=dt)
                if g_b is not None:
                    d_bias[cols] += g_b.sum(0, dtype=dt)
            del g_a, g_b
        cast = lambda t, like: None if t is None else t.to(like.dtype)  # noqa: E731
        return cast(d_ha, h_a), cast(d_hb, h_b), d_w, cast(d_bias, bias), None, None


class TorchJSD(torch.autograd.Function):
    """Per-row generalised Jensen–Shannon divergence of two views, chunked (any device).

    ``JSD_β(p_a‖p_b) = β·KL(p_a‖m) + (1−β)·KL(p_b‖m)``, ``m = β·p_a + (1−β)·p_b``. It needs
    ``Σ p log m``, which no combination of the six statistics gives, so it takes its own
    pass: the forward reduces row chunks of materialised logits (log-sum-exps, then the two
    KLs to the mixture); the backward walks vocabulary slabs of all rows with the saved
    per-row values — ``d/dz_a = β·p_a ⊙ (log p_a − log m − KL(p_a‖m))`` and likewise for b —
    and runs the GEMMs in the hidden states' dtype. Cost: one more logits pass in the forward
    and one in the backward next to the statistics' own (about twice the FLOPs of a KL term).
    """

    @staticmethod
    def forward(ctx, h_a, h_b, weight, bias, params: StatsParams, beta: float):
        n = h_a.shape[0]
        v = weight.shape[0]
        dt = compute_dtype(h_a.dtype)
        rows_out = torch.empty((4, n), dtype=dt, device=h_a.device)   # lse_a, lse_b, KL(p‖m), KL(q‖m)
        step = _rows_per_chunk(n, v, 2, params)
        for r0 in range(0, n, step):
            rows = slice(r0, min(n, r0 + step))
            z_a = scaled_logits(h_a[rows], weight, bias, params)[0]
            z_b = scaled_logits(h_b[rows], weight, bias, params)[0]
            lse_a, lse_b = torch.logsumexp(z_a, -1), torch.logsumexp(z_b, -1)
            lp, lq = z_a.sub_(lse_a[:, None]), z_b.sub_(lse_b[:, None])
            kl_am, kl_bm = _kl_to_mixture(lp, lq, beta)
            rows_out[:, rows] = torch.stack([lse_a, lse_b, kl_am, kl_bm])
            del z_a, z_b, lp, lq
        ctx.save_for_backward(h_a, h_b, weight, bias, rows_out)
        ctx.params, ctx.beta = params, beta
        ctx.set_materialize_grads(False)
        return beta * rows_out[2] + (1.0 - beta) * rows_out[3]

    @staticmethod
    def backward(ctx, grad):
        if grad is None:
            return (None,) * 6
        h_a, h_b, weight, bias, rows_out = ctx.saved_tensors
        p: StatsParams = ctx.params
        beta = ctx.beta
        need_ha, need_hb, need_w, need_bias = ctx.needs_input_grad[:4]
        need_b = not p.detach_b
        need_hb = need_hb and need_b
        n, d = h_a.shape
        v = weight.shape[0]
        dt = rows_out.dtype
        grad = grad.to(dt)
        lse_a, lse_b, kl_am, kl_bm = rows_out
        plan = launch.backward_plan(n, v, d, slab_bytes_per_cell=2 * _BWD_BYTES_PER_CELL,
                                    dh_bytes_per_row=(0 if dt == h_a.dtype else 2 * d * 4) + d * h_a.element_size(),
                                    need_dh=need_ha or need_hb, need_dw=need_w or need_bias,
                                    budget=launch.MEMORY_BUDGET["torch"])
        slab = plan.slab_dw or plan.slab_dh
        d_ha = torch.zeros((n, d), dtype=dt, device=h_a.device) if need_ha else None
        d_hb = torch.zeros((n, d), dtype=dt, device=h_a.device) if need_hb else None
        d_w = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device) if need_w else None
        d_bias = torch.zeros(v, dtype=dt, device=weight.device) if need_bias else None
        for c0 in range(0, v, slab):
            cols = slice(c0, min(v, c0 + slab))
            z_a, dz_a = scaled_logits(h_a, weight, bias, p, cols)
            z_b, dz_b = scaled_logits(h_b, weight, bias, p, cols)
            lp, lq = z_a.sub_(lse_a[:, None]), z_b.sub_(lse_b[:, None])
            log_m = _log_mixture(lp, lq, beta)
            pa, qb = lp.exp(), lq.exp()
            g_a = torch.where(pa > 0, pa * (lp - log_m - kl_am[:, None]), 0.0).mul_((beta * grad)[:, None])
            g_b = (torch.where(qb > 0, qb * (lq - log_m - kl_bm[:, None]), 0.0).mul_(((1.0 - beta) * grad)[:, None])
                   if need_b else None)
            del lp, lq, log_m, pa, qb
            g_a = (g_a if dz_a is None else g_a.mul_(dz_a)).to(h_a.dtype)
            g_b = None if g_b is None else (g_b if dz_b is None else g_b.mul_(dz_b)).to(h_a.dtype)
            if d_ha is not None or d_hb is not None:
                w = weight[cols].to(h_a.dtype)
                if d_ha is not None:
                    d_ha.add_(g_a @ w)
                if d_hb is not None:
                    d_hb.add_(g_b @ w)
            if d_w is not None:
                part = g_a.T @ h_a
                if g_b is not None:
                    part.addmm_(g_b.T, h_b)
                d_w[cols] = part
            if d_bias is not None:
                d_bias[cols] += g_a.sum(0, dtype=dt)
                if g_b is not None:
                    d_bias[cols] += g_b.sum(0, dtype=dt)
        cast = lambda t, like: None if t is None else t.to(like.dtype)  # noqa: E731
        return cast(d_ha, h_a), cast(d_hb, h_b), d_w, cast(d_bias, bias), None, None


def _log_mixture(lp: Tensor, lq: Tensor, beta: float) -> Tensor:
    """log(β·e^{lp} + (1−β)·e^{lq}) without overflow (−inf where both are)."""
    return torch.logaddexp(lp + torch.log(torch.tensor(beta, dtype=lp.dtype)),
                           lq + torch.log(torch.tensor(1.0 - beta, dtype=lq.dtype)))


def _kl_to_mixture(lp: Tensor, lq: Tensor, beta: float):
    """Row sums KL(p‖m), KL(q‖m) for log-probabilities lp, lq (0·log 0 = 0)."""
    log_m = _log_mixture(lp, lq, beta)
    p, q = lp.exp(), lq.exp()
    kl_am = torch.where(p > 0, p * (lp - log_m), 0.0).sum(-1)
    kl_bm = torch.where(q > 0, q * (lq - log_m), 0.0).sum(-1)
    return kl_am, kl_bm


def gather_units(x: Tensor, grid: UnitGrid, perm: Tensor, mask: Tensor, image: Tensor,
                 table: Optional[Tensor], noise: Optional[Tensor], slot: Optional[Tensor]) -> Tensor:
    """``out[u] = fill if mask[u] else x[perm[u]]`` by unfold, index, ``where``, fold back
    (the CPU path and the Triton gather's oracle)."""
    if grid.layout == "rows":
        L, D = x.shape
        units = x.reshape(grid.n_units, grid.unit_h, D)[perm]
        if noise is not None:
            fills = noise.reshape(-1, grid.unit_h, D)[slot.clamp(min=0)]
        elif table is not None:
            fills = table[image].repeat_interleave(D // grid.channels, dim=1)[:, None, :]
        if noise is not None or table is not None:
            units = torch.where(mask[:, None, None], fills, units)
        return units.reshape(L, D)
    C, H, W = grid.channels, grid.height, grid.width
    uh, uw, gh, gw = grid.unit_h, grid.unit_w, grid.grid_h, grid.grid_w
    out = x.reshape(grid.n_images, C, H, W).clone(memory_format=torch.contiguous_format)
    core = out[:, :, :gh * uh, :gw * uw]
    units = (core.reshape(grid.n_images, C, gh, uh, gw, uw).permute(0, 2, 4, 1, 3, 5)
             .reshape(grid.n_units, C, uh, uw))
    units = units[perm]
    if noise is not None:
        units = torch.where(mask[:, None, None, None], noise[slot.clamp(min=0)], units)
    elif table is not None:
        units = torch.where(mask[:, None, None, None], table[image][:, :, None, None], units)
    core.copy_(units.reshape(grid.n_images, gh, gw, C, uh, uw).permute(0, 3, 1, 4, 2, 5)
               .reshape(grid.n_images, C, gh * uh, gw * uw))
    return out.reshape(x.shape)
