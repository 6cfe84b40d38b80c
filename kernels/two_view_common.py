"""Tile helpers shared by the two-view kernels: logit scaling, the online statistics
update, and the closed-form gradient of the six statistics w.r.t. the scaled logits.

Online state per row and view (``m`` running max of z, and relative to it):
``s = Σ e^{z−m}``, ``t = Σ e^{z−m}(z−m)``, ``d = Σ e^{z−m}(z − z_other)``. Then
``lse = m + log s``, ``H = log s − t/s``, ``KL(this‖other) = d/s − (lse − lse_other)``.
Accumulating ``z − z_other`` directly (not the two expectations) makes identical views give
KL = 0 exactly and keeps large logits from cancelling catastrophically.
"""
import triton
import triton.language as tl


@triton.jit
def stable_tanh(x):
    """tanh from exp (libdevice is unavailable in the interpreter); exact for large |x|."""
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x >= 0, t, -t)


@triton.jit
def scale_logits(s, softcap, inv_temp, HAS_SOFTCAP: tl.constexpr):
    """Raw logits -> ``z = softcap·tanh(s/softcap)/T`` and ``dz/ds · T`` (1 without softcap)."""
    if HAS_SOFTCAP:
        th = stable_tanh(s / softcap)
        z = softcap * th * inv_temp
        cap_grad = 1.0 - th * th
    else:
        z = s * inv_temp
        cap_grad = tl.full(s.shape, 1.0, tl.float32)
    return z, cap_grad


@triton.jit
def online_update(m, s, t, d, z, z_other, col_mask):
    """Fold one (rows × BLOCK_V) tile of scaled logits into the running row statistics."""
    z_m = tl.where(col_mask[None, :], z, float("-inf"))
    m_new = tl.maximum(m, tl.max(z_m, axis=1))
    alpha = tl.exp(m - m_new)
    delta = tl.where(s > 0, m - m_new, 0.0)
    e = tl.exp(z_m - m_new[:, None])
    centred = tl.where(col_mask[None, :], z - m_new[:, None], 0.0)
    diff = tl.where(col_mask[None, :], z - z_other, 0.0)
    t = alpha * (t + delta * s) + tl.sum(e * centred, axis=1)
    d = alpha * d + tl.sum(e * diff, axis=1)
    s = alpha * s + tl.sum(e, axis=1)
    return m_new, s, t, d


@triton.jit
def finalize_stats(m_a, s_a, t_a, d_a, zy_a, m_b, s_b, t_b, d_b, zy_b, labels, V, ignore_index):
    """Online state -> (ce_a, ce_b, kl_ab, kl_ba, ent_a, ent_b, lse_a, lse_b).

    An out-of-range label (not ignore_index) gives ce = NaN: loud, without a host sync.
    """
    log_s_a = tl.log(s_a)
    log_s_b = tl.log(s_b)
    lse_a = m_a + log_s_a
    lse_b = m_b + log_s_b
    ent_a = log_s_a - t_a / s_a
    ent_b = log_s_b - t_b / s_b
    kl_ab = d_a / s_a - (lse_a - lse_b)
    kl_ba = d_b / s_b - (lse_b - lse_a)
    valid = labels != ignore_index
    in_range = (labels >= 0) & (labels < V)
    ce_a = tl.where(valid, tl.where(in_range, lse_a - zy_a, float("nan")), 0.0)
    ce_b = tl.where(valid, tl.where(in_range, lse_b - zy_b, float("nan")), 0.0)
    return ce_a, ce_b, kl_ab, kl_ba, ent_a, ent_b, lse_a, lse_b


