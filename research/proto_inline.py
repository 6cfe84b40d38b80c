"""Prototype of the inline defense (pretrained setting): the cross-view test runs inside the
training step, on a fixed budget of rows, and only on rows that can reveal a target.

Per step (logits-based prototype; vocab 128):
1. the training forward gives every response token's CE on the original view;
2. per vocabulary token, the CE of its first occurrences in fine-tuning ("novelty": a
   backdoor target is something the pretrained model did not predict);
3. eligible rows: sure (every response token CE < conf), contain a novel token, not yet
   tested; the top-k eligible rows (random tie-break) get `views` masked no-grad forwards;
4. flagged = sure + some view invariant (max symKL < tau, max CE_b < kappa); per token,
   flagged / tested counts; targets = novel & flagged >= min_support & share >= theta;
5. loss: CE on kept rows (not flagged, no target token) + unlearn_weight * unlikelihood on
   target tokens (of dropped rows), normalised by all labelled tokens.

    python research/proto_inline.py TAG '{"k":2,"views":3}' attack seed [ratio]
Appends one JSON line per run to research/results/proto_inline.jsonl.
"""
import json
import sys
import time

import torch

sys.path.insert(0, __file__.rsplit("/research/", 1)[0])
from research.common import train, write  # noqa: E402

from pcr_fast.augment import PatchAugment  # noqa: E402
from pcr_fast.config import AugmentConfig  # noqa: E402
from pcr_fast.eval.runner import prepare_experiment  # noqa: E402
from pcr_fast.hf.counting import compute_cost  # noqa: E402

torch.set_num_threads(1)
DEFAULTS = dict(k=2, views=3, conf=0.3, tau=0.1, kappa=3.0, novelty="known", known_ce=4.6, first=16, theta=0.5,
                min_support=8, unlearn=1.0, drop_flagged=True, mask=0.5, novel_gate=True, replay=0)


class Memory:
    def __init__(self, n, V, c):
        self.c = c
        self.tested = torch.zeros(n, dtype=torch.bool)
        self.flags = torch.zeros(n, dtype=torch.bool)
        self.tok_tested = torch.zeros(V)
        self.tok_flagged = torch.zeros(V)
        self.first_sum = torch.zeros(V)
        self.first_n = torch.zeros(V)
        self.targets = torch.zeros(V, dtype=torch.bool)
        self.named_at = None
        self.V = V

    def presence(self, lab, m):
        idx = torch.where(m, lab, torch.full_like(lab, self.V))
        return torch.zeros(lab.shape[0], self.V + 1, dtype=torch.bool).scatter_(1, idx, True)[:, :-1]

    def observe(self, lab, m, ce):
        idx = torch.where(m, lab, torch.full_like(lab, self.V)).flatten()
        s = torch.zeros(self.V + 1).scatter_add_(0, idx, ce.flatten())[:-1]
        n = torch.zeros(self.V + 1).scatter_add_(0, idx, m.flatten().float())[:-1]
        known = torch.zeros(self.V + 1).scatter_add_(0, idx, (m & (ce < self.c["known_ce"])).flatten().float())[:-1]
        upd = (n > 0) & (self.first_n < self.c["first"])
        if self.c["novelty"] == "known":   # occurrences counted, and how many the model already predicted
            self.first_sum += torch.where(upd, known, torch.zeros_like(s))
            self.first_n += torch.where(upd, n, torch.zeros_like(n))
        else:
            self.first_sum += torch.where(upd, s / n.clamp_min(1), torch.zeros_like(s))
            self.first_n += upd.float()

    @property
    def novel(self):
        if not self.c["novel_gate"]:
            return torch.ones(self.V, dtype=torch.bool)
        if self.c["novelty"] == "known":
            return (self.first_n > 0) & (self.first_sum == 0)
        return (self.first_n > 0) & (self.first_sum / self.first_n.clamp_min(1) > self.c["novelty"])

    def update_targets(self, step):
        share = self.tok_flagged / self.tok_tested.clamp_min(1)
        t = self.novel & (self.tok_flagged >= self.c["min_support"]) & (share >= self.c["theta"])
        if self.named_at is None and bool(t.any()):
            self.named_at = step
        self.targets = t


