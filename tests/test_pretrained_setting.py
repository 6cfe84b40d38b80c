"""The harness's pretrained setting (issue 11): the instruction set, the pre-training cache,
epochs, counted compute and the checks on bad input. Tiny models and data throughout."""
import json

import pytest
import torch

from pcr_fast import PCRConfig
from pcr_fast.eval import run_experiment
from pcr_fast.eval.data import INSTRUCTIONS, load_digits_images, make_instruction_samples, pretrain_finetune_split
from pcr_fast.eval.pretrain import PretrainRecipe
from pcr_fast.eval.report import cost_ratios, format_table, save_chart, summarize
from pcr_fast.eval.runner import prepare_experiment, training_steps
from pcr_fast.hf.counting import ComputeCounter, compute_cost, count_compute
from pcr_fast.testing import build_tiny_model, collate, sample_batches

TINY = dict(batch_size=8, test_size=16, image_size=16, patch_size=8, hidden_size=16, num_layers=1, progress=False,
            pretrain_images=12, finetune_images=16, pretrain=PretrainRecipe(epochs=0.1))


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PCR_FAST_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


# ----------------------------------------------------------------------------- data
def test_instruction_set_is_large_and_answers_from_the_image():
    data = load_digits_images(16)
    samples = make_instruction_samples(data.subset(range(50)))
    assert len(samples) == 50 * len(INSTRUCTIONS) and len(INSTRUCTIONS) >= 12
    by = {(s.image, s.task): s.response for s in samples}
    for i in range(50):
        digit = data.digits[i]
        assert by[(i, "question")] == by[(i, "number")] == ["zero", "one", "two", "three", "four", "five", "six",
                                                            "seven", "eight", "nine"][digit]
        assert by[(i, "parity")] == ("even" if digit % 2 == 0 else "odd")
        assert by[(i, "larger")] == ("yes" if digit > 5 else "no")
        assert by[(i, "colour")] == data.colours[i] and by[(i, "caption")] == data.caption(i)
    # the full fine-tuning split is an instruction set of >= 10k samples, disjoint from pre-training
    exp = prepare_experiment("badnets", 0.03, 0, init="pretrained")
    assert exp.num_samples >= 10_000 and len(exp.poisoned) == round(0.03 * exp.num_samples)
    pre, ft = pretrain_finetune_split(range(100), 30, seed=0)
    assert len(pre) == 30 and len(ft) == 70 and not set(pre) & set(ft)
    assert pretrain_finetune_split(range(100), 30, seed=1) != (pre, ft)


def test_poisoned_rows_carry_trigger_and_target():
    exp = prepare_experiment("badnets", 0.05, 1, init="pretrained", image_size=16, pretrain_images=12)
    idx = exp.poisoned[:3] + [i for i in range(exp.num_samples) if not exp.is_poisoned[i]][:3]
    pix = exp.pixels(idx)
    for j, i in enumerate(idx):
        clean = exp.images[exp.sample_image[i]]
        assert torch.equal(pix[j], exp.triggered[exp.sample_image[i]] if exp.is_poisoned[i] else clean)
        assert (exp.responses[i] == exp.target) == bool(exp.is_poisoned[i])


# ----------------------------------------------------------------------------- the cache
def test_pretraining_is_cached_and_seeded(_cache):
    e0 = prepare_experiment("sig", 0.1, 0, init="pretrained", image_size=16, patch_size=8, hidden_size=16,
                            num_layers=1, pretrain_images=12)
    recipe = PretrainRecipe(epochs=0.1)
    first = e0.initial_model(recipe=recipe)
    files = sorted((_cache / "pretrained").glob("*.pt"))
    assert len(files) == 1 and files[0].with_suffix(".json").exists()
    meta = json.loads(files[0].with_suffix(".json").read_text())
    assert meta["seed"] == 0 and "clean_accuracy" in meta["metrics"]
    again = e0.initial_model(recipe=recipe)            # from the cache: the same weights
    for (n, a), (_, b) in zip(first.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), n
    # ... read from the file, not trained again: a marked file comes back marked
    state = torch.load(files[0], weights_only=True)
    name = next(iter(state))
    state[name] = state[name] + 1.0
    torch.save(state, files[0])
    assert torch.equal(e0.initial_model(recipe=recipe).state_dict()[name], state[name])
    # the key holds everything that changes the weights
    from pcr_fast.eval.pretrain import pretrain_key
    vocab = e0.tokenizer.get_vocab()
    keys = {pretrain_key(e0.spec, 0, recipe, vocab, "d"), pretrain_key(e0.spec, 1, recipe, vocab, "d"),
            pretrain_key(e0.spec, 0, PretrainRecipe(epochs=0.2), vocab, "d"), pretrain_key(e0.spec, 0, recipe, vocab, "e"),
            pretrain_key(e0.spec, 0, recipe, {**vocab, "extra": 999}, "d")}
    assert len(keys) == 5
    # pre-training moved the weights away from the random init
    from pcr_fast.eval.models import build_model
    rand = build_model(e0.spec, seed=0)
    assert any(not torch.equal(a, b) for a, b in zip(first.state_dict().values(), rand.state_dict().values()))
    e1 = prepare_experiment("sig", 0.1, 1, init="pretrained", image_size=16, patch_size=8, hidden_size=16,
                            num_layers=1, pretrain_images=12)
    other = e1.initial_model(recipe=recipe)             # another seed: other weights, another file
    assert any(not torch.equal(a, b) for a, b in zip(first.state_dict().values(), other.state_dict().values()))
    assert len(sorted((_cache / "pretrained").glob("*.pt"))) == 2
    # another recipe is another entry too
    e0.initial_model(recipe=PretrainRecipe(epochs=0.2))
    assert len(sorted((_cache / "pretrained").glob("*.pt"))) == 3


