"""The inline defense (mode "inline"): InlineMemory's rules, the cross-view scores, row
selection per model layout, compute_pcr_loss's inline step (its loss, its counted extra
passes) and PCRTrainer with checkpoints. Truths are written out independently."""
import pytest
import torch

from pcr_fast import InlineMemory, PCRConfig
from pcr_fast.defense import CrossViewScores, cross_view_flags, cross_view_scores
from pcr_fast.hf import compute_pcr_loss
from pcr_fast.hf.counting import count_compute
from pcr_fast.hf.rows import select_rows
from pcr_fast.testing import build_tiny_model, collate, sample_batches

V = 12


def memory(n=10, **kw):
    args = dict(test_budget=1.0, novelty_confidence=1.0, novelty_window=2, flagged_share=0.5, min_support=2,
                views=1, invariance_threshold=0.1, view_confidence=3.0, original_confidence=0.3)
    args.update(kw)
    return InlineMemory(n, V, **args)


def scores(conf, inv, vce):
    t = lambda v: torch.tensor(v, dtype=torch.float32)  # noqa: E731
    return CrossViewScores(confidence=t(conf), invariance=t(inv), view_ce=t(vce))


# ----------------------------------------------------------------------------- the memory
def test_novelty_is_never_predicted_in_the_first_occurrences():
    mem = memory()
    labels = torch.tensor([[5, 6, -100], [5, 7, 6]])
    # token 5: CE 4, 2 (never below 1: novel); 6: CE 3 then 0.5 (predicted once: known);
    # 7: one occurrence only (window 2 not full: not novel yet)
    ce = torch.tensor([[4.0, 3.0, 0.0], [2.0, 9.0, 0.5]])
    mem.observe(labels, ce)
    assert not mem.novel.any(), "nothing is novel before the step is committed"
    mem.commit()
    assert mem.novel.nonzero().flatten().tolist() == [5]
    # later occurrences cannot change the verdict: the window is closed
    mem.observe(torch.tensor([[5]]), torch.tensor([[0.0]]))
    mem.commit()
    assert mem.novel.nonzero().flatten().tolist() == [5]
    # ... but a token whose window is still open can still be found predicted
    mem.observe(torch.tensor([[7]]), torch.tensor([[0.1]]))
    mem.commit()
    assert not bool(mem.novel[7])


def test_select_prefers_eligible_rows_and_never_retests():
    mem = memory()
    mem.observe(torch.tensor([[5, 5]]), torch.tensor([[9.0, 9.0]]))
    mem.commit()                                  # token 5 is novel
    ids = torch.tensor([0, 1, 2, 3])
    labels = torch.tensor([[5, 2], [5, 3], [4, 3], [5, -100]])
    ce = torch.tensor([[0.1, 0.1], [0.1, 0.9], [0.1, 0.1], [0.2, 0.0]])
    # row 0: sure + novel (eligible); row 1: not sure; row 2: no novel token; row 3: eligible
    for _ in range(5):
        rows, eligible = mem.select(ids, labels, ce, 2, generator=torch.Generator().manual_seed(_))
        assert sorted(rows.tolist()) == [0, 3] and eligible.all()
    mem.record(ids[torch.tensor([0])], labels[:1], torch.tensor([True]), scores([0.1], [0.5], [1.0]))
    rows, eligible = mem.select(ids, labels, ce, 2)
    assert rows[0].item() == 3 and eligible.tolist() == [True, False], "a tested row is not eligible again"
    # a batch shorter than k is padded with ineligible rows
    rows, eligible = mem.select(ids[:1], labels[:1], ce[:1], 3)
    assert rows.numel() == 3 and not eligible.any()


