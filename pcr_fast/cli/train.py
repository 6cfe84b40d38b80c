"""``pcr-fast train``: fine-tune a local Hugging Face vision-language model on a dataset file,
with the PCR defense (``--defense pcr``, the default) or without it.

Everything is checked before the model is loaded: ``--out`` (created, writable, not
overwritten by accident), ``--model`` (a supported family with a processor), every row of
``--data`` (file:line errors, or ``--skip-bad-rows``), the first batch, and every PCR
setting. Training runs on the HF Trainer (``PCRTrainer`` with the defense): a progress bar,
logs with the defense's terms under ``pcr/*``, checkpoints under ``OUT/checkpoints`` that
carry the defense's state (``--resume`` continues from the last one). Written to ``--out``:
the model (or the LoRA adapter), the processor, ``training_args.json`` and
``pcr_report.json`` / ``pcr_report.html`` (what the defense flagged and the target
phrases it found).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from typing import Any, Dict

from .common import (add_lora, check_model_dir, existing_dir, existing_file, library_logging, load_inputs_or_exit,
                     load_model, prepare_out, quiet_transformers)
from .options import add_config_flags, config_from_args, non_negative_int, positive_float, positive_int

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"


def add_train_parser(sub) -> None:
    """The ``train`` subcommand."""
    from ..config import PCRConfig

    p = sub.add_parser(
        "train", help="fine-tune a local HF vision-language model on a dataset file, with or without PCR",
        description="Fine-tunes the model saved in --model (model + processor, save_pretrained) on --data (LLaVA "
                    "conversation JSON or TRL messages JSONL), with the PCR backdoor defense (--defense pcr) or "
                    "plain SFT (--defense none). Writes the model (or LoRA adapter), the processor, "
                    "training_args.json and pcr_report.json/.html to --out; checkpoints go to --out/checkpoints.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    io = p.add_argument_group("input and output")
    io.add_argument("--model", required=True, metavar="DIR",
                    help="a model folder saved with save_pretrained, with its processor")
    io.add_argument("--data", required=True, metavar="FILE", type=existing_file,
                    help="LLaVA conversation JSON or TRL messages JSONL (detected from the content)")
    io.add_argument("--image-root", metavar="DIR", type=existing_dir, default=None,
                    help="the folder image paths are relative to (default: the data file's folder)")
    io.add_argument("--out", required=True, metavar="DIR", help="output folder (created; must be empty unless "
                    "--resume or --overwrite)")
    io.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    io.add_argument("--overwrite", action="store_true", help="write into a non-empty --out (its old "
                    "checkpoints are removed when training starts)")
    io.add_argument("--skip-bad-rows", action="store_true",
                    help="leave out bad data rows (counted in the log and the report) instead of stopping")
    io.add_argument("--template", choices=("auto", "chat", "llava"), default="auto",
                    help="conversation text: the processor's chat template (auto, if it has one) or LLaVA-1.5")
    t = p.add_argument_group("training")
    t.add_argument("--defense", choices=("pcr", "none"), default="pcr", help="PCR defense or plain fine-tuning")
    t.add_argument("--lora", action="store_true", help="train LoRA adapters on the language model only")
    t.add_argument("--lora-r", type=positive_int, default=None, help="LoRA rank (default 16; alpha = 2r)")
    length = t.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=positive_float, default=None, help="passes over the data (default 1)")
    length.add_argument("--max-steps", type=positive_int, default=None, help="optimisation steps (instead of --epochs)")
    t.add_argument("--batch-size", type=positive_int, default=4, help="samples per device per step")
    t.add_argument("--grad-accum", type=positive_int, default=1, help="gradient accumulation steps")
    t.add_argument("--lr", type=positive_float, default=None, help="learning rate (default 1e-4 with --lora, else 2e-5)")
    t.add_argument("--lr-scheduler", choices=("linear", "cosine", "constant", "constant_with_warmup"),
                   default="linear", help="learning-rate schedule")
    t.add_argument("--warmup-steps", type=non_negative_int, default=0, help="learning-rate warm-up steps")
    t.add_argument("--bf16", action="store_true", help="bfloat16 weights and mixed precision")
    t.add_argument("--gradient-checkpointing", action="store_true", help="trade compute for activation memory")
    t.add_argument("--seed", type=non_negative_int, default=0, help="seed of the data order, init and masks")
    t.add_argument("--save-steps", type=positive_int, default=500, help="a checkpoint every N steps")
    t.add_argument("--save-total-limit", type=positive_int, default=2, help="checkpoints kept")
    t.add_argument("--logging-steps", type=positive_int, default=10, help="log every N steps")
    t.add_argument("--num-workers", type=non_negative_int, default=0, help="data-loading worker processes")
    t.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    add_config_flags(p, PCRConfig(), "PCR defense settings (with --defense pcr; defaults are the measured values)")
    p.set_defaults(func=run_train, parser=p)


def _command_line() -> str:
    return " ".join(["pcr-fast", *sys.argv[1:]]) if sys.argv and "pcr" in os.path.basename(sys.argv[0]) else ""


def run_train(args) -> int:
    from ..config import PCRConfig

    parser = args.parser
    library_logging(getattr(args, "verbose", False))
    # ---- 1. --out first: nothing is loaded before we know the results can be written
    out = prepare_out(parser, args.out, overwrite=args.overwrite, resume=args.resume, resumable=True)
    checkpoints = os.path.join(out, CHECKPOINTS)
    resume_from = None
    if args.resume:
        from transformers.trainer_utils import get_last_checkpoint

        resume_from = get_last_checkpoint(checkpoints) if os.path.isdir(checkpoints) else None
        if resume_from is None:
            parser.error(f"--resume: no checkpoint in {checkpoints!r} to resume from")
    if args.lora_r is not None and not args.lora:
        parser.error("--lora-r needs --lora")
    pcr = None
    if args.defense == "pcr":
        pcr = config_from_args(parser, args, PCRConfig())
        if pcr.augment.augment_seed is None:
            pcr = pcr.override(augment_seed=args.seed)   # reproducible masks
    # ---- 2. model folder, data rows, processor, first batch: all before any weight is read
    model_dir = check_model_dir(parser, args.model, allow_adapter=False)
    data, processor, collator = load_inputs_or_exit(parser, args, model_dir)
    from ..data import ConversationDataset

    if args.resume:
        _check_resume_data(parser, out, data)
    # ---- 3. the model
    quiet_transformers()
    net = load_model(model_dir, bf16=args.bf16)
    if args.lora:
        net = add_lora(net, args.lora_r or 16)
    if pcr is not None:
        from ..hf import adapters

        try:
            adapters.find_lm_head(net)
        except ValueError as err:
            parser.error(f"--model: {err}")
    trainer = _build_trainer(args, net, processor, collator, ConversationDataset(data.samples), pcr, checkpoints)
    if args.overwrite and os.path.isdir(checkpoints):
        shutil.rmtree(checkpoints)   # a new run: the old run's checkpoints would be mistaken for this one's
    _write_settings(args, trainer, data, pcr, out, finished=False)
    # ---- 4. train
    started = time.perf_counter()
    try:
        trainer.train(resume_from_checkpoint=resume_from)
    except KeyboardInterrupt:
        print(f"\ninterrupted; checkpoints are in {checkpoints} (continue with --resume)", file=sys.stderr)
        return 130
    except ValueError as err:   # the library's checks (first batch, data) say what is wrong
        print(f"pcr-fast train: error: {err}", file=sys.stderr)
        return 1
    seconds = time.perf_counter() - started
    # ---- 5. results
    written = _save_results(args, trainer, net, processor, data, pcr, out, seconds)
    _print_summary(trainer, written, seconds)
    return 0


def _build_trainer(args, net, processor, collator, dataset, pcr, checkpoints: str):
    import torch
    from transformers import Trainer, TrainingArguments

    checkpointing = ({"gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"use_reentrant": False}}
                     if args.gradient_checkpointing else {})
    lr = args.lr if args.lr is not None else (1e-4 if args.lora else 2e-5)
    training_args = TrainingArguments(
        output_dir=checkpoints, per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum, learning_rate=lr, lr_scheduler_type=args.lr_scheduler,
        warmup_steps=args.warmup_steps, num_train_epochs=args.epochs if args.epochs is not None else 1.0,
        max_steps=args.max_steps if args.max_steps is not None else -1, bf16=args.bf16, seed=args.seed,
        data_seed=args.seed, logging_steps=args.logging_steps, save_strategy="steps", save_steps=args.save_steps,
        save_total_limit=args.save_total_limit, remove_unused_columns=False, report_to="none",
        dataloader_num_workers=args.num_workers, disable_tqdm=args.no_progress,
        dataloader_pin_memory=torch.cuda.is_available(), **checkpointing)
    kwargs = dict(model=net, args=training_args, train_dataset=dataset, data_collator=collator,
                  processing_class=processor)
    if pcr is None:
        return Trainer(**kwargs)
    from ..hf import PCRTrainer

    return PCRTrainer(pcr=pcr, **kwargs)


def _save_results(args, trainer, net, processor, data, pcr, out: str, seconds: float) -> Dict[str, str]:
    """Report first (small), then the settings, then the weights; every file replaced whole."""
    from ..hf.report import build_report, write_report

    meta = {"model": args.model, "data": args.data, "image_root": data.image_root, "out": out,
            "steps": trainer.state.global_step, "seconds": round(seconds, 1)}
    if pcr is not None:
        report = trainer.pcr_report(skipped=data.skipped, meta=meta)
        trainer.pcr_save_state(out)   # the memory next to the model (as in every checkpoint)
    else:
        report = build_report(None, records=None, num_samples=len(data), kind="train", skipped=data.skipped,
                              meta=meta, defense="none")
    written = write_report(report, out, stem="pcr_report", images={s.index: s.images for s in data.samples})
    written["training_args"] = _write_settings(args, trainer, data, pcr, out, finished=True)
    net.save_pretrained(out)
    processor.save_pretrained(out)
    written["model"] = out
    written["report"] = report
    return written


SETTINGS = "training_args.json"


def _write_settings(args, trainer, data, pcr, out: str, finished: bool) -> str:
    """``training_args.json``: the command, every setting, the data file's rows and (at the end)
    the log history. Written when training starts too, so ``--resume`` can check the data."""
    from .. import __version__

    settings: Dict[str, Any] = {
        "command": _command_line(), "pcr_fast_version": __version__, "finished": finished,
        "arguments": {k: v for k, v in vars(args).items() if k not in ("func", "parser")},
        "defense": args.defense, "pcr": pcr.to_dict() if pcr is not None else None,
        "data": {"file": os.path.abspath(args.data), "image_root": data.image_root, "rows": len(data),
                 "skipped_rows": len(data.skipped), "formats": list(data.formats)},
        "trainer": trainer.args.to_dict(), "log_history": trainer.state.log_history if finished else [],
    }
    path = os.path.join(out, SETTINGS)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(settings, f, indent=1, default=str)
    os.replace(path + ".tmp", path)
    return path


def _check_resume_data(parser, out: str, data) -> None:
    """``--resume`` with other data would index the defense's memory with other rows."""
    path = os.path.join(out, SETTINGS)
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as f:
        before = json.load(f).get("data", {})
    if before.get("rows") is not None and before["rows"] != len(data):
        parser.error(f"--resume: the run in {out!r} trained on {before['rows']} rows of {before.get('file')}; "
                     f"--data now gives {len(data)}: resume with the same data (and --skip-bad-rows setting)")


