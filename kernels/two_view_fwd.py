"""Fused forward: one pass over the vocabulary, each W tile loaded once for both views.

Grid: (row blocks, vocabulary splits). Each program computes, for its BLOCK_N rows and its
range of the vocabulary, both views' logit tiles (``tl.dot`` over D in BLOCK_D steps),
folds them into the online states (:mod:`.stats_table`) and discards them: no N×V tensor
ever reaches memory. Splitting the vocabulary keeps a small N from leaving SMs idle; the
splits' states merge exactly afterwards. Output: the (N_ROWS, N) float32 statistics table.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .launch import dot_mode, tile_config, vocab_splits
from .stats_table import N_STATE, finalize, merge_states
from .two_view_common import empty_state, fold_tile, logit_tiles, scale_logits, store_state


@triton.jit
def _two_view_fwd_kernel(
    ha_ptr, hb_ptr, w_ptr, bias_ptr, labels_ptr, states_ptr,
    N, V, D, v_per_split,
    stride_ha_n, stride_ha_d, stride_hb_n, stride_hb_d, stride_w_v, stride_w_d, stride_bias,
    stride_st_split, stride_st_k,
    inv_temp, softcap, ignore_index,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, TWO_VIEWS: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    row0 = pid_n * BLOCK_N
    r = tl.arange(0, BLOCK_N)
    row_mask = r < N - row0
    labels = tl.load(labels_ptr + tl.cast(row0, tl.int64) + r, mask=row_mask, other=ignore_index).to(tl.int32)
    inv_temp = tl.cast(inv_temp, tl.float32)
    softcap = tl.cast(softcap, tl.float32)
    v_lo = pid_s * v_per_split
    v_hi = tl.minimum(V, v_lo + v_per_split)
    c = tl.arange(0, BLOCK_V)

    m_a, s_a, t_a, d_a, zy_a, zs_a, am_a = empty_state(BLOCK_N)
    m_b, s_b, t_b, d_b, zy_b, zs_b, am_b = empty_state(BLOCK_N)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        col_mask = c < v_hi - v0
        raw_a, raw_b = logit_tiles(ha_ptr, hb_ptr, w_ptr, bias_ptr, row0, v0, row_mask, col_mask, D,
                                   stride_ha_n, stride_ha_d, stride_hb_n, stride_hb_d, stride_w_v,
                                   stride_w_d, stride_bias, HAS_BIAS, TWO_VIEWS, DOT_FP32, PRECISION,
                                   BLOCK_N, BLOCK_V, BLOCK_D)
        label_rel = labels - v0
        z_a, _ = scale_logits(raw_a, softcap, inv_temp, HAS_SOFTCAP)
        z_a = tl.where(col_mask[None, :], z_a, float("-inf"))
        if TWO_VIEWS:
            z_b, _ = scale_logits(raw_b, softcap, inv_temp, HAS_SOFTCAP)
            z_b = tl.where(col_mask[None, :], z_b, float("-inf"))
            m_b, s_b, t_b, d_b, zy_b, zs_b, am_b = fold_tile(m_b, s_b, t_b, d_b, zy_b, zs_b, am_b, z_b, z_a,
                                                             v0, c, col_mask, label_rel, True)
        else:
            z_b = z_a
        m_a, s_a, t_a, d_a, zy_a, zs_a, am_a = fold_tile(m_a, s_a, t_a, d_a, zy_a, zs_a, am_a, z_a, z_b,
                                                         v0, c, col_mask, label_rel, TWO_VIEWS)
    out = states_ptr + tl.cast(pid_s, tl.int64) * stride_st_split + row0
    store_state(out, stride_st_k, r, row_mask, m_a, s_a, t_a, d_a, zy_a, zs_a, am_a)
    if TWO_VIEWS:
        store_state(out + 7 * stride_st_k, stride_st_k, r, row_mask, m_b, s_b, t_b, d_b, zy_b, zs_b, am_b)


def two_view_forward(h_a: torch.Tensor, h_b: Optional[torch.Tensor], weight: torch.Tensor,
                     bias: Optional[torch.Tensor], labels: torch.Tensor, *, inv_temp: float,
                     softcap: Optional[float], ignore_index: int) -> torch.Tensor:
    """Launch the fused forward; returns the (N_ROWS, N) float32 statistics table.

    ``h_b=None``: one view (view b compiled out; its rows of the table are 0).
    """
    n, d = h_a.shape
    v = weight.shape[0]
    two = h_b is not None
    cfg = tile_config("two_view_fwd", n, v, d, dtype=h_a.dtype, device=h_a.device)
    splits = vocab_splits(n, v, cfg, h_a.device)
    v_per_split = triton.cdiv(triton.cdiv(v, splits), cfg.block_v) * cfg.block_v
    splits = triton.cdiv(v, v_per_split)
    states = torch.zeros((splits, 2 * N_STATE, n), dtype=torch.float32, device=h_a.device)
    if n > 0:
        dot_fp32, precision = dot_mode(h_a.dtype)
        hb = h_b if two else h_a
        grid = (triton.cdiv(n, cfg.block_n), splits)
        _two_view_fwd_kernel[grid](
            h_a, hb, weight, bias if bias is not None else weight, labels, states,
            n, v, d, v_per_split,
            h_a.stride(0), h_a.stride(1), hb.stride(0), hb.stride(1), weight.stride(0), weight.stride(1),
            bias.stride(0) if bias is not None else 0, states.stride(0), states.stride(1),
            float(inv_temp), float(softcap or 1.0), int(ignore_index),
            HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None, TWO_VIEWS=two,
            DOT_FP32=dot_fp32, PRECISION=precision,
            BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    return finalize(merge_states(states), labels, v, ignore_index, two_views=two)
