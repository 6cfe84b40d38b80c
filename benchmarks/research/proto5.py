"""proto4 + share="conf": a token's flagged share among the samples the model is sure of (or flagged).
Detection passes over the whole training set at chosen times; memory; drop CE + UL on flagged."""
import os, sys, json, time, torch
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Setup, token_logprobs, mask_units
torch.set_num_threads(1)
attack, seed = sys.argv[1], int(sys.argv[2]); cfg = json.loads(sys.argv[3]); tag = sys.argv[4] if len(sys.argv) > 4 else ""
C = dict(steps=600, passes=[0.4], K=3, unit=4, ratio=0.5, tau=0.1, kb=3.0, ka=0.3, lam=1.0, drop=True, poison_ratio=0.1,
         ul_until=None)
C.update(cfg)
C.setdefault("theta", 0.5)
S = Setup(attack, seed, poison_ratio=C["poison_ratio"], steps=C["steps"])
n = len(S.samples)
suspicious = torch.zeros(128, dtype=torch.bool)
confident = torch.zeros(n, dtype=torch.bool)
flagged = torch.zeros(n, dtype=torch.bool); decisive = torch.zeros(n, dtype=torch.long); dtok = torch.zeros(n, dtype=torch.long)
g = torch.Generator().manual_seed(1000 + seed)
pass_steps = sorted(int(round(f * C["steps"])) for f in C["passes"])
log = []
@torch.no_grad()
def detect():
    S.net.eval()
    new = 0
    for s in range(0, n, 256):
        idx = torch.arange(s, min(n, s + 256))
        idx = idx[~flagged[idx]]
        if len(idx) == 0: continue
        inp = S.inputs(idx); lab = inp["labels"][:, 1:]; m = lab != -100; yl = lab.clamp_min(0)[..., None]
        lpa = token_logprobs(S.net, inp)[0]; pa = lpa.exp()
        Ka = (-lpa.gather(-1, yl)[..., 0]).masked_fill(~m, -1).amax(1)
        confident[idx] = Ka < C["ka"]
        flag = torch.zeros(len(idx), dtype=torch.bool); dec = torch.zeros(len(idx), dtype=torch.long)
        for k in range(C["K"]):
            lpb = token_logprobs(S.net, {**inp, "pixel_values": mask_units(inp["pixel_values"], C["unit"], C["ratio"], g)})[0]
            sym = ((pa - lpb.exp()) * (lpa - lpb)).sum(-1).masked_fill(~m, -1).amax(1)
            Kb, d = (-lpb.gather(-1, yl)[..., 0]).masked_fill(~m, -1).max(1)
            f = (sym < C["tau"]) & (Kb < C["kb"]) & (Ka < C["ka"])
            dec = torch.where(f & ~flag, d, dec); flag |= f
        flagged[idx[flag]] = True; decisive[idx[flag]] = dec[flag]; dtok[idx[flag]] = lab[flag].gather(1, dec[flag][:, None])[:, 0]
    S.net.train()
    P = S.is_p
    log.append((S.step, int((flagged & P).sum()), int((flagged & ~P).sum())))
    global suspicious
    V = 128
    occ = torch.zeros(V); fl_cnt = torch.zeros(V)
    for i in range(n):
        toks = torch.tensor(sorted(set(S.builder.ids(S.responses[i]))), dtype=torch.long)
        if C.get("share") != "conf" or flagged[i] or confident[i]: occ[toks] += 1
        if flagged[i]: fl_cnt[toks] += 1
    frac = fl_cnt / occ.clamp_min(1)
    suspicious = frac >= C["theta"]
    print("pass", S.step, "suspicious:", [(S.tok.convert_ids_to_tokens(v), round(float(frac[v]), 2)) for v in torch.nonzero(suspicious).flatten().tolist()],
          "top non-susp:", [(S.tok.convert_ids_to_tokens(v), round(float(frac[v]), 2)) for v in frac.masked_fill(suspicious, -1).argsort(descending=True)[:3].tolist()], flush=True)
    import collections
    occ = collections.Counter(); 
    for i in range(n): occ.update(set(S.builder.ids(S.responses[i]) + [2]))
    fc = collections.Counter(dtok[flagged & ~P].tolist()); fp = collections.Counter(dtok[flagged & P].tolist())
    tok = lambda v: S.tok.convert_ids_to_tokens(v)
    print("pass", S.step, "FP tokens", [(tok(v), c, round((c + fp.get(v, 0)) / occ[v], 2)) for v, c in fc.most_common(4)],
          "TP tokens", [(tok(v), c, round((c + fc.get(v, 0)) / occ[v], 2)) for v, c in fp.most_common(3)], flush=True)
t0 = time.time()
for step in range(C["steps"]):
    if step in pass_steps: detect()
    idx = S.next_idx()
    inp = S.inputs(idx)
    fl = flagged[idx]
    if C.get("purge"):
        fl = fl | (suspicious[torch.tensor([0])].new_zeros(len(idx)) if False else fl)
        labs = S.inputs(idx)["labels"][:, 1:]
        fl = fl | (suspicious[labs.clamp_min(0)] & (labs != -100)).any(1)
    if not fl.any():
        loss = S.net(**inp).loss; S.update(loss); continue
    lab = inp["labels"][:, 1:]; m = lab != -100; yl = lab.clamp_min(0)[..., None]
    out = S.net(**{k: v for k, v in inp.items() if k != "labels"})
    lpa = out.logits[:, :-1].float().log_softmax(-1)
    ce_a = -lpa.gather(-1, yl)[..., 0] * m
    ce_rows = ce_a.sum(1) * (~fl).float() if C["drop"] else ce_a.sum(1)
    susp_pos = suspicious[lab.clamp_min(0)] & m & fl[:, None]   # (B, T)
    ul = (-torch.log((-torch.expm1(-ce_a.clamp_min(1e-6))))) * susp_pos.float()
    loss = (ce_rows.sum() + C["lam"] * ul.sum()) / m.sum().clamp_min(1)
    S.update(loss)
r = S.evaluate()
res = dict(tag=tag, attack=attack, seed=seed, cfg=C, asr=r["asr"], acc=r["clean_accuracy"], bleu=r["bleu"], ftr=r["false_trigger_rate"],
           passes=log, nP=int(S.is_p.sum()), wall=round(time.time() - t0, 1))
print(json.dumps({k: v for k, v in res.items() if k not in ("cfg",)}), flush=True)
with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "results", "research", "proto5.jsonl"), "a") as f: f.write(json.dumps(res) + "\n")
