"""The cuBLAS-chunked mode: statistics of precomputed logits, and their gradient in place.

The caller computes raw logits with a library matmul (``h Wᵀ + b`` in the input dtype).
:func:`chunk_states` reduces a (rows × V) chunk to the online states of
:mod:`.stats_table`; in the backward, :func:`chunk_grad_in_place` overwrites a (rows × slab)
block of recomputed logits with d(objective)/d(raw logits), so the two gradient matmuls
follow with no further allocation.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .launch import tile_config
from .stats_table import N_STATE
from .two_view_common import empty_state, fold_tile, grad_tile, scale_logits, store_state


@triton.jit
def _chunk_stats_kernel(
    sa_ptr, sb_ptr, labels_ptr, states_ptr,
    N, V, stride_sa, stride_sb, stride_st_k,
    inv_temp, softcap, ignore_index,
    HAS_SOFTCAP: tl.constexpr, TWO_VIEWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
):
    pid = tl.program_id(0)
    row0 = pid * BLOCK_N
    r = tl.arange(0, BLOCK_N)
    c = tl.arange(0, BLOCK_V)
    row_mask = r < N - row0
    labels = tl.load(labels_ptr + tl.cast(row0, tl.int64) + r, mask=row_mask, other=ignore_index).to(tl.int32)
    inv_temp = tl.cast(inv_temp, tl.float32)
    softcap = tl.cast(softcap, tl.float32)
    pa = sa_ptr + tl.cast(row0, tl.int64) * stride_sa
    pb = sb_ptr + tl.cast(row0, tl.int64) * stride_sb
    off_a = r[:, None] * stride_sa + c[None, :]
    off_b = r[:, None] * stride_sb + c[None, :]
    m_a, s_a, t_a, d_a, zy_a, zs_a, am_a = empty_state(BLOCK_N)
    m_b, s_b, t_b, d_b, zy_b, zs_b, am_b = empty_state(BLOCK_N)
    for v0 in range(0, V, BLOCK_V):
        col_mask = c < V - v0
        mask = row_mask[:, None] & col_mask[None, :]
        label_rel = labels - v0
        raw_a = tl.load(pa + off_a, mask=mask, other=0.0).to(tl.float32)
        z_a, _ = scale_logits(raw_a, softcap, inv_temp, HAS_SOFTCAP)
        z_a = tl.where(col_mask[None, :], z_a, float("-inf"))
        if TWO_VIEWS:
            raw_b = tl.load(pb + off_b, mask=mask, other=0.0).to(tl.float32)
            z_b, _ = scale_logits(raw_b, softcap, inv_temp, HAS_SOFTCAP)
            z_b = tl.where(col_mask[None, :], z_b, float("-inf"))
            m_b, s_b, t_b, d_b, zy_b, zs_b, am_b = fold_tile(m_b, s_b, t_b, d_b, zy_b, zs_b, am_b, z_b, z_a,
                                                             v0, c, col_mask, label_rel, True)
        else:
            z_b = z_a
        m_a, s_a, t_a, d_a, zy_a, zs_a, am_a = fold_tile(m_a, s_a, t_a, d_a, zy_a, zs_a, am_a, z_a, z_b,
                                                         v0, c, col_mask, label_rel, TWO_VIEWS)
        pa += BLOCK_V
        pb += BLOCK_V
    out = states_ptr + row0
    store_state(out, stride_st_k, r, row_mask, m_a, s_a, t_a, d_a, zy_a, zs_a, am_a)
    if TWO_VIEWS:
        store_state(out + 7 * stride_st_k, stride_st_k, r, row_mask, m_b, s_b, t_b, d_b, zy_b, zs_b, am_b)


@triton.jit
def _chunk_grad_kernel(
    sa_ptr, sb_ptr, labels_ptr, coef_ptr,
    N, n_cols, v0, stride_sa, stride_sb, stride_coef,
    inv_temp, softcap,
    HAS_SOFTCAP: tl.constexpr, TWO_VIEWS: tl.constexpr, NEED_GB: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    row0 = pid_n * BLOCK_N
    c0 = pid_v * BLOCK_V
    r = tl.arange(0, BLOCK_N)
    c = tl.arange(0, BLOCK_V)
    row_mask = r < N - row0
    mask = row_mask[:, None] & (c < n_cols - c0)[None, :]
    inv_temp = tl.cast(inv_temp, tl.float32)
    softcap = tl.cast(softcap, tl.float32)
    pa = sa_ptr + tl.cast(row0, tl.int64) * stride_sa + c0 + (r[:, None] * stride_sa + c[None, :])
    z_a, dz_a = scale_logits(tl.load(pa, mask=mask, other=0.0).to(tl.float32), softcap, inv_temp, HAS_SOFTCAP)
    pb = sb_ptr + tl.cast(row0, tl.int64) * stride_sb + c0 + (r[:, None] * stride_sb + c[None, :])
    if TWO_VIEWS:
        z_b, dz_b = scale_logits(tl.load(pb, mask=mask, other=0.0).to(tl.float32), softcap, inv_temp, HAS_SOFTCAP)
    else:
        z_b, dz_b = z_a, dz_a
    first_row = tl.cast(row0, tl.int64)
    labels = tl.load(labels_ptr + first_row + r, mask=row_mask, other=-1).to(tl.int32)
    g_a, g_b = grad_tile(z_a, z_b, c, labels - (v0 + c0), coef_ptr + first_row, stride_coef, r, row_mask,
                         TWO_VIEWS, NEED_GB)
    tl.store(pa, (g_a * dz_a).to(sa_ptr.dtype.element_ty), mask=mask)
    if NEED_GB:
        tl.store(pb, (g_b * dz_b).to(sb_ptr.dtype.element_ty), mask=mask)


def chunk_states(logits_a: torch.Tensor, logits_b: Optional[torch.Tensor], labels: torch.Tensor,
                 states_out: torch.Tensor, *, inv_temp: float, softcap: Optional[float],
                 ignore_index: int) -> None:
    """Fill ``states_out`` (2·N_STATE, rows; any row stride) from raw-logit chunks
    (``logits_b=None``: one view)."""
    n, v = logits_a.shape
    if n == 0:
        return
    two = logits_b is not None
    lb = logits_b if two else logits_a
    cfg = tile_config("chunk_stats", n, v, dtype=logits_a.dtype, device=logits_a.device)
    _chunk_stats_kernel[(triton.cdiv(n, cfg.block_n),)](
        logits_a, lb, labels, states_out, n, v, logits_a.stride(0), lb.stride(0), states_out.stride(0),
        float(inv_temp), float(softcap or 1.0), int(ignore_index),
        HAS_SOFTCAP=softcap is not None, TWO_VIEWS=two, BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v,
        num_warps=cfg.num_warps)


def chunk_grad_in_place(logits_a: torch.Tensor, logits_b: Optional[torch.Tensor], labels: torch.Tensor,
                        coef: torch.Tensor, *, v0: int, inv_temp: float, softcap: Optional[float],
                        need_b: bool) -> None:
    """Overwrite raw-logit blocks (rows × slab, vocabulary columns from ``v0``) with the
    objective's gradient w.r.t. them (view b's only if ``need_b``)."""
    n, cols = logits_a.shape
    if n == 0 or cols == 0:
        return
    two = logits_b is not None
    lb = logits_b if two else logits_a
    cfg = tile_config("chunk_grad", n, cols, dtype=logits_a.dtype, device=logits_a.device)
    _chunk_grad_kernel[(triton.cdiv(n, cfg.block_n), triton.cdiv(cols, cfg.block_v))](
        logits_a, lb, labels, coef, n, cols, int(v0), logits_a.stride(0), lb.stride(0), coef.stride(0),
        float(inv_temp), float(softcap or 1.0),
        HAS_SOFTCAP=softcap is not None, TWO_VIEWS=two, NEED_GB=two and need_b,
        BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, num_warps=cfg.num_warps)


__all__ = ["chunk_states", "chunk_grad_in_place", "N_STATE"]
