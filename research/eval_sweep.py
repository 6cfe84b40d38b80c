"""Experiment driver for the PCR defaults (see benchmarks/EVAL_NOTES.md): runs named
configurations of ``run_experiment`` and appends one JSON line per run to
benchmarks/results/eval_sweep.jsonl.

    python research/eval_sweep.py --configs "plain;demo" --attacks corner3 --seeds 0,1,2 --steps 600

A config is a name from CONFIGS or "cfg:<PCRConfig kwargs>" (public API). The earlier
"obj:" configs and the target-probability diagnostics ran through research hooks that
``run_experiment`` no longer has: they are at commit e58aad8 (research/README.md).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import replace

import torch

from pcr_fast import PCRConfig
from pcr_fast.eval import run_experiment
from pcr_fast.eval.defaults import DEMO_PCR_CONFIG

# the literal objective of section 1 (per-batch, mode="online"): pull-apart on, gate off
_LITERAL = dict(mode="online", unit="token", shuffle=True, mask_ratio=0.25, divergence_weight=1.0, gate_weight=0.0)
CONFIGS = {
    "plain": None,
    "literal": PCRConfig(**_LITERAL),
    "detach": PCRConfig(**_LITERAL, detach_augmented=True),
    "detach_rkl": PCRConfig(**_LITERAL, detach_augmented=True, divergence="reverse_kl"),
    "detach_w3": PCRConfig(**{**_LITERAL, "divergence_weight": 3.0}, detach_augmented=True),
    "nomask": PCRConfig(**{**_LITERAL, "mask_ratio": 0.0}),
    "detach_nomask": PCRConfig(**{**_LITERAL, "mask_ratio": 0.0}, detach_augmented=True),
    "online_gate": replace(DEMO_PCR_CONFIG, mode="online"),   # the per-batch gate of sections 3-7
    "demo": replace(DEMO_PCR_CONFIG, mode="scan"),             # scan-and-unlearn (section 8)
}


def corner3(images):
    """The README's example of a user trigger (never used to choose any default)."""
    out = images.clone()
    out[:, :, :3, :3] = 1.0
    return out


UNSEEN_TRIGGERS = {"corner3": corner3}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", default="plain,literal")
    ap.add_argument("--attacks", default="badnets")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--poison-ratio", type=float, default=0.1)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "benchmarks", "results",
                                                  "eval_sweep.jsonl"))
    ap.add_argument("--tag", default="")
    ap.add_argument("--warmup", type=float, default=None, help="pcr_warmup (default: the demo's)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    for name in args.configs.split(";"):
        for attack in args.attacks.split(","):
            for seed in [int(s) for s in args.seeds.split(",")]:
                t = time.time()
                if name in CONFIGS:
                    cfg = CONFIGS[name]
                else:  # any PCRConfig through the public API: "cfg:<kwargs>"
                    cfg = PCRConfig(**eval(f"dict({name[4:]})"))
                r = run_experiment(attack=UNSEEN_TRIGGERS.get(attack, attack), defense="none" if cfg is None else "pcr",
                                   pcr=cfg, steps=args.steps, seed=seed, poison_ratio=args.poison_ratio,
                                   progress=False, pcr_warmup=args.warmup)
                r.update(config=name, tag=args.tag, wall=round(time.time() - t, 1))
                keys = ["asr", "asr_caption", "asr_question", "clean_accuracy", "bleu", "false_trigger_rate"]
                print(name, attack, seed, {k: round(r[k], 3) for k in keys}, r["wall"], flush=True)
                for sc in r.get("scans", []):
                    print(f"   scan at step {sc['step']}: flagged {sc['flagged_poisoned']} poisoned + "
                          f"{sc['flagged_clean']} clean, target tokens {sc['target_tokens']}", flush=True)
                with open(args.out, "a") as f:
                    f.write(json.dumps(r, default=str) + "\n")


if __name__ == "__main__":
    main()
