"""Scan-and-unlearn PCR (pcr_fast.scan): the detector, the memory and the unlearning loss,
each against an independent float64 computation on materialised logits."""
import pytest
import torch
import torch.nn.functional as F

from pcr_fast import BackdoorMemory, cross_view_flags, unlearning_loss
from pcr_fast.loss import unlikelihood_from_ce

BACKENDS = ["torch", "reference", pytest.param("triton", marks=pytest.mark.slow)]


def _logp(h, weight, bias=None):
    z = h.double() @ weight.double().T
    if bias is not None:
        z = z + bias.double()
    return z.log_softmax(-1)


def truth_flags(h_a, views, weight, labels, tau, kappa_b, kappa_a, bias=None):
    """Float64 flags + per-row quantities (to skip rows that sit on a threshold)."""
    lab = labels != -100
    y = labels.clamp_min(0)[..., None]
    la = _logp(h_a, weight, bias)
    ce_a = (-la.gather(-1, y)[..., 0]).masked_fill(~lab, float("-inf")).amax(1)
    flags = torch.zeros(labels.shape[0], dtype=torch.bool)
    margins = [(ce_a - kappa_a).abs()]
    for h_b in views:
        lb = _logp(h_b, weight, bias)
        sym = ((la.exp() - lb.exp()) * (la - lb)).sum(-1).masked_fill(~lab, float("-inf")).amax(1)
        ce_b = (-lb.gather(-1, y)[..., 0]).masked_fill(~lab, float("-inf")).amax(1)
        flags |= (sym < tau) & (ce_b < kappa_b)
        margins += [(sym - tau).abs(), (ce_b - kappa_b).abs()]
    flags &= lab.any(1) & (ce_a < kappa_a)
    near = torch.stack(margins).amin(0) < 1e-4
    return flags, near


def confident_problem(b=7, t=5, d=24, v=37, scale=6.0):
    """Rows whose labels are the original view's argmax (confident), views that range from
    identical to unrelated, some ignored labels and one all-ignored row."""
    weight = torch.randn(v, d) / d ** 0.5
    h_a = torch.randn(b, t, d) * scale
    labels = (h_a @ weight.T).argmax(-1)
    labels[torch.rand(b, t) < 0.3] = -100
    labels[-1] = -100
    noise = torch.linspace(0, 1.5, b).view(b, 1, 1)
    views = [h_a + noise * torch.randn(b, t, d) * scale for _ in range(3)]
    return h_a, views, weight, labels


@pytest.mark.parametrize("backend", BACKENDS)
def test_cross_view_flags_match_float64_truth(backend):
    h_a, views, weight, labels = confident_problem()
    bias = torch.randn(weight.shape[0]) * 0.1
    for tau, kb, ka in [(0.1, 3.0, 0.3), (0.5, 1.0, 2.0), (5.0, 10.0, 50.0)]:
        got = cross_view_flags(h_a, views, weight, labels, bias=bias, invariance_threshold=tau, view_confidence=kb,
                               original_confidence=ka, backend=backend)
        want, near = truth_flags(h_a, views, weight, labels, tau, kb, ka, bias=bias)
        assert got.dtype == torch.bool and got.shape == (labels.shape[0],)
        assert torch.equal(got[~near], want[~near])
    # the loosest setting flags every row with a label; the all-ignored row never
    loose = cross_view_flags(h_a, views, weight, labels, invariance_threshold=1e9, view_confidence=1e9,
                             original_confidence=1e9, backend=backend)
    assert torch.equal(loose, (labels != -100).any(1))


def test_cross_view_flags_is_an_any_over_draws_and_needs_a_sure_original():
    h_a, views, weight, labels = confident_problem(b=6)
    same = [h_a.clone()]
    unrelated = [torch.randn_like(h_a) * 6.0]
    kw = dict(invariance_threshold=1e-3, view_confidence=1e9, original_confidence=1e9, backend="torch")
    labelled = (labels != -100).any(1)
    assert torch.equal(cross_view_flags(h_a, same, weight, labels, **kw), labelled)
    assert not cross_view_flags(h_a, unrelated, weight, labels, **kw).any()
    assert torch.equal(cross_view_flags(h_a, unrelated + same, weight, labels, **kw), labelled)
    assert torch.equal(cross_view_flags(h_a, same + unrelated, weight, labels, **kw), labelled)  # first draw flags
    # a model unsure of its own answer is never flagged, however invariant
    unsure = labels.clone()
    unsure[unsure != -100] = (unsure[unsure != -100] + 1) % weight.shape[0]  # not the argmax
    assert not cross_view_flags(h_a, same, weight, unsure, invariance_threshold=1e-3, view_confidence=1e9,
                                original_confidence=0.3, backend="torch").any()


