"""The float64 reference itself, checked against ``torch.nn.functional`` in every mode.

Every backend is judged against :mod:`pcr_fast.backends.reference`; a wrong reference would
hide behind itself (the accuracy rule tolerates |same-dtype torch − truth|). So here the
reference is compared with independent implementations: ``F.cross_entropy``, ``F.kl_div``
(log targets), ``torch.distributions.Categorical(...).entropy()``, ``torch.logsumexp`` —
values and gradients, with bias, softcap, temperature, ignored labels, detach_b.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Categorical

from pcr_fast.backends.reference import (reference_single_view_stats, reference_two_view_stats,
                                         reference_view_extras)

MODES = {
    "plain": dict(),
    "bias": dict(bias=True),
    "softcap": dict(softcap=5.0),
    "temperature": dict(temperature=0.6),
    "all": dict(bias=True, softcap=7.0, temperature=1.7),
}


def _inputs(n, d, v, ignore_frac, bias=False, **_):
    h_a = torch.randn(n, d, dtype=torch.float64, requires_grad=True)
    h_b = (h_a.detach() + 0.6 * torch.randn(n, d, dtype=torch.float64)).requires_grad_()
    w = (torch.randn(v, d, dtype=torch.float64) * 0.8).requires_grad_()
    b = (torch.randn(v, dtype=torch.float64) * 0.5).requires_grad_() if bias else None
    labels = torch.randint(0, v, (n,))
    if ignore_frac >= 1:
        labels[:] = -100
    elif ignore_frac > 0:
        labels[torch.rand(n) < ignore_frac] = -100
    return h_a, h_b, w, b, labels


def _functional_logits(h, w, b, softcap, temperature):
    z = F.linear(h, w, b)
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z / temperature


def _functional_stats(h_a, h_b, w, b, labels, softcap, temperature, detach_b):
    z_a = _functional_logits(h_a, w, b, softcap, temperature)
    z_b = _functional_logits(h_b, w, b, softcap, temperature)
    if detach_b:
        z_b = z_b.detach()
    lp, lq = F.log_softmax(z_a, -1), F.log_softmax(z_b, -1)
    ce_a = F.cross_entropy(z_a, labels, ignore_index=-100, reduction="none")
    ce_b = F.cross_entropy(z_b, labels, ignore_index=-100, reduction="none")
    kl_ab = F.kl_div(lq, lp, log_target=True, reduction="none").sum(-1)   # KL(p_a || p_b)
    kl_ba = F.kl_div(lp, lq, log_target=True, reduction="none").sum(-1)
    return ce_a, ce_b, kl_ab, kl_ba, Categorical(logits=z_a).entropy(), Categorical(logits=z_b).entropy()


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("ignore_frac", [0.0, 0.4, 1.0])
@pytest.mark.parametrize("detach_b", [False, True])
def test_two_view_reference_matches_torch_functional(mode, ignore_frac, detach_b):
    opts = MODES[mode]
    softcap, temperature = opts.get("softcap"), opts.get("temperature", 1.0)
    h_a, h_b, w, b, labels = _inputs(13, 9, 41, ignore_frac, **opts)
    ours = reference_two_view_stats(h_a, h_b, w, labels, b, temperature, softcap, -100, detach_b=detach_b)
    theirs = _functional_stats(h_a, h_b, w, b, labels, softcap, temperature, detach_b)
    for o, t in zip(ours, theirs):
        torch.testing.assert_close(o, t, rtol=1e-10, atol=1e-12)
    leaves = [x for x in (h_a, h_b, w, b) if x is not None]
    up = [torch.randn(13, dtype=torch.float64) for _ in range(6)]
    g_ours = torch.autograd.grad(sum((o * u).sum() for o, u in zip(ours, up)), leaves, allow_unused=True)
    g_theirs = torch.autograd.grad(sum((t * u).sum() for t, u in zip(theirs, up)), leaves, allow_unused=True)
    for go, gt in zip(g_ours, g_theirs):
        if gt is None:
            assert go is None or torch.all(go == 0)
        else:
            torch.testing.assert_close(go, gt, rtol=1e-9, atol=1e-11)
    if detach_b:
        assert g_ours[1] is None or torch.all(g_ours[1] == 0)


@pytest.mark.parametrize("mode", list(MODES))
def test_single_view_reference_and_extras_match_torch(mode):
    opts = MODES[mode]
    softcap, temperature = opts.get("softcap"), opts.get("temperature", 1.0)
    h, _, w, b, labels = _inputs(17, 6, 33, 0.3, **opts)
    ce, lse, ent, mean, amax = reference_single_view_stats(h, w, labels, b, temperature, softcap)
    z = _functional_logits(h, w, b, softcap, temperature)
    torch.testing.assert_close(ce, F.cross_entropy(z, labels, reduction="none"))
    torch.testing.assert_close(lse, torch.logsumexp(z, -1))
    torch.testing.assert_close(ent, Categorical(logits=z).entropy())
    torch.testing.assert_close(mean, z.mean(-1))
    assert torch.equal(amax, z.argmax(-1))
    lse2, mean2, amax2 = reference_view_extras(h, w, b, temperature, softcap)
    torch.testing.assert_close(lse2, lse)
    torch.testing.assert_close(mean2, mean)
    assert torch.equal(amax2, amax)
    # label smoothing composes from (ce, lse, mean): (1-e)·ce + e·(lse − mean) = F's smoothed CE
    eps = 0.2
    smooth = torch.where(labels != -100, (1 - eps) * ce + eps * (lse - mean), torch.zeros_like(ce))
    torch.testing.assert_close(smooth, F.cross_entropy(z, labels, reduction="none", label_smoothing=eps))
