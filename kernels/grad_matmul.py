"""The two gradient GEMMs of the fused backward, each owning its output tiles (no atomics).

* :func:`grad_dh`: ``out (+)= g @ W[slab]`` — dh of a row group, accumulated in fp32 over
  vocabulary slabs (each output tile read and written by one program per slab).
* :func:`grad_dw`: ``out = g_aᵀ h_a (+ g_bᵀ h_b)`` — dW of a vocabulary slab from all rows,
  both views summed in one fp32 accumulator and written once in the weight's dtype.

Operands run in the dtype of ``g`` (the hidden states' dtype; the weight tile is cast to
it), accumulation is fp32. Tiles are grouped along M so that consecutive programs share
operand panels in L2.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .launch import dot_mode, tile_config
from .two_view_common import operand


@triton.jit
def _tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(first row, first column) of this program's output tile, rows grouped by GROUP_M."""
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * grid_n
    group = pid // width
    first_m = group * GROUP_M
    size_m = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    return pid_m * BLOCK_M, pid_n * BLOCK_N


@triton.jit
def _grad_dh_kernel(
    g_ptr, w_ptr, out_ptr, M, N, K,
    stride_gm, stride_gk, stride_wk, stride_wn, stride_om, stride_on,
    ACCUMULATE: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    m0, n0 = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = tl.arange(0, BLOCK_M)
    rn = tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_mask = rm < M - m0
    n_mask = rn < N - n0
    pa = g_ptr + tl.cast(m0, tl.int64) * stride_gm
    pb = w_ptr + tl.cast(n0, tl.int64) * stride_wn
    off_a = rm[:, None] * stride_gm + rk[None, :] * stride_gk
    off_b = rk[:, None] * stride_wk + rn[None, :] * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = rk < K - k0
        a = tl.load(pa + off_a, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(pb + off_b, mask=k_mask[:, None] & n_mask[None, :], other=0.0).to(a.dtype)
        acc = tl.dot(operand(a, DOT_FP32), operand(b, DOT_FP32), acc, input_precision=PRECISION)
        pa += BLOCK_K * stride_gk
        pb += BLOCK_K * stride_wk
    po = out_ptr + tl.cast(m0, tl.int64) * stride_om + tl.cast(n0, tl.int64) * stride_on
    offs = rm[:, None] * stride_om + rn[None, :] * stride_on
    mask = m_mask[:, None] & n_mask[None, :]
    if ACCUMULATE:
        acc += tl.load(po + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(po + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _grad_dw_kernel(
    ga_ptr, ha_ptr, gb_ptr, hb_ptr, out_ptr, M, N, K,
    stride_ga_k, stride_ga_m, stride_ha_k, stride_ha_n, stride_gb_k, stride_gb_m, stride_hb_k, stride_hb_n,
    stride_om, stride_on,
    TWO_VIEWS: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    m0, n0 = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = tl.arange(0, BLOCK_M)
    rn = tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_mask = rm < M - m0
    n_mask = rn < N - n0
    pga = ga_ptr + tl.cast(m0, tl.int64) * stride_ga_m
    pha = ha_ptr + tl.cast(n0, tl.int64) * stride_ha_n
    pgb = gb_ptr + tl.cast(m0, tl.int64) * stride_gb_m
    phb = hb_ptr + tl.cast(n0, tl.int64) * stride_hb_n
    off_ga = rk[:, None] * stride_ga_k + rm[None, :] * stride_ga_m
    off_ha = rk[:, None] * stride_ha_k + rn[None, :] * stride_ha_n
    off_gb = rk[:, None] * stride_gb_k + rm[None, :] * stride_gb_m
    off_hb = rk[:, None] * stride_hb_k + rn[None, :] * stride_hb_n
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = rk < K - k0
        a_mask = k_mask[:, None] & m_mask[None, :]
        b_mask = k_mask[:, None] & n_mask[None, :]
        a = tl.load(pga + off_ga, mask=a_mask, other=0.0)
        b = tl.load(pha + off_ha, mask=b_mask, other=0.0)
        acc = tl.dot(tl.trans(operand(a, DOT_FP32)), operand(b.to(a.dtype), DOT_FP32), acc,
                     input_precision=PRECISION)
        if TWO_VIEWS:
            a = tl.load(pgb + off_gb, mask=a_mask, other=0.0)
            b = tl.load(phb + off_hb, mask=b_mask, other=0.0)
            acc = tl.dot(tl.trans(operand(a, DOT_FP32)), operand(b.to(a.dtype), DOT_FP32), acc,
                         input_precision=PRECISION)
        pga += BLOCK_K * stride_ga_k
        pha += BLOCK_K * stride_ha_k
        pgb += BLOCK_K * stride_gb_k
        phb += BLOCK_K * stride_hb_k
    po = out_ptr + tl.cast(m0, tl.int64) * stride_om + tl.cast(n0, tl.int64) * stride_on
    tl.store(po + rm[:, None] * stride_om + rn[None, :] * stride_on, acc.to(out_ptr.dtype.element_ty),
             mask=m_mask[:, None] & n_mask[None, :])


def grad_dh(g: torch.Tensor, w_slab: torch.Tensor, out: torch.Tensor, *, accumulate: bool) -> None:
    """``out (+)= g @ w_slab``: g (M × K), w_slab (K × N) a row slab of the weight, out (M × N)."""
    m, k = g.shape
    n = w_slab.shape[1]
    if m == 0 or n == 0:
        return
    cfg = tile_config("grad_dh", m, n, k, dtype=g.dtype, device=g.device)
    dot_fp32, precision = dot_mode(g.dtype)
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n),)
    _grad_dh_kernel[grid](
        g, w_slab, out, m, n, k, g.stride(0), g.stride(1), w_slab.stride(0), w_slab.stride(1),
        out.stride(0), out.stride(1), ACCUMULATE=accumulate and k > 0, DOT_FP32=dot_fp32, PRECISION=precision,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def grad_dw(g_a: torch.Tensor, h_a: torch.Tensor, g_b: Optional[torch.Tensor], h_b: Optional[torch.Tensor],
            out: torch.Tensor) -> None:
    """``out = g_aᵀ h_a (+ g_bᵀ h_b)``: g (K × M), h (K × N), out (M × N) in its own dtype."""
    k, m = g_a.shape
    n = h_a.shape[1]
    if m == 0 or n == 0:
        return
    if k == 0:
        out.zero_()
        return
    two = g_b is not None
    cfg = tile_config("grad_dw", m, n, k, dtype=g_a.dtype, device=g_a.device)
    dot_fp32, precision = dot_mode(g_a.dtype)
    gb, hb = (g_b, h_b) if two else (g_a, h_a)
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n),)
    _grad_dw_kernel[grid](
        g_a, h_a, gb, hb, out, m, n, k,
        g_a.stride(0), g_a.stride(1), h_a.stride(0), h_a.stride(1), gb.stride(0), gb.stride(1),
        hb.stride(0), hb.stride(1), out.stride(0), out.stride(1),
        TWO_VIEWS=two, DOT_FP32=dot_fp32, PRECISION=precision,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
