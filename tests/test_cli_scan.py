"""End to end: ``pcr-fast train --defense none`` plants the backdoor of a poisoned dataset in
a tiny LLaVA (real PNG files, a LLaVA JSON, a processor saved next to the model), and
``pcr-fast scan`` finds it: the poisoned rows flagged (precision and recall ≥ 0.8) and the
target phrase named in text, in report.json, report.csv and report.html.

The plain run (200 steps, ~10 s on one core) is measured to learn the 8 px trigger by step
100 while the clean digits stay either unsure or not invariant to the masks (4 data/model
seeds: precision and recall 1.0 each; the cross-view test alone flags 68–93 % of the
poisoned rows and 4–15 % of the clean ones)."""
import csv
import json
import os

import pytest
import torch

from _tiny_dirs import TARGET, run_cli, save_tiny_model_dir, write_digits_dataset

PLAIN = ("--defense", "none", "--max-steps", "200", "--batch-size", "16", "--lr", "2e-3", "--warmup-steps", "10",
         "--save-steps", "100", "--seed", "0", "--no-progress")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: one intra-op thread is fastest (and far faster on a shared machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def plain(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("scan_e2e")
    model = save_tiny_model_dir("llava", str(root / "llava"))
    data = write_digits_dataset(str(root / "data"), n=400)
    out = root / "plain"
    rc, stdout, stderr = run_cli("train", "--model", model, "--data", data["llava"], "--out", out, *PLAIN)
    assert rc == 0, stderr
    return {"root": root, "model": model, "data": data, "out": str(out), "stdout": stdout}


def test_plain_training_saves_a_model_from_pretrained_loads(plain):
    from transformers import AutoModelForImageTextToText

    from pcr_fast.data import load_processor

    out = plain["out"]
    model = AutoModelForImageTextToText.from_pretrained(out)
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert type(load_processor(out)).__name__ == "LlavaProcessor"
    settings = json.load(open(os.path.join(out, "training_args.json")))
    assert settings["defense"] == "none" and settings["pcr"] is None and settings["data"]["rows"] == 400
    assert settings["trainer"]["max_steps"] == 200 and settings["log_history"]
    report = json.load(open(os.path.join(out, "pcr_report.json")))
    assert report["defense"] == "none" and report["counts"]["samples"] == 400
    assert os.path.isdir(os.path.join(out, "checkpoints", "checkpoint-200"))
    assert "trained 200 steps" in plain["stdout"]


@pytest.fixture(scope="module")
def scanned(plain):
    out = plain["root"] / "audit"
    rc, stdout, stderr = run_cli("scan", "--model", plain["out"], "--data", plain["data"]["llava"], "--out", out,
                                 "--no-progress")
    assert rc == 0, stderr
    return {"out": str(out), "stdout": stdout, "report": json.load(open(out / "report.json"))}


def test_scan_flags_the_poisoned_rows_and_names_the_target(plain, scanned):
    report = scanned["report"]
    poisoned = {f"row{i}" for i in plain["data"]["poisoned"]}
    flagged = {s["id"] for s in report["samples"] if s["flagged"]}
    invariant = {s["id"] for s in report["samples"] if s["invariant"]}
    precision = len(flagged & poisoned) / max(1, len(flagged))
    recall = len(flagged & poisoned) / len(poisoned)
    print(f"\nscan: flagged precision {precision:.2f} recall {recall:.2f}; cross-view test alone: "
          f"precision {len(invariant & poisoned) / max(1, len(invariant)):.2f} "
          f"recall {len(invariant & poisoned) / len(poisoned):.2f}")
    assert precision >= 0.8 and recall >= 0.8
    assert [t["text"] for t in report["targets"]] == [TARGET]
    assert report["targets"][0]["invariant_share"] >= 0.6
    assert f'target phrase "{TARGET}"' in scanned["stdout"]
    scored = [s for s in report["samples"] if s["invariance"] is not None]
    assert len(scored) == 400 and report["counts"]["scans"] == 1


def test_scan_writes_a_csv_and_a_page_a_person_can_read(scanned):
    out = scanned["out"]
    with open(os.path.join(out, "report.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 400 and {"id", "invariance", "view_ce", "confidence", "flagged", "target"} <= set(rows[0])
    page = open(os.path.join(out, "report.html"), encoding="utf-8").read()
    flagged = scanned["report"]["counts"]["flagged"]
    assert f"Likely poisoned: {flagged} of 400 samples" in page and TARGET in page
    assert page.count("data:image/png;base64,") >= 1 + flagged       # the histogram and a thumbnail per card


def test_scan_skips_bad_rows_only_when_asked(plain):
    lines = open(plain["data"]["messages"]).read().splitlines()[:30]
    bad = plain["root"] / "data" / "bad.jsonl"
    bad.write_text("\n".join(lines[:10] + ['{"messages": oops'] + lines[10:20]
                             + [lines[20].replace("images/0020.png", "images/none.png")] + lines[21:]) + "\n")
    rc, _, stderr = run_cli("scan", "--model", plain["out"], "--data", bad, "--out", plain["root"] / "s1")
    assert rc == 2 and "bad.jsonl:11: malformed JSON line" in stderr and "bad.jsonl:22: image not found" in stderr
    rc, stdout, stderr = run_cli("scan", "--model", plain["out"], "--data", bad, "--out", plain["root"] / "s1",
                                 "--skip-bad-rows", "--no-progress")
    assert rc == 0, stderr
    report = json.load(open(plain["root"] / "s1" / "report.json"))
    assert report["counts"]["samples"] == 29 and report["counts"]["skipped_rows"] == 2
    assert report["skipped_rows"][0].startswith("bad.jsonl:11: malformed JSON line")
    assert "2 bad data row(s) skipped" in stdout


@pytest.mark.parametrize("args, message", [
    (("--views", "0"), "--views must be in"),
    (("--invariance-threshold", "-1"), "--invariance-threshold must be in"),
    (("--batch-size", "0"), "argument --batch-size: expected a positive integer"),
    (("--adapter", "."), "has no adapter_config.json"),
], ids=["views", "threshold", "batch_size", "adapter"])
def test_scan_usage_errors(plain, args, message):
    rc, _, stderr = run_cli("scan", "--model", plain["out"], "--data", plain["data"]["llava"],
                            "--out", plain["root"] / "s2", *args)
    assert rc == 2 and message in stderr and "Traceback" not in stderr


def test_scan_refuses_a_non_empty_out(plain, scanned):
    rc, _, stderr = run_cli("scan", "--model", plain["out"], "--data", plain["data"]["llava"], "--out", scanned["out"])
    assert rc == 2 and "is not empty" in stderr and "--overwrite" in stderr