@triton.jit
def grad_scaled_logits(z_a, z_b, onehot, lse_a, lse_b, kl_ab, kl_ba, ent_a, ent_b,
                       g_ce_a, g_ce_b, g_kl_ab, g_kl_ba, g_ent_a, g_ent_b,
                       NEED_B: tl.constexpr):
    """Closed forms of DESIGN §2: d(Σ_k g_k·stat_k)/dz for both views (g_* are per row)."""
    lp = z_a - lse_a[:, None]
    lq = z_b - lse_b[:, None]
    p = tl.exp(lp)
    q = tl.exp(lq)
    g_a = (g_ce_a[:, None] * (p - onehot)
           + g_kl_ab[:, None] * p * (lp - lq - kl_ab[:, None])
           + g_kl_ba[:, None] * (p - q)
           - g_ent_a[:, None] * p * (lp + ent_a[:, None]))
    if NEED_B:
        g_b = (g_ce_b[:, None] * (q - onehot)
               + g_kl_ba[:, None] * q * (lq - lp - kl_ba[:, None])
               + g_kl_ab[:, None] * (q - p)
               - g_ent_b[:, None] * q * (lq + ent_b[:, None]))
    else:
        g_b = tl.zeros(g_a.shape, tl.float32)
    return g_a, g_b


