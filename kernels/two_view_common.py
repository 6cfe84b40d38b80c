"""Tile helpers shared by the loss kernels: operands, logit tiles, softcap, the online state
update and the closed-form logit gradient (the math of :mod:`.stats_table`, in Triton).

Conventions: ``TWO_VIEWS`` compiles view b out (the single-view statistics of a plain
cross-entropy); ``DOT_FP32`` upcasts ``tl.dot`` operands to fp32 and is set only under the
interpreter (whose bf16 dot is wrong), so on a GPU the bf16/fp16 path is the fp32 path minus
that cast — the only code that never runs on CPU is the absence of ``operand``'s upcast.
"""
import triton
import triton.language as tl


@triton.jit
def operand(x, DOT_FP32: tl.constexpr):
    """A ``tl.dot`` operand: as loaded on a GPU, upcast to fp32 under the interpreter."""
    if DOT_FP32:
        return x.to(tl.float32)
    return x


@triton.jit
def tanh_sech2(x):
    """``(tanh x, 1 − tanh² x)`` to a few ulp of relative accuracy for every x.

    libdevice is unavailable in the interpreter, and ``(1 − e)/(1 + e)`` with
    ``e = exp(−2|x|)`` cancels near 0 (relative error 1e-2 at x = 1e-6), so |x| < 0.25 uses
    the odd Taylor series to x¹¹ (truncation < 1e-9 relative). ``sech² = 4e/(1 + e)²`` has
    no cancellation anywhere (``1 − tanh²`` would near |x| large).
    """
    ax = tl.abs(x)
    e = tl.exp(-2.0 * ax)
    x2 = ax * ax
    series = ax * (1.0 + x2 * (-0.3333333333333333 + x2 * (0.13333333333333333 + x2 * (
        -0.05396825396825397 + x2 * (0.021869488536155203 + x2 * -0.008863235529902197)))))
    t = tl.where(ax < 0.25, series, (1.0 - e) / (1.0 + e))
    t = tl.where(x < 0, -t, t)
    one_e = 1.0 + e
    return t, 4.0 * e / (one_e * one_e)


@triton.jit
def scale_logits(raw, softcap, inv_temp, HAS_SOFTCAP: tl.constexpr):
    """Raw logits -> ``z = softcap·tanh(raw/softcap)/T`` and ``dz/draw`` (``1/T`` without softcap)."""
    if HAS_SOFTCAP:
        th, sech2 = tanh_sech2(raw / softcap)
        return (softcap * inv_temp) * th, sech2 * inv_temp
    return raw * inv_temp, tl.full(raw.shape, 1.0, tl.float32) * inv_temp


@triton.jit
def logit_tiles(ha_ptr, hb_ptr, w_ptr, bias_ptr, row0, col0, row_mask, col_mask, D,
                stride_ha_n, stride_ha_d, stride_hb_n, stride_hb_d, stride_w_v, stride_w_d, stride_bias,
                HAS_BIAS: tl.constexpr, TWO_VIEWS: tl.constexpr, DOT_FP32: tl.constexpr,
                PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                BLOCK_D: tl.constexpr):
    """Raw logit tiles (rows ``row0 +`` BLOCK_N × columns ``col0 +`` BLOCK_V) of view a and b,
    each W tile loaded once for both.

    The matmul runs in the hidden states' dtype (the weight tile is cast to it, as
    ``torch.autocast`` does for an lm_head), accumulating in fp32. Addressing: 64-bit
    scalar bases advanced every K step, 32-bit offsets inside the tile (half the registers
    of 64-bit offset tiles, and no overflow however large N·D or V·D).
    """
    r = tl.arange(0, BLOCK_N)
    c = tl.arange(0, BLOCK_V)
    k = tl.arange(0, BLOCK_D)
    pa = ha_ptr + tl.cast(row0, tl.int64) * stride_ha_n
    pb = hb_ptr + tl.cast(row0, tl.int64) * stride_hb_n
    pw = w_ptr + tl.cast(col0, tl.int64) * stride_w_v
    off_a = r[:, None] * stride_ha_n + k[None, :] * stride_ha_d
    off_b = r[:, None] * stride_hb_n + k[None, :] * stride_hb_d
    off_w = c[None, :] * stride_w_v + k[:, None] * stride_w_d
    acc_a = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
    acc_b = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d_mask = k < D - d0
        h_mask = row_mask[:, None] & d_mask[None, :]
        xa = tl.load(pa + off_a, mask=h_mask, other=0.0)
        w = tl.load(pw + off_w, mask=d_mask[:, None] & col_mask[None, :], other=0.0).to(xa.dtype)
        w = operand(w, DOT_FP32)
        acc_a = tl.dot(operand(xa, DOT_FP32), w, acc_a, input_precision=PRECISION)
        if TWO_VIEWS:
            xb = tl.load(pb + off_b, mask=h_mask, other=0.0)
            acc_b = tl.dot(operand(xb, DOT_FP32), w, acc_b, input_precision=PRECISION)
        pa += BLOCK_D * stride_ha_d
        pb += BLOCK_D * stride_hb_d
        pw += BLOCK_D * stride_w_d
    if HAS_BIAS:
        bias = tl.load(bias_ptr + tl.cast(col0, tl.int64) * stride_bias + c * stride_bias, mask=col_mask,
                       other=0.0).to(tl.float32)
        acc_a += bias[None, :]
        acc_b += bias[None, :]
    return acc_a, acc_b


