"""The report (pcr_fast.hf.report) and the detector's scores it shows.

A memory with known flags and targets must give the right phrases, verdicts and counts; the
three writers must produce what a person opens (a CSV row per sample, an HTML page with the
thumbnails and the histogram inside it); an inline memory's own scores fill the report."""
import base64
import csv
import json
import os

import numpy as np
import pytest
import torch

from _tiny_dirs import word_tokenizer
from pcr_fast import BackdoorMemory, DetectorConfig, PCRConfig
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


def test_an_end_of_answer_token_is_never_a_phrase():
    """When most samples are flagged, the token ending every answer reaches the target share
    too; it must not make every sample 'hold a target'."""
    tok = word_tokenizer("llava")
    answers = ["visit evil dot com"] * 4 + ["zero"]
    answer_ids = [ids(tok, a) + [tok.eos_token_id] for a in answers]
    labels = torch.full((5, 6), -100)
    for i, a in enumerate(answer_ids):
        labels[i, :len(a)] = torch.tensor(a)
    memory = BackdoorMemory(5, len(tok), target_share=0.6, min_support=2)
    memory.begin_scan()
    memory.record(torch.arange(5), labels, torch.tensor([1, 1, 1, 1, 0], dtype=torch.bool))
    memory.end_scan()
    assert bool(memory.targets[tok.eos_token_id])             # the memory's own rule makes it a target
    records = [SampleRecord(index=i, answer=a, answer_ids=x) for i, (a, x) in enumerate(zip(answers, answer_ids))]
    report = build_report(memory, records=records, tokenizer=tok)
    assert [(t["text"], t["token_ids"]) for t in report["targets"]] == [("visit evil dot com",
                                                                        ids(tok, "visit evil dot com"))]
    assert [r["flagged"] for r in report["samples"]] == [True] * 4 + [False]
    assert tok.eos_token_id in [t["id"] for t in report["target_tokens"]]      # listed as a token, truthfully


def test_an_inline_memory_reports_its_own_scores(scene):
    """The inline test (mode "inline") keeps per-sample scores; the report shows them and its
    target phrase, with the same structure as for scans."""
    from pcr_fast import InlineMemory
    from pcr_fast.defense import CrossViewScores

    tok, _, records, _ = scene
    labels = torch.full((10, 6), -100)
    for r in records:
        labels[r.index, :len(r.answer_ids)] = torch.tensor(r.answer_ids)
    memory = InlineMemory(10, len(tok), novelty_window=1, min_support=2, flagged_share=0.5)
    memory.observe(labels, torch.full(labels.shape, 9.0))        # never predicted before: every token novel
    memory.commit()
    poisoned = torch.arange(10) < 4
    scores = CrossViewScores(confidence=torch.full((10,), 0.05),
                             invariance=torch.where(poisoned, 0.01, 2.0), view_ce=torch.full((10,), 0.1))
    memory.record(torch.arange(10), labels, torch.ones(10, dtype=torch.bool), scores)
    memory.commit()
    report = build_report(memory, records=records, tokenizer=tok, config=PCRConfig(mode="inline"))
    assert [t["text"] for t in report["targets"]] == ["visit evil dot com"]
    assert [r["flagged"] for r in report["samples"]] == [True] * 4 + [False] * 6
    assert report["counts"]["tested"] == 10 and report["mode"] == "inline"
    assert report["samples"][0]["invariance"] == pytest.approx(0.01) and report["samples"][9]["invariance"] == 2.0
    assert report["thresholds"]["flagged_share"] == 0.5 and report["thresholds"]["min_support"] == 2


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
def test_scores_judge_each_response_on_its_best_draw():
    """The documented draw: the most invariant one among those whose masked view still
    predicts the answer (what makes the report's three numbers agree with its flag)."""
    torch.manual_seed(0)
    weight = torch.randn(23, 16)
    h_a = torch.randn(3, 4, 16) * 0.01                   # unsure of every answer: CE ≈ log 23
    labels = torch.randint(0, 23, (3, 4))
    toward = h_a + 2.0 * weight[labels]                  # a draw that predicts the answers
    for views in ([h_a.clone(), toward], [toward, h_a.clone()]):
        s = cross_view_scores(h_a, views, weight, labels, view_confidence=2.5, backend="torch")
        # the identical draw is more invariant, but only `toward` still predicts the answer
        assert bool((s.confidence > 2.5).all()) and bool((s.view_ce < 2.5).all())
        assert bool((s.invariance > 0.1).all())
