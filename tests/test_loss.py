"""TwoViewLoss: the PCR objective composed from the statistics, against a float64 truth."""
from __future__ import annotations

import pytest
import torch

from pcr_fast import TwoViewLoss, two_view_loss
from pcr_fast.backends.reference import reference_two_view_stats
from _two_view_utils import as_float64, make_problem

BACKENDS = ["torch", "triton", "triton_chunked"]


def manual_objective(pr, *, ce_weight=1.0, divergence="kl", divergence_weight=1.0, margin=3.0,
                     divergence_form="hinge", entropy_weight=0.0, entropy_view="a",
                     entropy_target=None, entropy_form=None, reduction="mean", num_items=None):
    """The objective written out in float64 from the reference statistics."""
    p = as_float64(pr)
    ce_a, ce_b, kl_ab, kl_ba, ent_a, ent_b = reference_two_view_stats(
        p.h_a, p.h_b, p.weight, p.labels, p.bias, p.temperature, p.softcap)
    lab = (p.labels != -100).double()
    d = {"kl": kl_ab, "reverse_kl": kl_ba, "symmetric_kl": kl_ab + kl_ba}[divergence]
    if margin is None:
        phi = -d
    elif divergence_form == "hinge":
        phi = torch.clamp(margin - d, min=0)
    else:
        phi = -torch.clamp(d, max=margin)
    h = {"a": ent_a, "b": ent_b, "both": ent_a + ent_b}[entropy_view]
    form = entropy_form or ("linear" if entropy_target is None else "below")
    psi = {"linear": lambda: h, "below": lambda: torch.clamp(h - entropy_target, min=0),
           "above": lambda: torch.clamp(entropy_target - h, min=0),
           "square": lambda: (h - (entropy_target or 0.0)) ** 2}[form]()
    per = ce_weight * ce_a + (divergence_weight * phi + entropy_weight * psi) * lab
    if reduction == "none":
        return per, p
    if reduction == "sum":
        return per.sum(), p
    den = num_items if num_items is not None else lab.sum().clamp_min(1)
    return per.sum() / den, p