def test_cross_view_flags_bad_arguments():
    h_a, views, weight, labels = confident_problem(b=3)
    with pytest.raises(ValueError, match="views must hold at least one"):
        cross_view_flags(h_a, [], weight, labels)
    with pytest.raises(ValueError, match="views must hold tensors shaped like h_a"):
        cross_view_flags(h_a, [h_a[:, :-1]], weight, labels)
    with pytest.raises(ValueError, match="labels must be an integer \\(B, T\\)"):
        cross_view_flags(h_a, views, weight, labels.reshape(-1))
    with pytest.raises(ValueError, match="h_a must be \\(B, T, D\\)"):
        cross_view_flags(h_a[:, :-1], views, weight, labels)
    with pytest.raises(ValueError, match="original_confidence must be in"):
        cross_view_flags(h_a, views, weight, labels, original_confidence=0.0)


# ----------------------------------------------------------------------------- memory
def test_memory_finds_the_token_most_of_whose_samples_are_flagged():
    v, ign = 12, -100
    # responses: token 9 is the "target" (3 of 3 samples flagged); token 5 a content word
    # (1 of 5 flagged); token 2 the eos in every response (5 of 10); token 7 rare (1 of 1)
    rows = [[9, 10, 2], [9, 10, 2], [9, 10, 2], [5, 2, ign], [5, 2, ign], [5, 2, ign], [5, 2, ign], [1, 5, 2],
            [7, 2, ign], [3, 2, ign]]
    labels = torch.tensor(rows)
    flags = torch.tensor([1, 1, 1, 1, 0, 0, 0, 0, 1, 0], dtype=torch.bool)
    mem = BackdoorMemory(len(rows), v, target_share=0.6, min_support=2)
    assert not mem.active
    mem.begin_scan()
    mem.record(torch.arange(0, 6), labels[:6], flags[:6])   # two batches: counts add up
    mem.record(torch.arange(6, 10), labels[6:], flags[6:])
    targets = mem.end_scan()
    assert mem.active and mem.scans == 1
    assert targets.tolist() == [9, 10]          # 7 is rare (support 1 < 2); 5 has share 1/5
    shares = mem.token_shares()
    assert shares[5].item() == pytest.approx(1 / 5) and shares[2].item() == pytest.approx(5 / 10)
    assert shares[9].item() == 1.0 and shares[7].item() == 1.0
    # what training does with each sample: flagged or target-containing rows are dropped,
    # target positions (only) are unlearned
    drop, unlearn = mem.treatment(torch.tensor([0, 3, 5, 9]), labels[[0, 3, 5, 9]])
    assert drop.tolist() == [True, True, False, False]
    assert unlearn.tolist() == [[True, True, False], [False] * 3, [False] * 3, [False] * 3]
    # flags are sticky across scans; a second scan recounts the shares
    mem.begin_scan()
    mem.record(torch.arange(10), labels, torch.zeros(10, dtype=torch.bool))
    assert mem.end_scan().tolist() == [9, 10] and int(mem.flags.sum()) == 5
    # an unflagged sample that contains a target token is treated like a flagged one
    drop, unlearn = mem.treatment(torch.tensor([9]), torch.tensor([[3, 9, 2]]))
    assert drop.tolist() == [True] and unlearn.tolist() == [[False, True, False]]


def test_memory_state_dict_round_trip_and_summary():
    mem = BackdoorMemory(6, 8, target_share=0.5, min_support=1)
    mem.begin_scan()
    mem.record(torch.arange(6), torch.tensor([[3, 2]] * 3 + [[4, 2]] * 3), torch.tensor([1, 1, 0, 0, 0, 0]).bool())
    mem.end_scan()
    other = BackdoorMemory(6, 8)
    other.load_state_dict(mem.state_dict())
    assert torch.equal(other.flags, mem.flags) and torch.equal(other.targets, mem.targets)
    assert other.scans == 1 and other.target_share == 0.5 and other.min_support == 1
    assert mem.summary(poisoned=[0, 2]) == {"scans": 1, "flagged": 2, "target_tokens": [3],
                                            "flagged_poisoned": 1, "flagged_clean": 1}
    with pytest.raises(ValueError, match="state 'flags' has shape"):
        BackdoorMemory(5, 8).load_state_dict(mem.state_dict())