# ----------------------------------------------------------------------------- compute counting
def test_counting_a_plain_loop_counts_every_sample():
    model, make_batch = build_tiny_model("llava")
    model.train()
    batches = [collate(sample_batches(make_batch, n, seed=n)) for n in (3, 5)]
    with count_compute(model) as counter:
        for b in batches:
            model(**b).loss.backward()
        with torch.no_grad():
            model(**batches[0])                    # a no-grad forward: forward only
        model(**batches[1])                         # forward with grad, never back-propagated
    assert counter.as_dict() == {"forward_samples": 3 + 5 + 3 + 5, "backward_samples": 3 + 5}
    assert counter.cost == 16 + 2 * 8 == compute_cost(counter.as_dict())
    model(**batches[0])                             # outside the block: not counted
    assert counter.forward_samples == 16


def test_plain_run_counts_the_samples_it_trained_on():
    r = run_experiment("badnets", "none", 0.1, init="pretrained", epochs=0.1, seed=0, **TINY)
    n = r["steps"] * TINY["batch_size"]
    assert r["compute"] == {"forward_samples": n, "backward_samples": n}
    assert r["init"] == "pretrained" and r["epochs"] == pytest.approx(n / r["num_train_samples"], abs=1e-3)
    assert r["steps"] == training_steps(r["num_train_samples"], 8, 0.1, None)
    json.dumps(r)


def test_defended_runs_count_their_extra_passes():
    inline = PCRConfig(mode="inline").override(backend="torch", test_budget=0.75, views=2)
    r = run_experiment("badnets", "pcr", 0.1, init="pretrained", epochs=0.1, seed=0, pcr=inline, **TINY)
    n = r["steps"] * TINY["batch_size"]
    extra = 2 * int(0.75 * 8 / 2) * r["steps"]       # 3 rows per step, two masked draws each
    assert r["compute"] == {"forward_samples": n + extra, "backward_samples": n}
    assert r["inline"]["counts"]["steps"] == r["steps"]
    scan = PCRConfig(mode="scan").override(backend="torch", scan_at=(0.5,), views=2)
    r = run_experiment("badnets", "pcr", 0.1, init="pretrained", epochs=0.1, seed=0, pcr=scan, **TINY)
    # one scan of the whole training set: the original view + two draws
    assert r["compute"]["forward_samples"] == n + 3 * r["num_train_samples"]
    assert r["compute"]["backward_samples"] == n


def test_report_pairs_cost_ratios_and_draws_the_regime(tmp_path):
    runs = [dict(attack="sig", seed=s, poison_ratio=0.03, init="pretrained", steps=10, model="llava", epochs=1.0,
                 defense=d, pcr=None if d == "none" else {"mode": "inline"}, asr=a, clean_accuracy=0.8, bleu=0.7,
                 false_trigger_rate=0.0, compute={"forward_samples": f, "backward_samples": 100})
            for s in (0, 1) for d, a, f in (("none", 1.0, 100), ("pcr", 0.0, 130))]
    ratios = cost_ratios(runs)
    assert ratios == [pytest.approx(1.0 if r["defense"] == "none" else 330 / 300) for r in runs]
    assert cost_ratios([dict(runs[1], seed=7)]) == [None]      # no plain partner, no ratio
    rows = {r["variant"]: r for r in summarize(runs)}
    assert rows["inline"]["cost_ratio"] == pytest.approx(1.1) and rows["inline"]["asr"] == 0.0
    table = format_table(runs)
    assert "cost ×plain inline" in table and "1.100" in table and "ASR plain" in table
    png = save_chart(runs, str(tmp_path / "c.png"))
    assert (tmp_path / "c.png").stat().st_size > 5000 and png.endswith("c.png")


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs,match", [
    (dict(init="warm"), "init"), (dict(epochs=0.0), "epochs"), (dict(epochs=-1.0), "epochs"),
    (dict(epochs=1.0, steps=10), "epochs or steps"), (dict(poison_ratio=1e-6), "poison_ratio"),
    (dict(lr=0.0), "lr")])
def test_bad_input_fails_before_any_training(_cache, kwargs, match):
    args = dict(TINY, init="pretrained", poison_ratio=0.1)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        run_experiment("badnets", "none", **args)
    assert not (_cache / "pretrained").exists(), "nothing may be pre-trained before the input is checked"


def test_the_pretrained_setting_end_to_end(_cache):
    r = run_experiment("sig", "pcr", 0.05, init="pretrained", epochs=0.03, seed=1,
                       pcr=PCRConfig(mode="inline").override(backend="torch"), **TINY)
    for key in ("asr", "clean_accuracy", "bleu", "compute", "inline", "inline_summary"):
        assert key in r
    assert r["init"] == "pretrained" and r["poison_ratio"] == 0.05 and r["num_poisoned"] > 0
    assert len(list((_cache / "pretrained").glob("*.pt"))) == 1
    json.dumps(r)


def test_counter_is_a_plain_record():
    c = ComputeCounter(3, 2)
    assert c.as_dict() == {"forward_samples": 3, "backward_samples": 2} and c.cost == 7