def test_targets_need_novelty_support_and_share():
    mem = memory(n=10, min_support=2, flagged_share=0.5)
    mem.observe(torch.tensor([[5, 5, 6, 6]]), torch.tensor([[9.0, 9.0, 0.0, 0.0]]))
    mem.commit()                                           # 5 novel, 6 known
    labels = torch.tensor([[5, 6], [5, 6], [5, 6], [6, 6]])
    ids = torch.tensor([0, 1, 2, 3])
    tested = torch.tensor([True, True, True, True])
    # rows 0 and 3 flagged (sure, invariant, predicted); 1 not invariant; 2 not sure
    flags = mem.record(ids, labels, tested, scores([0.1, 0.1, 0.5, 0.1], [0.01, 0.5, 0.01, 0.01], [1, 1, 1, 1]))
    assert flags.tolist() == [True, False, False, True]
    mem.commit()
    # token 5: tested 3, flagged 1 (< min_support 2); token 6: flagged 2 but not novel
    assert not mem.targets.any()
    mem.record(torch.tensor([4]), torch.tensor([[5, 0]]), torch.tensor([True]), scores([0.1], [0.0], [0.0]))
    mem.commit()                                           # token 5: 2 of 4 flagged = 0.5
    assert mem.targets.nonzero().flatten().tolist() == [5]
    assert mem.token_shares()[5].item() == pytest.approx(0.5)
    # the step that named it is kept (the third commit), and stays its first even when renamed
    assert mem.named_at[5].item() == 3 and (mem.named_at[torch.arange(V) != 5] == -1).all()
    mem.commit()
    assert mem.named_at[5].item() == 3 and mem.summary()["first_named_at_step"] == 3
    assert mem.report()["targets"][0]["named_at_step"] == 3
    other = memory(n=10)
    other.load_state_dict(mem.state_dict())
    assert other.named_at[5].item() == 3
    # treatment: flagged rows and rows holding a target leave the CE; only target tokens unlearned
    drop, unlearn = mem.treatment(torch.tensor([3, 5, 6]), torch.tensor([[6, 6], [5, 6], [7, -100]]))
    assert drop.tolist() == [True, True, False]
    assert unlearn.tolist() == [[False, False], [True, False], [False, False]]


def test_rows_to_test_spends_the_budget_exactly():
    mem = memory(test_budget=0.1, views=3)
    ks = [mem.rows_to_test(32) for _ in range(300)]
    assert sum(ks) == pytest.approx(0.1 * 32 * 300 / 3, abs=1)
    assert set(ks) <= {1, 2}
    assert memory(test_budget=0.0).rows_to_test(32) == 0


def test_state_dict_round_trip_and_report():
    mem = memory(n=6)
    mem.observe(torch.tensor([[5, 5]]), torch.tensor([[9.0, 9.0]]))
    mem.commit()
    mem.record(torch.tensor([1, 2]), torch.tensor([[5], [5]]), torch.tensor([True, True]),
               scores([0.1, 0.1], [0.01, 0.02], [0.5, 0.6]))
    with pytest.raises(RuntimeError, match="commit"):
        mem.state_dict()
    mem.commit()
    mem.rows_to_test(7)
    other = memory(n=6)
    other.load_state_dict(mem.state_dict())
    for key in ("tested", "flags", "counts", "targets"):
        assert torch.equal(getattr(other, key), getattr(mem, key)), key
    assert torch.allclose(other.invariance, mem.invariance, equal_nan=True)
    assert other.steps == mem.steps and other.rows_to_test(7) == mem.rows_to_test(7)
    rep = mem.report()
    assert rep["counts"]["tested"] == 2 and rep["counts"]["flagged"] == 2 and rep["counts"]["targets"] == 1
    assert rep["targets"] == [{"token_id": 5, "tested": 2, "flagged": 2, "share": 1.0, "named_at_step": 2}]
    assert rep["thresholds"]["flagged_share"] == 0.5
    recs = mem.sample_records()
    assert [r["id"] for r in recs] == [1, 2] and recs[0]["invariance"] == pytest.approx(0.01)
    assert all(r["flagged"] for r in recs)
    assert mem.summary([2])["flagged_poisoned"] == 1
    with pytest.raises(ValueError, match="shape"):
        memory(n=7).load_state_dict(mem.state_dict())


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_samples=0), "num_samples"), (dict(flagged_share=0.0), "flagged_share"),
    (dict(test_budget=-1.0), "test_budget"), (dict(novelty_window=0), "novelty_window"),
    (dict(novelty_confidence=0.0), "novelty_confidence"), (dict(views=0), "views")])
def test_memory_bad_arguments(kwargs, match):
    args = dict(num_samples=4, vocab_size=V)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        InlineMemory(**args)
    mem = memory(n=4)
    with pytest.raises(ValueError, match="sample_ids"):
        mem.treatment(torch.tensor([0, 9]), torch.zeros(2, 2, dtype=torch.long))