CONFIGS = [
    dict(),
    dict(divergence="reverse_kl", margin=1.5, entropy_weight=0.3),
    dict(divergence="symmetric_kl", divergence_form="clip", margin=2.0, entropy_weight=0.2, entropy_view="b",
         entropy_target=1.0, entropy_form="above"),
    dict(margin=None, divergence_weight=0.1, entropy_weight=0.5, entropy_view="both", entropy_target=2.0,
         entropy_form="square", ce_weight=0.7),
    dict(entropy_weight=0.4, entropy_target=0.5),  # "below" by default with a target
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "default")
def test_objective_and_grads_match_float64(backend, cfg):
    pr = make_problem(31, 24, 777, ignore_frac=0.3, scale=1.5)
    out = TwoViewLoss(backend=backend, **cfg)(pr.h_a, pr.h_b, pr.weight, pr.labels)
    truth, p64 = manual_objective(pr, **cfg)
    assert out.loss.shape == ()
    assert torch.allclose(out.loss.double(), truth, rtol=1e-5, atol=1e-5)
    g = torch.autograd.grad(out.loss, [pr.h_a, pr.h_b, pr.weight])
    gt = torch.autograd.grad(truth, [p64.h_a, p64.h_b, p64.weight])
    for name, a, b in zip(["h_a", "h_b", "weight"], g, gt):
        scale = b.abs().max().clamp_min(1e-8)
        assert ((a.double() - b).abs().max() / scale) < 1e-4, name


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_sum_and_none_reductions_with_random_upstream(reduction):
    pr = make_problem(26, 20, 501, ignore_frac=0.3)
    cfg = dict(entropy_weight=0.2, divergence="symmetric_kl", reduction=reduction)
    out = TwoViewLoss(backend="triton", **cfg)(pr.h_a, pr.h_b, pr.weight, pr.labels)
    truth, p64 = manual_objective(pr, **cfg)
    assert out.loss.shape == truth.shape
    up = torch.randn(truth.shape)
    g = torch.autograd.grad(out.loss, [pr.h_a, pr.weight], up)
    gt = torch.autograd.grad(truth, [p64.h_a, p64.weight], up.double())
    assert torch.allclose(out.loss.double(), truth, rtol=1e-5, atol=1e-5)
    for a, b in zip(g, gt):
        assert ((a.double() - b).abs().max() / b.abs().max()) < 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_accumulation_equivalence(backend):
    """Two half-batches with num_items_in_batch == one full batch (HF Trainer convention)."""
    pr = make_problem(40, 16, 300, ignore_frac=0.4)
    loss_fn = TwoViewLoss(backend=backend, entropy_weight=0.1)
    full = loss_fn(pr.h_a, pr.h_b, pr.weight, pr.labels).loss
    g_full = torch.autograd.grad(full, [pr.weight])[0]
    total = (pr.labels != -100).sum()
    halves, g_acc = 0.0, torch.zeros_like(pr.weight)
    for sl in (slice(0, 17), slice(17, 40)):
        part = loss_fn(pr.h_a[sl], pr.h_b[sl], pr.weight, pr.labels[sl], num_items_in_batch=total).loss
        g_acc += torch.autograd.grad(part, [pr.weight])[0]
        halves = halves + part.detach()
    assert torch.allclose(halves, full.detach(), rtol=1e-5, atol=1e-6)
    assert torch.allclose(g_acc, g_full, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_ignored_batch_gives_zero_not_nan(backend):
    pr = make_problem(12, 16, 200, ignore_frac=1.0)
    out = TwoViewLoss(backend=backend, entropy_weight=0.5)(pr.h_a, pr.h_b, pr.weight, pr.labels)
    assert out.loss.item() == 0.0 and torch.isfinite(out.ce) and torch.isfinite(out.divergence)
    out.loss.backward()
    assert torch.all(pr.h_a.grad == 0) and torch.all(pr.weight.grad == 0)


def test_hinge_gives_no_divergence_gradient_beyond_margin():
    pr = make_problem(10, 16, 300, ignore_frac=0.0, scale=6.0)  # very different views: KL large
    kl = TwoViewLoss(backend="torch")(pr.h_a, pr.h_b, pr.weight, pr.labels).stats.kl_ab
    margin = float(kl.min()) * 0.5  # every row is beyond the margin
    loss_fn = TwoViewLoss(ce_weight=0.0, divergence_weight=1.0, margin=margin, backend="torch")
    out = loss_fn(pr.h_a, pr.h_b, pr.weight, pr.labels)
    assert bool((out.stats.kl_ab > margin).all())
    g = torch.autograd.grad(out.loss, [pr.h_a], allow_unused=True)[0]
    assert g is None or torch.all(g == 0)
    # and inside the margin the divergence is pushed up (gradient ascent on KL)
    loss_fn2 = TwoViewLoss(ce_weight=0.0, divergence_weight=1.0, margin=1e6, backend="torch")
    kl_before = loss_fn2(pr.h_a, pr.h_b, pr.weight, pr.labels).divergence
    out2 = loss_fn2(pr.h_a, pr.h_b, pr.weight, pr.labels)
    g2 = torch.autograd.grad(out2.loss, [pr.h_a])[0]
    kl_after = loss_fn2(pr.h_a - 0.05 * g2, pr.h_b, pr.weight, pr.labels).divergence
    assert kl_after > kl_before


def test_regularize_all_with_token_mask_and_logging_values():
    pr = make_problem(20, 16, 100, ignore_frac=0.5)
    mask = torch.rand(20) < 0.7
    loss_fn = TwoViewLoss(regularize="all", entropy_weight=0.2, backend="torch")
    out = loss_fn(pr.h_a, pr.h_b, pr.weight, pr.labels, token_mask=mask)
    s = out.stats
    lab = (pr.labels != -100).float()
    m = mask.float()
    expect = (s.ce_a.sum() / lab.sum() + ((torch.clamp(3.0 - s.kl_ab, min=0) + 0.2 * s.ent_a) * m).sum() / m.sum())
    assert torch.allclose(out.loss.detach(), expect, rtol=1e-5)
    assert torch.allclose(out.divergence, (s.kl_ab * m).sum() / m.sum())
    assert not out.ce.requires_grad and not out.divergence.requires_grad
    assert set(out.log_dict("pcr/")) == {"pcr/ce", "pcr/divergence", "pcr/divergence_term", "pcr/entropy"}


def test_functional_form_and_3d_inputs():
    pr = make_problem(2 * 9, 16, 120)
    a = two_view_loss(pr.h_a.view(2, 9, 16), pr.h_b.view(2, 9, 16), pr.weight, pr.labels.view(2, 9),
                      backend="torch", entropy_weight=0.1)
    b = TwoViewLoss(backend="torch", entropy_weight=0.1)(pr.h_a, pr.h_b, pr.weight, pr.labels)
    assert torch.allclose(a.loss, b.loss)


def test_detach_view_b_sends_no_gradient_to_h_b():
    pr = make_problem(10, 16, 100)
    out = TwoViewLoss(detach_b=True, backend="triton")(pr.h_a, pr.h_b, pr.weight, pr.labels)
    g = torch.autograd.grad(out.loss, [pr.h_a, pr.h_b], allow_unused=True)
    assert g[0] is not None and g[1] is None


@pytest.mark.parametrize("kwargs, name", [
    (dict(divergence="js"), "divergence"),
    (dict(divergence_form="soft"), "divergence_form"),
    (dict(entropy_view="c"), "entropy_view"),
    (dict(reduction="avg"), "reduction"),
    (dict(margin=-1.0), "margin"),
    (dict(entropy_form="above"), "entropy_target"),
    (dict(regularize="some"), "regularize"),
])
def test_bad_options_raise_value_error(kwargs, name):
    with pytest.raises(ValueError, match=name):
        TwoViewLoss(**kwargs)


def test_token_mask_shape_is_checked():
    pr = make_problem(6, 8, 20)
    with pytest.raises(ValueError, match="token_mask"):
        TwoViewLoss(regularize="all", backend="torch")(pr.h_a, pr.h_b, pr.weight, pr.labels,
                                                       token_mask=torch.ones(5, dtype=torch.bool))


def test_triton_chunked_scalar_loss_takes_the_compute_minimal_path(monkeypatch):
    """Scalar objective + triton_chunked: gradients are formed in the forward (no recompute)."""
    from pcr_fast.backends import triton as triton_function

    calls = {"objective": 0, "stats_backward": 0}
    real_apply = triton_function.TritonChunkedObjective.apply
    real_bwd = triton_function.chunk_grad_in_place

    def spy_apply(*a):
        calls["objective"] += 1
        return real_apply(*a)

    monkeypatch.setattr(triton_function.TritonChunkedObjective, "apply", spy_apply)
    pr = make_problem(30, 16, 400, ignore_frac=0.2)
    loss_fn = TwoViewLoss(backend="triton_chunked", entropy_weight=0.2, chunk_size=7)
    out = loss_fn(pr.h_a, pr.h_b, pr.weight, pr.labels)
    assert calls["objective"] == 1
    n_grad_kernels = {"n": 0}

    def spy_bwd(*a, **k):
        n_grad_kernels["n"] += 1
        return real_bwd(*a, **k)

    monkeypatch.setattr(triton_function, "chunk_grad_in_place", spy_bwd)
    g = torch.autograd.grad(out.loss * 2.0, [pr.h_a, pr.weight])
    assert n_grad_kernels["n"] == 0  # the backward only scales stored gradients
    ref = TwoViewLoss(backend="torch", entropy_weight=0.2)(pr.h_a, pr.h_b, pr.weight, pr.labels)
    gr = torch.autograd.grad(ref.loss * 2.0, [pr.h_a, pr.weight])
    assert torch.allclose(out.loss, ref.loss, rtol=1e-5)
    for a, b in zip(g, gr):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


def _gate_truth(pr, b, t, lam, tau, kappa):
    """The cross-view gate written out in float64 from the reference statistics."""
    p = as_float64(pr)
    ce_a, ce_b, kl_ab, kl_ba, _, _ = reference_two_view_stats(p.h_a, p.h_b, p.weight, p.labels, None, 1.0, None)
    lab = (p.labels != -100).view(b, t)
    total = ce_a.sum()
    flags = []
    for r in range(b):
        idx = lab[r].nonzero().flatten()
        if len(idx) == 0:
            flags.append(False)
            continue
        sym = (kl_ab + kl_ba).view(b, t)[r, idx]
        cb = ce_b.view(b, t)[r, idx].detach()
        flag = bool(sym.max() < tau) and bool(cb.max() < kappa)
        flags.append(flag)
        if flag:
            star = idx[cb.argmax()]
            c = ce_a.view(b, t)[r, star]
            total = total + lam * -torch.log(1 - torch.exp(-c))
    return total / lab.sum(), flags, p


@pytest.mark.parametrize("backend", BACKENDS)
def test_cross_view_gate_matches_float64_and_flags_invariant_confident_rows(backend):
    b, t, d, v = 4, 9, 16, 60
    pr = make_problem(b * t, d, v, ignore_frac=0.3, scale=1.0)
    # rows 0 and 1: identical views (invariant) and the argmax labels (ce_b <= log V < kappa=5)
    # -> flagged;
    # row 2: different views -> not flagged; row 3: fully ignored -> never flagged.
    h_a = pr.h_a.detach().clone()
    h_b = pr.h_b.detach().clone()
    w = pr.weight.detach() * 4
    h_b[: 2 * t] = h_a[: 2 * t]
    labels = pr.labels.clone()
    labels[: 2 * t] = (h_a[: 2 * t] @ w.T).argmax(-1)  # the model's own confident answer
    labels[3 * t:] = -100
    from _two_view_utils import Problem

    prob = Problem(h_a.requires_grad_(), h_b.requires_grad_(), w.requires_grad_(), None, labels)
    loss_fn = TwoViewLoss(backend=backend, divergence_weight=0.0, gate_weight=0.7,
                          invariance_threshold=0.03, view_confidence=5.0)
    out = loss_fn(prob.h_a.view(b, t, d), prob.h_b.view(b, t, d), prob.weight, labels.view(b, t))
    truth, flags, p64 = _gate_truth(prob, b, t, 0.7, 0.03, 5.0)
    assert flags[:2] == [True, True] and flags[3] is False
    assert torch.allclose(out.gated_fraction, torch.tensor(sum(flags) / b))
    assert torch.allclose(out.loss.double(), truth, rtol=1e-5, atol=1e-6)
    g = torch.autograd.grad(out.loss, [prob.h_a, prob.weight])
    gt = torch.autograd.grad(truth, [p64.h_a, p64.weight])
    for a, c in zip(g, gt):
        assert ((a.double() - c).abs().max() / c.abs().max()) < 1e-4


def test_cross_view_gate_needs_2d_labels():
    pr = make_problem(12, 8, 30)
    with pytest.raises(ValueError, match="labels must be 2-D"):
        TwoViewLoss(gate_weight=1.0, backend="torch")(pr.h_a, pr.h_b, pr.weight, pr.labels)
    with pytest.raises(ValueError, match="gate_weight"):
        TwoViewLoss(gate_weight=-1.0)
