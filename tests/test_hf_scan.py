"""Scan-and-unlearn PCR on HF models: scan_batch / scan_dataset, compute_pcr_loss(memory=...),
PCRTrainer in scan mode. Truths are written out independently on the model's own logits."""
import pytest
import torch

from pcr_fast import BackdoorMemory, PCRConfig
from pcr_fast.hf import PCRTrainer, compute_pcr_loss, scan_batch, scan_dataset
from pcr_fast.testing import build_tiny_model, collate, sample_batches

transformers = pytest.importorskip("transformers")

# (gemma3 and mllama are left out: in their tiny batches the image does not reach the labelled
# tokens, so no view can differ; the online-objective tests cover their layouts)
FAMILIES = ["llava", "qwen2_vl", "idefics3", "internvl"]


def identity(pixel_values, image_grid_thw=None, generator=None):
    return pixel_values.clone()


def scramble(pixel_values, image_grid_thw=None, generator=None):
    return -30.0 * pixel_values.flip(-1) + 10.0


def naive_max_sym_kl(model, batch, pixels_b):
    """Per response, the largest symmetric KL between the two views (float64, own logits)."""
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "sample_ids")}
    with torch.no_grad():
        la = model(**inputs).logits.double().log_softmax(-1)[:, :-1]
        lb = model(**{**inputs, "pixel_values": pixels_b}).logits.double().log_softmax(-1)[:, :-1]
    sym = ((la.exp() - lb.exp()) * (la - lb)).sum(-1)
    lab = batch["labels"][:, 1:] != -100
    return sym.masked_fill(~lab, float("-inf")).amax(1)


def with_ids(samples, start=0):
    return [{**s, "sample_ids": torch.tensor([start + i])} for i, s in enumerate(samples)]


def vocab_of(model):
    return model.get_output_embeddings().weight.shape[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_scan_batch_flags_follow_the_views(family):
    model, make_batch = build_tiny_model(family)
    batch = collate(with_ids(sample_batches(make_batch, 3, seed=2)))
    mem = BackdoorMemory(3, vocab_of(model), min_support=1)
    # a threshold between "identical" (0) and what the scrambled view really changes
    changed = naive_max_sym_kl(model, batch, scramble(batch["pixel_values"]))
    assert float(changed.min()) > 1e-9
    loose = PCRConfig().override(invariance_threshold=0.5 * float(changed.min()), view_confidence=1e9, original_confidence=1e9,
                      views=2, backend="torch")
    mem.begin_scan()
    # identical views are invariant: every response is flagged (confidence checks off)
    assert scan_batch(model, batch, mem, config=loose, augment=identity).all()
    mem.end_scan()
    assert mem.flags.all() and mem.scans == 1
    # a scrambled image changes the random model's outputs: nothing is invariant
    mem2 = BackdoorMemory(3, vocab_of(model))
    mem2.begin_scan()
    assert not scan_batch(model, batch, mem2, config=loose, augment=scramble).any()
    # and a random model is never sure of the labels: the default confidence check refuses all
    assert not scan_batch(model, batch, mem2, config=PCRConfig().override(backend="torch"), augment=identity).any()


def test_scan_batch_looks_at_every_draw():
    """gate_views draws, flagged if invariant under ANY: the first draw scrambles, the second
    is the identity; one draw flags nothing, two flag everything."""
    model, make_batch = build_tiny_model("llava")
    batch = collate(with_ids(sample_batches(make_batch, 3, seed=3)))
    changed = naive_max_sym_kl(model, batch, scramble(batch["pixel_values"]))
    calls = []

    def scramble_then_identity(pixel_values, image_grid_thw=None, generator=None):
        calls.append(1)
        return scramble(pixel_values) if len(calls) % 2 == 1 else identity(pixel_values)

    for views, expected in ((1, False), (2, True)):
        calls.clear()
        cfg = PCRConfig().override(invariance_threshold=0.5 * float(changed.min()), view_confidence=1e9,
                        original_confidence=1e9, views=views, backend="torch")
        mem = BackdoorMemory(3, vocab_of(model))
        mem.begin_scan()
        flags = scan_batch(model, batch, mem, config=cfg, augment=scramble_then_identity)
        assert len(calls) == views and bool(flags.all()) is expected and bool(flags.any()) is expected


def test_scan_dataset_restores_train_mode_and_counts_every_sample():
    model, make_batch = build_tiny_model("llava")
    model.train()
    samples = with_ids(sample_batches(make_batch, 5, seed=4))
    batches = [collate(samples[:3]), collate(samples[3:])]
    mem = BackdoorMemory(5, vocab_of(model), min_support=1, target_share=1.0)
    summary = scan_dataset(model, batches, mem, augment=identity, progress=True,
                           config=PCRConfig().override(invariance_threshold=1e-3, view_confidence=1e9, original_confidence=1e9,
                                            backend="torch", views=1))
    assert model.training
    assert summary["scans"] == 1 and summary["flagged"] == 5
    # every labelled token of a fully flagged set is a target token
    labels = torch.cat([collate([s])["labels"][:, 1:].reshape(-1) for s in samples])
    assert set(summary["target_tokens"]) == set(labels[labels != -100].tolist())


def naive_unlearning_loss(model, batch, drop, targets, lam):
    """Full float64 logits from the model's own forward: CE on kept rows + λ·unlikelihood."""
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "sample_ids")}
    z = model(**inputs, use_cache=False).logits.double()[:, :-1]
    labels = batch["labels"][:, 1:]
    lab = labels != -100
    lp = z.log_softmax(-1)
    ce = (-lp.gather(-1, labels.clamp_min(0)[..., None])[..., 0]) * lab
    is_target = torch.isin(labels, targets) & lab
    drop = drop | is_target.any(1)
    unl = is_target & drop[:, None]
    ul = -torch.log1p(-(-ce).exp().clamp(max=1 - 1e-12)) * unl
    return ((ce * (lab & ~drop[:, None])).sum() + lam * ul.sum()) / lab.sum()


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_compute_pcr_loss_with_memory_matches_the_naive_objective(family):
    model, make_batch = build_tiny_model(family)
    model.train()
    batch = collate(with_ids(sample_batches(make_batch, 4, seed=1)))
    labels = batch["labels"][:, 1:]
    mem = BackdoorMemory(4, vocab_of(model), min_support=1)
    mem.begin_scan()
    flags = torch.tensor([True, False, False, False])
    mem.record(batch["sample_ids"], labels, flags)
    mem.end_scan()
    # make one token of row 2 a target: row 2 is then dropped and unlearned too
    target = labels[2][labels[2] != -100][0]
    mem.targets.zero_()
    mem.targets[target] = True
    cfg = PCRConfig(mode="scan").override(backend="torch", unlearn_weight=2.5)
    out = compute_pcr_loss(model, batch, config=cfg, memory=mem)
    params = [p for p in model.parameters() if p.requires_grad]
    got = torch.autograd.grad(out.loss, params, allow_unused=True)
    want_loss = naive_unlearning_loss(model, batch, flags, target.view(1), 2.5)
    want = torch.autograd.grad(want_loss, params, allow_unused=True)
    torch.testing.assert_close(out.loss.double(), want_loss.detach(), atol=1e-5, rtol=1e-5)
    for g, w in zip(got, want):
        if w is None:
            assert g is None or not g.abs().any()
            continue
        torch.testing.assert_close(g.double(), w.double(), atol=1e-5, rtol=1e-4)
    assert out.dropped_fraction.item() >= 0.5 and out.divergence is None
    assert set(out.log_dict()) == {"pcr/ce", "pcr/unlikelihood", "pcr/dropped_fraction"}


