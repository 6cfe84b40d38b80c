"""What the cross-view detector sees in the pretrained setting (plain SFT, no defense).

At a few points of one fine-tuning epoch, every poisoned sample and a random subset of the
clean ones go through the original view and K masked views (the library's default mask:
50 % of half-visual-token units, mean fill). Per group (poisoned; clean per instruction
template): share of samples the model is sure of (every response token CE < 0.3), share
flagged (sure + some draw with max CE_b < 3 and max symKL < 0.1), and per response token
the share of flagged samples among (a) all samples and (b) sure samples containing it.

    python research/diag_detector.py badnets 0 [ratio] [clean_subset]
"""
import collections
import json
import sys

import torch

sys.path.insert(0, __file__.rsplit("/research/", 1)[0])
from research.common import train, write  # noqa: E402

from pcr_fast.augment import PatchAugment  # noqa: E402
from pcr_fast.config import AugmentConfig  # noqa: E402
from pcr_fast.eval.runner import prepare_experiment  # noqa: E402

torch.set_num_threads(1)
attack, seed = sys.argv[1], int(sys.argv[2])
ratio = float(sys.argv[3]) if len(sys.argv) > 3 else 0.03
subset = int(sys.argv[4]) if len(sys.argv) > 4 else 2000
K = 3
exp = prepare_experiment(attack, ratio, seed, init="pretrained")
net = exp.initial_model()
augment = PatchAugment.from_config(AugmentConfig(), net, seed=seed)
gen = torch.Generator().manual_seed(seed)
clean = [i for i in range(exp.num_samples) if not exp.is_poisoned[i]]
pick = sorted(exp.poisoned + [clean[j] for j in torch.randperm(len(clean), generator=gen)[:subset].tolist()])
task_of = {}
for s_i in range(exp.num_samples):
    task_of[s_i] = "POISON" if exp.is_poisoned[s_i] else exp.prompts[s_i]
steps_total = -(-exp.num_samples // 32)
probe_at = {int(f * steps_total) - 1 for f in (0.25, 0.5, 0.75, 1.0)}
tok = exp.tokenizer


@torch.no_grad()
def probe(step):
    net.eval()
    rows = []
    for s in range(0, len(pick), 256):
        idx = pick[s:s + 256]
        inp = exp.batch(idx)
        lab = inp["labels"][:, 1:]
        m = lab != -100
        out = {k: v for k, v in inp.items() if k != "labels"}
        la = net(**out).logits[:, :-1].log_softmax(-1)
        ce_a = -la.gather(-1, lab.clamp_min(0)[..., None])[..., 0]
        sure = (ce_a.masked_fill(~m, 0).amax(1) < 0.3)
        flag1 = torch.zeros(len(idx), dtype=torch.bool)
        flagk = torch.zeros(len(idx), dtype=torch.bool)
        minkl = torch.full((len(idx),), float("inf"))
        for k in range(K):
            pb = augment(out["pixel_values"])
            pb = pb.pixel_values if hasattr(pb, "pixel_values") else pb
            lb = net(**{**out, "pixel_values": pb}).logits[:, :-1].log_softmax(-1)
            ce_b = -lb.gather(-1, lab.clamp_min(0)[..., None])[..., 0]
            sym = ((la.exp() - lb.exp()) * (la - lb)).sum(-1)
            s_max = sym.masked_fill(~m, 0).amax(1)
            minkl = torch.minimum(minkl, s_max)
            f = (s_max < 0.1) & (ce_b.masked_fill(~m, 0).amax(1) < 3.0)
            if k == 0:
                flag1 = f.clone()
            flagk |= f
        for j, i in enumerate(idx):
            toks = sorted(set(lab[j][m[j]].tolist()))
            rows.append((i, bool(sure[j]), bool(flag1[j] & sure[j]), bool(flagk[j] & sure[j]), float(minkl[j]), toks))
    net.train()
    by = collections.defaultdict(lambda: [0, 0, 0, 0])
    occ, occ_sure, fl = collections.Counter(), collections.Counter(), collections.Counter()
    for i, sure, f1, fk, _, toks in rows:
        g = by[task_of[i]]
        g[0] += 1; g[1] += sure; g[2] += f1; g[3] += fk
        for t in toks:
            occ[t] += 1; occ_sure[t] += sure; fl[t] += fk
    print(f"== {attack} seed {seed} step {step}")
    for g, (n, su, f1, fk) in sorted(by.items(), key=lambda kv: kv[0]):
        print(f"  {g:45s} n={n:5d} sure {su / n:.2f} flag1 {f1 / n:.3f} flag{K} {fk / n:.3f}")
    shares = {tok.convert_ids_to_tokens(t): (round(fl[t] / occ[t], 3), round(fl[t] / max(1, occ_sure[t]), 3), occ[t])
              for t in occ if fl[t] >= 3}
    top = sorted(shares.items(), key=lambda kv: -kv[1][0])[:14]
    print("  token shares (all, sure, n):", top, flush=True)
    write("research/results/diag_detector.jsonl", {"attack": attack, "seed": seed, "ratio": ratio, "step": step,
                                                    "groups": {k: v for k, v in by.items()}, "shares": shares})


train(exp, lambda n, inp, idx, step: n(**inp).loss, epochs=1.0, seed=seed, net=net,
      on_step=lambda st: probe(st) if st in probe_at else None)
