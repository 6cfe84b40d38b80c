"""two_view_stats: every backend against an independent float64 truth (Triton under the
interpreter on CPU), plus edge cases, strides, gradcheck and input validation."""
from __future__ import annotations

import pytest
import torch

from pcr_fast import TwoViewStats, two_view_stats
from _two_view_utils import (STAT_NAMES, as_float64, assert_within_rule, grads_of, make_problem,
                             same_dtype_stats, truth_stats)

FAST_BACKENDS = ["torch", "triton", "triton_chunked"]
TOL = {torch.float32: dict(atol=2e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=1e-2)}
GRAD_TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=1e-2)}

SHAPES = {
    "odd": (37, 23, 1001),        # nothing is a multiple of a block
    "tiny_vocab": (5, 16, 3),     # V smaller than one block
    "multi_block": (70, 40, 5000),  # V and N span several blocks
}


def _check(pr, backend, dtype, upstream=None, tol=None, grad_tol=None):
    ours = two_view_stats(pr.h_a, pr.h_b, pr.weight, pr.labels, backend=backend, chunk_size=16, **pr.kwargs())
    assert isinstance(ours, TwoViewStats)
    truth, p64 = truth_stats(pr)
    base = same_dtype_stats(pr)
    for name, o, t, b in zip(STAT_NAMES, ours, truth, base):
        assert o.dtype == torch.float32 and o.shape == pr.labels.shape
        assert_within_rule(o, t, b, name=f"{backend}/{name}", **(tol or TOL[dtype]))
    n = pr.labels.shape[0]
    up = upstream or [torch.randn(n) for _ in range(6)]
    g_ours = grads_of(ours, pr.leaves(), up)
    g_truth = grads_of(truth, p64.leaves(), [u.double() for u in up])
    g_base = grads_of(base, pr.leaves(), up)
    for name, o, t, b in zip(["d_h_a", "d_h_b", "d_weight", "d_bias"], g_ours, g_truth, g_base):
        scale = t.abs().max().clamp_min(1e-6)
        assert_within_rule(o / scale, t / scale, b / scale, name=f"{backend}/{name}", **(grad_tol or GRAD_TOL[dtype]))
    return ours, truth


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
def test_matches_float64_truth(backend, dtype, shape):
    n, d, v = SHAPES[shape]
    pr = make_problem(n, d, v, dtype=dtype, ignore_frac=0.3, scale=3.0)
    _check(pr, backend, dtype)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("ignore_frac", [0.0, 0.3, 1.0])
def test_bias_temperature_softcap_and_ignored_labels(backend, ignore_frac):
    pr = make_problem(29, 33, 777, bias=True, temperature=1.7, softcap=8.0, ignore_frac=ignore_frac, scale=4.0)
    ours, truth = _check(pr, backend, torch.float32)
    ignored = pr.labels == -100
    assert torch.all(ours.ce_a[ignored] == 0) and torch.all(ours.ce_b[ignored] == 0)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_fp32_relative_error_below_1e5(backend):
    pr = make_problem(40, 64, 2049, scale=2.0)
    ours = two_view_stats(pr.h_a, pr.h_b, pr.weight, pr.labels, backend=backend)
    truth, _ = truth_stats(pr)
    for name, o, t in zip(STAT_NAMES, ours, truth):
        rel = ((o.double() - t).abs() / t.abs().clamp_min(1e-2)).max()
        assert rel < 1e-5, f"{name}: relative error {float(rel):.2e}"


