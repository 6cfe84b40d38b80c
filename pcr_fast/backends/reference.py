"""Materialised reference of the per-row statistics.

Written directly from the definitions (softmax, log-softmax, sums over the vocabulary) and
independently of the kernels' online/closed-form algebra, so that it can serve as the
float64 truth in tests (the tests check it against ``torch.nn.functional`` in turn).
Differentiable through plain autograd; memory is O(N·V), so it is for tests and tiny shapes.

Conventions shared with every backend: the matmul runs in the hidden states' dtype (a
weight of another dtype is cast to it first, as ``torch.autocast`` does); terms with
probability 0 contribute 0 (0·log 0 = 0), so ``-inf`` logits give finite KL and entropy.
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
    z = (h @ weight.to(h.dtype).T).to(dt)
    if bias is not None:
        z = z + bias.to(dt)
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z / temperature


def _plogp_terms(p: Tensor, x: Tensor) -> Tensor:
    """Row sums of p·x with 0 wherever p = 0 (so 0·(−inf) = 0, gradients included)."""
    live = p > 0
    return (p * torch.where(live, x, torch.zeros((), dtype=x.dtype))).sum(-1)


def _ce(logp: Tensor, labels: Tensor, ignore_index: int) -> Tensor:
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels)).unsqueeze(-1)
    return torch.where(valid, -logp.gather(-1, safe).squeeze(-1), torch.zeros((), dtype=logp.dtype))


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
    return (_ce(logp, labels, ignore_index), _ce(logq, labels, ignore_index),
            _plogp_terms(p, logp - logq), _plogp_terms(q, logq - logp),
            -_plogp_terms(p, logp), -_plogp_terms(q, logq))


def reference_view_extras(h: Tensor, weight: Tensor, bias: Optional[Tensor] = None, temperature: float = 1.0,
                          softcap: Optional[float] = None):
    """``(lse, logit_mean, argmax)`` of one view's scaled logits, each (N,)."""
    z = reference_logits(h, weight, bias, temperature, softcap)
    return torch.logsumexp(z, dim=-1), z.mean(dim=-1), z.argmax(dim=-1)


def reference_single_view_stats(h: Tensor, weight: Tensor, labels: Tensor, bias: Optional[Tensor] = None,
                                temperature: float = 1.0, softcap: Optional[float] = None,
                                ignore_index: int = -100):
    """``(ce, lse, entropy, logit_mean, argmax)`` of one view, each (N,)."""
    z = reference_logits(h, weight, bias, temperature, softcap)
    logp = torch.log_softmax(z, dim=-1)
    return (_ce(logp, labels, ignore_index), torch.logsumexp(z, dim=-1), -_plogp_terms(logp.exp(), logp),
            z.mean(dim=-1), z.argmax(dim=-1))
