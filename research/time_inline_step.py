"""Wall time of the inline defense against plain SFT on the tiny pretrained harness (the
counted cost is 1.033x; this measures what a CPU pays for it). Alternates plain and inline
runs of 0.25 epoch (same attack, seed) in one process, one thread, and appends each pair's
training seconds to research/results/time_inline_step.jsonl.

    python research/time_inline_step.py [pairs=3] [attack=badnets]
"""
import json
import sys
import time

import torch

sys.path.insert(0, __file__.rsplit("/research/", 1)[0])
from research.common import write  # noqa: E402

from pcr_fast import PCRConfig  # noqa: E402
from pcr_fast.environment import git_commit  # noqa: E402
from pcr_fast.eval import run_experiment  # noqa: E402

torch.set_num_threads(1)
pairs = int(sys.argv[1]) if len(sys.argv) > 1 else 3
attack = sys.argv[2] if len(sys.argv) > 2 else "badnets"
for i in range(pairs):
    row = {"attack": attack, "seed": 0, "poison_ratio": 0.03, "epochs": 0.25, "pair": i, "git": git_commit()}
    for name, defense, cfg in (("plain", "none", None), ("inline", "pcr", PCRConfig(mode="inline"))):
        t0 = time.perf_counter()
        r = run_experiment(attack, defense, 0.03, seed=0, init="pretrained", epochs=0.25, pcr=cfg, progress=False)
        row[name + "_train_seconds"] = r["train_seconds"]
        row[name + "_steps"] = r["steps"]
        row[name + "_compute"] = r["compute"]
    row["wall_ratio"] = round(row["inline_train_seconds"] / row["plain_train_seconds"], 3)
    write("research/results/time_inline_step.jsonl", row)
    print(json.dumps(row), flush=True)
