"""The inline test's scores on the rows it tested (product code: compute_pcr_loss with an
InlineMemory, driven by the research loop): per tested row, poisoned or clean, its
confidence, invariance (min over views of the max symmetric KL) and masked-view CE; how
the flagged share of the target would move with the invariance threshold.

    python research/diag_inline_scores.py attack seed [ratio] ['{"override": ...}']
Appends one JSON line to research/results/diag_inline_scores.jsonl.
"""
import json
import sys

import torch

sys.path.insert(0, __file__.rsplit("/research/", 1)[0])
from research.common import train, write  # noqa: E402

from pcr_fast import InlineMemory, PCRConfig  # noqa: E402
from pcr_fast.augment import PatchAugment  # noqa: E402
from pcr_fast.eval.runner import prepare_experiment  # noqa: E402
from pcr_fast.hf import compute_pcr_loss  # noqa: E402

torch.set_num_threads(1)
attack, seed = sys.argv[1], int(sys.argv[2])
ratio = float(sys.argv[3]) if len(sys.argv) > 3 else 0.03
over = json.loads(sys.argv[4]) if len(sys.argv) > 4 else {}
cfg = PCRConfig(mode="inline").override(**over)
exp = prepare_experiment(attack, ratio, seed, init="pretrained")
net = exp.initial_model()
mem = InlineMemory.from_config(cfg, exp.num_samples, net.get_output_embeddings().weight.shape[0])
augment = PatchAugment.from_config(cfg.augment, net, seed=seed)
gen = torch.Generator().manual_seed(seed + 2)


def step(net, inputs, idx, s):
    inputs = {**inputs, "sample_ids": torch.tensor(idx)}
    return compute_pcr_loss(net, inputs, config=cfg, memory=mem, augment=augment, generator=gen).loss


net, info = train(exp, step, epochs=1.0, seed=seed, net=net)
r = exp.evaluate(net)
recs = mem.sample_records()
pois = set(exp.poisoned)
rows = [(rec["id"] in pois, rec["confidence"], rec["invariance"], rec["view_ce"]) for rec in recs]
taus = [0.1, 0.2, 0.3, 0.5, 1.0, 2.0]
share = {}
for tau in taus:
    fp = [p for p, c, v, b in rows if p]
    share[tau] = round(sum(1 for p, c, v, b in rows if p and v < tau and b < 3) / max(1, len(fp)), 3)
out = {"attack": attack, "seed": seed, "ratio": ratio, "override": over, "asr": r["asr"], "acc": r["clean_accuracy"],
       "bleu": r["bleu"], "report": mem.report(exp.tokenizer)["counts"],
       "targets": [t["token"] for t in mem.report(exp.tokenizer)["targets"]],
       "tested_poisoned": sum(p for p, *_ in rows), "tested_clean": sum(not p for p, *_ in rows),
       "poisoned_share_by_tau": share,
       "invariance_poisoned": sorted(round(v, 3) for p, c, v, b in rows if p)[:: max(1, len(rows) // 40)],
       "compute": info["compute"]}
write("research/results/diag_inline_scores.jsonl", out)
print(json.dumps(out), flush=True)
