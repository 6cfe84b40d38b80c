"""One-pass patch shuffle/mask: ``dst[u] = code[u] >= 0 ? fill : src[perm[u]]`` over pixels.

Every pixel layout is described to the kernel as a stack of *images* (up to three leading
dimensions, any strides), each ``C × H × W`` and cut into a ``GH × GW`` grid of
``UH × UW`` *units*. Each program writes one ``BLOCK_Y × BLOCK_X`` tile of one channel of
one image, pixel-major, so writes are contiguous and pixels outside the unit grid (the
border left by ``allow_remainder``) are copied in place in the same launch.

Two tiny per-unit tables, indexed by the global unit ``g = image·GH·GW + uy·GW + ux``,
carry the randomness (built by :mod:`pcr_fast.augment`):

* ``delta[g]`` (int64): offset, in *source* element units, from the destination unit's
  position to its source unit's position, so ``src_offset = position_offset + delta``.
  Expressing the permutation as an address delta keeps every layout (strided patches,
  tiles, flattened rows) the same arithmetic and never makes a reshaped copy.
* ``code[g]`` (int32): ``-1`` copies; ``>= 0`` fills. With ``NOISE=False`` the fill is
  ``fill[code, channel]`` (a per-image, per-channel table in the output dtype); with
  ``NOISE=True`` it is element ``(c, y mod UH, x mod UW)`` of slot ``code`` of a
  pre-generated ``(slots, C, UH, UW)`` noise buffer.

Bytes moved: each output element is written once; each copied element is read once;
plus the two tables (a few bytes per unit).

The flattened-rows layout of Qwen2-VL-style models is one image of ``H = L`` rows and
``W = C·t·p·p`` columns whose units are ``merge²`` consecutive rows (``GW = 1``); there
the fill channel is ``x // FILL_CH_DIV`` (``FILL_CH_DIV = t·p·p``) instead of the
program's channel.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import tile_config


@triton.jit
def _patch_gather_kernel(
    src_ptr, dst_ptr, delta_ptr, code_ptr, fill_ptr,
    n_yblocks, C, H, W, lead1, lead2, GH, GW,
    s_b, s_n, s_t, s_c, s_h, s_w,
    d_b, d_n, d_t, d_c, d_h, d_w,
    fill_row_stride,
    UH: tl.constexpr, UW: tl.constexpr,
    FILL_CH_DIV: tl.constexpr, NOISE: tl.constexpr,
    BLOCK_Y: tl.constexpr, BLOCK_X: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_x = tl.program_id(1)
    yb = pid % n_yblocks
    rest = pid // n_yblocks
    c = rest % C
    img = rest // C
    # Image index -> (b, n, t) over up to three leading dims of arbitrary strides.
    it = img % lead2
    rest2 = img // lead2
    inn = rest2 % lead1
    ib = rest2 // lead1
    src_base = (ib.to(tl.int64) * s_b + inn.to(tl.int64) * s_n + it.to(tl.int64) * s_t
                + c.to(tl.int64) * s_c)
    dst_base = (ib.to(tl.int64) * d_b + inn.to(tl.int64) * d_n + it.to(tl.int64) * d_t
                + c.to(tl.int64) * d_c)

    ys = yb * BLOCK_Y + tl.arange(0, BLOCK_Y)
    xs = pid_x * BLOCK_X + tl.arange(0, BLOCK_X)
    in_img = (ys < H)[:, None] & (xs < W)[None, :]
    uy = ys // UH
    ux = xs // UW
    in_grid = in_img & (uy < GH)[:, None] & (ux < GW)[None, :]
    unit = img.to(tl.int64) * GH * GW + (uy * GW)[:, None] + ux[None, :]
    unit = tl.where(in_grid, unit, 0)
    code = tl.load(code_ptr + unit, mask=in_grid, other=-1)
    delta = tl.load(delta_ptr + unit, mask=in_grid, other=0)

    ys64 = ys.to(tl.int64)[:, None]
    xs64 = xs.to(tl.int64)[None, :]
    filled = code >= 0
    src_off = src_base + ys64 * s_h + xs64 * s_w + delta
    vals = tl.load(src_ptr + src_off, mask=in_img & (code < 0))
    if NOISE:
        in_unit = ((c * UH + (ys % UH)[:, None]) * UW + (xs % UW)[None, :]).to(tl.int64)
        fill_off = code.to(tl.int64) * (C * UH * UW) + in_unit
    else:
        if FILL_CH_DIV > 0:
            channel = (xs // FILL_CH_DIV)[None, :]
        else:
            channel = c
        fill_off = code.to(tl.int64) * fill_row_stride + channel
    fill_off = tl.where(filled, fill_off, 0)
    fills = tl.load(fill_ptr + fill_off, mask=in_img & filled)
    out = tl.where(filled, fills, vals)
    tl.store(dst_ptr + dst_base + ys64 * d_h + xs64 * d_w, out, mask=in_img)


def patch_gather(
    src: torch.Tensor,
    dst: torch.Tensor,
    delta: torch.Tensor,
    code: torch.Tensor,
    fill: torch.Tensor,
    *,
    lead_shape: tuple[int, int, int],
    src_lead_strides: tuple[int, int, int],
    dst_lead_strides: tuple[int, int, int],
    channels: int,
    height: int,
    width: int,
    src_chw_strides: tuple[int, int, int],
    dst_chw_strides: tuple[int, int, int],
    unit_h: int,
    unit_w: int,
    grid_h: int,
    grid_w: int,
    noise: bool,
    fill_channel_div: int = 0,
) -> None:
    """Launch the gather once for the whole batch (writes ``dst`` in place).

    ``src``/``dst`` are addressed only through the given strides (element units), so any
    view works without a copy. ``lead_shape`` is the (b, n, t) split of the image index
    (pad with 1s), ``delta`` (int64) and ``code`` (int32) have ``prod(lead_shape)·grid_h·grid_w``
    entries. ``fill`` is ``(rows, C)`` in ``dst.dtype`` (``noise=False``) or a contiguous
    ``(slots, C, unit_h, unit_w)`` buffer (``noise=True``).
    """
    n_images = lead_shape[0] * lead_shape[1] * lead_shape[2]
    if n_images == 0 or height == 0 or width == 0 or channels == 0:
        return
    cfg = tile_config("patch_gather", height, width, device=src.device)
    block_y, block_x = cfg.block_y, cfg.block_x
    n_yblocks = triton.cdiv(height, block_y)
    grid = (n_images * channels * n_yblocks, triton.cdiv(width, block_x))
    fill_row_stride = fill.stride(0) if fill.dim() >= 1 else 0
    _patch_gather_kernel[grid](
        src, dst, delta, code, fill,
        n_yblocks, channels, height, width, lead_shape[1], lead_shape[2], grid_h, grid_w,
        *src_lead_strides, *src_chw_strides,
        *dst_lead_strides, *dst_chw_strides,
        fill_row_stride,
        UH=unit_h, UW=unit_w, FILL_CH_DIV=fill_channel_div, NOISE=noise,
        BLOCK_Y=block_y, BLOCK_X=block_x,
        num_warps=cfg.num_warps,
    )
