"""How surprising each response token is to the pre-trained model at its first occurrences
in the (poisoned) fine-tuning data: per token, the lowest CE over its first 16 occurrences
(in training order) and their mean. A backdoor target was never predicted.

    python research/diag_novelty.py seed [attack] [ratio]
"""
import sys

import torch

sys.path.insert(0, __file__.rsplit("/research/", 1)[0])
from pcr_fast.eval.runner import prepare_experiment  # noqa: E402

torch.set_num_threads(1)
seed = int(sys.argv[1])
attack = sys.argv[2] if len(sys.argv) > 2 else "badnets"
ratio = float(sys.argv[3]) if len(sys.argv) > 3 else 0.03
exp = prepare_experiment(attack, ratio, seed, init="pretrained")
net = exp.initial_model().eval()
order = torch.randperm(exp.num_samples, generator=torch.Generator().manual_seed(seed + 1))[:3200].tolist()
seen = {}
with torch.no_grad():
    for s in range(0, len(order), 256):
        idx = order[s:s + 256]
        inp = exp.batch(idx)
        lab = inp["labels"][:, 1:]
        lp = net(**{k: v for k, v in inp.items() if k != "labels"}).logits[:, :-1].log_softmax(-1)
        ce = -lp.gather(-1, lab.clamp_min(0)[..., None])[..., 0]
        for j in range(len(idx)):
            for t, c in zip(lab[j].tolist(), ce[j].tolist()):
                if t >= 0 and len(seen.setdefault(t, [])) < 16:
                    seen[t].append(c)
rows = sorted(((min(v), sum(v) / len(v), len(v), exp.tokenizer.convert_ids_to_tokens(t)) for t, v in seen.items()),
              reverse=True)
for mn, mean, n, name in rows[:14]:
    print(f"seed {seed} {name:10s} min {mn:6.2f} mean {mean:6.2f} n {n}")
