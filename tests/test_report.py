"""The report (pcr_fast.hf.report) and the detector's scores it shows.

A memory with known flags and targets must give the right phrases, verdicts and counts; the
three writers must produce what a person opens (a CSV row per sample, an HTML page with the
thumbnails and the histogram inside it); and the per-response scores must be the single
computation the flags are thresholds of."""
import base64
import csv
import json
import os

import numpy as np
import pytest
import torch

from _tiny_dirs import word_tokenizer
from pcr_fast import BackdoorMemory, DetectorConfig, PCRConfig, cross_view_flags
from pcr_fast.defense import cross_view_scores
from pcr_fast.hf.report import SampleRecord, build_report, render_html, write_report


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


@pytest.fixture
def scene(tmp_path):
    """10 samples: 0-3 poisoned ('visit evil dot com'), 4-9 clean digits; flags on 0, 1, 2 and
    on clean 5; an image on disk for each."""
    from PIL import Image

    tok = word_tokenizer("llava")
    answers = ["visit evil dot com"] * 4 + ["zero", "zero", "one", "one", "two", "three"]
    records, labels = [], torch.full((10, 6), -100)
    for i, a in enumerate(answers):
        path = str(tmp_path / f"{i}.png")
        Image.fromarray(np.full((8, 8, 3), 20 * i, dtype=np.uint8)).save(path)
        answer_ids = ids(tok, a) + [tok.eos_token_id]
        labels[i, :len(answer_ids)] = torch.tensor(answer_ids)
        records.append(SampleRecord(index=i, id=f"row{i}", source=f"d.json[{i}]", images=[path],
                                    image_names=[f"{i}.png"], answer=a, answer_ids=answer_ids))
    memory = BackdoorMemory(10, len(tok), target_share=0.6, min_support=2)
    memory.begin_scan()
    memory.record(torch.arange(10), labels, torch.tensor([1, 1, 1, 0, 0, 1, 0, 0, 0, 0], dtype=torch.bool))
    memory.end_scan()
    scores = (torch.linspace(0.01, 1.0, 10), torch.full((10,), 0.5), torch.full((10,), 0.1))
    return tok, memory, records, scores


def test_report_names_the_target_phrase_and_flags_the_samples_holding_it(scene):
    tok, memory, records, scores = scene
    report = build_report(memory, records=records, scores=scores, tokenizer=tok, config=PCRConfig(),
                          skipped=["d.json[12]: empty answer"], meta={"model": "m"})
    assert report["format"] == "pcr_fast.report/1" and report["defense"] == "pcr"
    assert report["counts"] == {"samples": 10, "invariant": 4, "flagged": 4, "skipped_rows": 1, "scans": 1}
    [phrase] = report["targets"]
    assert phrase["text"] == "visit evil dot com" and phrase["token_ids"] == ids(tok, "visit evil dot com")
    assert phrase["samples"] == 4 and phrase["invariant"] == 3 and phrase["invariant_share"] == 0.75
    # the end-of-answer token is shared by all answers: never a phrase, never a verdict
    assert tok.eos_token_id not in [t for p in report["targets"] for t in p["token_ids"]]
    rows = report["samples"]
    assert [r["flagged"] for r in rows] == [True] * 4 + [False] * 6
    assert [r["invariant"] for r in rows] == [True, True, True, False, False, True, False, False, False, False]
    assert rows[3]["target"] == "visit evil dot com" and rows[5]["target"] is None
    assert rows[0]["invariance"] == pytest.approx(0.01) and rows[9]["view_ce"] == 0.5
    assert report["thresholds"]["invariance_threshold"] == DetectorConfig().invariance_threshold
    json.dumps(report)                                        # JSON-ready as built