def test_compute_pcr_loss_with_memory_needs_sample_ids():
    model, make_batch = build_tiny_model("llava")
    batch = collate(sample_batches(make_batch, 2))
    mem = BackdoorMemory(2, vocab_of(model))
    with pytest.raises(ValueError, match="needs inputs\\['sample_ids'\\]"):
        compute_pcr_loss(model, batch, memory=mem)
    with pytest.raises(ValueError, match="memory must be a BackdoorMemory"):
        compute_pcr_loss(model, {**batch, "sample_ids": torch.arange(2)}, memory={"flags": None})


def training_args(tmp_path, **overrides):
    kwargs = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=6, learning_rate=1e-2,
                  logging_steps=1, remove_unused_columns=False, report_to=[], use_cpu=True, save_strategy="no",
                  disable_tqdm=True, lr_scheduler_type="constant", seed=0, dataloader_num_workers=0)
    kwargs.update(overrides)
    return transformers.TrainingArguments(**kwargs)


def test_pcr_trainer_scan_mode_scans_on_schedule_then_unlearns(tmp_path):
    model, make_batch = build_tiny_model("llava")
    samples = with_ids(sample_batches(make_batch, 8))
    # loose detector (identity view, no confidence check): every sample is flagged at the
    # first scan, so training after it runs the unlearning objective
    cfg = PCRConfig(mode="scan").override(backend="torch", scan_at=(0.5,), invariance_threshold=1e-3, view_confidence=1e9,
                    original_confidence=1e9, views=1, min_support=1)
    trainer = PCRTrainer(model=model, args=training_args(tmp_path), train_dataset=samples, data_collator=collate,
                         pcr=cfg, pcr_augment=identity)
    calls = []
    original = trainer.pcr_scan
    trainer.pcr_scan = lambda m=None: calls.append(trainer.state.global_step) or original(m)
    trainer.train()
    assert calls == [3]
    assert trainer.pcr_memory.scans == 1 and bool(trainer.pcr_memory.flags.all())
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 6
    assert all(not any(k.startswith("pcr/") for k in h) for h in logs[:3])   # the model's own loss before the scan
    assert all(h["pcr/dropped_fraction"] == 1.0 for h in logs[3:])
    metrics = trainer.evaluate(eval_dataset=sample_batches(make_batch, 4, seed=5))  # the model's own loss
    assert metrics["eval_loss"] > 0


def test_pcr_trainer_scan_mode_refuses_an_online_loss_and_missing_ids(tmp_path):
    from pcr_fast import TwoViewLoss

    model, make_batch = build_tiny_model("llava")
    with pytest.raises(ValueError, match="pcr_loss is the per-batch objective"):
        PCRTrainer(model=model, args=training_args(tmp_path), train_dataset=sample_batches(make_batch, 4),
                   data_collator=collate, pcr=PCRConfig(), pcr_loss=TwoViewLoss())
    trainer = PCRTrainer(model=model, args=training_args(tmp_path, max_steps=2),
                         train_dataset=sample_batches(make_batch, 4), data_collator=collate,
                         pcr=PCRConfig(mode="scan").override(backend="torch", scan_at=(0.0,)), pcr_augment=identity)
    with pytest.raises(ValueError, match="sample_ids"):
        trainer.train()
