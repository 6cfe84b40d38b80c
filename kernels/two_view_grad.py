"""Fused logit gradient: recompute a block of logits, turn it into d(objective)/d(raw logits).

Grid: (row blocks of a row group, vocabulary blocks of a slab). Each program recomputes
both views' raw logit tile (``tl.dot`` over D), scales it (softcap, temperature), evaluates
the closed-form gradient from the per-row coefficients (:func:`.stats_table.grad_coefficients`)
and stores the gradient tile of the raw logits into a (rows × slab) scratch buffer in the
GEMM operand dtype. The two gradient GEMMs (:mod:`.grad_matmul`) then read that buffer; the
caller sizes row groups and slabs to its memory budget (:func:`.launch.backward_plan`).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .launch import dot_mode, tile_config
from .two_view_common import grad_tile, logit_tiles, scale_logits


@triton.jit
def _two_view_grad_kernel(
    ha_ptr, hb_ptr, w_ptr, bias_ptr, labels_ptr, coef_ptr, ga_ptr, gb_ptr,
    n_rows, n_cols, row0, v0, D,
    stride_ha_n, stride_ha_d, stride_hb_n, stride_hb_d, stride_w_v, stride_w_d, stride_bias,
    stride_coef, stride_ga, stride_gb,
    inv_temp, softcap,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, TWO_VIEWS: tl.constexpr, NEED_GB: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    r0 = pid_n * BLOCK_N                       # first row of the block within the row group
    c0 = pid_v * BLOCK_V                       # first column of the block within the slab
    r = tl.arange(0, BLOCK_N)
    c = tl.arange(0, BLOCK_V)
    row_mask = r < n_rows - r0
    col_mask = c < n_cols - c0
    inv_temp = tl.cast(inv_temp, tl.float32)
    softcap = tl.cast(softcap, tl.float32)

    raw_a, raw_b = logit_tiles(ha_ptr, hb_ptr, w_ptr, bias_ptr, row0 + r0, v0 + c0, row_mask, col_mask, D,
                               stride_ha_n, stride_ha_d, stride_hb_n, stride_hb_d, stride_w_v, stride_w_d,
                               stride_bias, HAS_BIAS, TWO_VIEWS, DOT_FP32, PRECISION, BLOCK_N, BLOCK_V, BLOCK_D)
    z_a, dz_a = scale_logits(raw_a, softcap, inv_temp, HAS_SOFTCAP)
    z_b, dz_b = scale_logits(raw_b, softcap, inv_temp, HAS_SOFTCAP)
    first_row = tl.cast(row0 + r0, tl.int64)
    labels = tl.load(labels_ptr + first_row + r, mask=row_mask, other=-1).to(tl.int32)
    g_a, g_b = grad_tile(z_a, z_b, c, labels - (v0 + c0), coef_ptr + first_row, stride_coef, r, row_mask,
                         TWO_VIEWS, NEED_GB)
    tile_mask = row_mask[:, None] & col_mask[None, :]
    pa = ga_ptr + tl.cast(r0, tl.int64) * stride_ga + c0
    tl.store(pa + r[:, None] * stride_ga + c[None, :], (g_a * dz_a).to(ga_ptr.dtype.element_ty), mask=tile_mask)
    if NEED_GB:
        pb = gb_ptr + tl.cast(r0, tl.int64) * stride_gb + c0
        tl.store(pb + r[:, None] * stride_gb + c[None, :], (g_b * dz_b).to(gb_ptr.dtype.element_ty), mask=tile_mask)


def two_view_grad_tiles(h_a: torch.Tensor, h_b: Optional[torch.Tensor], weight: torch.Tensor,
                        bias: Optional[torch.Tensor], labels: torch.Tensor, coef: torch.Tensor,
                        g_a: torch.Tensor, g_b: Optional[torch.Tensor], *, rows: slice, cols: slice,
                        inv_temp: float, softcap: Optional[float]) -> None:
    """Fill ``g_a`` (and ``g_b``), each (rows × cols) with unit column stride, with the
    gradient of the objective w.r.t. the raw logits of ``h[rows] @ weight[cols].T + bias``.

    ``h_b=None``: one view. ``g_b=None``: view b's gradient is not wanted (its
    distribution still enters view a's gradient through the KL terms).
    """
    n_rows = rows.stop - rows.start
    n_cols = cols.stop - cols.start
    if n_rows <= 0 or n_cols <= 0:
        return
    d = h_a.shape[1]
    two = h_b is not None
    need_gb = two and g_b is not None
    cfg = tile_config("two_view_grad", n_rows, n_cols, d, dtype=h_a.dtype, device=h_a.device)
    dot_fp32, precision = dot_mode(h_a.dtype)
    hb = h_b if two else h_a
    gb = g_b if need_gb else g_a
    grid = (triton.cdiv(n_rows, cfg.block_n), triton.cdiv(n_cols, cfg.block_v))
    _two_view_grad_kernel[grid](
        h_a, hb, weight, bias if bias is not None else weight, labels, coef, g_a, gb,
        n_rows, n_cols, rows.start, cols.start, d,
        h_a.stride(0), h_a.stride(1), hb.stride(0), hb.stride(1), weight.stride(0), weight.stride(1),
        bias.stride(0) if bias is not None else 0, coef.stride(0), g_a.stride(0), gb.stride(0),
        float(inv_temp), float(softcap or 1.0),
        HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None, TWO_VIEWS=two, NEED_GB=need_gb,
        DOT_FP32=dot_fp32, PRECISION=precision,
        BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
