"""PCRTrainer: the first batch is checked when train() starts (before any step or scan, once),
and pcr_report() says what the defense found (its checkpoints: tests/test_inline.py and
tests/test_cli_train.py)."""
import pytest
import torch

from pcr_fast import PCRConfig
from pcr_fast.hf import PCRTrainer
from pcr_fast.testing import build_tiny_model, collate, sample_batches

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: one intra-op thread is fastest (and far faster on a shared machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def identity(pixel_values, image_grid_thw=None, generator=None):
    return pixel_values.clone()


def with_ids(samples):
    return [{**s, "sample_ids": torch.tensor([i])} for i, s in enumerate(samples)]


def training_args(path, **overrides):
    kwargs = dict(output_dir=str(path), per_device_train_batch_size=4, max_steps=4, learning_rate=1e-2,
                  logging_steps=1, remove_unused_columns=False, report_to=[], use_cpu=True, save_strategy="no",
                  disable_tqdm=True, lr_scheduler_type="constant", seed=0, dataloader_num_workers=0)
    kwargs.update(overrides)
    return transformers.TrainingArguments(**kwargs)


# loose detector (identity view, no confidence check): every sample is flagged at a scan
LOOSE = PCRConfig(mode="scan").override(backend="torch", invariance_threshold=1e-3, view_confidence=1e9, original_confidence=1e9,
                             views=1, min_support=1)


def trainer_for(path, samples, collator=collate, pcr=LOOSE.override(scan_at=(0.0,)), **args):
    model, _ = build_tiny_model("llava")
    return PCRTrainer(model=model, args=training_args(path, **args), train_dataset=samples, data_collator=collator,
                      pcr=pcr, pcr_augment=identity)


def broken(key, value):
    def collator(samples):
        batch = collate(samples)
        batch[key] = value(batch)
        return batch
    return collator


@pytest.mark.parametrize("collator, message", [
    (collate, "needs inputs\\['sample_ids'\\]"),                      # the example: no id column
    (broken("pixel_values", lambda b: b["pixel_values"].masked_fill(torch.rand_like(b["pixel_values"]) < 0.1,
                                                                    float("nan"))), "NaN or inf"),
    (broken("labels", lambda b: torch.full_like(b["labels"], -100)), "no labelled token"),
    (broken("sample_ids", lambda b: b["sample_ids"] + 100), "outside the training set's row ids"),
], ids=["no_sample_ids", "nan_pixels", "no_labels", "ids_out_of_range"])
def test_the_first_batch_is_checked_before_any_step(tmp_path, collator, message):
    model, make_batch = build_tiny_model("llava")
    samples = sample_batches(make_batch, 8)
    if collator is not collate:
        samples = with_ids(samples)
    # scans would start only at 50 %: without the check, this would fail (or train on NaN) much later
    trainer = trainer_for(tmp_path, samples, collator, pcr=LOOSE.override(scan_at=(0.5,)))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    with pytest.raises(ValueError, match=message):
        trainer.train()
    assert trainer.state.global_step == 0 and trainer.pcr_memory is None
    assert all(torch.equal(p.detach(), before[n]) for n, p in trainer.model.named_parameters())


def test_the_first_batch_check_runs_once(tmp_path):
    model, make_batch = build_tiny_model("llava")
    calls = []
    import pcr_fast.hf.trainer as trainer_module

    original = trainer_module.check_first_batch
    trainer_module.check_first_batch = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        trainer_for(tmp_path, with_ids(sample_batches(make_batch, 8))).train()
    finally:
        trainer_module.check_first_batch = original
    assert calls == [1]


def test_pcr_report_says_what_was_found(tmp_path):
    model, make_batch = build_tiny_model("llava")
    trainer = trainer_for(tmp_path, with_ids(sample_batches(make_batch, 8)))
    assert trainer.pcr_report()["counts"]["scans"] == 0                   # before training: nothing yet
    trainer.train()
    report = trainer.pcr_report()
    assert report["kind"] == "train" and report["defense"] == "pcr"
    assert report["counts"]["samples"] == 8 and report["counts"]["invariant"] == 8 and report["counts"]["scans"] == 1
    assert report["target_tokens"]           # every response token is a target under the loose detector
