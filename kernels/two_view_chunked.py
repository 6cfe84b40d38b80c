"""The cuBLAS-chunked mode: statistics, and the logit gradient written in place.

The caller computes a chunk of raw logits per view with a library matmul (``h Wᵀ + b``,
chunk × V). :func:`chunk_stats` reduces them to the statistics; in the backward,
:func:`chunk_grad_in_place` overwrites the same buffers with d(objective)/d(raw logits),
so the two gradient matmuls can follow with no further N×V allocation.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .two_view_common import (empty_state, finalize_stats, fold_views, grad_tiles, scale_logits,
                              store_stats)
from .launch import tile_config


@triton.jit
def _chunk_stats_kernel(
    sa_ptr, sb_ptr, labels_ptr, stats_ptr,
    N, V, stride_sa, stride_sb, stride_stats,
    inv_temp, softcap, ignore_index,
    HAS_SOFTCAP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = (pid * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    row_mask = rows < N
    labels = tl.load(labels_ptr + rows, mask=row_mask, other=ignore_index)
    inv_temp = tl.cast(inv_temp, tl.float32)
    softcap = tl.cast(softcap, tl.float32)
    m_a, s_a, t_a, d_a, zy_a = empty_state(BLOCK_N)
    m_b, s_b, t_b, d_b, zy_b = empty_state(BLOCK_N)
    for v0 in range(0, V, BLOCK_V):
        cols = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)
        col_mask = cols < V
        mask = row_mask[:, None] & col_mask[None, :]
        raw_a = tl.load(sa_ptr + rows[:, None] * stride_sa + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        raw_b = tl.load(sb_ptr + rows[:, None] * stride_sb + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        m_a, s_a, t_a, d_a, zy_a, m_b, s_b, t_b, d_b, zy_b = fold_views(
            m_a, s_a, t_a, d_a, zy_a, m_b, s_b, t_b, d_b, zy_b, raw_a, raw_b, cols, col_mask,
            labels, softcap, inv_temp, HAS_SOFTCAP)
    ce_a, ce_b, kl_ab, kl_ba, ent_a, ent_b, lse_a, lse_b = finalize_stats(
        m_a, s_a, t_a, d_a, zy_a, m_b, s_b, t_b, d_b, zy_b, labels, V, ignore_index)
    store_stats(stats_ptr, stride_stats, rows, row_mask, ce_a, ce_b, kl_ab, kl_ba, ent_a, ent_b, lse_a, lse_b)


@triton.jit
def _chunk_grad_kernel(
    sa_ptr, sb_ptr, labels_ptr, stats_ptr, grads_ptr,
    N, V, stride_sa, stride_sb, stride_stats, stride_g_k, stride_g_n,
    inv_temp, softcap, ignore_index,
    HAS_SOFTCAP: tl.constexpr, NEED_B: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    rows = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    cols = (pid_v * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
    row_mask = rows < N
    col_mask = cols < V
    mask = row_mask[:, None] & col_mask[None, :]
    inv_temp = tl.cast(inv_temp, tl.float32)
    softcap = tl.cast(softcap, tl.float32)
    pa = sa_ptr + rows[:, None] * stride_sa + cols[None, :]
    pb = sb_ptr + rows[:, None] * stride_sb + cols[None, :]
    raw_a = tl.load(pa, mask=mask, other=0.0).to(tl.float32)
    raw_b = tl.load(pb, mask=mask, other=0.0).to(tl.float32)
    z_a, cap_a = scale_logits(raw_a, softcap, inv_temp, HAS_SOFTCAP)
    z_b, cap_b = scale_logits(raw_b, softcap, inv_temp, HAS_SOFTCAP)
    labels = tl.load(labels_ptr + rows, mask=row_mask, other=ignore_index)
    g_a, g_b = grad_tiles(z_a, z_b, cols, col_mask, rows, row_mask, labels, ignore_index,
                          stats_ptr, stride_stats, grads_ptr, stride_g_k, stride_g_n, NEED_B)
    tl.store(pa, (g_a * cap_a * inv_temp).to(sa_ptr.dtype.element_ty), mask=mask)
    if NEED_B:
        tl.store(pb, (g_b * cap_b * inv_temp).to(sb_ptr.dtype.element_ty), mask=mask)


def chunk_stats(logits_a: torch.Tensor, logits_b: torch.Tensor, labels: torch.Tensor,
                stats_out: torch.Tensor, *, inv_temp: float, softcap: Optional[float],
                ignore_index: int) -> None:
    """Fill ``stats_out`` (8, rows; row stride may be > rows) from two raw-logit chunks."""
    n, v = logits_a.shape
    if n == 0:
        return
    cfg = tile_config("chunk_stats", n, v)
    _chunk_stats_kernel[(triton.cdiv(n, cfg.block_n),)](
        logits_a, logits_b, labels, stats_out, n, v,
        logits_a.stride(0), logits_b.stride(0), stats_out.stride(0),
        float(inv_temp), float(softcap or 1.0), int(ignore_index),
        HAS_SOFTCAP=softcap is not None, BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def chunk_grad_in_place(logits_a: torch.Tensor, logits_b: torch.Tensor, labels: torch.Tensor,
                        stats: torch.Tensor, grads: torch.Tensor, *, inv_temp: float,
                        softcap: Optional[float], ignore_index: int, need_b: bool) -> None:
    """Overwrite the raw-logit chunks with the objective's gradient w.r.t. them."""
    n, v = logits_a.shape
    if n == 0:
        return
    cfg = tile_config("chunk_grad", n, v)
    _chunk_grad_kernel[(triton.cdiv(n, cfg.block_n), triton.cdiv(v, cfg.block_v))](
        logits_a, logits_b, labels, stats, grads, n, v,
        logits_a.stride(0), logits_b.stride(0), stats.stride(0), grads.stride(0), grads.stride(1),
        float(inv_temp), float(softcap or 1.0), int(ignore_index),
        HAS_SOFTCAP=softcap is not None, NEED_B=need_b, BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
