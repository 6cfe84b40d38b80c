"""Attack calibration for the pretrained setting (EVAL_NOTES §9.1): plain SFT on the
instruction set with a trigger given as a Python expression over the trigger classes, e.g.

    python research/calibrate_attacks.py "BadNets(size=6)" 0.03 1.0 0       # the from-scratch size
    python research/calibrate_attacks.py "WaNet(strength=5.0)" 0.03 1.0 1

(args: trigger, poison ratio, epochs, seed[, lr]). Appends a JSON line to
research/results/calibration.jsonl. The runs quoted in §9.1 were made with an earlier copy of
this script that printed instead of appending (same call of run_experiment).
"""
import json
import sys

import torch

sys.path.insert(0, __file__.rsplit("/research/", 1)[0])
from research.common import write  # noqa: E402

from pcr_fast.eval import run_experiment  # noqa: E402
from pcr_fast.eval.triggers import SIG, BadNets, Blended, SampleNoise, WaNet  # noqa: E402,F401

torch.set_num_threads(1)
expr, ratio, epochs, seed = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
lr = float(sys.argv[5]) if len(sys.argv) > 5 else 1e-3
trigger = eval(expr)  # noqa: S307 - research script, the expression is the experiment
trigger.__name__ = expr
r = run_experiment(trigger, "none", ratio, seed=seed, init="pretrained", epochs=epochs, lr=lr, progress=False)
rec = {"trigger": expr, "poison_ratio": ratio, "epochs": epochs, "lr": lr, "seed": seed, "asr": r["asr"],
       "clean_accuracy": r["clean_accuracy"], "bleu": r["bleu"], "steps": r["steps"]}
write("research/results/calibration.jsonl", rec)
print(json.dumps(rec), flush=True)
