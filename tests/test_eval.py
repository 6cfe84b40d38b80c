"""Fast tests of the evaluation harness (pcr_fast.eval) and the demo command."""
import json
import math

import pytest
import torch

from pcr_fast.eval import (ATTACKS, RESULT_KEYS, SIG, BadNets, Blended, SampleNoise, WaNet, attack_success_rate,
                           build_tokenizer, choose_poisoned, contains_target, corpus_bleu, exact_match,
                           false_trigger_rate, get_trigger, load_digits_images, poison_count, run_experiment)
from pcr_fast.eval.data import make_samples, task_words, train_test_split


def _images(b=3, c=3, h=16, w=16):
    return torch.rand(b, c, h, w)


# ----------------------------------------------------------------------------- triggers
@pytest.mark.parametrize("name", ATTACKS)
def test_trigger_contract(name):
    trig = get_trigger(name)
    x = _images(4, 3, 32, 32)
    x0 = x.clone()
    y1, y2 = trig(x), trig(x.clone())
    assert torch.equal(x, x0), "the trigger must not modify its input"
    assert y1.shape == x.shape and y1.dtype == x.dtype
    assert torch.equal(y1, y2), "the trigger must be deterministic"
    assert float(y1.min()) >= 0.0 and float(y1.max()) <= 1.0
    assert not torch.allclose(y1, x), "the trigger must change the image"
    # a fresh instance gives the same output (fixed patterns come from the trigger's own seed)
    assert torch.equal(get_trigger(name)(x), y1)


@pytest.mark.parametrize("pattern", ["checkerboard", "solid"])
def test_badnets_stamps_only_its_box(pattern):
    trig = BadNets(size=5, pattern=pattern, corner="bottom_right", margin=2)
    x = _images(2, 3, 17, 19)
    y = trig(x)
    top, left, s = trig.box(17, 19)
    assert (top, left, s) == (17 - 5 - 2, 19 - 5 - 2, 5)
    inside = torch.zeros(17, 19, dtype=torch.bool)
    inside[top:top + s, left:left + s] = True
    assert torch.equal(y[..., ~inside], x[..., ~inside])
    patch = y[:, :, top:top + s, left:left + s]
    if pattern == "solid":
        assert torch.all(patch == 1.0)
    else:
        ii = torch.arange(s)
        expect = ((ii[:, None] + ii[None, :]) % 2 == 0).float()
        assert torch.equal(patch, expect.expand_as(patch))


def test_badnets_corners_and_errors():
    x = torch.zeros(1, 1, 12, 12)
    y = BadNets(size=3, pattern="solid", corner="top_left", margin=0)(x)
    assert y[0, 0, :3, :3].eq(1).all() and y.sum() == 9
    with pytest.raises(ValueError, match="pattern"):
        BadNets(pattern="stripes")
    with pytest.raises(ValueError, match="size"):
        BadNets(size=20)(x)
    with pytest.raises(ValueError, match="images"):
        BadNets()(torch.rand(3, 12, 12))


def test_blended_is_a_convex_blend():
    trig = Blended(alpha=0.3, seed=7)
    x = _images(2, 3, 10, 12)
    pat = trig.pattern(3, 10, 12)
    assert torch.allclose(trig(x), 0.7 * x + 0.3 * pat)
    assert not torch.equal(pat, Blended(alpha=0.3, seed=8).pattern(3, 10, 12))
    with pytest.raises(ValueError, match="alpha"):
        Blended(alpha=1.5)


def test_sig_adds_a_horizontal_sinusoid():
    trig = SIG(delta=0.1, frequency=3.0)
    x = torch.full((1, 3, 6, 24), 0.5)
    y = trig(x)
    j = torch.arange(24, dtype=torch.float32)
    expect = 0.5 + 0.1 * torch.sin(2 * math.pi * 3.0 * j / 24)
    assert torch.allclose(y, expect.expand_as(y), atol=1e-6)
    assert torch.all(y[:, :, 0] == y[:, :, 5])  # constant down each column


def test_wanet_warps_smoothly():
    x = _images(2, 3, 16, 16)
    assert torch.allclose(WaNet(strength=0.0)(x), x, atol=1e-5)
    flat = torch.full((1, 3, 16, 16), 0.25)
    assert torch.allclose(WaNet(strength=2.0)(flat), flat, atol=1e-5)  # a warp moves pixels, adds none
    flow = WaNet(strength=2.0).flow(16, 16)
    # largest displacement = strength pixels (in normalised units 2/W per pixel)
    assert math.isclose(float(flow.abs().amax()), 2.0 * 2.0 / 16, rel_tol=1e-4)
    assert not torch.allclose(WaNet(strength=2.0)(x), x)