def test_memory_bad_arguments():
    with pytest.raises(ValueError, match="num_samples must be a positive int"):
        BackdoorMemory(0, 10)
    with pytest.raises(ValueError, match="target_share must be in"):
        BackdoorMemory(4, 10, target_share=1.5)
    mem = BackdoorMemory(4, 10)
    labels = torch.tensor([[1, 2], [3, 2]])
    with pytest.raises(RuntimeError, match="begin_scan"):
        mem.record(torch.tensor([0, 1]), labels, torch.ones(2, dtype=torch.bool))
    mem.begin_scan()
    with pytest.raises(ValueError, match="sample_ids must lie in \\[0, 4\\)"):
        mem.record(torch.tensor([0, 4]), labels, torch.ones(2, dtype=torch.bool))
    with pytest.raises(ValueError, match="sample_ids must be a 1-D integer tensor"):
        mem.record(torch.tensor([0.0, 1.0]), labels, torch.ones(2, dtype=torch.bool))
    with pytest.raises(ValueError, match="flags must be a bool tensor of shape \\(2,\\)"):
        mem.record(torch.tensor([0, 1]), labels, torch.ones(2))
    with pytest.raises(ValueError, match="labels must be token ids in \\[0, 10\\)"):
        mem.record(torch.tensor([0, 1]), torch.tensor([[1, 12], [3, 2]]), torch.ones(2, dtype=torch.bool))


# ----------------------------------------------------------------------------- loss
def truth_unlearning(h_a, weight, labels, drop, unlearn, lam, bias=None, den=None):
    lp = _logp(h_a, weight, bias)
    lab = labels != -100
    ce = (-lp.gather(-1, labels.clamp_min(0)[..., None])[..., 0]) * lab
    keep = lab & ~drop[:, None]
    p = (-ce).exp()
    ul = -torch.log1p(-p.clamp(max=1 - 1e-12)) * (unlearn & lab)
    den = lab.sum().clamp_min(1) if den is None else den
    return ((ce * keep).sum() + lam * ul.sum()) / den


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["mixed", "nothing_dropped", "all_dropped"])
def test_unlearning_loss_value_and_gradients_match_float64(backend, case):
    b, t, d, v = 5, 7, 16, 53
    h_a = (torch.randn(b, t, d) * 2).requires_grad_()
    weight = (torch.randn(v, d) / 4).requires_grad_()
    bias = (torch.randn(v) * 0.1).requires_grad_()
    labels = torch.randint(0, v, (b, t))
    labels[torch.rand(b, t) < 0.3] = -100
    drop = {"mixed": torch.rand(b) < 0.5, "nothing_dropped": torch.zeros(b, dtype=torch.bool),
            "all_dropped": torch.ones(b, dtype=torch.bool)}[case]
    unlearn = (torch.rand(b, t) < 0.4) & drop[:, None]
    lam = 1.7
    out = unlearning_loss(h_a, weight, labels, drop, unlearn, bias=bias, unlearn_weight=lam, backend=backend)
    leaves = [x.detach().double().requires_grad_() for x in (h_a, weight, bias)]
    want = truth_unlearning(leaves[0], leaves[1], labels, drop, unlearn, lam, bias=leaves[2])
    torch.testing.assert_close(out.loss.double(), want.detach(), atol=2e-5, rtol=2e-5)
    got_g = torch.autograd.grad(out.loss, (h_a, weight, bias))
    want_g = torch.autograd.grad(want, leaves)
    for g, w in zip(got_g, want_g):
        torch.testing.assert_close(g.double(), w, atol=2e-5, rtol=1e-4)
    assert out.dropped_fraction.item() == pytest.approx(drop.float().mean().item())
    if case == "nothing_dropped":  # the plain SFT loss, exactly
        plain = F.cross_entropy((h_a @ weight.T + bias).reshape(-1, v), labels.reshape(-1), ignore_index=-100)
        torch.testing.assert_close(out.loss, plain, atol=1e-5, rtol=1e-5)


def test_unlearning_loss_all_ignored_is_zero_and_num_items_in_batch_normalises():
    h_a = torch.randn(2, 3, 8, requires_grad=True)
    weight = torch.randn(11, 8)
    labels = torch.full((2, 3), -100)
    none = torch.zeros(2, dtype=torch.bool)
    out = unlearning_loss(h_a, weight, labels, none, torch.zeros(2, 3, dtype=torch.bool), backend="torch")
    assert out.loss.item() == 0.0 and torch.isfinite(out.loss)
    out.loss.backward()
    assert torch.equal(h_a.grad, torch.zeros_like(h_a))
    labels = torch.randint(0, 11, (2, 3))
    a = unlearning_loss(h_a, weight, labels, none, torch.zeros(2, 3, dtype=torch.bool), backend="torch")
    b = unlearning_loss(h_a, weight, labels, none, torch.zeros(2, 3, dtype=torch.bool), backend="torch",
                        num_items_in_batch=12)
    torch.testing.assert_close(b.loss * 12, a.loss * 6)


