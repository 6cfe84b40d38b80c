"""End to end: ``pcr-fast train`` on saved tiny LLaVA and Qwen2-VL model folders and real data
files — with and without the defense, full and LoRA — and every mistake stopped before
training with a usage error that names the flag (never a traceback).

Short runs: these check that training finishes, saves what it should, resumes with the
defense's state, and refuses bad input; test_cli_scan.py checks what a trained model reveals."""
import json
import os
import shutil

import pytest
import torch

from _tiny_dirs import run_cli, save_tiny_model_dir, write_digits_dataset

FAST = ("--batch-size", "8", "--lr", "2e-3", "--save-steps", "6", "--no-progress", "--logging-steps", "3")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def home(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("train_e2e")
    data = write_digits_dataset(str(root / "data"), n=40)
    return {"root": root, "data": data, "llava": save_tiny_model_dir("llava", str(root / "llava")),
            "qwen2_vl": save_tiny_model_dir("qwen2_vl", str(root / "qwen2_vl"))}


def train(home, out, *args, model="llava", data="llava"):
    return run_cli("train", "--model", home[model], "--data", home["data"][data], "--out", home["root"] / out, *args)


# ----------------------------------------------------------------------------- runs
@pytest.fixture(scope="module")
def pcr_run(home):
    # scans before steps 3 and 9 of 12; checkpoints at 6 and 12; a loose target rule for 40 rows
    rc, stdout, stderr = train(home, "pcr", "--max-steps", "12", "--mode", "scan", "--scan-at", "0.25,0.75", "--min-support", "2", *FAST)
    assert rc == 0, stderr
    return {"out": home["root"] / "pcr", "stdout": stdout}


def test_pcr_training_saves_model_processor_settings_and_report(home, pcr_run):
    from transformers import AutoModelForImageTextToText

    out = pcr_run["out"]
    AutoModelForImageTextToText.from_pretrained(str(out))
    for name in ("config.json", "model.safetensors", "processor_config.json", "training_args.json",
                 "pcr_report.json", "pcr_report.html", "pcr_memory.pt"):
        assert (out / name).is_file(), name
    settings = json.load(open(out / "training_args.json"))
    assert settings["pcr"]["schedule"]["scan_at"] == [0.25, 0.75] and settings["defense"] == "pcr"
    assert any("pcr/ce" in h for h in settings["log_history"])           # the defense's terms in the logs
    report = json.load(open(out / "pcr_report.json"))
    assert report["kind"] == "train" and report["defense"] == "pcr" and report["counts"]["scans"] == 2
    assert report["counts"]["samples"] == 40 and len(report["samples"]) == 40
    assert "PCR: 2 scan(s)" in pcr_run["stdout"]
    for step in (6, 12):
        assert (out / "checkpoints" / f"checkpoint-{step}" / "pcr_memory.pt").is_file()


def test_resume_continues_with_the_defense_state(home, pcr_run):
    """Interrupted after checkpoint-6 (one scan done): --resume brings the scan back and runs
    only the scan still ahead, so the run ends with two scans, as an uninterrupted one."""
    resumed = home["root"] / "resumed"
    shutil.copytree(pcr_run["out"] / "checkpoints", resumed / "checkpoints")
    shutil.rmtree(resumed / "checkpoints" / "checkpoint-12")
    rc, stdout, stderr = train(home, "resumed", "--max-steps", "12", "--mode", "scan", "--scan-at", "0.25,0.75", "--min-support", "2",
                               "--resume", *FAST)
    assert rc == 0, stderr
    report = json.load(open(resumed / "pcr_report.json"))
    assert report["counts"]["scans"] == 2                    # 1 restored + 1 (without the state: 1)
    original = json.load(open(pcr_run["out"] / "pcr_report.json"))
    assert report["counts"]["samples"] == original["counts"]["samples"]
    history = json.load(open(resumed / "training_args.json"))["log_history"]
    assert [h["step"] for h in history if "loss" in h] == [3, 6, 9, 12]      # continued, nothing redone


def test_resume_needs_a_checkpoint_the_same_data_and_no_overwrite(home, pcr_run):
    rc, _, stderr = train(home, "fresh", "--resume", "--max-steps", "2")
    assert rc == 2 and "--resume: no checkpoint in" in stderr
    rc, _, stderr = train(home, "fresh", "--resume", "--overwrite", "--max-steps", "2")
    assert rc == 2 and "contradict" in stderr
    rows = json.load(open(home["data"]["llava"]))[:30]
    fewer = home["root"] / "data" / "fewer.json"
    fewer.write_text(json.dumps(rows))
    rc, _, stderr = run_cli("train", "--model", home["llava"], "--data", fewer, "--out", pcr_run["out"], "--resume",
                            "--max-steps", "12")
    assert rc == 2 and "trained on 40 rows" in stderr and "now gives 30" in stderr


def test_qwen2_vl_lora_with_pcr_saves_an_adapter_and_scans(home):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    rc, stdout, stderr = train(home, "qwen_lora", "--lora", "--lora-r", "4", "--max-steps", "6", "--mode", "scan", "--scan-at", "0.5",
                               *FAST, model="qwen2_vl", data="messages")
    assert rc == 0, stderr
    out = home["root"] / "qwen_lora"
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert not (out / "model.safetensors").exists() and (out / "chat_template.jinja").is_file()
    base = AutoModelForImageTextToText.from_pretrained(home["qwen2_vl"])
    model = PeftModel.from_pretrained(base, str(out))
    assert any("lora_" in n for n, _ in model.named_parameters())
    # the adapter folder is a --model for the audit (its base model is found from it)
    rc, stdout, stderr = run_cli("scan", "--model", out, "--data", home["data"]["messages"],
                                 "--out", home["root"] / "qwen_audit", "--no-progress", "--min-support", "2")
    assert rc == 0, stderr
    assert json.load(open(home["root"] / "qwen_audit" / "report.json"))["counts"]["samples"] == 40


def test_qwen2_vl_plain_training(home):
    from transformers import AutoModelForImageTextToText

    rc, stdout, stderr = train(home, "qwen_plain", "--defense", "none", "--max-steps", "4", *FAST,
                               model="qwen2_vl", data="messages")
    assert rc == 0, stderr
    model = AutoModelForImageTextToText.from_pretrained(str(home["root"] / "qwen_plain"))
    assert type(model).__name__ == "Qwen2VLForConditionalGeneration"


# ----------------------------------------------------------------------------- mistakes
def write_model_dir(path, config=None, processor=True):
    os.makedirs(path, exist_ok=True)
    if config is not None:
        json.dump(config, open(os.path.join(path, "config.json"), "w"))
    return str(path)


@pytest.mark.parametrize("args, message", [
    (("--max-steps", "0"), "argument --max-steps: expected a positive integer, got 0"),
    (("--lr", "-1"), "argument --lr: expected a positive number"),
    (("--lr", "inf"), "argument --lr: expected a positive number"),
    (("--epochs", "1", "--max-steps", "3"), "not allowed with argument"),
    (("--batch-size", "two"), "argument --batch-size: expected a positive integer, got 'two'"),
    (("--seed", "-3"), "expected a non-negative integer"),
    (("--mask-ratio", "1.5"), "--mask-ratio must be in [0.0, 1.0)"),
    (("--scan-at", "0.5,1.2"), "--scan-at must hold fractions"),
    (("--lora-r", "8"), "--lora-r needs --lora"),
    (("--defense", "maybe"), "invalid choice: 'maybe'"),
    (("--template", "chat"), "--template: template='chat' but the processor has no chat template"),
    (("--scan-at", "0.5"), "--scan-at: no effect with --mode inline (--scan-at is read by --mode scan)"),
    (("--mode", "scan", "--test-budget", "0.2"), "--test-budget: no effect with --mode scan"),
], ids=["max_steps", "lr", "lr_inf", "epochs_and_steps", "batch_size", "seed", "mask_ratio", "scan_at", "lora_r",
        "defense", "template", "unread_by_inline", "unread_by_scan"])
def test_bad_flag_values_are_usage_errors(home, args, message):
    rc, _, stderr = train(home, "never", "--max-steps", "1", *args) if "--max-steps" not in args \
        else train(home, "never", *args)
    assert rc == 2 and message in stderr and "Traceback" not in stderr
    assert not (home["root"] / "never" / "checkpoints").exists()


def test_model_folder_mistakes(home, tmp_path):
    cases = [
        (str(tmp_path / "nothing"), "--model: no such folder"),
        (write_model_dir(tmp_path / "empty"), "has no config.json"),
        (write_model_dir(tmp_path / "bert", {"model_type": "bert"}),
         "model type 'bert' is not supported; supported families: llava, llava_next"),
    ]
    no_processor = tmp_path / "no_processor"
    shutil.copytree(home["llava"], no_processor)
    for name in ("tokenizer.json", "tokenizer_config.json", "processor_config.json"):
        os.remove(no_processor / name)
    cases.append((str(no_processor), "cannot load its processor"))
    for i, (model, message) in enumerate(cases):
        rc, _, stderr = run_cli("train", "--model", model, "--data", home["data"]["llava"], "--out", tmp_path / f"o{i}",
                                "--max-steps", "1")
        assert rc == 2 and message in stderr and "Traceback" not in stderr, stderr


def test_out_mistakes_come_before_anything_is_loaded(home, tmp_path):
    full = tmp_path / "full"
    full.mkdir()
    (full / "results.txt").write_text("keep me")
    # --out is checked first: even a missing model is not reached
    rc, _, stderr = run_cli("train", "--model", tmp_path / "missing", "--data", home["data"]["llava"], "--out", full)
    assert rc == 2 and "is not empty (results.txt)" in stderr and "--overwrite" in stderr and "--resume" in stderr
    assert (full / "results.txt").read_text() == "keep me"
    a_file = tmp_path / "file"
    a_file.write_text("x")
    rc, _, stderr = run_cli("train", "--model", home["llava"], "--data", home["data"]["llava"], "--out", a_file)
    assert rc == 2 and "--out: cannot write to" in stderr


def test_data_mistakes_name_the_row(home, tmp_path):
    rows = json.load(open(home["data"]["llava"]))[:6]
    rows[2]["conversations"][0]["value"] = "what digit is this ?"          # no <image>
    rows[4]["conversations"][1]["value"] = ""                              # empty answer
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(rows))
    rc, _, stderr = run_cli("train", "--model", home["llava"], "--data", bad, "--image-root",
                            os.path.dirname(home["data"]["llava"]), "--out", tmp_path / "o", "--max-steps", "1")
    assert rc == 2 and "bad.json[2]: no image placeholder" in stderr and "bad.json[4]: empty answer" in stderr
    assert not os.listdir(tmp_path / "o")        # nothing written: the model was never loaded
    rc, _, stderr = run_cli("train", "--model", home["llava"], "--data", tmp_path / "absent.json", "--out",
                            tmp_path / "o")
    assert rc == 2 and "argument --data: no such file" in stderr


def test_nan_pixels_stop_before_training(home, tmp_path):
    """An image processor that divides by a zero std: a clear error, never a NaN loss."""
    model = tmp_path / "zero_std"
    shutil.copytree(home["llava"], model)
    config = json.load(open(model / "processor_config.json"))
    config["image_processor"]["image_std"] = [0.0, 0.0, 0.0]
    json.dump(config, open(model / "processor_config.json", "w"))
    rc, _, stderr = run_cli("train", "--model", model, "--data", home["data"]["llava"], "--out", tmp_path / "o",
                            "--max-steps", "1")
    assert rc == 2 and "NaN or inf in 'pixel_values'" in stderr and "image_std" in stderr