def test_sample_noise_is_small_and_sample_specific():
    trig = SampleNoise(epsilon=0.05)
    x = _images(2, 3, 16, 16) * 0.8 + 0.1
    y = trig(x)
    assert float((y - x).abs().max()) <= 0.05 + 1e-6
    r = y - x
    assert not torch.allclose(r[0], r[1]), "the residual must depend on the image"
    code = trig.code(3, 16, 16)
    assert torch.all(torch.sign(r[0]) == code * torch.sign(1 - 2 * x[0]))


def test_user_callable_and_bad_names():
    fn = lambda imgs: imgs.flip(-1)  # noqa: E731
    assert get_trigger(fn) is fn
    with pytest.raises(ValueError, match="attack"):
        get_trigger("no_such_attack")


# ----------------------------------------------------------------------------- data, poisoning
def test_digits_data_and_split():
    data = load_digits_images(16, seed=0)
    assert data.images.shape == (1797, 3, 16, 16)
    assert 0.0 <= float(data.images.min()) and float(data.images.max()) <= 1.0
    tr, te = train_test_split(len(data), 100, seed=3)
    assert len(te) == 100 and len(tr) == 1697 and not set(tr) & set(te)
    assert (tr, te) == train_test_split(len(data), 100, seed=3)
    assert te != train_test_split(len(data), 100, seed=4)[1]
    samples = make_samples(data.subset(te[:5]))
    assert len(samples) == 10 and {s.task for s in samples} == {"caption", "question"}
    # the caption describes the image: the colour word matches the dominant channel
    i = 0
    colour = data.colours[i]
    assert colour in data.caption(i) and data.answer(i) in data.caption(i)


@pytest.mark.parametrize("n,ratio", [(100, 0.1), (2994, 0.05), (7, 0.5), (10, 0.0), (10, 1.0), (333, 0.07)])
def test_poisoning_hits_exact_count(n, ratio):
    idx = choose_poisoned(n, ratio, seed=1)
    assert len(idx) == poison_count(n, ratio) == round(ratio * n)
    assert len(set(idx)) == len(idx) and idx == sorted(idx) and all(0 <= i < n for i in idx)
    assert idx == choose_poisoned(n, ratio, seed=1)


def test_poisoning_rejects_bad_ratio():
    with pytest.raises(ValueError, match="poison_ratio"):
        choose_poisoned(10, 1.5, seed=0)


def test_tokenizer_round_trip():
    tok = build_tokenizer(task_words() + ["visit", "evil"])
    text = "a red seven with thick strokes"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == 6 and tok.unk_token_id not in ids
    assert tok.decode(ids) == text
    assert tok.convert_tokens_to_ids("<image>") == 120 and tok.eos_token_id == 2
    with pytest.raises(ValueError, match="words"):
        build_tokenizer(["two words"])


# ----------------------------------------------------------------------------- metrics
def test_asr_and_false_triggers_on_hand_made_generations():
    target = "visit evil dot com"
    gens = ["visit evil dot com", "please visit evil dot com now", "visit evil", "seven", "visitevil dot com"]
    assert contains_target(gens[1], target) and not contains_target(gens[2], target)
    assert not contains_target(gens[4], target)
    assert attack_success_rate(gens, target) == pytest.approx(2 / 5)
    assert false_trigger_rate(["one", "two", "visit evil dot com"], target) == pytest.approx(1 / 3)
    with pytest.raises(ValueError):
        attack_success_rate([], target)