@triton.jit
def logit_tiles(ha_ptr, hb_ptr, w_ptr, bias_ptr, rows, cols, row_mask, col_mask, D,
                stride_ha_n, stride_ha_d, stride_hb_n, stride_hb_d, stride_w_v, stride_w_d,
                HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    """Raw logit tiles of both views for (rows × cols); each W tile is loaded once for both."""
    acc_a = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
    acc_b = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = (d0 + tl.arange(0, BLOCK_D)).to(tl.int64)
        d_mask = dd < D
        h_mask = row_mask[:, None] & d_mask[None, :]
        xa = tl.load(ha_ptr + rows[:, None] * stride_ha_n + dd[None, :] * stride_ha_d, mask=h_mask, other=0.0)
        xb = tl.load(hb_ptr + rows[:, None] * stride_hb_n + dd[None, :] * stride_hb_d, mask=h_mask, other=0.0)
        w = tl.load(w_ptr + cols[None, :] * stride_w_v + dd[:, None] * stride_w_d,
                    mask=d_mask[:, None] & col_mask[None, :], other=0.0)
        if DOT_FP32:
            xa = xa.to(tl.float32)
            xb = xb.to(tl.float32)
            w = w.to(tl.float32)
        else:
            w = w.to(xa.dtype)
        acc_a = tl.dot(xa, w, acc_a, input_precision=PRECISION)
        acc_b = tl.dot(xb, w, acc_b, input_precision=PRECISION)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        acc_a += bias[None, :]
        acc_b += bias[None, :]
    return acc_a, acc_b


@triton.jit
def empty_state(BLOCK_N: tl.constexpr):
    """Initial online state of one view: (m, s, t, d, z_label)."""
    return (tl.full((BLOCK_N,), float("-inf"), tl.float32), tl.zeros((BLOCK_N,), tl.float32),
            tl.zeros((BLOCK_N,), tl.float32), tl.zeros((BLOCK_N,), tl.float32),
            tl.zeros((BLOCK_N,), tl.float32))


@triton.jit
def label_logit(z, cols, col_mask, labels):
    """Row sums of z at the label column (0 where the label is not in this tile)."""
    hit = (cols[None, :] == labels[:, None]) & col_mask[None, :]
    return tl.sum(tl.where(hit, z, 0.0), axis=1)


@triton.jit
def store_stats(stats_ptr, stride_stats, rows, row_mask, ce_a, ce_b, kl_ab, kl_ba, ent_a, ent_b,
                lse_a, lse_b):
    """Write the (8, rows) statistics table: ce_a, ce_b, kl_ab, kl_ba, ent_a, ent_b, lse_a, lse_b."""
    tl.store(stats_ptr + 0 * stride_stats + rows, ce_a, mask=row_mask)
    tl.store(stats_ptr + 1 * stride_stats + rows, ce_b, mask=row_mask)
    tl.store(stats_ptr + 2 * stride_stats + rows, kl_ab, mask=row_mask)
    tl.store(stats_ptr + 3 * stride_stats + rows, kl_ba, mask=row_mask)
    tl.store(stats_ptr + 4 * stride_stats + rows, ent_a, mask=row_mask)
    tl.store(stats_ptr + 5 * stride_stats + rows, ent_b, mask=row_mask)
    tl.store(stats_ptr + 6 * stride_stats + rows, lse_a, mask=row_mask)
    tl.store(stats_ptr + 7 * stride_stats + rows, lse_b, mask=row_mask)


@triton.jit
def grad_tiles(z_a, z_b, cols, col_mask, rows, row_mask, labels, ignore_index,
               stats_ptr, stride_stats, grads_ptr, stride_g_k, stride_g_n, NEED_B: tl.constexpr):
    """Gradient tiles w.r.t. the scaled logits from the saved row statistics and the
    upstream gradients of the six statistics (CE terms masked on ignored rows)."""
    kl_ab = tl.load(stats_ptr + 2 * stride_stats + rows, mask=row_mask, other=0.0)
    kl_ba = tl.load(stats_ptr + 3 * stride_stats + rows, mask=row_mask, other=0.0)
    ent_a = tl.load(stats_ptr + 4 * stride_stats + rows, mask=row_mask, other=0.0)
    ent_b = tl.load(stats_ptr + 5 * stride_stats + rows, mask=row_mask, other=0.0)
    lse_a = tl.load(stats_ptr + 6 * stride_stats + rows, mask=row_mask, other=0.0)
    lse_b = tl.load(stats_ptr + 7 * stride_stats + rows, mask=row_mask, other=0.0)
    g_row = grads_ptr + rows * stride_g_n
    valid = (labels != ignore_index) & row_mask
    g_ce_a = tl.where(valid, tl.load(g_row + 0 * stride_g_k, mask=row_mask, other=0.0), 0.0)
    g_ce_b = tl.where(valid, tl.load(g_row + 1 * stride_g_k, mask=row_mask, other=0.0), 0.0)
    g_kl_ab = tl.load(g_row + 2 * stride_g_k, mask=row_mask, other=0.0)
    g_kl_ba = tl.load(g_row + 3 * stride_g_k, mask=row_mask, other=0.0)
    g_ent_a = tl.load(g_row + 4 * stride_g_k, mask=row_mask, other=0.0)
    g_ent_b = tl.load(g_row + 5 * stride_g_k, mask=row_mask, other=0.0)
    onehot = tl.where((cols[None, :] == labels[:, None]) & col_mask[None, :], 1.0, 0.0)
    return grad_scaled_logits(z_a, z_b, onehot, lse_a, lse_b, kl_ab, kl_ba, ent_a, ent_b,
                              g_ce_a, g_ce_b, g_kl_ab, g_kl_ba, g_ent_a, g_ent_b, NEED_B)


@triton.jit
def fold_views(m_a, s_a, t_a, d_a, zy_a, m_b, s_b, t_b, d_b, zy_b, raw_a, raw_b, cols, col_mask,
               labels, softcap, inv_temp, HAS_SOFTCAP: tl.constexpr):
    """Scale one vocabulary tile of raw logits of both views and fold it into their states."""
    z_a, _ = scale_logits(raw_a, softcap, inv_temp, HAS_SOFTCAP)
    z_b, _ = scale_logits(raw_b, softcap, inv_temp, HAS_SOFTCAP)
    m_a, s_a, t_a, d_a = online_update(m_a, s_a, t_a, d_a, z_a, z_b, col_mask)
    m_b, s_b, t_b, d_b = online_update(m_b, s_b, t_b, d_b, z_b, z_a, col_mask)
    zy_a += label_logit(z_a, cols, col_mask, labels)
    zy_b += label_logit(z_b, cols, col_mask, labels)
    return m_a, s_a, t_a, d_a, zy_a, m_b, s_b, t_b, d_b, zy_b
