"""The torch backend: chunked two-view statistics (any device) and the patch gather.

Rows are processed ``chunk_size`` at a time: the chunk's logits (chunk × V, float32) are
the only large temporary, so memory is O(chunk·V) instead of O(N·V). The backward
recomputes each chunk's logits and applies the closed-form gradients (DESIGN §2). The two
helpers :func:`rows_stats` and :func:`rows_grad_logits` are the same math the Triton
kernels implement, written in plain torch; the Triton ``chunked`` mode falls back to them
when Triton is unavailable.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from .params import StatsParams, UnitGrid


def capped_logits(h: Tensor, weight: Tensor, bias: Optional[Tensor], params: StatsParams):
    """Return ``(z, cap_grad)``: scaled logits in float32/64 and d(z·T)/d(raw) (or None)."""
    dt = torch.float64 if h.dtype == torch.float64 else torch.float32
    if h.device.type == "cpu" or h.dtype == dt:
        s = h.to(dt) @ weight.to(dt).T
    else:  # tensor-core matmul in the input precision, statistics in float32
        s = (h @ weight.to(h.dtype).T).to(dt)
    if bias is not None:
        s = s + bias.to(dt)
    cap_grad = None
    if params.softcap is not None:
        c = torch.tanh(s / params.softcap)
        cap_grad = 1.0 - c * c
        s = params.softcap * c
    if params.temperature != 1.0:
        s = s / params.temperature
    return s, cap_grad


def rows_stats(z_a: Tensor, z_b: Tensor, labels: Tensor, ignore_index: int):
    """Six statistics plus ``lse_a, lse_b`` for a block of rows of scaled logits.

    Consumes ``z_a``/``z_b`` (overwritten in place) so a chunk needs only two more
    (rows × V) temporaries, the probabilities.
    """
    valid = labels != ignore_index
    in_range = (labels >= 0) & (labels < z_a.shape[1])
    safe = torch.where(valid & in_range, labels, torch.zeros_like(labels))[:, None]
    zy_a = z_a.gather(1, safe)[:, 0]
    zy_b = z_b.gather(1, safe)[:, 0]
    lse_a = torch.logsumexp(z_a, dim=-1)
    lse_b = torch.logsumexp(z_b, dim=-1)
    # softmax normalises by the exact Σe^{z−m}; exp(z − lse) need not sum to 1 in fp32
    # when lse rounds (peaked rows with large logits), which would bias KL and H.
    p = torch.softmax(z_a, dim=-1)
    q = torch.softmax(z_b, dim=-1)
    logp = z_a.sub_(lse_a[:, None])
    logq = z_b.sub_(lse_b[:, None])
    ent_a = -torch.linalg.vecdot(p, logp)
    ent_b = -torch.linalg.vecdot(q, logq)
    diff = logp.sub_(logq)
    kl_ab = torch.linalg.vecdot(p, diff)
    kl_ba = -torch.linalg.vecdot(q, diff)
    zero = torch.zeros((), dtype=z_a.dtype, device=z_a.device)
    nan = torch.full((), float("nan"), dtype=z_a.dtype, device=z_a.device)
    # out-of-range labels (only reachable on CUDA, where checking would sync) give NaN
    ce_a = torch.where(valid, torch.where(in_range, lse_a - zy_a, nan), zero)
    ce_b = torch.where(valid, torch.where(in_range, lse_b - zy_b, nan), zero)
    return (ce_a, ce_b, kl_ab, kl_ba, ent_a, ent_b), lse_a, lse_b


def _zero_if_none(g: Optional[Tensor], like: Tensor) -> Tensor:
    return torch.zeros_like(like) if g is None else g


def rows_grad_logits(z_a: Tensor, z_b: Tensor, labels: Tensor, ignore_index: int,
                     lse_a: Tensor, lse_b: Tensor, grads: Sequence[Optional[Tensor]],
                     need_b: bool = True):
    """Closed-form gradient of ``Σ_k g_k · stat_k`` w.r.t. the scaled logits of each view.

    ``grads`` holds the upstream gradients (ce_a, ce_b, kl_ab, kl_ba, ent_a, ent_b), each
    (rows,) or None. Consumes ``z_a``/``z_b`` (overwritten in place with log p, log q) to
    keep the chunk's temporaries few. Returns ``(g_za, g_zb or None)``. Grouped per row as

        g_a = p ⊙ (α_a + β_a·(log p − log q) + γ_a·log p) − g_klba·q − w_a·e_y
        g_b = q ⊙ (α_b + β_b·(log q − log p) + γ_b·log q) − g_klab·p − w_b·e_y

    KL and H are re-reduced from these very p, q (not the saved values): for peaked rows
    the terms p·(log p − log q − KL) cancel to ~0 and only a bit-consistent KL cancels
    cleanly there (what autograd through log_softmax does too).
    """
    g_ce_a, g_ce_b, g_kl_ab, g_kl_ba, g_ent_a, g_ent_b = grads
    any_b = any(g is not None for g in (g_ce_b, g_kl_ab, g_kl_ba, g_ent_b))
    p = torch.softmax(z_a, dim=-1)
    q = torch.softmax(z_b, dim=-1)
    logp = z_a.sub_(lse_a[:, None])
    logq = z_b.sub_(lse_b[:, None])
    diff = logp - logq if (g_kl_ab is not None or g_kl_ba is not None) else None
    rows = lse_a
    valid = (labels != ignore_index) & (labels >= 0) & (labels < z_a.shape[1])
    safe = torch.where(valid, labels, torch.zeros_like(labels))[:, None]

    def view_grad(prob, other, logprob, signed_diff, w_ce, g_kl_self, g_kl_other, g_ent):
        alpha = torch.where(valid, _zero_if_none(w_ce, rows), torch.zeros_like(rows))
        w_ce_eff = alpha.clone()
        if g_kl_other is not None:
            alpha = alpha + g_kl_other
        inner = alpha[:, None].expand_as(prob).clone()
        if g_kl_self is not None:
            kl_self = torch.linalg.vecdot(prob, signed_diff)
            inner.sub_((g_kl_self * kl_self)[:, None]).addcmul_(g_kl_self[:, None], signed_diff)
        if g_ent is not None:
            ent = -torch.linalg.vecdot(prob, logprob)
            inner.sub_((g_ent * ent)[:, None]).addcmul_(-g_ent[:, None], logprob)
        grad = inner.mul_(prob)
        if g_kl_other is not None:
            grad.addcmul_(-g_kl_other[:, None], other)
        grad.scatter_add_(1, safe, -w_ce_eff[:, None])
        return grad

    g_a = view_grad(p, q, logp, diff, g_ce_a, g_kl_ab, g_kl_ba, g_ent_a)
    g_b = None
    if need_b and any_b:
        neg = None if diff is None else diff.neg_()
        g_b = view_grad(q, p, logq, neg, g_ce_b, g_kl_ba, g_kl_ab, g_ent_b)
    return g_a, g_b


def to_raw_grad(g_z: Tensor, cap_grad: Optional[Tensor], params: StatsParams) -> Tensor:
    """Chain the scaled-logit gradient through the temperature and the softcap."""
    if params.temperature != 1.0:
        g_z = g_z.div_(params.temperature)
    if cap_grad is not None:
        g_z = g_z.mul_(cap_grad)
    return g_z


class TorchChunkedStats(torch.autograd.Function):
    """Autograd Function of the chunked torch backend (see module docstring)."""

    @staticmethod
    def forward(ctx, h_a, h_b, weight, bias, labels, params: StatsParams):
        n = h_a.shape[0]
        dt = torch.float64 if h_a.dtype == torch.float64 else torch.float32
        out = torch.empty(6, n, dtype=dt, device=h_a.device)
        lse = torch.empty(2, n, dtype=dt, device=h_a.device)
        for start in range(0, n, params.chunk_size):
            sl = slice(start, min(n, start + params.chunk_size))
            z_a, _ = capped_logits(h_a[sl], weight, bias, params)
            z_b, _ = capped_logits(h_b[sl], weight, bias, params)
            stats, lse_a, lse_b = rows_stats(z_a, z_b, labels[sl], params.ignore_index)
            out[:, sl] = torch.stack(stats)
            lse[0, sl], lse[1, sl] = lse_a, lse_b
        ctx.save_for_backward(h_a, h_b, weight, bias, labels, out, lse)
        ctx.params = params
        ctx.set_materialize_grads(False)
        return tuple(out.unbind(0))

    @staticmethod
    def backward(ctx, *grads):
        h_a, h_b, weight, bias, labels, out, lse = ctx.saved_tensors
        params: StatsParams = ctx.params
        need_ha, need_hb, need_w, need_b = ctx.needs_input_grad[:4]
        b_side = not params.detach_b
        dt = out.dtype
        d_ha = torch.zeros(h_a.shape, dtype=dt, device=h_a.device) if need_ha else None
        d_hb = torch.zeros(h_b.shape, dtype=dt, device=h_b.device) if need_hb and b_side else None
        d_w = torch.zeros(weight.shape, dtype=dt, device=weight.device) if need_w else None
        d_b = torch.zeros(weight.shape[0], dtype=dt, device=weight.device) if need_b else None
        w_dt = weight.to(dt)
        n = h_a.shape[0]
        for start in range(0, n, params.chunk_size):
            sl = slice(start, min(n, start + params.chunk_size))
            z_a, cap_a = capped_logits(h_a[sl], weight, bias, params)
            z_b, cap_b = capped_logits(h_b[sl], weight, bias, params)
            g = [None if x is None else x[sl].to(dt) for x in grads]
            g_a, g_b = rows_grad_logits(z_a, z_b, labels[sl], params.ignore_index,
                                        lse[0, sl], lse[1, sl], g, need_b=b_side)
            g_a = to_raw_grad(g_a, cap_a, params)
            g_b = to_raw_grad(g_b, cap_b, params) if g_b is not None else None
            if d_ha is not None:
                d_ha[sl] = g_a @ w_dt
            if d_hb is not None and g_b is not None:  # d_hb starts at zero
                d_hb[sl] = g_b @ w_dt
            if d_w is not None:
                d_w += g_a.T @ h_a[sl].to(dt)
                if g_b is not None:
                    d_w += g_b.T @ h_b[sl].to(dt)
            if d_b is not None:
                d_b += g_a.sum(0)
                if g_b is not None:
                    d_b += g_b.sum(0)
        cast = lambda t, like: None if t is None else t.to(like.dtype)  # noqa: E731
        return (cast(d_ha, h_a), cast(d_hb, h_b), cast(d_w, weight),
                None if d_b is None else d_b.to(bias.dtype), None, None)


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