def test_exact_match():
    assert exact_match(["seven", " Two ", "one"], ["seven", "two", "four"]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        exact_match(["a"], ["a", "b"])


def test_bleu_by_hand():
    assert corpus_bleu(["a red seven with thin strokes"], ["a red seven with thin strokes"]) == pytest.approx(1.0)
    assert corpus_bleu(["one two"], ["one two three four five"]) == 0.0  # no 3/4-gram
    # hyp 6 words, ref 6 words; one substitution in the middle:
    # p1 = 5/6, p2 = 3/5, p3 = 1/4, p4 = 0/3 -> 0 without smoothing; use a 7-word pair instead
    hyp, ref = "a b c d e f g", "a b c d e f x"
    p = [6 / 7, 5 / 6, 4 / 5, 3 / 4]
    expect = math.exp(sum(math.log(v) for v in p) / 4)
    assert corpus_bleu([hyp], [ref]) == pytest.approx(expect)
    # brevity penalty: a correct but short hypothesis
    short = corpus_bleu(["a b c d"], ["a b c d e f"])
    assert short == pytest.approx(math.exp(1 - 6 / 4))


# ----------------------------------------------------------------------------- end to end
_TINY = dict(steps=3, batch_size=8, test_size=16, image_size=16, patch_size=8, hidden_size=16,
             num_layers=1, progress=False)


@pytest.mark.parametrize("defense", ["none", "pcr"])
def test_run_experiment_end_to_end(defense):
    r = run_experiment(attack="badnets", defense=defense, poison_ratio=0.1, seed=0, **_TINY)
    for k in RESULT_KEYS:
        assert k in r
    for k in ("asr", "clean_accuracy", "bleu", "false_trigger_rate"):
        assert 0.0 <= r[k] <= 1.0
    assert r["attack"] == "badnets" and r["defense"] == defense and r["seed"] == 0
    assert r["num_poisoned"] == round(0.1 * r["num_train_samples"])
    json.dumps(r)  # serialisable for results.json


def test_qwen2_vl_rows_layout_and_run():
    """Qwen2-VL family: processor-style patch rows, and a PCR run end to end."""
    from pcr_fast.eval.models import qwen_rows

    x = torch.rand(2, 3, 16, 16)
    rows, grid = qwen_rows(x, 4)
    assert rows.shape == (2 * 16, 3 * 2 * 4 * 4) and grid.tolist() == [[1, 4, 4], [1, 4, 4]]
    # row 1 of image 0 is the patch right of the first one (2×2 merge order), both frames equal
    first = rows[1].view(3, 2, 4, 4)
    assert torch.equal(first[:, 0], x[0, :, 0:4, 4:8]) and torch.equal(first[:, 1], first[:, 0])
    # row 2 is the patch below the first one
    assert torch.equal(rows[2].view(3, 2, 4, 4)[:, 0], x[0, :, 4:8, 0:4])
    r = run_experiment(attack="sig", defense="pcr", model="qwen2_vl", seed=0,
                       **{**_TINY, "hidden_size": 32})
    assert r["model"] == "qwen2_vl" and 0.0 <= r["asr"] <= 1.0


def test_run_experiment_online_mode_without_warmup_and_bad_warmup():
    from pcr_fast import ObjectiveConfig, PCRConfig

    online = PCRConfig(mode="online", objective=ObjectiveConfig.cross_view_gate())
    r = run_experiment(attack="sig", defense="pcr", pcr=online, seed=2, **_TINY)
    assert r["pcr"]["schedule"]["warmup"] == 0.0 and r["pcr"]["objective"]["gate_weight"] == 19.0
    assert "scans" not in r
    with pytest.raises(ValueError, match="warmup"):
        run_experiment(defense="pcr", pcr=online.override(warmup=1.0), **_TINY)
    with pytest.raises(ValueError, match="pcr must be a PCRConfig"):
        run_experiment(defense="pcr", pcr={"mode": "online"}, **_TINY)


def test_run_experiment_scan_mode_scans_on_schedule():
    """The default defense: plain SFT, then scans of the whole training set at the scheduled
    steps; the result says what each scan flagged (split by the true poisoned ids)."""
    from pcr_fast.eval.defaults import DEMO_PCR_CONFIG

    cfg = DEMO_PCR_CONFIG.override(mode="scan", scan_at=(0.25, 0.75))
    r = run_experiment(attack="blended", defense="pcr", pcr=cfg, poison_ratio=0.1, seed=1, **{**_TINY, "steps": 4})
    assert [s["step"] for s in r["scans"]] == [1, 3]
    for s in r["scans"]:
        assert s["flagged"] == s["flagged_poisoned"] + s["flagged_clean"]
        assert s["scans"] >= 1 and isinstance(s["target_tokens"], list)
    assert r["scan_summary"]["scans"] == 2 and r["pcr"]["mode"] == "scan"
    json.dumps(r)


def test_generation_never_emits_special_tokens():
    """An untrained model may rank <image> first; generating it would break the next forward."""
    from pcr_fast.eval.data import task_words
    from pcr_fast.eval.models import IMAGE_ID, BatchBuilder, ModelSpec, build_model

    spec = ModelSpec(image_size=16, patch_size=8, hidden_size=16, num_layers=1, vision_hidden_size=16,
                     vision_layers=1)
    model = build_model(spec, seed=0).eval()
    with torch.no_grad():
        model.lm_head.weight[IMAGE_ID] *= 0
        model.lm_head.weight[IMAGE_ID] += 10 * model.model.language_model.norm.weight.sign()
    tok = build_tokenizer(task_words())
    texts = BatchBuilder(tok, spec).generate(model, torch.rand(3, 3, 16, 16), "describe the image .", 4)
    assert len(texts) == 3 and all("<" not in t for t in texts)


def test_run_experiment_with_user_trigger_and_bad_args():
    def corner_dot(images):
        out = images.clone()
        out[:, :, :2, :2] = 1.0
        return out

    r = run_experiment(attack=corner_dot, defense="none", poison_ratio=0.05, seed=1, **_TINY)
    assert r["attack"] == "corner_dot"
    with pytest.raises(ValueError, match="defense"):
        run_experiment(defense="magic", **_TINY)
    with pytest.raises(ValueError, match="trigger"):
        run_experiment(attack=lambda x: x[:, :1], **_TINY)


def test_demo_cli_writes_results(tmp_path):
    from pcr_fast.cli import main

    out = tmp_path / "demo"
    # --jobs 2: the default path on a 2-core CPU (runs trained side by side in worker processes)
    rc = main(["demo", "--attacks", "badnets", "--init", "scratch", "--steps", "2", "--batch-size", "8",
               "--test-size", "16", "--poison-ratio", "0.1", "--out", str(out), "--no-progress", "--jobs", "2"])
    assert rc == 0
    data = json.loads((out / "results.json").read_text())
    assert {r["defense"] for r in data["runs"]} == {"none", "pcr"}
    for r in data["runs"]:
        assert set(RESULT_KEYS) <= set(r) and r["init"] == "scratch" and r["steps"] == 2
        assert r["cost_ratio"] is not None
    assert data["regime"]["init"] == ["scratch"] and data["environment"]["git"]
    assert (out / "results.png").stat().st_size > 1000


def test_demo_cli_pretrained_epochs(tmp_path, monkeypatch, capsys):
    """--init pretrained --epochs reach run_experiment; the table shows the cost against plain SFT.
    (The pre-training itself is stubbed with a random model: the cache has its own tests.)"""
    from pcr_fast.cli import main
    from pcr_fast.eval import pretrain

    calls = []

    def stub(spec, seed, *args, **kwargs):
        calls.append(seed)
        return pretrain.build_model(spec, seed=seed)

    monkeypatch.setattr(pretrain, "pretrained_model", stub)
    monkeypatch.setattr("pcr_fast.eval.runner.pretrained_model", stub)
    out = tmp_path / "demo"
    rc = main(["demo", "--attacks", "sig", "--init", "pretrained", "--epochs", "0.001", "--test-size", "16",
               "--out", str(out), "--no-progress", "--jobs", "1", "--mode", "inline"])
    assert rc == 0 and calls and set(calls) == {0}
    data = json.loads((out / "results.json").read_text())
    assert [r["init"] for r in data["runs"]] == ["pretrained"] * 2
    assert all(r["steps"] == 1 and r["poison_ratio"] == 0.03 for r in data["runs"])
    assert data["config"]["epochs"] == 0.001 and data["regime"]["init"] == ["pretrained"]
    text = capsys.readouterr().out
    assert "cost ×plain inline" in text and "init pretrained" in text
    for bad in (["--epochs", "1", "--steps", "2"], ["--epochs", "0"], ["--init", "warm"], ["--poison-ratio", "1e-7"]):
        with pytest.raises(SystemExit):
            main(["demo", "--attacks", "sig", "--out", str(out), *bad])


def test_demo_help_documents_every_knob(capsys):
    from pcr_fast.cli import main

    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    text = capsys.readouterr().out
    for flag in ("--attacks", "--poison-ratio", "--steps", "--epochs", "--init", "--seed", "--model", "--out",
                 "--patch-size", "--test-budget", "--novelty-confidence", "--flagged-share",
                 "--mask-ratio", "--shuffle", "--divergence-weight", "--margin", "--entropy-weight",
                 "--gate-weight", "--invariance-threshold", "--view-confidence", "--detach-b", "--jobs",
                 "--warmup", "--scan-at", "--views", "--original-confidence", "--target-share"):
        assert flag in text, flag


def test_demo_rejects_unknown_attack(capsys):
    from pcr_fast.cli import main

    with pytest.raises(SystemExit):
        main(["demo", "--attacks", "nope", "--steps", "1"])
    assert "unknown attack" in capsys.readouterr().err