@pytest.mark.parametrize("backend", FAST_BACKENDS + ["reference"])
def test_identical_views_give_zero_kl(backend):
    pr = make_problem(33, 20, 1500, same_views=True, scale=5.0)
    out = two_view_stats(pr.h_a, pr.h_b, pr.weight, pr.labels, backend=backend)
    for kl in (out.kl_ab, out.kl_ba):
        assert kl.min() >= -1e-6, f"negative KL {float(kl.min())}"
        assert kl.abs().max() <= 1e-5
    assert torch.allclose(out.ent_a, out.ent_b) and torch.allclose(out.ce_a, out.ce_b)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_very_large_logits_do_not_overflow(backend):
    pr = make_problem(17, 24, 999, scale=400.0)  # logits in the thousands
    # fp32 logits of size ~1e3 carry ~1e-4 absolute rounding: allow 1e-4 relative on the
    # statistics; the gradients are nearly one-hot cancellations there, judged at 2e-3 of
    # their largest entry. The point of this test: no inf/NaN, no overflow.
    _check(pr, backend, torch.float32, tol=dict(atol=1e-4, rtol=1e-4), grad_tol=dict(atol=2e-3, rtol=1e-4))


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_non_contiguous_inputs_and_broadcast_upstream_grads(backend):
    n, d, v = 21, 19, 1003
    base = make_problem(n, 2 * d, v + 5, scale=2.0)
    # strided views: every other hidden column, transposed-storage weight, strided labels
    h_a = base.h_a.detach()[:, ::2].requires_grad_()
    h_b = base.h_b.detach().T.contiguous().T[:, 1::2].requires_grad_()
    w_store = torch.randn(d, v) / d ** 0.25
    weight = w_store.T.requires_grad_()  # (V, D) with strides (1, V)
    labels_store = torch.randint(0, v, (n, 2))
    labels = labels_store[:, 1]
    labels[::4] = -100
    assert not h_a.is_contiguous() and not weight.is_contiguous() and not labels.is_contiguous()
    from _two_view_utils import Problem

    pr = Problem(h_a, h_b, weight, None, labels)
    upstream = [torch.randn(1).expand(n), torch.randn(2 * n)[::2], torch.randn(n), torch.zeros(n),
                torch.randn(n), torch.randn(1).expand(n)]
    _check(pr, backend, torch.float32, upstream=upstream)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_batched_3d_inputs_flatten(backend):
    pr = make_problem(2 * 11, 16, 300)
    h3a, h3b = pr.h_a.detach().view(2, 11, 16), pr.h_b.detach().view(2, 11, 16)
    out3 = two_view_stats(h3a, h3b, pr.weight.detach(), pr.labels.view(2, 11), backend=backend)
    out2 = two_view_stats(pr.h_a.detach(), pr.h_b.detach(), pr.weight.detach(), pr.labels, backend=backend)
    for a, b in zip(out3, out2):
        assert a.shape == (22,) and torch.allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_all_ignored_gives_zero_ce_and_finite_grads(backend):
    pr = make_problem(13, 16, 500, ignore_frac=1.0)
    out = two_view_stats(pr.h_a, pr.h_b, pr.weight, pr.labels, backend=backend)
    assert torch.all(out.ce_a == 0) and torch.all(out.ce_b == 0)
    grads = torch.autograd.grad(out.ce_a.sum() + out.ce_b.sum(), [pr.h_a, pr.weight])
    for g in grads:
        assert torch.isfinite(g).all() and torch.all(g == 0)


@pytest.mark.parametrize("backend", FAST_BACKENDS + ["reference"])
def test_detach_b_stops_gradient_through_view_b(backend):
    pr = make_problem(19, 16, 401, bias=True)
    out = two_view_stats(pr.h_a, pr.h_b, pr.weight, pr.labels, bias=pr.bias, backend=backend, detach_b=True)
    up = [torch.randn(19) for _ in range(6)]
    g = grads_of(out, pr.leaves(), up)
    assert g[1] is None  # no gradient reaches h_b
    # truth, written out here: view b's logits built from detached inputs and parameters
    p64 = as_float64(pr)
    lp = torch.log_softmax(p64.h_a @ p64.weight.T + p64.bias, -1)
    lq = torch.log_softmax((p64.h_b @ p64.weight.T + p64.bias).detach(), -1)
    valid = p64.labels != -100
    y = torch.where(valid, p64.labels, 0)[:, None]
    t = (torch.where(valid, -lp.gather(1, y)[:, 0], 0.0), torch.where(valid, -lq.gather(1, y)[:, 0], 0.0),
         (lp.exp() * (lp - lq)).sum(-1), (lq.exp() * (lq - lp)).sum(-1),
         -(lp.exp() * lp).sum(-1), -(lq.exp() * lq).sum(-1))
    gt = grads_of(t, p64.leaves(), [u.double() for u in up])
    for o, tt in ((g[0], gt[0]), (g[2], gt[2]), (g[3], gt[3])):
        assert torch.allclose(o.double(), tt, atol=1e-4, rtol=1e-4)