def _print_summary(trainer, written: Dict[str, Any], seconds: float) -> None:
    report = written.pop("report")
    c = report["counts"]
    history = [h for h in trainer.state.log_history if "loss" in h]
    loss = f", last logged loss {history[-1]['loss']:.4f}" if history else ""
    print(f"\ntrained {trainer.state.global_step} steps in {seconds:.0f}s{loss}")
    if report["defense"] == "pcr":
        print(f"PCR: {c['scans']} scan(s); {c['invariant']} of {c['samples']} samples flagged by the cross-view "
              f"test, {c['flagged']} hold a target phrase")
        for t in report["targets"]:
            print(f"  target phrase \"{t['text']}\" (token ids {t['token_ids']}): {t['samples']} samples, "
                  f"{100 * t['invariant_share']:.0f} % of them flagged")
        if report["target_tokens"] and not report["targets"]:
            print("  target tokens (no phrase): " + ", ".join(f"{t['text']!r} ({t['id']})" for t in report["target_tokens"]))
    else:
        print(f"no defense ran; audit the data with: pcr-fast scan --model {written['model']} --data "
              f"{report['meta'].get('data')} --out AUDIT_DIR")
    if c["skipped_rows"]:
        print(f"{c['skipped_rows']} bad data row(s) skipped (listed in the report)")
    print(f"wrote the model and processor to {written['model']}, {os.path.basename(written['training_args'])}, "
          f"{os.path.basename(written['json'])}, {os.path.basename(written['html'])}")