def test_config_builds_the_memory_and_validates():
    cfg = PCRConfig(mode="inline").override(test_budget=0.2, flagged_share=0.3, min_support=5, views=2)
    mem = InlineMemory.from_config(cfg, 10, V)
    assert mem.thresholds["test_budget"] == 0.2 and mem.thresholds["min_support"] == 5
    assert mem.thresholds["views"] == 2 and mem.thresholds["flagged_share"] == 0.3
    with pytest.raises(ValueError, match="flagged_share"):
        PCRConfig().override(flagged_share=1.5)
    with pytest.raises(ValueError, match="test_budget"):
        PCRConfig().override(test_budget=-0.1)


# ----------------------------------------------------------------------------- the detector's scores
@pytest.mark.parametrize("views", [1, 3])
def test_scores_flag_exactly_what_cross_view_flags_flags(views):
    torch.manual_seed(0)
    b, t, d = 6, 5, 8
    w = torch.randn(V, d)
    h_a = torch.randn(b, t, d) * 2
    labels = torch.randint(0, V, (b, t))
    labels[:, :2] = -100
    labels[5] = -100                                   # a row without labels is never flagged
    labels[0, 2:] = (h_a[0, 2:] @ w.T).argmax(-1)      # some rows the model is sure of
    labels[1, 2:] = (h_a[1, 2:] @ w.T).argmax(-1)
    views_ = [h_a + 0.01 * torch.randn_like(h_a) for _ in range(views - 1)] + [torch.randn_like(h_a)]
    for tau in (0.05, 0.5, 5.0):
        for conf in (0.5, 5.0, 50.0):
            sc = cross_view_scores(h_a, views_, w, labels, backend="torch")
            expect = cross_view_flags(h_a, views_, w, labels, invariance_threshold=tau, original_confidence=conf,
                                      backend="torch")
            assert torch.equal(sc.flags(invariance_threshold=tau, original_confidence=conf), expect)
    # scores by hand (float64) for the most invariant draw
    la = (h_a.double() @ w.double().T).log_softmax(-1)
    lab = labels != -100
    ce_a = (-la.gather(-1, labels.clamp_min(0)[..., None])[..., 0]).masked_fill(~lab, -1).amax(1)
    sc = cross_view_scores(h_a, views_, w, labels, backend="torch", view_confidence=1e9)
    syms = []
    for hv in views_:
        lb = (hv.double() @ w.double().T).log_softmax(-1)
        syms.append((((la.exp() - lb.exp()) * (la - lb)).sum(-1)).masked_fill(~lab, -1).amax(1))
    best = torch.stack(syms).amin(0)
    assert torch.allclose(sc.confidence[:5].double(), ce_a[:5], atol=1e-4)
    assert torch.allclose(sc.invariance[:5].double(), best[:5], atol=1e-4)
    assert torch.isinf(sc.confidence[5]) and torch.isinf(sc.invariance[5])


# ----------------------------------------------------------------------------- rows of a batch
def with_ids(samples, start=0):
    return [{**s, "sample_ids": torch.tensor([start + i])} for i, s in enumerate(samples)]


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_select_rows_gives_the_rows_of_the_full_batch(family):
    model, make_batch = build_tiny_model(family)
    batch = collate(sample_batches(make_batch, 4, seed=5))
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    rows = torch.tensor([3, 1])
    sub = select_rows(inputs, rows)
    assert sub is not None and sub["input_ids"].shape[0] == 2
    with torch.no_grad():
        full = model(**inputs).logits[rows]
        part = model(**sub).logits
    mask = batch["attention_mask"][rows].bool()
    assert torch.allclose(full[mask], part[mask], atol=1e-5)
    assert select_rows({"input_ids": batch["input_ids"], "odd": torch.zeros(7, 2)}, rows) is None


# ----------------------------------------------------------------------------- the training step
def naive_ce_loss(model, batch, drop=None):
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "sample_ids")}
    z = model(**inputs, use_cache=False).logits.double()[:, :-1]
    labels = batch["labels"][:, 1:]
    lab = labels != -100
    ce = -z.log_softmax(-1).gather(-1, labels.clamp_min(0)[..., None])[..., 0] * lab
    keep = lab if drop is None else lab & ~drop[:, None]
    return (ce * keep).sum() / lab.sum()