def test_backends_agree_with_each_other():
    pr = make_problem(45, 30, 1234, bias=True, temperature=0.8, softcap=15.0, scale=3.0)
    outs = {b: two_view_stats(pr.h_a, pr.h_b, pr.weight, pr.labels, backend=b, **pr.kwargs())
            for b in FAST_BACKENDS + ["reference"]}
    ref = outs.pop("reference")
    for b, out in outs.items():
        for name, x, y in zip(STAT_NAMES, out, ref):
            assert torch.allclose(x, y, atol=1e-4, rtol=1e-5), f"{b}/{name}"


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_gradcheck_float64(backend):
    pr = as_float64(make_problem(6, 5, 11, bias=True, temperature=1.3, softcap=3.0, ignore_frac=0.3))

    def fn(h_a, h_b, w, b):
        s = two_view_stats(h_a, h_b, w, pr.labels, bias=b, temperature=1.3, softcap=3.0,
                           backend=backend, chunk_size=4)
        return tuple(s)

    assert torch.autograd.gradcheck(fn, (pr.h_a, pr.h_b, pr.weight, pr.bias), eps=1e-6, atol=1e-6)


def test_float64_outputs_are_float64_on_torch_and_reference():
    pr = as_float64(make_problem(4, 6, 10))
    for backend in ("torch", "reference"):
        assert two_view_stats(pr.h_a, pr.h_b, pr.weight, pr.labels, backend=backend).ce_a.dtype == torch.float64


def test_fp16_inputs():
    pr = make_problem(23, 32, 600, dtype=torch.float16)
    for backend in FAST_BACKENDS:
        out = two_view_stats(pr.h_a, pr.h_b, pr.weight, pr.labels, backend=backend)
        truth, _ = truth_stats(pr)
        base = same_dtype_stats(pr)
        for name, o, t, b in zip(STAT_NAMES, out, truth, base):
            assert_within_rule(o, t, b, name=f"{backend}/{name}", atol=5e-3, rtol=5e-3)


def test_torch_compile_does_not_break():
    pr = make_problem(8, 16, 64)

    def f(h_a, h_b, w):
        s = two_view_stats(h_a * 1.0, h_b, w, pr.labels, backend="auto")
        return s.ce_a.mean() - s.kl_ab.mean()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=False)
    loss = compiled(pr.h_a, pr.h_b, pr.weight)
    loss.backward()
    assert torch.isfinite(pr.h_a.grad).all()
    assert torch.allclose(loss, f(pr.h_a, pr.h_b, pr.weight))


# ---------------------------------------------------------------- input validation
def _ok():
    return torch.randn(4, 8), torch.randn(4, 8), torch.randn(10, 8), torch.randint(0, 10, (4,))


@pytest.mark.parametrize("mutate, arg", [
    (lambda a, b, w, y: (a, torch.randn(5, 8), w, y), "h_b"),
    (lambda a, b, w, y: (a, b.half(), w, y), "h_b"),
    (lambda a, b, w, y: (a, b, torch.randn(10, 7), y), "weight"),
    (lambda a, b, w, y: (a, b, torch.randn(10), y), "weight"),
    (lambda a, b, w, y: (a, b, w, y.float()), "labels"),
    (lambda a, b, w, y: (a, b, w, y[:3]), "labels"),
    (lambda a, b, w, y: (a, b, w, torch.tensor([0, 1, 10, -100])), "labels"),
    (lambda a, b, w, y: (a, b, w, torch.tensor([0, 1, -5, 2])), "labels"),
    (lambda a, b, w, y: (a.long(), b, w, y), "h_a"),
    (lambda a, b, w, y: (a[None, None], b[None, None], w, y), "h_a"),
])
def test_bad_input_raises_value_error_naming_argument(mutate, arg):
    h_a, h_b, w, y = mutate(*_ok())
    with pytest.raises(ValueError, match=arg):
        two_view_stats(h_a, h_b, w, y)


def test_bad_scalars_and_backend():
    h_a, h_b, w, y = _ok()
    with pytest.raises(ValueError, match="temperature"):
        two_view_stats(h_a, h_b, w, y, temperature=0.0)
    with pytest.raises(ValueError, match="softcap"):
        two_view_stats(h_a, h_b, w, y, softcap=-1.0)
    with pytest.raises(ValueError, match="backend"):
        two_view_stats(h_a, h_b, w, y, backend="cuda-magic")
    with pytest.raises(ValueError, match="bias"):
        two_view_stats(h_a, h_b, w, y, bias=torch.randn(9))
    with pytest.raises(ValueError, match="float64"):
        two_view_stats(h_a.double(), h_b.double(), w.double(), y, backend="triton")


