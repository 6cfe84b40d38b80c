"""TwoViewLoss parity features against float64 truths written with torch.nn.functional:
reduction="none" in the labels' shape, label smoothing, z-loss and the returned
log-sum-exp, the generalised JSD(β) divergence, and token accuracy."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pcr_fast import TwoViewLoss
from pcr_fast.stats import two_view_jsd

BACKENDS = ["torch", "triton", "triton_chunked", "reference"]


def _problem(b=3, t=7, d=12, v=90, dtype=torch.float32):
    h_a = (torch.randn(b, t, d) * 1.5).to(dtype).requires_grad_()
    h_b = (h_a.detach() + 0.8 * torch.randn(b, t, d)).to(dtype).requires_grad_()
    w = (torch.randn(v, d) / 2).to(dtype).requires_grad_()
    y = torch.randint(0, v, (b, t))
    y[:, :2] = -100
    return h_a, h_b, w, y


def _truth(h_a, h_b, w, y, *, ce_weight=1.0, label_smoothing=0.0, z_loss=0.0, divergence="kl", jsd_beta=0.5,
           divergence_weight=1.0, margin=3.0, reduction="mean"):
    h_a, h_b, w = (t.detach().double().requires_grad_() for t in (h_a, h_b, w))
    z_a, z_b = h_a @ w.T, h_b @ w.T
    lp, lq = F.log_softmax(z_a, -1), F.log_softmax(z_b, -1)
    lab = (y != -100).double()
    ce = F.cross_entropy(z_a.flatten(0, 1), y.flatten(), reduction="none", label_smoothing=label_smoothing)
    ce = ce.view(y.shape)
    per = ce_weight * ce + z_loss * torch.logsumexp(z_a, -1).square() * lab
    if divergence == "kl":
        div = F.kl_div(lq, lp, log_target=True, reduction="none").sum(-1)
    else:
        log_m = torch.log(jsd_beta * lp.exp() + (1 - jsd_beta) * lq.exp())
        div = (jsd_beta * F.kl_div(log_m, lp, log_target=True, reduction="none").sum(-1)
               + (1 - jsd_beta) * F.kl_div(log_m, lq, log_target=True, reduction="none").sum(-1))
    per = per + divergence_weight * torch.relu(margin - div) * lab
    if reduction == "none":
        loss = per
    elif reduction == "sum":
        loss = per.sum()
    else:
        loss = per.sum() / lab.sum()
    return loss, (h_a, h_b, w), z_a


def _compare(out_loss, truth, leaves, leaves64, rtol=1e-5):
    torch.testing.assert_close(out_loss.double(), truth.detach(), rtol=rtol, atol=1e-6)
    up = torch.randn(truth.shape, dtype=torch.float64)
    g = torch.autograd.grad((out_loss * up.to(out_loss.dtype)).sum(), leaves)
    gt = torch.autograd.grad((truth * up).sum(), leaves64)
    for o, t in zip(g, gt):
        scale = t.abs().max()
        torch.testing.assert_close(o.double() / scale, t / scale, rtol=rtol, atol=2e-5)


def _dt(backend):
    return torch.float64 if backend == "reference" else torch.float32


@pytest.mark.parametrize("backend", BACKENDS)
def test_reduction_none_keeps_the_labels_shape(backend):
    h_a, h_b, w, y = _problem(dtype=_dt(backend))
    out = TwoViewLoss(reduction="none", backend=backend)(h_a, h_b, w, y)
    assert out.loss.shape == y.shape and out.lse.shape == y.shape
    truth, leaves64, _ = _truth(h_a, h_b, w, y, reduction="none")
    _compare(out.loss, truth, [h_a, h_b, w], leaves64)


@pytest.mark.parametrize("backend", BACKENDS)
def test_label_smoothing_and_z_loss(backend):
    h_a, h_b, w, y = _problem(dtype=_dt(backend))
    loss_fn = TwoViewLoss(label_smoothing=0.15, z_loss=2e-3, backend=backend)
    out = loss_fn(h_a, h_b, w, y)
    truth, leaves64, z_a = _truth(h_a, h_b, w, y, label_smoothing=0.15, z_loss=2e-3)
    _compare(out.loss, truth, [h_a, h_b, w], leaves64)
    lse = torch.logsumexp(z_a, -1).detach()
    torch.testing.assert_close(out.lse.double(), lse, rtol=1e-5, atol=1e-6)
    lab = (y != -100).double()
    torch.testing.assert_close(out.z_loss.double(), (2e-3 * lse.square() * lab).sum() / lab.sum(), rtol=1e-5, atol=1e-8)
    assert "z_loss" in out.log_dict()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("beta", [0.5, 0.2])
def test_generalised_jsd_divergence(backend, beta):
    h_a, h_b, w, y = _problem(dtype=_dt(backend))
    out = TwoViewLoss(divergence="jsd", jsd_beta=beta, margin=1.0, backend=backend)(h_a, h_b, w, y)
    truth, leaves64, _ = _truth(h_a, h_b, w, y, divergence="jsd", jsd_beta=beta, margin=1.0)
    _compare(out.loss, truth, [h_a, h_b, w], leaves64)


def test_two_view_jsd_refuses_beta_outside_the_open_interval():
    h_a, h_b, w, _ = _problem()
    for beta in (0.0, 1.0, -0.1, True):
        with pytest.raises(ValueError, match="beta"):
            two_view_jsd(h_a, h_b, w, beta=beta)
    with pytest.raises(ValueError, match="jsd_beta"):
        TwoViewLoss(divergence="jsd", jsd_beta=1.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_accuracy(backend):
    h_a, h_b, w, y = _problem(dtype=_dt(backend))
    y = torch.where(y == -100, y, (h_a.detach().double() @ w.detach().double().T).argmax(-1))   # all correct ...
    y[0, 3] = (y[0, 3] + 1) % w.shape[0]                                                         # ... but one
    out = TwoViewLoss(backend=backend)(h_a, h_b, w, y)
    lab = int((y != -100).sum())
    torch.testing.assert_close(out.accuracy.double(), torch.tensor((lab - 1) / lab, dtype=torch.float64))


def test_fused_chunked_path_returns_the_same_extras():
    """triton_chunked takes the compute-minimal path for a scalar loss: its accuracy and
    lse must equal the regular path's."""
    h_a, h_b, w, y = _problem()
    fused = TwoViewLoss(backend="triton_chunked")(h_a, h_b, w, y)
    regular = TwoViewLoss(backend="torch")(h_a, h_b, w, y)
    torch.testing.assert_close(fused.lse, regular.lse, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused.accuracy, regular.accuracy)
    torch.testing.assert_close(fused.loss, regular.loss, rtol=1e-5, atol=1e-6)