def identity(pixel_values, image_grid_thw=None, generator=None):
    return pixel_values.clone()


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_inline_step_is_plain_sft_until_a_target_and_counts_its_views(family):
    """Nothing novel: the loss is the plain CE; the masked views of the budgeted rows are
    extra forward rows, never back-propagated."""
    model, make_batch = build_tiny_model(family)
    model.train()
    batch = collate(with_ids(sample_batches(make_batch, 4, seed=2)))
    cfg = PCRConfig(mode="inline").override(backend="torch", test_budget=1.5, views=2)
    mem = InlineMemory.from_config(cfg, 4, model.get_output_embeddings().weight.shape[0])
    with count_compute(model) as counter:
        out = compute_pcr_loss(model, batch, config=cfg, memory=mem, augment=identity)
        out.loss.backward()
    k = int(1.5 * 4 / 2)                       # rows tested this step (3), two draws each
    assert counter.as_dict() == {"forward_samples": 4 + 2 * k, "backward_samples": 4}
    assert float(out.tested_rows) == 0.0 and mem.steps == 1   # nothing eligible: nothing novel yet
    assert out.loss.item() == pytest.approx(naive_ce_loss(model, batch).item(), rel=1e-5)


def test_inline_step_flags_names_and_unlearns():
    """Everything made eligible and invariant (identity view): after min_support flagged rows
    the novel tokens are targets; their rows leave the CE and get unlikelihood."""
    model, make_batch = build_tiny_model("llava")
    model.train()
    samples = with_ids(sample_batches(make_batch, 6, seed=3))
    first, second = collate(samples[:3]), collate(samples[3:])
    cfg = PCRConfig(mode="inline").override(backend="torch", test_budget=3.0, views=1, novelty_window=1,
                                            novelty_confidence=1e-6, original_confidence=1e9, view_confidence=1e9,
                                            min_support=1, flagged_share=1.0)
    mem = InlineMemory.from_config(cfg, 6, model.get_output_embeddings().weight.shape[0])
    compute_pcr_loss(model, first, config=cfg, memory=mem, augment=identity)   # novelty only
    assert mem.novel.any() and not mem.targets.any()
    out = compute_pcr_loss(model, second, config=cfg, memory=mem, augment=identity)
    assert float(out.tested_rows) == 3 and float(out.flagged_rows) == 3
    assert mem.flags[3:].all() and not mem.flags[:3].any()
    labels = second["labels"][:, 1:]
    expected = set(labels[labels != -100].tolist()) & set(mem.novel.nonzero().flatten().tolist())
    assert set(mem.targets.nonzero().flatten().tolist()) == expected
    # next step: a flagged row's tokens are unlearned, the loss is the naive objective
    out = compute_pcr_loss(model, second, config=cfg, memory=mem, augment=identity)
    z = model(**{k: v for k, v in second.items() if k not in ("labels", "sample_ids")}).logits.double()[:, :-1]
    lab = labels != -100
    ce = -z.log_softmax(-1).gather(-1, labels.clamp_min(0)[..., None])[..., 0] * lab
    is_t = mem.targets[labels.clamp_min(0)] & lab
    ul = -torch.log1p(-(-ce).exp().clamp(max=1 - 1e-12)) * is_t
    assert out.loss.item() == pytest.approx((ul.sum() / lab.sum()).item(), rel=1e-4)
    assert float(out.dropped_fraction) == 1.0


def test_inline_mode_needs_an_inline_memory():
    model, make_batch = build_tiny_model("llava")
    batch = collate(with_ids(sample_batches(make_batch, 2, seed=1)))
    with pytest.raises(ValueError, match="InlineMemory"):
        compute_pcr_loss(model, batch, config=PCRConfig(mode="inline"))
    mem = InlineMemory.from_config(PCRConfig(mode="inline"), 2, model.get_output_embeddings().weight.shape[0])
    with pytest.raises(ValueError, match="sample_ids"):
        compute_pcr_loss(model, {k: v for k, v in batch.items() if k != "sample_ids"},
                         config=PCRConfig(mode="inline"), memory=mem)


# ----------------------------------------------------------------------------- the Trainer
def _trainer(tmp_path, samples, cfg, max_steps, **extra):
    from transformers import TrainingArguments

    from pcr_fast.hf import PCRTrainer

    model, _ = build_tiny_model("llava")
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=max_steps,
                             learning_rate=1e-3, remove_unused_columns=False, report_to=[], use_cpu=True,
                             save_strategy="steps", save_steps=2, disable_tqdm=True, logging_steps=1, seed=0,
                             **extra)
    return PCRTrainer(model=model, args=args, train_dataset=samples, data_collator=collate, pcr=cfg,
                      pcr_augment=identity)