@triton.jit
def empty_state(BLOCK_N: tl.constexpr):
    """Initial online state of one view: (m, s, t, d, zy, zsum, amax) per row."""
    zero = tl.zeros((BLOCK_N,), tl.float32)
    return tl.full((BLOCK_N,), float("-inf"), tl.float32), zero, zero, zero, zero, zero, zero


@triton.jit
def fold_tile(m, s, t, d, zy, zsum, amax, z, z_other, v0, c, col_mask, label_rel, TWO_VIEWS: tl.constexpr):
    """Fold one (rows × BLOCK_V) tile of scaled logits (``-inf`` outside the vocabulary)
    into a view's online state. ``c`` are the tile's column offsets from ``v0`` and
    ``label_rel`` the labels minus ``v0``. Terms with e^{z−m} = 0 count 0 (a ``-inf`` logit
    is exact)."""
    tile_max = tl.max(z, axis=1)
    tile_arg = tl.argmax(z, axis=1)
    amax = tl.where(tile_max > m, (v0 + tile_arg).to(tl.float32), amax)
    m_new = tl.maximum(m, tile_max)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.where(m == m_new, 1.0, tl.exp(m - m_safe))
    shift = tl.where(s > 0, m - m_safe, 0.0)
    centred = z - m_safe[:, None]
    e = tl.exp(centred)
    live = e > 0
    t = alpha * (t + shift * s) + tl.sum(tl.where(live, e * centred, 0.0), axis=1)
    if TWO_VIEWS:
        d = alpha * d + tl.sum(tl.where(live, e * (z - z_other), 0.0), axis=1)
    s = alpha * s + tl.sum(e, axis=1)
    zy += tl.sum(tl.where(c[None, :] == label_rel[:, None], z, 0.0), axis=1)
    zsum += tl.sum(tl.where(col_mask[None, :], z, 0.0), axis=1)
    return m_new, s, t, d, zy, zsum, amax


@triton.jit
def store_state(ptr, stride_k, r, row_mask, m, s, t, d, zy, zsum, amax):
    """Write one view's state as 7 consecutive rows (stride ``stride_k``) of a state table
    (``ptr`` at the block's first row, ``r`` the row offsets)."""
    tl.store(ptr + 0 * stride_k + r, m, mask=row_mask)
    tl.store(ptr + 1 * stride_k + r, s, mask=row_mask)
    tl.store(ptr + 2 * stride_k + r, t, mask=row_mask)
    tl.store(ptr + 3 * stride_k + r, d, mask=row_mask)
    tl.store(ptr + 4 * stride_k + r, zy, mask=row_mask)
    tl.store(ptr + 5 * stride_k + r, zsum, mask=row_mask)
    tl.store(ptr + 6 * stride_k + r, amax, mask=row_mask)


@triton.jit
def load_coef(coef_ptr, stride_k, k, r, row_mask):
    """Row ``k`` of the coefficient table for the block's rows, as a column."""
    return tl.load(coef_ptr + k * stride_k + r, mask=row_mask, other=0.0)[:, None]


@triton.jit
def grad_tile(z_a, z_b, c, label_rel, coef_ptr, stride_k, rows, row_mask,
              TWO_VIEWS: tl.constexpr, NEED_GB: tl.constexpr):
    """d(objective)/dz for one tile of both views (``stats_table.grad_coefficients`` order:
    m, logs, A, k, e, c, w, u for view a then b; ``coef_ptr`` at the block's first row,
    ``rows`` the row offsets, ``c``/``label_rel`` columns and labels relative to the tile's
    first column). Returns ``(g_a, g_b)``; ``g_b`` is a zero tile unless ``NEED_GB``."""
    m_a = load_coef(coef_ptr, stride_k, 0, rows, row_mask)
    ls_a = load_coef(coef_ptr, stride_k, 1, rows, row_mask)
    lp = (z_a - m_a) - ls_a
    p = tl.exp(lp)
    hit = c[None, :] == label_rel[:, None]
    inner_a = load_coef(coef_ptr, stride_k, 2, rows, row_mask) - load_coef(coef_ptr, stride_k, 4, rows, row_mask) * lp
    g_b = tl.zeros(z_a.shape, tl.float32)
    if TWO_VIEWS:
        m_b = load_coef(coef_ptr, stride_k, 8, rows, row_mask)
        ls_b = load_coef(coef_ptr, stride_k, 9, rows, row_mask)
        lq = (z_b - m_b) - ls_b
        q = tl.exp(lq)
        dlpq = (z_a - z_b) - ((m_a - m_b) + (ls_a - ls_b))
        inner_a += load_coef(coef_ptr, stride_k, 3, rows, row_mask) * dlpq
        if NEED_GB:
            inner_b = (load_coef(coef_ptr, stride_k, 10, rows, row_mask)
                       + load_coef(coef_ptr, stride_k, 11, rows, row_mask) * dlpq
                       - load_coef(coef_ptr, stride_k, 12, rows, row_mask) * lq)
            g_b = (tl.where(q > 0, q * inner_b, 0.0) - load_coef(coef_ptr, stride_k, 13, rows, row_mask) * p
                   - tl.where(hit, load_coef(coef_ptr, stride_k, 14, rows, row_mask), 0.0)
                   + load_coef(coef_ptr, stride_k, 15, rows, row_mask))
        g_a = tl.where(p > 0, p * inner_a, 0.0) - load_coef(coef_ptr, stride_k, 5, rows, row_mask) * q
    else:
        g_a = tl.where(p > 0, p * inner_a, 0.0)
    g_a = (g_a - tl.where(hit, load_coef(coef_ptr, stride_k, 6, rows, row_mask), 0.0)
           + load_coef(coef_ptr, stride_k, 7, rows, row_mask))
    return g_a, g_b