def test_without_memory_or_targets(scene):
    tok, memory, records, _ = scene
    none = build_report(None, records=None, num_samples=7, kind="train", defense="none")
    assert none["counts"]["samples"] == 7 and none["counts"]["flagged"] == 0 and none["samples"][6]["index"] == 6
    assert none["samples"][0]["invariance"] is None
    clean = BackdoorMemory(10, len(tok), min_support=2)       # scanned, nothing flagged
    clean.begin_scan()
    clean.record(torch.arange(10), torch.tensor([r.answer_ids[:1] for r in records]), torch.zeros(10, dtype=torch.bool))
    clean.end_scan()
    report = build_report(clean, records=records, tokenizer=tok)
    assert report["targets"] == [] and report["counts"]["flagged"] == 0
    assert "No target phrase found" in render_html(report)
    with pytest.raises(ValueError, match="records has 3 samples, the memory 10"):
        build_report(memory, records=records[:3])
    with pytest.raises(ValueError, match=r"scores\['invariance'\] has 2 values for 10"):
        build_report(memory, records=records, scores=([0.1, 0.2], [0.1, 0.2], [0.1, 0.2]))


def test_writers_make_what_a_person_opens(scene, tmp_path):
    tok, memory, records, scores = scene
    report = build_report(memory, records=records, scores=scores, tokenizer=tok)
    paths = write_report(report, str(tmp_path), images={r.index: r.images for r in records})
    with open(paths["csv"], newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 10 and rows[0]["flagged"] == "True" and rows[0]["target"] == "visit evil dot com"
    assert rows[9]["id"] == "row9" and rows[9]["target"] == ""
    assert json.load(open(paths["json"]))["counts"] == report["counts"]
    page = open(paths["html"], encoding="utf-8").read()
    assert "visit evil dot com" in page and "Likely poisoned: 4 of 10 samples" in page
    images = page.count("data:image/png;base64,")
    assert images == 1 + 4 + 1        # the histogram, 4 flagged thumbnails, 1 invariant-only thumbnail
    blob = page.split("data:image/png;base64,")[1].split("'")[0]
    assert base64.b64decode(blob)[:4] == b"\x89PNG"
    body = page.split("<body>")[1]
    assert "<script" not in body and "src='http" not in body and "href=" not in body    # self-contained
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_user_text_is_escaped_in_the_page(scene):
    tok, memory, records, scores = scene
    records[0].answer = "<script>alert(1)</script>"
    page = render_html(build_report(memory, records=records, scores=scores, tokenizer=tok))
    assert "<script>" not in page and "&lt;script&gt;" in page


# ----------------------------------------------------------------------------- scores
def problem(b=9, t=5, d=16, v=23):
    weight = torch.randn(v, d) / d ** 0.5
    h_a = torch.randn(b, t, d) * 5
    labels = (h_a @ weight.T).argmax(-1)
    labels[:, 0] = -100
    labels[-1] = -100
    views = [h_a + torch.linspace(0, 1.2, b).view(b, 1, 1) * torch.randn(b, t, d) * 5 for _ in range(3)]
    return h_a, views, weight, labels


def test_flags_are_thresholds_of_the_scores():
    h_a, views, weight, labels = problem()
    for tau, kb, ka in [(0.1, 3.0, 0.3), (0.5, 0.2, 2.0), (3.0, 1.0, 1.0)]:
        scores = cross_view_scores(h_a, views, weight, labels, view_confidence=kb, backend="torch")
        flags = cross_view_flags(h_a, views, weight, labels, invariance_threshold=tau, view_confidence=kb,
                                 original_confidence=ka, backend="torch")
        assert torch.equal(scores.flags(tau, kb, ka), flags)
    assert torch.isnan(scores.invariance[-1]) and torch.isnan(scores.original_ce[-1])   # no labelled token
    assert bool(torch.isfinite(scores.invariance[:-1]).all())


def test_scores_judge_each_response_on_its_best_draw():
    """The most invariant draw among those whose masked view still predicts the answer."""
    h_a, _, weight, labels = problem(b=4)
    same, far = h_a.clone(), torch.randn_like(h_a) * 5
    a = cross_view_scores(h_a, [far, same], weight, labels, backend="torch")
    b = cross_view_scores(h_a, [same, far], weight, labels, backend="torch")
    for s in (a, b):
        assert torch.allclose(s.invariance[:-1], torch.zeros(3), atol=1e-5)     # the identical draw
        assert torch.allclose(s.view_ce[:-1], s.original_ce[:-1], atol=1e-5)
    only_far = cross_view_scores(h_a, [far], weight, labels, backend="torch")
    assert bool((only_far.invariance[:-1] > 0.1).all())
