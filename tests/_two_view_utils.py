"""Helpers for the two-view tests: random problems and the float64 / same-dtype truths."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from pcr_fast.backends.reference import reference_two_view_stats

STAT_NAMES = ("ce_a", "ce_b", "kl_ab", "kl_ba", "ent_a", "ent_b")


@dataclass
class Problem:
    h_a: torch.Tensor
    h_b: torch.Tensor
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    labels: torch.Tensor
    temperature: float = 1.0
    softcap: Optional[float] = None

    def kwargs(self):
        return dict(bias=self.bias, temperature=self.temperature, softcap=self.softcap)

    def leaves(self):
        out = [self.h_a, self.h_b, self.weight]
        return out + ([self.bias] if self.bias is not None else [])


def make_problem(n, d, v, dtype=torch.float32, ignore_frac=0.3, bias=False, temperature=1.0,
                 softcap=None, scale=1.0, same_views=False) -> Problem:
    """Random inputs; hidden states scaled so logits have O(scale) spread."""
    h_a = (torch.randn(n, d) * scale / d ** 0.25)
    h_b = h_a.clone() if same_views else (h_a + 0.7 * torch.randn(n, d) * scale / d ** 0.25)
    w = torch.randn(v, d) / d ** 0.25
    b = torch.randn(v) * 0.5 if bias else None
    labels = torch.randint(0, v, (n,))
    if ignore_frac >= 1.0:
        labels[:] = -100
    elif ignore_frac > 0:
        labels[torch.rand(n) < ignore_frac] = -100
    leaves = [t.to(dtype).requires_grad_() for t in (h_a, h_b, w)]
    bt = b.to(dtype).requires_grad_() if b is not None else None
    return Problem(*leaves, bt, labels, temperature, softcap)


def as_float64(pr: Problem) -> Problem:
    cast = lambda t: None if t is None else t.detach().double().requires_grad_()  # noqa: E731
    return Problem(cast(pr.h_a), cast(pr.h_b), cast(pr.weight), cast(pr.bias), pr.labels,
                   pr.temperature, pr.softcap)


def same_dtype_stats(pr: Problem, detach_b: bool = False):
    """What plain PyTorch in the input dtype gives: logits materialised in that dtype."""
    def logits(h):
        z = h @ pr.weight.T
        if pr.bias is not None:
            z = z + pr.bias
        z = z.float()
        if pr.softcap is not None:
            z = pr.softcap * torch.tanh(z / pr.softcap)
        return z / pr.temperature

    z_a, z_b = logits(pr.h_a), logits(pr.h_b)
    if detach_b:
        z_b = z_b.detach()
    lp, lq = torch.log_softmax(z_a, -1), torch.log_softmax(z_b, -1)
    p, q = lp.exp(), lq.exp()
    valid = pr.labels != -100
    safe = torch.where(valid, pr.labels, 0)[:, None]
    ce_a = torch.where(valid, -lp.gather(1, safe)[:, 0], 0.0)
    ce_b = torch.where(valid, -lq.gather(1, safe)[:, 0], 0.0)
    return (ce_a, ce_b, (p * (lp - lq)).sum(-1), (q * (lq - lp)).sum(-1),
            -(p * lp).sum(-1), -(q * lq).sum(-1))


def truth_stats(pr: Problem):
    p64 = as_float64(pr)
    return reference_two_view_stats(p64.h_a, p64.h_b, p64.weight, p64.labels, p64.bias,
                                     p64.temperature, p64.softcap), p64


def grads_of(stats, leaves, upstream):
    total = sum((s.to(u.dtype) * u).sum() for s, u in zip(stats, upstream))
    return torch.autograd.grad(total, leaves, allow_unused=True)


def assert_within_rule(ours, truth, baseline, *, atol, rtol, name):
    """CCE's accuracy rule: |ours − truth| ≤ |same-dtype PyTorch − truth| + atol + rtol·|truth|."""
    ours, truth, baseline = ours.detach().double(), truth.detach().double(), baseline.detach().double()
    err = (ours - truth).abs()
    bound = (baseline - truth).abs() + atol + rtol * truth.abs()
    worst = (err - bound).max()
    assert bool(torch.isfinite(ours).all()), f"{name}: non-finite values"
    assert worst <= 0, (f"{name}: error exceeds the rule by {float(worst):.3e} "
                        f"(max err {float(err.max()):.3e}, max baseline err "
                        f"{float((baseline - truth).abs().max()):.3e})")
