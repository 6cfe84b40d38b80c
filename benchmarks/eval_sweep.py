"""Experiment driver for the PCR defaults (see EVAL_NOTES.md): runs named configurations
of run_experiment and appends one JSON line per run to results/eval_sweep.jsonl.

    python benchmarks/eval_sweep.py --configs "literal;detach" --attacks badnets,blended --seeds 0

A config is a name from CONFIGS, "cfg:<PCRConfig kwargs>" (public API), or "obj:<PCRConfig kwargs>|<SampleObjective kwargs>" for the
experimental objectives of pcr_fast/eval/objectives.py.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import replace

import torch

from pcr_fast import PCRConfig
from pcr_fast.eval import DEFAULT_TARGET, build_tokenizer, run_experiment
from pcr_fast.eval.data import task_words
from pcr_fast.eval.defaults import DEMO_PCR_CONFIG
from eval_objectives import SampleObjective  # benchmarks/eval_objectives.py (experiment prototypes)


def _first_target_id() -> int:
    tok = build_tokenizer(task_words() + DEFAULT_TARGET.split())
    return tok.convert_tokens_to_ids(DEFAULT_TARGET.split()[0])

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
    "demo": DEMO_PCR_CONFIG,                                   # scan-and-unlearn (section 8)
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
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "eval_sweep.jsonl"))
    ap.add_argument("--tag", default="")
    ap.add_argument("--warmup", type=float, default=None, help="pcr_warmup (default: the demo's)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    for name in args.configs.split(";"):
        for attack in args.attacks.split(","):
            for seed in [int(s) for s in args.seeds.split(",")]:
                t = time.time()
                objective = None
                if name in CONFIGS:
                    cfg = CONFIGS[name]
                elif name.startswith("cfg:"):  # any PCRConfig through the public API
                    cfg = PCRConfig(**eval(f"dict({name[4:]})"))
                else:  # experimental objective: "obj:<PCRConfig kwargs for the augmentation>|<SampleObjective kwargs>"
                    aug_kw, obj_kw = name[4:].split("|")
                    cfg = PCRConfig(**{"mode": "online", **eval(f"dict({aug_kw})")})
                    objective = SampleObjective(steps=args.steps, poison_token=_first_target_id(),
                                                **eval(f"dict({obj_kw})"))
                r = run_experiment(attack=UNSEEN_TRIGGERS.get(attack, attack), defense="none" if cfg is None else "pcr",
                                   pcr=cfg,
                                   steps=args.steps, seed=seed, poison_ratio=args.poison_ratio,
                                   progress=False, diagnostics=True, objective=objective,
                                   pcr_warmup=0.0 if objective is not None else args.warmup)
                if objective is not None:
                    r["flag_log"] = objective.log
                r.update(config=name, tag=args.tag, wall=round(time.time() - t, 1))
                keys = ["asr", "asr_caption", "asr_question", "clean_accuracy", "bleu", "false_trigger_rate",
                        "target_prob_triggered", "target_prob_triggered_augmented"]
                print(name, attack, seed, {k: round(r[k], 3) for k in keys}, r["wall"], flush=True)
                for sc in r.get("scans", []):
                    print(f"   scan at step {sc['step']}: flagged {sc['flagged_poisoned']} poisoned + "
                          f"{sc['flagged_clean']} clean, target tokens {sc['target_tokens']}", flush=True)
                if r.get("flag_log"):
                    fl = r["flag_log"]
                    chunks = [fl[i:i + 6] for i in range(0, len(fl), 6)]
                    print("   flags (step, poisoned flagged, poisoned, clean flagged, clean) summed per 120 steps:",
                          [tuple(sum(x[j] for x in c) for j in range(1, 5)) for c in chunks], flush=True)
                with open(args.out, "a") as f:
                    f.write(json.dumps(r, default=str) + "\n")


if __name__ == "__main__":
    main()