def test_env_var_forces_backend(monkeypatch):
    from pcr_fast.stats import resolve_backend

    monkeypatch.setenv("PCR_FAST_BACKEND", "reference")
    assert resolve_backend("auto", torch.device("cpu")) == "reference"
    monkeypatch.setenv("PCR_FAST_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="PCR_FAST_BACKEND"):
        resolve_backend("auto", torch.device("cpu"))
    monkeypatch.delenv("PCR_FAST_BACKEND")
    assert resolve_backend("auto", torch.device("cpu")) == "torch"


@pytest.mark.gpu
@pytest.mark.parametrize("v", [151936, 262144])
def test_gpu_real_vocab_bf16(v):
    """Real vocabulary sizes in bf16 on the GPU against a float32 chunked truth."""
    dev = torch.device("cuda")
    n, d = 512, 1024
    h_a = torch.randn(n, d, device=dev, dtype=torch.bfloat16)
    h_b = h_a + 0.5 * torch.randn_like(h_a)
    w = (torch.randn(v, d, device=dev) / d ** 0.5).to(torch.bfloat16)
    y = torch.randint(0, v, (n,), device=dev)
    truth = two_view_stats(h_a.float(), h_b.float(), w.float(), y, backend="torch", chunk_size=64)
    for backend in ("triton", "triton_chunked"):
        out = two_view_stats(h_a, h_b, w, y, backend=backend)
        for name, o, t in zip(STAT_NAMES, out, truth):
            assert torch.allclose(o, t, atol=5e-2, rtol=2e-2), f"{backend}/{name}"


@pytest.mark.gpu
def test_gpu_int64_offsets():
    """N·V > 2³¹: offsets must not wrap."""
    dev = torch.device("cuda")
    n, d, v = 16384, 64, 151936  # N·V ≈ 2.5e9
    h_a = torch.randn(n, d, device=dev, dtype=torch.bfloat16)
    h_b = torch.randn(n, d, device=dev, dtype=torch.bfloat16)
    w = torch.randn(v, d, device=dev, dtype=torch.bfloat16)
    y = torch.randint(0, v, (n,), device=dev)
    out = two_view_stats(h_a, h_b, w, y, backend="triton")
    tail = slice(n - 64, n)
    truth = two_view_stats(h_a[tail].float(), h_b[tail].float(), w.float(), y[tail], backend="torch")
    for name, o, t in zip(STAT_NAMES, out, truth):
        assert torch.allclose(o[tail], t, atol=5e-2, rtol=2e-2), name


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_out_of_range_label_gives_nan_when_unchecked(backend, monkeypatch):
    """On CUDA the range check would sync; the kernels then mark such a row NaN instead of
    a silent wrong value. Simulated on CPU by skipping the (CPU-only) check."""
    import pcr_fast.stats as stats_mod

    real = stats_mod.validate_inputs

    def no_range_check(h_a, h_b, weight, labels, *a):
        h_a2, h_b2, _, softcap = real(h_a, h_b, weight, torch.where(labels >= weight.shape[0], 0, labels), *a)
        return h_a2, h_b2, labels, softcap

    monkeypatch.setattr(stats_mod, "validate_inputs", no_range_check)
    pr = make_problem(6, 8, 50, ignore_frac=0.0)
    labels = pr.labels.clone()
    labels[2] = 57
    out = two_view_stats(pr.h_a, pr.h_b, pr.weight, labels, backend=backend)
    assert torch.isnan(out.ce_a[2]) and torch.isnan(out.ce_b[2])
    assert torch.isfinite(out.ce_a[[0, 1, 3, 4, 5]]).all()


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_peaked_rows_with_competing_large_logits_keep_kl_gradient_accurate(backend):
    """Deterministic regression: two logits near 1e3 compete (p ≈ 1 − 3e-6) while view b
    sits far away. exp(z − lse) then fails to sum to 1 in fp32 (lse rounds), which biased
    KL's closed-form gradient by ~30 % of its size; normalised probabilities fix it."""
    z_a = torch.tensor([[847.54, 834.75, 772.38, 0.0]])
    z_b = torch.tensor([[385.0, 118.0, -114.0, 616.0]])  # log q ≈ −231 and −498 on those two
    weight = torch.eye(4)  # logits = hidden states
    labels = torch.tensor([0])
    h_a = z_a.clone().requires_grad_()
    out = two_view_stats(h_a, z_b, weight, labels, backend=backend)
    (g,) = torch.autograd.grad(out.kl_ab.sum(), [h_a])
    h64 = z_a.double().requires_grad_()
    lp, lq = torch.log_softmax(h64, -1), torch.log_softmax(z_b.double(), -1)
    (gt,) = torch.autograd.grad((lp.exp() * (lp - lq)).sum(), [h64])
    assert ((g.double() - gt).abs().max() / gt.abs().max()) < 2e-2


# ---------------------------------------------------------------- memory plans and splits
@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("detach_b", [False, True])
def test_small_memory_budget_walks_the_plane_in_pieces(backend, detach_b, monkeypatch):
    """A tiny budget forces row groups and vocabulary slabs (the two-pass backward of the
    fused backend): the result must not change."""
    from pcr_fast.kernels import launch

    monkeypatch.setitem(launch.MEMORY_BUDGET, backend, 24 << 10)
    dtype = torch.bfloat16 if backend == "triton" else torch.float32   # bf16: fp32 dh accumulators are extra
    pr = make_problem(150, 24, 700, bias=True, softcap=9.0, temperature=1.2, scale=3.0, dtype=dtype)
    if backend == "triton":
        plan = launch.backward_plan(150, 700, 24, slab_bytes_per_cell=4, dh_bytes_per_row=2 * 24 * 4, need_dh=True,
                                    need_dw=True, budget=24 << 10)
        assert not plan.fused and plan.rows_per_group < 150 and plan.slab_dh < 700 and plan.slab_dw < 700
    tol = dict(atol=2e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    out = two_view_stats(pr.h_a, pr.h_b, pr.weight, pr.labels, backend=backend, detach_b=detach_b, **pr.kwargs())
    ref = two_view_stats(*[t.detach().double().requires_grad_() for t in (pr.h_a, pr.h_b, pr.weight)],
                         pr.labels, bias=pr.bias.detach().double().requires_grad_(), temperature=1.2, softcap=9.0,
                         backend="reference", detach_b=detach_b)
    up = [torch.randn(150) for _ in range(6)]
    g = grads_of(out, pr.leaves(), up)
    for name, o, t in zip(STAT_NAMES, out, ref):
        torch.testing.assert_close(o.double(), t.detach(), **tol, msg=name)
    p64 = as_float64(pr)
    truth = two_view_stats(p64.h_a, p64.h_b, p64.weight, p64.labels, bias=p64.bias, temperature=1.2, softcap=9.0,
                           backend="reference", detach_b=detach_b)
    gt = grads_of(truth, p64.leaves(), [u.double() for u in up])
    for name, o, t in zip(["d_h_a", "d_h_b", "d_weight", "d_bias"], g, gt):
        if t is None:
            assert o is None, name
            continue
        scale = t.abs().max()
        torch.testing.assert_close(o.double() / scale, t / scale, **tol, msg=name)


def test_backward_plan_respects_the_budget():
    from pcr_fast.kernels.launch import SLAB_ALIGN, backward_plan

    for n, v, d, budget in [(8192, 151936, 4096, 48 << 20), (37, 1001, 23, 1 << 30), (5000, 262144, 2560, 64 << 20)]:
        cell, dh_row = 4, 2 * d * 4
        plan = backward_plan(n, v, d, slab_bytes_per_cell=cell, dh_bytes_per_row=dh_row, need_dh=True, need_dw=True,
                             budget=budget)
        assert plan.slab_dh % SLAB_ALIGN == 0 or plan.slab_dh == v
        if plan.fused:
            assert n * dh_row + n * plan.slab_dh * cell <= budget
        else:
            assert plan.rows_per_group * (dh_row + plan.slab_dh * cell) <= budget
            assert n * plan.slab_dw * cell <= budget
    big = backward_plan(8192, 151936, 4096, slab_bytes_per_cell=4, dh_bytes_per_row=2 * 4096 * 4, need_dh=True,
                        need_dw=True, budget=48 << 20)
    assert not big.fused   # 256 MB of fp32 dh cannot fit in 48 MB: dh per row group, dW per slab


@pytest.mark.parametrize("two_views", [True, False])
def test_vocabulary_splits_of_the_fused_forward_merge_exactly(two_views, monkeypatch):
    """On a GPU a small N splits the vocabulary across programs; the split states merge
    into the same statistics (the interpreter never splits, so force it here)."""
    import pcr_fast.kernels.two_view_fwd as fwd

    monkeypatch.setattr(fwd, "vocab_splits", lambda n, v, cfg, device=None: 3)
    pr = make_problem(21, 16, 5000, bias=True, scale=4.0)
    if two_views:
        out = two_view_stats(pr.h_a, pr.h_b, pr.weight, pr.labels, bias=pr.bias, backend="triton")
        truth, _ = truth_stats(pr)
        for name, o, t in zip(STAT_NAMES, out, truth):
            torch.testing.assert_close(o.double(), t.detach(), atol=2e-5, rtol=1e-5, msg=name)
    else:
        from pcr_fast.stats import single_view_stats

        out = single_view_stats(pr.h_a, pr.weight, pr.labels, bias=pr.bias, backend="triton")
        ref = single_view_stats(pr.h_a.detach().double(), pr.weight.detach().double(), pr.labels,
                                bias=pr.bias.detach().double(), backend="reference")
        for name, o, t in zip(ref._fields, out, ref):
            torch.testing.assert_close(o.double() if o.is_floating_point() else o, t, atol=2e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("backend", FAST_BACKENDS + ["reference"])
def test_extras_match_the_float64_reference_and_are_differentiable(backend):
    pr = make_problem(31, 20, 900, bias=True, softcap=12.0, temperature=0.9, scale=3.0)
    stats, ex_a, ex_b = two_view_stats(pr.h_a, pr.h_b, pr.weight, pr.labels, backend=backend, with_extras=True,
                                       **pr.kwargs())
    assert isinstance(stats, TwoViewStats)
    p64 = as_float64(pr)
    from pcr_fast.backends.reference import reference_view_extras

    for ex, h in ((ex_a, p64.h_a), (ex_b, p64.h_b)):
        lse, mean, amax = reference_view_extras(h, p64.weight, p64.bias, 0.9, 12.0)
        # independent of pcr_fast: torch's own logsumexp/mean/argmax of the float64 logits
        z = 12.0 * torch.tanh((h @ p64.weight.T + p64.bias) / 12.0) / 0.9
        torch.testing.assert_close(lse, torch.logsumexp(z, -1))
        torch.testing.assert_close(ex.lse.double(), lse.detach(), atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(ex.logit_mean.double(), mean.detach(), atol=2e-5, rtol=1e-5)
        assert ex.argmax.dtype == torch.int64 and torch.equal(ex.argmax, z.argmax(-1))
    up = torch.randn(31)
    g = torch.autograd.grad((ex_a.lse * up).sum() + ex_b.logit_mean.sum(), pr.leaves())
    z_a = 12.0 * torch.tanh((p64.h_a @ p64.weight.T + p64.bias) / 12.0) / 0.9
    z_b = 12.0 * torch.tanh((p64.h_b @ p64.weight.T + p64.bias) / 12.0) / 0.9
    gt = torch.autograd.grad((torch.logsumexp(z_a, -1) * up.double()).sum() + z_b.mean(-1).sum(), p64.leaves())
    for o, t in zip(g, gt):
        torch.testing.assert_close(o.double(), t, atol=2e-5 * float(t.abs().max()), rtol=1e-4)


@pytest.mark.parametrize("op", ["stats", "augment"])
def test_auto_picks_triton_on_cuda_only_where_validated(op, monkeypatch, caplog):
    """Honest default: until a GPU run validates the kernels on an architecture, 'auto' on
    CUDA picks the torch backend (explicit 'triton' still works); a validated capability
    switches 'auto' to Triton."""
    import logging

    import pcr_fast.backends as backends
    from pcr_fast.kernels.launch import assume_capability

    monkeypatch.setattr(backends, "triton_available", lambda device: True)
    monkeypatch.delenv("PCR_FAST_BACKEND", raising=False)
    monkeypatch.delenv("PCR_FAST_AUGMENT_BACKEND", raising=False)
    cuda = torch.device("cuda")
    assert backends.VALIDATED_CAPABILITIES[op] == frozenset()   # no GPU run yet
    with assume_capability((9, 0)), caplog.at_level(logging.INFO, logger="pcr_fast.backends"):
        assert backends.select_backend(op, "auto", cuda) == "torch"
        assert backends.select_backend(op, "triton", cuda) == "triton"
        monkeypatch.setitem(backends.VALIDATED_CAPABILITIES, op, frozenset({(9, 0)}))
        assert backends.select_backend(op, "auto", cuda) == "triton"
    with assume_capability((8, 0)):
        assert backends.select_backend(op, "auto", cuda) == "torch"
    assert backends.select_backend(op, "auto", torch.device("cpu")) == "torch"
