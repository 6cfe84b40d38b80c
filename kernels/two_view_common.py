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
