"""Fused forward: one pass over the vocabulary, each W tile loaded once for both views.

Grid: one program per block of BLOCK_N rows. For each BLOCK_V slice of the vocabulary the
program computes both views' logit tiles (``tl.dot`` over D in BLOCK_D steps), folds them
into the online row statistics and discards them: no N×V tensor ever reaches memory.
Output: ``stats`` (8, N) float32 = ce_a, ce_b, kl_ab, kl_ba, ent_a, ent_b, lse_a, lse_b.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .launch import TileConfig, dot_mode, tile_config
from .two_view_common import empty_state, finalize_stats, fold_views, logit_tiles, store_stats

N_STATS = 8  # six statistics + the two log-sum-exps the backward needs


@triton.jit
def _two_view_fwd_kernel(
    ha_ptr, hb_ptr, w_ptr, bias_ptr, labels_ptr, stats_ptr,
    N, V, D,
    stride_ha_n, stride_ha_d, stride_hb_n, stride_hb_d, stride_w_v, stride_w_d,
    inv_temp, softcap, ignore_index,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DOT_FP32: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
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
        acc_a, acc_b = logit_tiles(ha_ptr, hb_ptr, w_ptr, bias_ptr, rows, cols, row_mask, col_mask, D,
                                   stride_ha_n, stride_ha_d, stride_hb_n, stride_hb_d, stride_w_v,
                                   stride_w_d, HAS_BIAS, DOT_FP32, PRECISION, BLOCK_N, BLOCK_V, BLOCK_D)
        m_a, s_a, t_a, d_a, zy_a, m_b, s_b, t_b, d_b, zy_b = fold_views(
            m_a, s_a, t_a, d_a, zy_a, m_b, s_b, t_b, d_b, zy_b, acc_a, acc_b, cols, col_mask,
            labels, softcap, inv_temp, HAS_SOFTCAP)

    ce_a, ce_b, kl_ab, kl_ba, ent_a, ent_b, lse_a, lse_b = finalize_stats(
        m_a, s_a, t_a, d_a, zy_a, m_b, s_b, t_b, d_b, zy_b, labels, V, ignore_index)
    store_stats(stats_ptr, N, rows, row_mask, ce_a, ce_b, kl_ab, kl_ba, ent_a, ent_b, lse_a, lse_b)


def two_view_forward(h_a: torch.Tensor, h_b: torch.Tensor, weight: torch.Tensor,
                     bias: Optional[torch.Tensor], labels: torch.Tensor, *, inv_temp: float,
                     softcap: Optional[float], ignore_index: int,
                     config: Optional[TileConfig] = None) -> torch.Tensor:
    """Launch the fused forward; returns the (8, N) float32 statistics table."""
    n, d = h_a.shape
    v = weight.shape[0]
    cfg = config or tile_config("two_view_fwd", n, v, d)
    stats = torch.empty((N_STATS, n), dtype=torch.float32, device=h_a.device)
    if n == 0:
        return stats
    dot_fp32, precision = dot_mode(h_a.dtype)
    grid = (triton.cdiv(n, cfg.block_n),)
    _two_view_fwd_kernel[grid](
        h_a, h_b, weight, bias if bias is not None else weight, labels, stats,
        n, v, d,
        h_a.stride(0), h_a.stride(1), h_b.stride(0), h_b.stride(1), weight.stride(0), weight.stride(1),
        float(inv_temp), float(softcap or 1.0), int(ignore_index),
        HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None, DOT_FP32=dot_fp32,
        PRECISION=precision, BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return stats