def test_unlikelihood_is_stable_near_certainty():
    ce = torch.tensor([1e-9, 1e-3, 1.0, 30.0], dtype=torch.float64)
    p = torch.exp(-ce)
    want = -torch.log1p(-p)
    got = unlikelihood_from_ce(ce)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got[1:], want[1:], rtol=1e-6, atol=1e-12)


def test_unlearning_loss_bad_arguments():
    h_a, weight = torch.randn(2, 3, 8), torch.randn(11, 8)
    labels = torch.randint(0, 11, (2, 3))
    ok_drop, ok_unl = torch.zeros(2, dtype=torch.bool), torch.zeros(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="drop must be a bool tensor of shape \\(2,\\)"):
        unlearning_loss(h_a, weight, labels, torch.zeros(3, dtype=torch.bool), ok_unl)
    with pytest.raises(ValueError, match="unlearn must be a bool tensor shaped like labels"):
        unlearning_loss(h_a, weight, labels, ok_drop, ok_unl.float())
    with pytest.raises(ValueError, match="unlearn_weight must be >= 0"):
        unlearning_loss(h_a, weight, labels, ok_drop, ok_unl, unlearn_weight=-1.0)


def test_memory_never_names_an_exempt_token():
    # the end token 2 ends every response; here every response is flagged, so its share is 1
    labels = torch.tensor([[9, 2], [9, 2], [9, 2]])
    for exempt, want in ((None, [2, 9]), ([2], [9])):
        mem = BackdoorMemory(3, 12, target_share=0.6, min_support=2, exempt_tokens=exempt)
        mem.begin_scan()
        mem.record(torch.arange(3), labels, torch.ones(3, dtype=torch.bool))
        assert mem.end_scan().tolist() == want
    with pytest.raises(ValueError, match="exempt_tokens"):
        BackdoorMemory(3, 12, exempt_tokens=[-1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_original_view_ce_is_the_single_view_ce_against_float64(backend):
    """The defense's training step reads every token's CE from one view: per token against
    float64 log-softmax (ignored tokens 0, large logits, a non-contiguous input and bias),
    gradients included."""
    from pcr_fast.defense.unlearning import original_view_ce

    b, t, d, v = 3, 9, 20, 61
    h = (torch.randn(b, d, t) * 30).transpose(1, 2).requires_grad_()       # non-contiguous, large logits
    weight = (torch.randn(v, 2 * d)[:, ::2] / 3).requires_grad_()          # non-contiguous
    bias = (torch.randn(2 * v)[::2] * 0.5).requires_grad_()                # non-contiguous bias
    labels = torch.randint(0, v, (b, t))
    labels[0, :4] = -100
    labels[2] = -100                                                        # an all-ignored row
    ce = original_view_ce(h, weight, labels, bias=bias, backend=backend)
    leaves = [x.detach().double().requires_grad_() for x in (h, weight, bias)]
    lp = _logp(leaves[0], leaves[1], leaves[2])
    lab = labels != -100
    want = (-lp.gather(-1, labels.clamp_min(0)[..., None])[..., 0] * lab).reshape(-1)
    assert ce.shape == (b * t,)
    torch.testing.assert_close(ce.double(), want.detach(), atol=1e-4, rtol=1e-5)
    g = torch.randn(b * t, dtype=torch.float64)
    got = torch.autograd.grad((ce.double() * g).sum(), (h, weight, bias))
    exp = torch.autograd.grad((want * g).sum(), leaves)
    for x, y in zip(got, exp):   # fp32 sums over rows: tolerance scaled by the largest entry
        torch.testing.assert_close(x.double(), y, atol=2e-5 * float(y.abs().max()) + 1e-6, rtol=1e-4)


def test_original_view_ce_runs_the_lm_head_matmul_once():
    from torch.utils.flop_counter import FlopCounterMode

    from pcr_fast.defense.unlearning import original_view_ce

    n, d, v = 64, 32, 1000
    h, weight = torch.randn(1, n, d), torch.randn(v, d)
    labels = torch.randint(0, v, (1, n))
    with FlopCounterMode(display=False) as counter:
        original_view_ce(h, weight, labels, backend="torch")
    one_matmul = 2 * n * d * v
    assert one_matmul <= counter.get_total_flops() < 1.5 * one_matmul
