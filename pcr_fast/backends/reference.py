"""Materialised reference of the six two-view statistics.

Written directly from the definitions (softmax, log-softmax, sums over the vocabulary) and
independently of the kernels' online/closed-form algebra, so that it can serve as the
float64 truth in tests. Differentiable through plain autograd; memory is O(N·V), so it is
for tests and tiny shapes only.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def reference_logits(h: Tensor, weight: Tensor, bias: Optional[Tensor], temperature: float,
                     softcap: Optional[float]) -> Tensor:
    """``softcap(h Wᵀ + b) / T`` in float32 (float64 for float64 inputs)."""
    dt = _compute_dtype(h.dtype)
    z = h.to(dt) @ weight.to(dt).T
    if bias is not None:
        z = z + bias.to(dt)
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z / temperature


def reference_two_view_stats(h_a: Tensor, h_b: Tensor, weight: Tensor, labels: Tensor,
                             bias: Optional[Tensor] = None, temperature: float = 1.0,
                             softcap: Optional[float] = None, ignore_index: int = -100,
                             detach_b: bool = False):
    """Return ``(ce_a, ce_b, kl_ab, kl_ba, ent_a, ent_b)``, each (N,).

    ``detach_b``: view b's logits are a constant (no gradient into h_b, nor into weight/bias
    through view b).
    """
    z_a = reference_logits(h_a, weight, bias, temperature, softcap)
    z_b = reference_logits(h_b, weight, bias, temperature, softcap)
    if detach_b:
        z_b = z_b.detach()
    logp = torch.log_softmax(z_a, dim=-1)
    logq = torch.log_softmax(z_b, dim=-1)
    p, q = logp.exp(), logq.exp()
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels)).unsqueeze(-1)
    ce_a = torch.where(valid, -logp.gather(-1, safe).squeeze(-1), torch.zeros((), dtype=logp.dtype))
    ce_b = torch.where(valid, -logq.gather(-1, safe).squeeze(-1), torch.zeros((), dtype=logq.dtype))
    kl_ab = (p * (logp - logq)).sum(-1)
    kl_ba = (q * (logq - logp)).sum(-1)
    ent_a = -(p * logp).sum(-1)
    ent_b = -(q * logq).sum(-1)
    return ce_a, ce_b, kl_ab, kl_ba, ent_a, ent_b
