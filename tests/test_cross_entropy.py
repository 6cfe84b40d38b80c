"""fused_linear_cross_entropy against ``F.cross_entropy`` on float64 logits, every backend,
dtype and mode (reduction, label smoothing, z-loss, bias, softcap, temperature,
num_items_in_batch, ignored tokens), values and gradients; and single_view_stats."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import pcr_fast
from pcr_fast import fused_linear_cross_entropy
from pcr_fast.stats import SingleViewStats, single_view_stats
from _two_view_utils import assert_within_rule

BACKENDS = ["torch", "triton", "triton_chunked", "reference"]
TOL = {torch.float32: dict(atol=2e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=1e-2),
       torch.float16: dict(atol=5e-3, rtol=5e-3), torch.float64: dict(atol=1e-10, rtol=1e-10)}


def _problem(b, t, d, v, dtype, bias=False, ignore_frac=0.3, scale=2.0):
    h = (torch.randn(b, t, d) * scale / d ** 0.25).to(dtype).requires_grad_()
    w = (torch.randn(v, d) / d ** 0.25).to(dtype).requires_grad_()
    bb = (torch.randn(v) * 0.5).to(dtype).requires_grad_() if bias else None
    y = torch.randint(0, v, (b, t))
    if ignore_frac >= 1:
        y[:] = -100
    elif ignore_frac > 0:
        y[torch.rand(b, t) < ignore_frac] = -100
    return h, w, bb, y


def _f64(*ts):
    return [None if t is None else t.detach().double().requires_grad_() for t in ts]


def _truth(h, w, b, y, *, softcap=None, temperature=1.0, label_smoothing=0.0, z_loss=0.0, reduction="mean",
           num_items_in_batch=None, same_dtype=False):
    """F.cross_entropy (+ z-loss) on float64 logits (or on the input-dtype logits, upcast: the
    same-dtype baseline of the accuracy rule)."""
    if same_dtype:
        z = F.linear(h, w, b).float()
    else:
        z = F.linear(h.double(), w.double(), None if b is None else b.double())
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    z = z / temperature
    red = "sum" if num_items_in_batch is not None else reduction
    per = F.cross_entropy(z.flatten(0, -2), y.flatten(), ignore_index=-100, reduction="none",
                          label_smoothing=label_smoothing)
    if z_loss:
        per = per + torch.where(y.flatten() != -100, z_loss * torch.logsumexp(z.flatten(0, -2), -1).square(), 0.0)
    if red == "none":
        return per.view(y.shape)
    if red == "sum":
        out = per.sum()
        return out / num_items_in_batch if num_items_in_batch is not None else out
    return per.sum() / (y != -100).sum()


MODES = {
    "mean": dict(),
    "sum": dict(reduction="sum"),
    "none": dict(reduction="none"),
    "smoothing": dict(label_smoothing=0.1),
    "z_loss": dict(z_loss=1e-3),
    "softcap_temp_bias": dict(softcap=6.0, temperature=1.4, bias=True),
    "all": dict(label_smoothing=0.2, z_loss=1e-2, softcap=9.0, bias=True, reduction="none"),
    "num_items": dict(num_items_in_batch=17),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", list(MODES))
def test_matches_functional_cross_entropy_fp32(backend, mode):
    opts = dict(MODES[mode])
    bias = opts.pop("bias", False)
    h, w, b, y = _problem(3, 13, 24, 501, torch.float32, bias=bias)
    ours = fused_linear_cross_entropy(h, w, y, bias=b, backend=backend, **opts)
    h64, w64, b64 = _f64(h, w, b)
    truth = _truth(h64, w64, b64, y, **opts)
    assert ours.shape == truth.shape and ours.dtype == torch.float32
    torch.testing.assert_close(ours.double(), truth.detach(), atol=2e-5, rtol=1e-5)
    leaves = [x for x in (h, w, b) if x is not None]
    up = torch.randn(truth.shape, dtype=torch.float64)
    g = torch.autograd.grad((ours * up.float()).sum(), leaves)
    gt = torch.autograd.grad((truth * up).sum(), [x for x in (h64, w64, b64) if x is not None])
    for o, t in zip(g, gt):
        scale = t.abs().max()
        torch.testing.assert_close(o.double() / scale, t / scale, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("mode", ["mean", "all"])
def test_half_precision_within_the_accuracy_rule(backend, dtype, mode):
    """|ours − truth| ≤ |same-dtype PyTorch − truth| + atol + rtol·|truth| (CCE's rule)."""
    opts = dict(MODES[mode])
    bias = opts.pop("bias", False)
    h, w, b, y = _problem(2, 17, 32, 333, dtype, bias=bias)
    ours = fused_linear_cross_entropy(h, w, y, bias=b, backend=backend, **opts)
    h64, w64, b64 = _f64(h, w, b)
    truth = _truth(h64, w64, b64, y, **opts)
    base = _truth(h, w, b, y, same_dtype=True, **opts)
    assert_within_rule(ours, truth, base, name=f"{backend}/loss", **TOL[dtype])
    leaves = [x for x in (h, w, b) if x is not None]
    up = torch.randn(truth.shape)
    g = torch.autograd.grad((ours * up).sum(), leaves)
    gt = torch.autograd.grad((truth * up.double()).sum(), [x for x in (h64, w64, b64) if x is not None])
    gb = torch.autograd.grad((base * up).sum(), leaves)
    for name, o, t, bb in zip(("h", "weight", "bias"), g, gt, gb):
        scale = t.abs().max()
        assert_within_rule(o / scale, t / scale, bb / scale, name=f"{backend}/d_{name}", **TOL[dtype])


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_float64_is_exact(backend):
    h, w, b, y = _problem(2, 7, 6, 29, torch.float64, bias=True)
    ours = fused_linear_cross_entropy(h, w, y, bias=b, label_smoothing=0.3, z_loss=0.01, softcap=4.0, backend=backend)
    truth = _truth(h, w, b, y, label_smoothing=0.3, z_loss=0.01, softcap=4.0)
    torch.testing.assert_close(ours, truth, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(
        lambda hh, ww, bb: fused_linear_cross_entropy(hh, ww, y, bias=bb, label_smoothing=0.3, z_loss=0.01,
                                                      softcap=4.0, backend=backend),
        (h.detach().requires_grad_(), w.detach().requires_grad_(), b.detach().requires_grad_()), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "triton", "triton_chunked"])
def test_ignored_tokens(backend):
    h, w, _, y = _problem(2, 9, 16, 77, torch.float32, ignore_frac=1.0)
    assert torch.isnan(fused_linear_cross_entropy(h, w, y, backend=backend))   # as F.cross_entropy: 0/0
    total = fused_linear_cross_entropy(h, w, y, reduction="sum", backend=backend)
    assert float(total) == 0.0
    (g,) = torch.autograd.grad(total, [h])
    assert torch.all(g == 0)
    per = fused_linear_cross_entropy(h, w, y, reduction="none", label_smoothing=0.5, z_loss=1.0, backend=backend)
    assert per.shape == (2, 9) and torch.all(per == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_aux_outputs(backend):
    h, w, b, y = _problem(2, 11, 20, 60, torch.float32, bias=True, scale=6.0)
    out = fused_linear_cross_entropy(h, w, y, bias=b, z_loss=1e-2, backend=backend, return_aux=True)
    z = F.linear(h.double(), w.double(), b.double())
    torch.testing.assert_close(out.lse.double(), torch.logsumexp(z, -1).detach(), atol=2e-5, rtol=1e-5)
    assert out.lse.shape == (2, 11) and out.predictions.shape == (2, 11)
    assert torch.equal(out.predictions, z.argmax(-1))
    valid = y != -100
    assert int(out.num_tokens) == int(valid.sum())
    acc = ((z.argmax(-1) == y) & valid).sum() / valid.sum()
    torch.testing.assert_close(out.accuracy.double(), acc.double())
    zl = (torch.logsumexp(z, -1).square() * valid).sum() / valid.sum() * 1e-2
    torch.testing.assert_close(out.z_loss.double(), zl.detach(), rtol=1e-5, atol=1e-7)
    assert not out.accuracy.requires_grad and not out.z_loss.requires_grad
    torch.testing.assert_close(out.loss, fused_linear_cross_entropy(h, w, y, bias=b, z_loss=1e-2, backend=backend))


def test_exported_and_leading_dims():
    assert pcr_fast.fused_linear_cross_entropy is fused_linear_cross_entropy
    h, w, _, y = _problem(2, 3, 8, 19, torch.float32)
    h4 = h.detach().view(2, 3, 1, 8)
    per = fused_linear_cross_entropy(h4, w.detach(), y.view(2, 3, 1), reduction="none")
    assert per.shape == (2, 3, 1)


@pytest.mark.parametrize("kwargs, arg", [
    (dict(label_smoothing=1.5), "label_smoothing"),
    (dict(label_smoothing=-0.1), "label_smoothing"),
    (dict(z_loss=-1.0), "z_loss"),
    (dict(z_loss=float("nan")), "z_loss"),
    (dict(reduction="avg"), "reduction"),
    (dict(num_items_in_batch=0), "num_items_in_batch"),
    (dict(num_items_in_batch=5, reduction="sum"), "num_items_in_batch"),
    (dict(num_items_in_batch=torch.ones(2)), "num_items_in_batch"),
    (dict(temperature=0.0), "temperature"),
    (dict(softcap=0.0), "softcap"),
    (dict(backend="fast"), "backend"),
    (dict(bias=torch.zeros(3)), "bias"),
])
def test_bad_arguments_raise_value_error_naming_them(kwargs, arg):
    h, w, _, y = _problem(1, 4, 8, 10, torch.float32)
    with pytest.raises(ValueError, match=arg):
        fused_linear_cross_entropy(h, w, y, **kwargs)
    with pytest.raises(ValueError, match="labels"):
        fused_linear_cross_entropy(h, w, y[:, :2])


# ------------------------------------------------------------------ single_view_stats
@pytest.mark.parametrize("backend", BACKENDS)
def test_single_view_stats_match_the_reference(backend):
    h, w, b, y = _problem(1, 29, 16, 700, torch.float32, bias=True, scale=3.0)
    h2, y2 = h.view(29, 16), y.view(29)
    st = single_view_stats(h2, w, y2, bias=b, softcap=11.0, temperature=0.8, backend=backend, chunk_size=8)
    assert isinstance(st, SingleViewStats)
    ref = single_view_stats(h2.detach().double(), w.detach().double(), y2, bias=b.detach().double(), softcap=11.0,
                            temperature=0.8, backend="reference")
    for name, o, t in zip(SingleViewStats._fields, st, ref):
        if name == "argmax":
            assert torch.equal(o, t)
        else:
            torch.testing.assert_close(o.double(), t, atol=2e-5, rtol=1e-5, msg=name)
    up = [torch.randn(29) for _ in range(4)]
    g = torch.autograd.grad(sum((s * u).sum() for s, u in zip(st[:4], up)), [h, w, b])
    leaves = [t.detach().double().requires_grad_() for t in (h2, w, b)]
    ref = single_view_stats(leaves[0], leaves[1], y2, bias=leaves[2], softcap=11.0, temperature=0.8,
                            backend="reference")
    gt = torch.autograd.grad(sum((s * u.double()).sum() for s, u in zip(ref[:4], up)), leaves)
    for o, t in zip(g, gt):
        scale = t.abs().max()
        torch.testing.assert_close(o.double().view_as(t) / scale, t / scale, atol=2e-5, rtol=1e-5)


def test_single_view_runs_the_matmul_once(monkeypatch):
    """The single-view path must not compute view b (the old way: two_view_stats(h, h.detach()))."""
    import pcr_fast.backends.triton as bt

    calls = []
    real = bt.library_logits

    def counting(h, *a, **k):
        calls.append(h.shape[0])
        return real(h, *a, **k)

    monkeypatch.setattr(bt, "library_logits", counting)
    h, w, _, y = _problem(1, 40, 16, 300, torch.float32)
    single_view_stats(h.view(40, 16), w, y.view(40), backend="triton_chunked").ce.sum().backward()
    assert sum(calls) == 2 * 40   # forward once, backward once: one view
