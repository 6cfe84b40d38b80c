"""Fused backward: one recompute pass with the closed-form gradients (DESIGN §2).

Grid: (row blocks, vocabulary blocks). Each program recomputes both views' logit tile,
turns it into the gradient tile of the raw logits from the saved per-row statistics and the
upstream gradients of all six statistics, then accumulates (fp32, atomically)
``dh_a += g_a W``, ``dh_b += g_b W``, ``dW += g_aᵀ h_a + g_bᵀ h_b`` and ``dbias``.
No N×V tensor reaches memory.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from .two_view_common import grad_tiles, logit_tiles, scale_logits
from .launch import TileConfig, dot_mode, tile_config


@triton.jit
def _two_view_bwd_kernel(
    ha_ptr, hb_ptr, w_ptr, bias_ptr, labels_ptr, stats_ptr, grads_ptr,
    dha_ptr, dhb_ptr, dw_ptr, dbias_ptr,
    N, V, D,
    stride_ha_n, stride_ha_d, stride_hb_n, stride_hb_d, stride_w_v, stride_w_d,
    stride_g_k, stride_g_n,
    inv_temp, softcap, ignore_index,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DOT_FP32: tl.constexpr,
    PRECISION: tl.constexpr, NEED_B: tl.constexpr,
    NEED_DHA: tl.constexpr, NEED_DHB: tl.constexpr, NEED_DW: tl.constexpr, NEED_DBIAS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    rows = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    cols = (pid_v * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
    row_mask = rows < N
    col_mask = cols < V
    inv_temp = tl.cast(inv_temp, tl.float32)
    softcap = tl.cast(softcap, tl.float32)

    # 1. recompute both views' logit tiles
    acc_a, acc_b = logit_tiles(ha_ptr, hb_ptr, w_ptr, bias_ptr, rows, cols, row_mask, col_mask, D,
                               stride_ha_n, stride_ha_d, stride_hb_n, stride_hb_d, stride_w_v,
                               stride_w_d, HAS_BIAS, DOT_FP32, PRECISION, BLOCK_N, BLOCK_V, BLOCK_D)
    z_a, cap_a = scale_logits(acc_a, softcap, inv_temp, HAS_SOFTCAP)
    z_b, cap_b = scale_logits(acc_b, softcap, inv_temp, HAS_SOFTCAP)

    # 2. gradient of the raw logits
    labels = tl.load(labels_ptr + rows, mask=row_mask, other=ignore_index)
    g_a, g_b = grad_tiles(z_a, z_b, cols, col_mask, rows, row_mask, labels, ignore_index,
                          stats_ptr, N, grads_ptr, stride_g_k, stride_g_n, NEED_B)
    tile_mask = row_mask[:, None] & col_mask[None, :]
    g_a = tl.where(tile_mask, g_a * cap_a * inv_temp, 0.0)
    g_b = tl.where(tile_mask, g_b * cap_b * inv_temp, 0.0)

    if NEED_DBIAS:
        db = tl.sum(g_a, axis=0)
        if NEED_B:
            db += tl.sum(g_b, axis=0)
        tl.atomic_add(dbias_ptr + cols, db, mask=col_mask)

    # 3. dh = g W (per row block) and dW = gᵀ h (per vocabulary block), D in BLOCK_D steps
    if DOT_FP32:
        ga_dot = g_a
        gb_dot = g_b
    else:
        ga_dot = g_a.to(ha_ptr.dtype.element_ty)
        gb_dot = g_b.to(ha_ptr.dtype.element_ty)
    for d0 in range(0, D, BLOCK_D):
        dd = (d0 + tl.arange(0, BLOCK_D)).to(tl.int64)
        d_mask = dd < D
        h_mask = row_mask[:, None] & d_mask[None, :]
        w_t = tl.load(w_ptr + cols[:, None] * stride_w_v + dd[None, :] * stride_w_d,
                      mask=col_mask[:, None] & d_mask[None, :], other=0.0)
        if DOT_FP32:
            w_t = w_t.to(tl.float32)
        else:
            w_t = w_t.to(ha_ptr.dtype.element_ty)
        if NEED_DHA:
            dha = tl.dot(ga_dot, w_t, input_precision=PRECISION)
            tl.atomic_add(dha_ptr + rows[:, None] * D + dd[None, :], dha, mask=h_mask)
        if NEED_DHB:
            dhb = tl.dot(gb_dot, w_t, input_precision=PRECISION)
            tl.atomic_add(dhb_ptr + rows[:, None] * D + dd[None, :], dhb, mask=h_mask)
        if NEED_DW:
            xa = tl.load(ha_ptr + rows[:, None] * stride_ha_n + dd[None, :] * stride_ha_d, mask=h_mask, other=0.0)
            if DOT_FP32:
                xa = xa.to(tl.float32)
            dw = tl.dot(tl.trans(ga_dot), xa, input_precision=PRECISION)
            if NEED_B:
                xb = tl.load(hb_ptr + rows[:, None] * stride_hb_n + dd[None, :] * stride_hb_d, mask=h_mask, other=0.0)
                if DOT_FP32:
                    xb = xb.to(tl.float32)
                dw = tl.dot(tl.trans(gb_dot), xb, dw, input_precision=PRECISION)
            tl.atomic_add(dw_ptr + cols[:, None] * D + dd[None, :], dw,
                          mask=col_mask[:, None] & d_mask[None, :])


@dataclass
class BackwardGrads:
    """fp32 accumulators filled by the kernel (None where no gradient is needed)."""

    d_h_a: Optional[torch.Tensor]
    d_h_b: Optional[torch.Tensor]
    d_weight: Optional[torch.Tensor]
    d_bias: Optional[torch.Tensor]


def two_view_backward(h_a: torch.Tensor, h_b: torch.Tensor, weight: torch.Tensor,
                      bias: Optional[torch.Tensor], labels: torch.Tensor, stats: torch.Tensor,
                      grads: torch.Tensor, *, inv_temp: float, softcap: Optional[float],
                      ignore_index: int, need_b: bool, need_h_a: bool, need_h_b: bool,
                      need_weight: bool, need_bias: bool,
                      config: Optional[TileConfig] = None) -> BackwardGrads:
    """Launch the recompute backward. ``grads`` is (6, N) float32 with any strides."""
    n, d = h_a.shape
    v = weight.shape[0]
    dev = h_a.device
    out = BackwardGrads(
        torch.zeros((n, d), dtype=torch.float32, device=dev) if need_h_a else None,
        torch.zeros((n, d), dtype=torch.float32, device=dev) if need_h_b and need_b else None,
        torch.zeros((v, d), dtype=torch.float32, device=dev) if need_weight else None,
        torch.zeros((v,), dtype=torch.float32, device=dev) if need_bias and bias is not None else None,
    )
    if n == 0 or not any(x is not None for x in (out.d_h_a, out.d_h_b, out.d_weight, out.d_bias)):
        return out
    cfg = config or tile_config("two_view_bwd", n, v, d)
    dot_fp32, precision = dot_mode(h_a.dtype)
    dummy = stats
    grid = (triton.cdiv(n, cfg.block_n), triton.cdiv(v, cfg.block_v))
    _two_view_bwd_kernel[grid](
        h_a, h_b, weight, bias if bias is not None else weight, labels, stats, grads,
        out.d_h_a if out.d_h_a is not None else dummy,
        out.d_h_b if out.d_h_b is not None else dummy,
        out.d_weight if out.d_weight is not None else dummy,
        out.d_bias if out.d_bias is not None else dummy,
        n, v, d,
        h_a.stride(0), h_a.stride(1), h_b.stride(0), h_b.stride(1), weight.stride(0), weight.stride(1),
        grads.stride(0), grads.stride(1),
        float(inv_temp), float(softcap or 1.0), int(ignore_index),
        HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None, DOT_FP32=dot_fp32,
        PRECISION=precision, NEED_B=need_b,
        NEED_DHA=out.d_h_a is not None, NEED_DHB=out.d_h_b is not None,
        NEED_DW=out.d_weight is not None, NEED_DBIAS=out.d_bias is not None,
        BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out