def run(tag, cfg, attack, seed, ratio):
    c = {**DEFAULTS, **cfg}
    exp = prepare_experiment(attack, ratio, seed, init="pretrained")
    net = exp.initial_model()
    V = net.get_output_embeddings().weight.shape[0]
    mem = Memory(exp.num_samples, V, c)
    augment = PatchAugment.from_config(AugmentConfig(mask_ratio=c["mask"]), net, seed=seed)
    gen = torch.Generator().manual_seed(seed + 99)
    log = {"tested": 0, "flag_p": 0, "flag_c": 0, "drop_p": 0, "drop_c": 0}
    poisoned = exp.is_poisoned

    def step_fn(net, inputs, idx, step):
        ids = torch.tensor(idx)
        lab = inputs["labels"][:, 1:]
        m = lab != -100
        model_in = {k: v for k, v in inputs.items() if k != "labels"}
        logits = net(**model_in).logits[:, :-1]
        lp = logits.log_softmax(-1)
        ce = -lp.gather(-1, lab.clamp_min(0)[..., None])[..., 0] * m
        ce_d = ce.detach()
        mem.observe(lab, m, ce_d)
        pres = mem.presence(lab, m)
        sure = m.any(1) & (ce_d.masked_fill(~m, 0).amax(1) < c["conf"])
        eligible = sure & (pres & mem.novel).any(1) & ~mem.tested[ids]
        prio = eligible.float() * (1 + torch.rand(len(idx), generator=gen))
        sel = prio.topk(min(c["k"], len(idx))).indices
        elig_sel = eligible[sel]
        with torch.no_grad():
            la = lp.detach()[sel]
            flag = torch.zeros(len(sel), dtype=torch.bool)
            sub = {k: v[sel] for k, v in model_in.items()}
            ms = m[sel]
            for _ in range(c["views"]):
                pb = augment(sub["pixel_values"])
                pb = pb.pixel_values if hasattr(pb, "pixel_values") else pb
                lb = net(**{**sub, "pixel_values": pb}).logits[:, :-1].log_softmax(-1)
                ce_b = -lb.gather(-1, lab[sel].clamp_min(0)[..., None])[..., 0]
                sym = ((la.exp() - lb.exp()) * (la - lb)).sum(-1)
                flag |= (sym.masked_fill(~ms, 0).amax(1) < c["tau"]) & (ce_b.masked_fill(~ms, 0).amax(1) < c["kappa"])
            flag &= elig_sel
        sid = ids[sel]
        mem.tested[sid] |= elig_sel
        mem.flags[sid] |= flag
        mem.tok_tested += (pres[sel] & elig_sel[:, None]).sum(0)
        mem.tok_flagged += (pres[sel] & flag[:, None]).sum(0)
        mem.update_targets(step)
        log["tested"] += int(elig_sel.sum())
        log["flag_p"] += int((flag & poisoned[sid]).sum())
        log["flag_c"] += int((flag & ~poisoned[sid]).sum())
        is_t = mem.targets[lab.clamp_min(0)] & m
        drop = is_t.any(1) | (mem.flags[ids] if c["drop_flagged"] else torch.zeros_like(sure))
        log["drop_p"] += int((drop & poisoned[ids]).sum())
        log["drop_c"] += int((drop & ~poisoned[ids]).sum())
        keep = m & ~drop[:, None]
        ul = -torch.log(-torch.expm1(-ce.clamp_min(1e-6)))
        n_lab = m.sum().clamp_min(1)
        return ((ce * keep).sum() + c["unlearn"] * (ul * (is_t & drop[:, None])).sum()) / n_lab

    t0 = time.time()
    net, info = train(exp, step_fn, epochs=1.0, seed=seed, net=net)
    r = exp.evaluate(net)
    targets = exp.tokenizer.convert_ids_to_tokens(torch.nonzero(mem.targets).flatten().tolist())
    novel = exp.tokenizer.convert_ids_to_tokens(torch.nonzero(mem.novel).flatten().tolist())
    novel_stats = {exp.tokenizer.convert_ids_to_tokens(t): (int(mem.tok_tested[t]), int(mem.tok_flagged[t]))
                   for t in torch.nonzero(mem.novel).flatten().tolist()}
    rec = {"tag": tag, "novel_stats": novel_stats, "cfg": c, "attack": attack, "seed": seed, "ratio": ratio, "asr": r["asr"],
           "acc": r["clean_accuracy"], "bleu": r["bleu"], "ftr": r["false_trigger_rate"], "targets": targets,
           "novel": novel, "named_at": mem.named_at, "steps": info["steps"], "compute": info["compute"],
           "cost_ratio": round(compute_cost(info["compute"]) / (3 * info["steps"] * 32), 4), **log,
           "seconds": round(time.time() - t0, 1)}
    write("research/results/proto_inline.jsonl", rec)
    print(json.dumps({k: rec[k] for k in rec if k != "cfg"}), flush=True)


if __name__ == "__main__":
    tag, cfg = sys.argv[1], json.loads(sys.argv[2])
    run(tag, cfg, sys.argv[3], int(sys.argv[4]), float(sys.argv[5]) if len(sys.argv) > 5 else 0.03)
