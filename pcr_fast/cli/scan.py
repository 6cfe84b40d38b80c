"""``pcr-fast scan``: audit a dataset with a model — typically the one just fine-tuned on it —
for poisoned samples.

One cross-view scan of every sample (the original image and ``--views`` half-masked copies,
no gradient): a backdoor answer is one the model keeps giving when half of the image is
masked, and the answer most of whose samples do that is the attacker's target. Writes
``report.json``, ``report.csv`` and a self-contained ``report.html`` (flagged samples with
thumbnails, the target phrase, a histogram of the scores) to ``--out``.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from .common import (check_model_dir, existing_dir, existing_file, library_logging, load_inputs_or_exit, load_model,
                     prepare_out, quiet_transformers)
from .options import add_config_flags, config_from_args, non_negative_int, positive_int

logger = logging.getLogger(__name__)


def add_scan_parser(sub) -> None:
    """The ``scan`` subcommand."""
    from ..config import PCRConfig

    p = sub.add_parser(
        "scan", help="audit a dataset for poisoned samples with a (fine-tuned) model: report.json/.csv/.html",
        description="Runs the PCR cross-view test on every sample of --data with the model in --model (and "
                    "--adapter), finds the target phrase(s) of a backdoor, and writes report.json, report.csv and "
                    "report.html to --out.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    io = p.add_argument_group("input and output")
    io.add_argument("--model", required=True, metavar="DIR",
                    help="a model folder saved with save_pretrained (with its processor), or a LoRA adapter folder "
                         "written by pcr-fast train --lora")
    io.add_argument("--adapter", metavar="DIR", type=existing_dir, default=None,
                    help="a LoRA adapter folder to apply on --model")
    io.add_argument("--data", required=True, metavar="FILE", type=existing_file,
                    help="LLaVA conversation JSON or TRL messages JSONL (detected from the content)")
    io.add_argument("--image-root", metavar="DIR", type=existing_dir, default=None,
                    help="the folder image paths are relative to (default: the data file's folder)")
    io.add_argument("--out", required=True, metavar="DIR", help="output folder for the report (created)")
    io.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    io.add_argument("--skip-bad-rows", action="store_true",
                    help="leave out bad data rows (listed in the report) instead of stopping")
    io.add_argument("--template", choices=("auto", "chat", "llava"), default="auto",
                    help="conversation text: the processor's chat template (auto, if it has one) or LLaVA-1.5")
    r = p.add_argument_group("scan")
    r.add_argument("--batch-size", type=positive_int, default=8, help="samples per forward")
    r.add_argument("--bf16", action="store_true", help="run the model in bfloat16")
    r.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    r.add_argument("--seed", type=non_negative_int, default=0, help="seed of the masked views")
    r.add_argument("--num-workers", type=non_negative_int, default=0, help="data-loading worker processes")
    r.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    add_config_flags(p, PCRConfig(mode="scan"), "detector settings (defaults are the measured values)",
                     sections=("augment", "detector", "unlearn", "execution"))
    p.set_defaults(func=run_scan, parser=p)


def run_scan(args) -> int:
    from ..config import PCRConfig

    parser = args.parser
    library_logging(getattr(args, "verbose", False))
    out = prepare_out(parser, args.out, overwrite=args.overwrite)
    config = config_from_args(parser, args, PCRConfig(mode="scan"))   # the scan's thresholds and target rule
    if config.augment.augment_seed is None:
        config = config.override(augment_seed=args.seed)
    model_dir = check_model_dir(parser, args.model, allow_adapter=True)
    if args.adapter is not None and not os.path.isfile(os.path.join(args.adapter, "adapter_config.json")):
        parser.error(f"--adapter {args.adapter!r} has no adapter_config.json (a peft adapter folder is expected)")
    data, processor, collator = load_inputs_or_exit(parser, args, model_dir)
    from ..data import ConversationDataset

    import torch

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    quiet_transformers()
    net = load_model(model_dir, bf16=args.bf16, adapter=args.adapter).to(device)
    from ..hf import adapters, scan_report
    from ..hf.report import write_report

    try:
        adapters.find_lm_head(net)
    except ValueError as err:
        parser.error(f"--model: {err}")
    started = time.perf_counter()
    meta = {"model": args.model, "adapter": args.adapter, "data": args.data, "image_root": data.image_root}
    try:
        report = scan_report(net, ConversationDataset(data.samples), collator, config=config,
                             batch_size=args.batch_size, progress=not args.no_progress, skipped=data.skipped,
                             meta=meta, num_workers=args.num_workers)
    except ValueError as err:
        print(f"pcr-fast scan: error: {err}", file=sys.stderr)
        return 1
    report["meta"]["seconds"] = round(time.perf_counter() - started, 1)
    paths = write_report(report, out, images={s.index: s.images for s in data.samples})
    c = report["counts"]
    print(f"scanned {c['samples']} samples in {report['meta']['seconds']:.0f}s: {c['invariant']} flagged by the "
          f"cross-view test, {c['flagged']} hold a target phrase")
    for t in report["targets"]:
        print(f"  target phrase \"{t['text']}\" (token ids {t['token_ids']}): {t['samples']} samples, "
              f"{100 * t['invariant_share']:.0f} % of them flagged")
    if report["target_tokens"] and not report["targets"]:
        print("  target tokens (no phrase): " + ", ".join(f"{t['text']!r} ({t['id']})" for t in report["target_tokens"]))
    elif not report["targets"]:
        print("  no target phrase found")
    if c["skipped_rows"]:
        print(f"{c['skipped_rows']} bad data row(s) skipped (listed in the report)")
    print(f"wrote {paths['json']}, {os.path.basename(paths['csv'])}, {os.path.basename(paths['html'])}")
    return 0
