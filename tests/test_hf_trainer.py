"""PCRTrainer / PCRTrainerMixin / plain loop: training works, GA is exact, logs carry the terms."""
import pytest
import torch

from pcr_fast import PCRConfig, TwoViewLoss
from pcr_fast.hf import PCRTrainer, PCRTrainerMixin, compute_pcr_loss
from pcr_fast.testing import build_tiny_model, collate, sample_batches, tiny_tokenizer

transformers = pytest.importorskip("transformers")


def flip(pixel_values, image_grid_thw=None, generator=None):
    """Deterministic stand-in augmentation (same view b for the same image)."""
    return -0.8 * pixel_values.flip(-1)


def training_args(tmp_path, **overrides):
    kwargs = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=12,
                  learning_rate=1e-2, logging_steps=4, remove_unused_columns=False, report_to=[],
                  use_cpu=True, save_strategy="no", disable_tqdm=True, lr_scheduler_type="constant",
                  seed=0, dataloader_num_workers=0)
    kwargs.update(overrides)
    return transformers.TrainingArguments(**kwargs)


PCR = PCRConfig().override(mode="online", backend="torch", entropy_weight=0.1, divergence_weight=0.5, gate_weight=0.0,
                shuffle=True, mask_ratio=0.25, unit="token")  # the literal objective


def test_plain_loop_loss_goes_down():
    model, make_batch = build_tiny_model("llava")
    model.train()
    batch = collate(sample_batches(make_batch, 4, seed=1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loss_fn = TwoViewLoss.from_config(PCR)
    losses = []
    for _ in range(12):
        out = compute_pcr_loss(model, batch, augment=flip, loss_fn=loss_fn)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(float(out.loss.detach()))
    assert losses[-1] < 0.8 * losses[0]
    assert all(torch.isfinite(torch.tensor(losses)))


@pytest.mark.parametrize("detach", [False, True], ids=["both_views", "detach_b"])
def test_pcr_trainer_trains_and_logs_terms(tmp_path, detach):
    model, make_batch = build_tiny_model("qwen2_vl")
    pcr = PCR.override(detach_b=detach)
    trainer = PCRTrainer(model=model, args=training_args(tmp_path), train_dataset=sample_batches(make_batch, 8),
                         data_collator=collate, pcr=pcr, pcr_augment=flip)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 3
    for key in ("pcr/ce", "pcr/divergence", "pcr/divergence_term", "pcr/entropy"):
        assert all(key in h for h in logs)
    assert logs[-1]["loss"] < 0.85 * logs[0]["loss"]
    assert logs[-1]["pcr/ce"] < logs[0]["pcr/ce"]
    # the logged loss is the objective composed of the logged terms
    first = logs[0]
    composed = first["pcr/ce"] + 0.5 * first["pcr/divergence_term"] + 0.1 * first["pcr/entropy"]
    assert abs(first["loss"] - composed) < 1e-3 * first["loss"]
    # evaluation goes through compute_loss(return_outputs=True) under no_grad
    metrics = trainer.evaluate(eval_dataset=sample_batches(make_batch, 4, seed=5))
    assert metrics["eval_loss"] > 0


def _one_step_params(tmp_path, batch_size, accumulation):
    model, make_batch = build_tiny_model("llava_next")
    args = training_args(tmp_path, per_device_train_batch_size=batch_size,
                         gradient_accumulation_steps=accumulation, max_steps=1, optim="sgd",
                         learning_rate=0.5, logging_steps=1)
    samples = sample_batches(make_batch, 4, seed=3)
    # ragged answers: micro-batches hold different numbers of labelled tokens
    for i, s in enumerate(samples):
        s["labels"][0, -(2 + i):] = s["input_ids"][0, -(2 + i):]
    trainer = PCRTrainer(model=model, args=args, train_dataset=samples, data_collator=collate,
                         pcr=PCR, pcr_augment=flip)
    trainer.train()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_gradient_accumulation_equals_the_big_batch(tmp_path):
    """num_items_in_batch: 2 micro-batches of 2 == one batch of 4 (token-weighted, not batch-averaged)."""
    big = _one_step_params(tmp_path / "a", 4, 1)
    accumulated = _one_step_params(tmp_path / "b", 2, 2)
    initial, _ = build_tiny_model("llava_next")
    moved = 0
    for name, p in initial.named_parameters():
        torch.testing.assert_close(accumulated[name], big[name], atol=2e-6, rtol=1e-4)
        moved += int(not torch.allclose(big[name], p.detach()))
    assert moved > 0


def test_gradient_checkpointing_non_reentrant_trains_reentrant_is_refused(tmp_path):
    model, make_batch = build_tiny_model("idefics3")
    samples = sample_batches(make_batch, 4)
    args = training_args(tmp_path, max_steps=2, gradient_checkpointing=True,
                         gradient_checkpointing_kwargs={"use_reentrant": False})
    trainer = PCRTrainer(model=model, args=args, train_dataset=samples, data_collator=collate, pcr=PCR,
                         pcr_augment=flip)
    trainer.train()
    assert torch.isfinite(torch.tensor(trainer.state.log_history[-1]["train_loss"]))
    bad = training_args(tmp_path, max_steps=2, gradient_checkpointing=True,
                        gradient_checkpointing_kwargs={"use_reentrant": True})
    with pytest.raises(ValueError, match="use_reentrant"):
        PCRTrainer(model=model, args=bad, train_dataset=samples, data_collator=collate, pcr=PCR)


def test_sft_trainer_mixin_with_lora_trains_only_adapters(tmp_path):
    trl = pytest.importorskip("trl")
    peft = pytest.importorskip("peft")

    class PCRSFTTrainer(PCRTrainerMixin, trl.SFTTrainer):
        pass

    model, make_batch = build_tiny_model("qwen2_vl")
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=r".*language_model.*\.(q_proj|v_proj)")
    model = peft.get_peft_model(model, lora)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = trl.SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=3,
                         learning_rate=5e-2, logging_steps=1, remove_unused_columns=False, report_to=[],
                         use_cpu=True, save_strategy="no", disable_tqdm=True, gradient_checkpointing=False,
                         dataset_kwargs={"skip_prepare_dataset": True}, max_length=None)
    datasets = pytest.importorskip("datasets")   # TRL wants a datasets.Dataset
    rows = [{k: v.tolist() for k, v in s.items()} for s in sample_batches(make_batch, 8)]
    dataset = datasets.Dataset.from_list(rows).with_format("torch")
    trainer = PCRSFTTrainer(model=model, args=args, train_dataset=dataset,
                            data_collator=collate, processing_class=tiny_tokenizer(), pcr=PCR,
                            pcr_augment=flip)
    trainer.train()
    assert any("pcr/divergence" in h for h in trainer.state.log_history)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed and all("lora_" in n for n in changed)


def test_trainer_rejects_a_bad_pcr_argument(tmp_path):
    model, make_batch = build_tiny_model("llava")
    with pytest.raises(ValueError, match="pcr must be a PCRConfig"):
        PCRTrainer(model=model, args=training_args(tmp_path), train_dataset=sample_batches(make_batch, 2),
                   data_collator=collate, pcr={"margin": 1.0})