def test_trainer_inline_saves_and_resumes_its_memory(tmp_path):
    pytest.importorskip("transformers")
    _, make_batch = build_tiny_model("llava")
    samples = with_ids(sample_batches(make_batch, 8, seed=6))
    for s in samples:   # one word shared by every response: novel after step 1, so step 2 tests rows
        first = int((s["labels"][0] != -100).nonzero()[0])
        s["labels"][0, first] = s["input_ids"][0, first] = 50
    cfg = PCRConfig(mode="inline").override(backend="torch", test_budget=1.0, views=1, novelty_window=1,
                                            novelty_confidence=1e-6, original_confidence=1e9, view_confidence=1e9,
                                            min_support=1)
    full = _trainer(tmp_path / "full", samples, cfg, 4)
    full.train()
    assert full.pcr_memory.steps == 4 and full.pcr_memory.tested.any()
    assert (tmp_path / "full" / "checkpoint-2" / "pcr_memory.pt").exists()
    assert any("pcr/tested_rows" in h for h in full.state.log_history)
    # resume from step 2: the memory of step 2 comes back, and training ends where the full run did
    resumed = _trainer(tmp_path / "full", samples, cfg, 4)
    mid = torch.load(tmp_path / "full" / "checkpoint-2" / "pcr_memory.pt", weights_only=False)["memory"]
    assert mid["steps"] == 2 and int(mid["tested"].sum()) >= 1
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
    for key in ("tested", "flags", "counts", "targets"):
        assert torch.equal(getattr(resumed.pcr_memory, key), getattr(full.pcr_memory, key)), key
    assert resumed.pcr_memory.steps == 4
    with pytest.raises(ValueError, match="mode"):
        _trainer(tmp_path / "x", samples, PCRConfig(mode="online"), 1).pcr_load_state(
            str(tmp_path / "full" / "checkpoint-2"))


def test_exempt_tokens_are_never_novel_nor_targets():
    # trained from scratch the end-of-answer token (2) is as new as the target (5): both never
    # predicted, both in every flagged row. Only 5 may be named; 2 must not even make a row eligible
    kw = dict(n=10, min_support=2, flagged_share=0.5)
    found = {}
    for exempt in (None, [2]):
        mem = memory(exempt_tokens=exempt, **kw)
        mem.observe(torch.tensor([[5, 2, 5, 2]]), torch.tensor([[9.0, 9.0, 9.0, 9.0]]))
        mem.commit()
        labels = torch.tensor([[5, 2], [5, 2], [4, 2]])
        ids = torch.tensor([0, 1, 2])
        ce = torch.full((3, 2), 0.1)
        rows, eligible = mem.select(ids, labels, ce, 3, generator=torch.Generator().manual_seed(0))
        chosen = sorted(rows[eligible].tolist())
        mem.record(ids, labels, torch.ones(3, dtype=torch.bool), scores([0.1] * 3, [0.01] * 3, [1.0] * 3))
        mem.commit()
        found[exempt is None] = (mem.novel.nonzero().flatten().tolist(), mem.targets.nonzero().flatten().tolist(),
                                 chosen)
        if exempt:
            state = mem.state_dict()
            other = memory(**kw)
            other.load_state_dict(state)
            assert other.exempt.nonzero().flatten().tolist() == [2], "the exemption travels with the checkpoint"
    assert found[True] == ([2, 5], [2, 5], [0, 1, 2]), "without exemption the end token is a target"
    assert found[False] == ([5], [5], [0, 1]), "an exempt token is never novel: row 2 (only token 2 novel) stays out"
    with pytest.raises(ValueError, match="exempt_tokens"):
        memory(exempt_tokens=[V])


def test_special_token_ids_of_a_model_and_its_tokenizer():
    from transformers import PreTrainedTokenizerFast

    from pcr_fast.hf import special_token_ids

    model, _ = build_tiny_model("llava")
    ids = special_token_ids(model)
    assert {model.config.text_config.eos_token_id, model.config.text_config.pad_token_id} <= set(ids)

    class Processor:   # a processor holds its tokenizer
        tokenizer = type("Tok", (), {"all_special_ids": [7, 3]})()

    assert {3, 7} <= set(special_token_ids(model, Processor()))
    assert special_token_ids(None, Processor()) == [3, 7]
    assert special_token_ids(None, Processor(), vocab_size=5) == [3], "ids the lm_head lacks are left out"
    assert PreTrainedTokenizerFast is not None
