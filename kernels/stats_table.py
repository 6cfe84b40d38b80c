"""The kernel contract in torch: online states -> per-row statistics -> gradient coefficients.

Every backend reduces a view's scaled logits ``z`` (``softcap·tanh(raw/softcap)/T``) over the
vocabulary to an *online state* per row (relative to the running maximum ``m``)::

    m = max z,  s = Σ e^{z−m},  t = Σ e^{z−m}(z−m),  d = Σ e^{z−m}(z − z_other),
    zy = z[label],  zsum = Σ z,  amax = argmax z

(terms with e^{z−m} = 0 count 0, so a ``-inf`` logit — a masked vocabulary entry — gives
the exact finite values of 0·log 0 = 0). States of vocabulary ranges merge exactly
(:func:`merge_states`); :func:`finalize` turns them into the statistics table
(:data:`ROWS`), and :func:`grad_coefficients` turns the table and the upstream gradients of
the differentiable statistics into the per-row coefficients of the closed-form gradient of
the scaled logits, which the Triton kernels and the torch backend evaluate the same way::

    g_a = p ⊙ (A_a + k_a·(lp − lq) − e_a·lp) − c_a·q − w_a·1_y + u_a
    g_b = q ⊙ (A_b − k_b·(lp − lq) − e_b·lq) − c_b·p − w_b·1_y + u_b

with ``lp = (z_a − m_a) − log s_a`` (the split keeps large logits exact) and
``lp − lq = (z_a − z_b) − ((m_a − m_b) + (log s_a − log s_b))``.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

#: rows of a state tensor, per view (view a: these indices; view b: + N_STATE)
STATE = ("m", "s", "t", "d", "zy", "zsum", "amax")
N_STATE = len(STATE)

#: rows of the statistics table; the first :data:`N_DIFF` are differentiable outputs
ROWS = ("ce_a", "ce_b", "kl_ab", "kl_ba", "ent_a", "ent_b", "lse_a", "lse_b", "zmean_a", "zmean_b",
        "m_a", "m_b", "logs_a", "logs_b", "amax_a", "amax_b")
N_ROWS = len(ROWS)
N_DIFF = 10
R = {name: i for i, name in enumerate(ROWS)}

#: rows of the gradient-coefficient table (per view: a then b)
COEF = ("m", "logs", "A", "k", "e", "c", "w", "u")
N_COEF = len(COEF)


def merge_states(parts: Tensor) -> Tensor:
    """Merge (splits, 2·N_STATE, N) online states of consecutive vocabulary ranges."""
    if parts.shape[0] == 1:
        return parts[0]
    out = []
    for view in range(2):
        base = view * N_STATE
        m, s, t, d, zy, zsum, amax = (parts[:, base + k] for k in range(N_STATE))
        m_all = m.max(dim=0).values
        m_safe = torch.where(torch.isneginf(m_all), torch.zeros_like(m_all), m_all)
        alpha = torch.where(m == m_all, torch.ones_like(m), torch.exp(m - m_safe))
        shift = torch.where(s > 0, m - m_safe, torch.zeros_like(m))
        s_all = (alpha * s).sum(0)
        t_all = (alpha * (t + shift * s)).sum(0)
        d_all = (alpha * d).sum(0)
        # the first range holding the maximum wins (argmax returns the first maximum)
        first = (m == m_all).to(torch.int8).argmax(dim=0, keepdim=True)
        amax_all = amax.gather(0, first)[0]
        out += [m_all, s_all, t_all, d_all, zy.sum(0), zsum.sum(0), amax_all]
    return torch.stack(out)


def finalize(states: Tensor, labels: Tensor, vocab: int, ignore_index: int, two_views: bool = True) -> Tensor:
    """Online states (2·N_STATE, N) -> the statistics table (N_ROWS, N).

    A label outside [0, V) that is not ``ignore_index`` gives ce = NaN: loud, without a
    host sync. With ``two_views=False`` the view-b rows and the KLs are 0.
    """
    n = states.shape[1]
    table = torch.zeros((N_ROWS, n), dtype=states.dtype, device=states.device)
    valid = labels != ignore_index
    in_range = (labels >= 0) & (labels < vocab)
    nan = torch.full((), float("nan"), dtype=states.dtype, device=states.device)
    zero = torch.zeros((), dtype=states.dtype, device=states.device)
    views = (0, 1) if two_views else (0,)
    logs = {}
    for view in views:
        m, s, t, d, zy, zsum, amax = states[view * N_STATE:(view + 1) * N_STATE]
        ls = torch.log(s)
        logs[view] = (m, ls, d, s)
        lse = m + ls
        table[R["ce_a"] + view] = torch.where(valid, torch.where(in_range, lse - zy, nan), zero)
        table[R["ent_a"] + view] = ls - t / s
        table[R["lse_a"] + view] = lse
        table[R["zmean_a"] + view] = zsum / vocab
        table[R["m_a"] + view] = m
        table[R["logs_a"] + view] = ls
        table[R["amax_a"] + view] = amax
    if two_views:
        (m_a, ls_a, d_a, s_a), (m_b, ls_b, d_b, s_b) = logs[0], logs[1]
        gap = (m_a - m_b) + (ls_a - ls_b)   # lse_a − lse_b without rounding the large lse
        table[R["kl_ab"]] = d_a / s_a - gap
        table[R["kl_ba"]] = d_b / s_b + gap
    return table


def grad_table(grads: Sequence[Optional[Tensor]], n: int, device, dtype=torch.float32) -> Tensor:
    """Upstream gradients of the N_DIFF statistics as one (N_DIFF, N) table (None -> 0)."""
    cols = [torch.zeros(n, dtype=dtype, device=device) if g is None else g.to(dtype).expand(n)
            for g in grads]
    cols += [torch.zeros(n, dtype=dtype, device=device)] * (N_DIFF - len(cols))
    return torch.stack(cols)


def grad_coefficients(table: Tensor, grads: Tensor, labels: Tensor, vocab: int,
                      ignore_index: int) -> Tensor:
    """Per-row coefficients (2·N_COEF, N) of the closed-form logit gradient (module docstring).

    CE gradients are dropped on ignored rows (their ce is the constant 0).
    """
    valid = ((labels != ignore_index) & (labels >= 0) & (labels < vocab)).to(grads.dtype)
    g = dict(zip(ROWS[:N_DIFF], grads))
    out = []
    for self_, other, kl_self, kl_other in (("a", "b", "kl_ab", "kl_ba"), ("b", "a", "kl_ba", "kl_ab")):
        w = g[f"ce_{self_}"] * valid
        A = (w + g[kl_other] + g[f"lse_{self_}"] - g[kl_self] * table[R[kl_self]]
             - g[f"ent_{self_}"] * table[R[f"ent_{self_}"]])
        k = g[kl_self] if self_ == "a" else -g[kl_self]   # coefficient of (lp − lq)
        out += [table[R[f"m_{self_}"]], table[R[f"logs_{self_}"]], A, k, g[f"ent_{self_}"],
                g[kl_other], w, g[f"zmean_{self_}"] / vocab]
    return torch.stack(out)


def state_from_logits(z_a: Tensor, z_b: Optional[Tensor], labels: Tensor) -> Tensor:
    """Online states (2·N_STATE, rows) of materialised scaled logits (torch backend)."""
    rows, vocab = z_a.shape
    safe = torch.where((labels >= 0) & (labels < vocab), labels, torch.zeros_like(labels))[:, None]
    out = []
    for z, other in ((z_a, z_b), (z_b, z_a)):
        if z is None:
            out += [torch.zeros(rows, dtype=z_a.dtype, device=z_a.device)] * N_STATE
            continue
        m, amax = z.max(dim=1)
        m_safe = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
        centred = z - m_safe[:, None]
        e = torch.exp(centred)
        live = e > 0
        s = e.sum(1)
        t = torch.where(live, e * centred, 0.0).sum(1)
        d = (torch.where(live, e * (z - other), 0.0).sum(1) if other is not None
             else torch.zeros_like(s))
        out += [m, s, t, d, z.gather(1, safe)[:, 0], z.sum(1), amax.to(z.dtype)]
    return torch.stack(out)


def grad_from_logits(z_a: Tensor, z_b: Optional[Tensor], coef: Tensor, labels: Tensor,
                     need_b: bool):
    """Closed-form gradient (torch) of the objective w.r.t. materialised scaled logits.

    ``coef`` holds the rows of :func:`grad_coefficients` for these logit rows; ``labels``
    are relative to the first column of ``z_a`` (a label outside its columns adds nothing).
    Returns ``(g_a, g_b or None)``.
    """
    ca = dict(zip(COEF, coef[:N_COEF]))
    cb = dict(zip(COEF, coef[N_COEF:]))
    col = lambda x: x[:, None]  # noqa: E731
    lp = (z_a - col(ca["m"])) - col(ca["logs"])
    p = torch.exp(lp)
    here = (labels >= 0) & (labels < z_a.shape[1])   # the label falls in these columns
    safe = torch.where(here, labels, torch.zeros_like(labels))[:, None]
    if z_b is not None:
        lq = (z_b - col(cb["m"])) - col(cb["logs"])
        q = torch.exp(lq)
        dlpq = (z_a - z_b) - col((ca["m"] - cb["m"]) + (ca["logs"] - cb["logs"]))
    else:
        lq = q = dlpq = torch.zeros_like(z_a)
    inner = col(ca["A"]) + col(ca["k"]) * dlpq - col(ca["e"]) * lp
    g_a = torch.where(p > 0, p * inner, 0.0) - col(ca["c"]) * q + col(ca["u"])
    g_a.scatter_add_(1, safe, col(torch.where(here, -ca["w"], 0.0)))
    g_b = None
    if need_b and z_b is not None:
        inner = col(cb["A"]) + col(cb["k"]) * dlpq - col(cb["e"]) * lq
        g_b = torch.where(q > 0, q * inner, 0.0) - col(cb["c"]) * p + col(cb["u"])
        g_b.scatter_add_(1, safe, col(torch.where(here, -cb["w"], 0.0)))
    return g_a, g_b
