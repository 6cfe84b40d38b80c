"""GPU-only checks of the compiled Triton kernels (skipped without CUDA; first in
benchmarks/gpu_check.sh).

On CPU the interpreter always upcasts ``tl.dot`` operands to fp32 (its bf16 dot is wrong), so
the bf16/fp16 operand path — the same code minus that cast — only ever runs here: the
fused forward, the logit-gradient tiles stored in bf16/fp16, and the two gradient GEMMs, in
the one-pass and the two-pass (row groups × slabs) backward, against a float64 truth.
"""
from __future__ import annotations

import pytest
import torch

from pcr_fast import fused_linear_cross_entropy, two_view_stats
from pcr_fast.kernels import launch
from pcr_fast.backends.reference import reference_two_view_stats
from _two_view_utils import STAT_NAMES, as_float64, assert_within_rule, grads_of, make_problem, same_dtype_stats

pytestmark = pytest.mark.gpu
DEVICE = "cuda"   # the test logic can be dry-run on CPU under the interpreter by setting "cpu"
TOL = {torch.bfloat16: dict(atol=2e-2, rtol=1e-2), torch.float16: dict(atol=5e-3, rtol=5e-3),
       torch.float32: dict(atol=2e-5, rtol=1e-5)}


def _to_cuda(pr):
    def move(t):
        return None if t is None else t.detach().to(DEVICE).requires_grad_()

    pr.h_a, pr.h_b, pr.weight, pr.bias = move(pr.h_a), move(pr.h_b), move(pr.weight), move(pr.bias)
    pr.labels = pr.labels.to(DEVICE)
    return pr


def _check(pr, backend, dtype, detach_b=False):
    out = two_view_stats(pr.h_a, pr.h_b, pr.weight, pr.labels, backend=backend, detach_b=detach_b, **pr.kwargs())
    cpu = as_float64(pr)
    cpu.labels = pr.labels.cpu()
    for name in ("h_a", "h_b", "weight", "bias"):
        t = getattr(cpu, name)
        if t is not None:
            setattr(cpu, name, t.detach().cpu().double().requires_grad_())
    p64 = cpu
    truth = reference_two_view_stats(p64.h_a, p64.h_b, p64.weight, p64.labels, p64.bias, p64.temperature,
                                     p64.softcap, detach_b=detach_b)
    base = same_dtype_stats(pr, detach_b=detach_b)
    for name, o, t, b in zip(STAT_NAMES, out, truth, base):
        assert_within_rule(o.cpu(), t, b.cpu(), name=f"{backend}/{dtype}/{name}", **TOL[dtype])
    n = pr.labels.shape[0]
    up = [torch.randn(n, device=DEVICE) for _ in range(6)]
    g = grads_of(out, pr.leaves(), up)
    gt = grads_of(truth, p64.leaves(), [u.cpu().double() for u in up])
    gb = grads_of(base, pr.leaves(), up)
    for name, o, t, b in zip(["d_h_a", "d_h_b", "d_weight", "d_bias"], g, gt, gb):
        if detach_b and name == "d_h_b":
            assert o is None
            continue
        scale = t.abs().max().clamp_min(1e-6)
        assert_within_rule(o.cpu() / scale, t / scale, b.cpu() / scale, name=f"{backend}/{dtype}/{name}", **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("two_pass", [False, True], ids=["one_pass", "two_pass"])
@pytest.mark.parametrize("detach_b", [False, True])
def test_fused_backward_half_precision_operands(dtype, two_pass, detach_b, monkeypatch):
    """The bf16/fp16 operand branch of the fused kernels, first in the GPU script."""
    if two_pass:   # row groups and vocabulary slabs, as at a production shape under 64 MB
        monkeypatch.setitem(launch.MEMORY_BUDGET, "triton", 256 << 10)
    pr = _to_cuda(make_problem(300, 160, 3000, dtype=dtype, bias=True, softcap=20.0, temperature=1.1, scale=3.0))
    _check(pr, "triton", dtype, detach_b=detach_b)


@pytest.mark.parametrize("backend", ["triton", "triton_chunked"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_backends_on_gpu_against_float64(backend, dtype):
    pr = _to_cuda(make_problem(257, 96, 5003, dtype=dtype, bias=True, scale=2.0))
    _check(pr, backend, dtype)


def test_small_n_splits_the_vocabulary_and_merges_exactly():
    pr = _to_cuda(make_problem(5, 64, 40000, dtype=torch.bfloat16, scale=3.0))
    cfg = launch.tile_config("two_view_fwd", 5, 40000, 64, dtype=torch.bfloat16, device=pr.h_a.device)
    assert launch.vocab_splits(5, 40000, cfg, pr.h_a.device) > 1
    _check(pr, "triton", torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fused_cross_entropy_on_gpu(dtype):
    h = torch.randn(4, 300, 128, device=DEVICE, dtype=dtype, requires_grad=True)
    w = (torch.randn(32000, 128, device=DEVICE) / 8).to(dtype).requires_grad_()
    y = torch.randint(0, 32000, (4, 300), device=DEVICE)
    y[:, :50] = -100
    loss = fused_linear_cross_entropy(h, w, y, backend="triton", label_smoothing=0.1, z_loss=1e-4)
    z = (h.double() @ w.double().T)
    ref = torch.nn.functional.cross_entropy(z.flatten(0, 1), y.flatten(), label_smoothing=0.1, ignore_index=-100,
                                            reduction="none")
    ref = (ref + 1e-4 * torch.logsumexp(z.flatten(0, 1), -1).square() * (y.flatten() != -100)).sum() / (y != -100).sum()
    torch.testing.assert_close(loss.double(), ref, rtol=TOL[dtype]["rtol"], atol=TOL[dtype]["atol"])
    loss.backward()
    assert torch.isfinite(h.grad).all() and torch.isfinite(w.grad).all()
