"""Prototype PCR objectives with per-sample memory. Usage: proto.py attack seed 'json cfg' tag"""
import os, sys, json, time, torch
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Setup, token_logprobs, mask_units
torch.set_num_threads(1)
attack, seed = sys.argv[1], int(sys.argv[2]); cfg = json.loads(sys.argv[3]); tag = sys.argv[4] if len(sys.argv) > 4 else ""
C = dict(steps=600, warmup=0.4, K=3, unit=4, ratio=0.5, tau=0.1, kb=3.0, ka=None, votes=1, lam=19.0, ul_mem=False,
         drop_mem=True, lam_mem=None, poison_ratio=0.1, cap=None)
C.update(cfg)
S = Setup(attack, seed, poison_ratio=C["poison_ratio"], steps=C["steps"])
counts = torch.zeros(len(S.samples), dtype=torch.int32)
g = torch.Generator().manual_seed(1000 + seed)
W = int(C["warmup"] * C["steps"])
log = []
t0 = time.time()
for step in range(C["steps"]):
    idx = S.next_idx()
    inp = S.inputs(idx)
    if step < W:
        loss = S.net(**inp).loss; S.update(loss); continue
    lab = inp["labels"][:, 1:]; m = lab != -100; yl = lab.clamp_min(0)[..., None]
    out = S.net(**{k: v for k, v in inp.items() if k != "labels"})
    lpa = out.logits[:, :-1].float().log_softmax(-1)
    ce_a = -lpa.gather(-1, yl)[..., 0] * m  # (B, T)
    with torch.no_grad():
        la = lpa.detach(); pa = la.exp()
        Ka = ce_a.detach().masked_fill(~m, -1).amax(1)
        flag = torch.zeros(len(idx), dtype=torch.bool); dec = torch.zeros(len(idx), dtype=torch.long)
        S.net.eval() if C.get("eval_det") else None
        for k in range(C["K"]):
            lpb = token_logprobs(S.net, {**inp, "pixel_values": mask_units(inp["pixel_values"], C["unit"], C["ratio"], g)})[0]
            sym = ((pa - lpb.exp()) * (la - lpb)).sum(-1).masked_fill(~m, -1).amax(1)
            ceb = (-lpb.gather(-1, yl)[..., 0]).masked_fill(~m, -1)
            Kb, d = ceb.max(1)
            f = (sym < C["tau"]) & (Kb < C["kb"])
            if C["ka"] is not None: f &= Ka < C["ka"]
            dec = torch.where(f & ~flag, d, dec); flag |= f
        S.net.train()
        if C["cap"] is not None:
            kmax = max(1, int(C["cap"] * len(idx)))
            if flag.sum() > kmax:
                keep = torch.zeros_like(flag); keep[torch.nonzero(flag).flatten()[torch.randperm(int(flag.sum()), generator=g)[:kmax]]] = True; flag &= keep
        counts[idx] += flag.to(torch.int32)
        mem = counts[idx] >= C["votes"]
    n_lab = m.sum().clamp_min(1)
    ce_rows = ce_a.sum(1)
    if C["drop_mem"]: ce_rows = ce_rows * (~mem).float()
    ul_on = mem if C["ul_mem"] else flag
    if C["ul_mem"]:  # decisive token for remembered samples: argmax ce of view a? use first labelled token fallback
        dec = torch.where(flag, dec, ce_a.detach().masked_fill(~m, -1).argmax(1))
    p_dec = (-ce_a.gather(1, dec[:, None])[:, 0]).exp()
    ul = -torch.log((1 - p_dec).clamp_min(1e-6)) * ul_on.float()
    loss = (ce_rows.sum() + C["lam"] * ul.sum()) / n_lab
    S.update(loss)
    if step % 50 == 0:
        P = S.is_p[idx]
        log.append((step, int((flag & P).sum()), int(P.sum()), int((flag & ~P).sum()), int((~P).sum())))
r = S.evaluate()
memP = int(((counts >= C["votes"]) & S.is_p).sum()); memC = int(((counts >= C["votes"]) & ~S.is_p).sum())
res = dict(tag=tag, attack=attack, seed=seed, cfg=C, asr=r["asr"], acc=r["clean_accuracy"], bleu=r["bleu"], ftr=r["false_trigger_rate"],
           memP=memP, memC=memC, nP=int(S.is_p.sum()), wall=round(time.time() - t0, 1), log=log)
print(json.dumps({k: v for k, v in res.items() if k not in ("cfg", "log")}), flush=True)
with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "results", "research", "proto.jsonl"), "a") as f: f.write(json.dumps(res) + "\n")
