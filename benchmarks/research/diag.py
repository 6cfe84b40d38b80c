import os, sys, json, torch
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Setup, token_logprobs, mask_units
torch.set_num_threads(1)
attack, seed = sys.argv[1], int(sys.argv[2])
S = Setup(attack, seed)
AUGS = {"m50u4": (4, .5, "mean"), "m75u4": (4, .75, "mean"), "m50u8": (8, .5, "mean"), "m75u8": (8, .75, "mean"),
        "mix50u4": (4, .5, "other"), "m90u4": (4, .9, "mean")}
K = 3

@torch.no_grad()
def score():
    S.net.eval()
    n = len(S.samples); res = {}
    g = torch.Generator().manual_seed(123)
    allst = {a: {"S": [], "K": [], "gap": [], "lpb": []} for a in AUGS}
    lpa_all = []
    for s in range(0, n, 500):
        idx = list(range(s, min(n, s + 500)))
        inp = S.inputs(idx); lab = inp["labels"][:, 1:]; m = lab != -100
        lpa, _ = token_logprobs(S.net, inp)
        ya = lpa.gather(-1, lab.clamp_min(0)[..., None])[..., 0]
        lpa_all.append((ya * m).sum(1))
        pa = lpa.exp()
        other = S.pix[torch.tensor(idx).roll(1)]
        for a, (u, r, f) in AUGS.items():
            Ss, Ks, gaps, lpbs = [], [], [], []
            for k in range(K):
                pb_pix = mask_units(S.pix[idx], u, r, g, f, other=other)
                lpb, _ = token_logprobs(S.net, {**inp, "pixel_values": pb_pix})
                pb = lpb.exp()
                sym = ((pa - pb) * (lpa - lpb)).sum(-1)
                yb = lpb.gather(-1, lab.clamp_min(0)[..., None])[..., 0]
                Ss.append(sym.masked_fill(~m, -1).amax(1)); Ks.append((-yb).masked_fill(~m, -1).amax(1))
                gaps.append(((ya - yb) * m).sum(1)); lpbs.append((yb * m).sum(1))
            for key, v in zip(("S", "K", "gap", "lpb"), (Ss, Ks, gaps, lpbs)):
                allst[a][key].append(torch.stack(v, 1))
    S.net.train()
    P = S.is_p
    out = {}
    for a in AUGS:
        st = {k: torch.cat(v) for k, v in allst[a].items()}
        flag = (st["S"] < 0.1) & (st["K"] < 3.0)  # (n, K)
        d1 = flag[:, 0]; du = flag.any(1)
        def auc(score):  # higher score = more poisoned-like
            sp, sc = score[P], score[~P]
            return float((sp[:, None] > sc[None, :]).float().mean() + 0.5 * (sp[:, None] == sc[None, :]).float().mean())
        def tpr_at(score, fpr):
            thr = torch.quantile(score[~P], 1 - fpr); return float((score[P] > thr).float().mean())
        smin = -st["S"].min(1).values
        gmin = -st["gap"].min(1).values
        out[a] = dict(flag1_p=float(d1[P].float().mean()), flag1_c=float(d1[~P].float().mean()),
                      flagU_p=float(du[P].float().mean()), flagU_c=float(du[~P].float().mean()),
                      auc_S=auc(smin), tpr1_S=tpr_at(smin, .01), auc_gap=auc(gmin), tpr1_gap=tpr_at(gmin, .01),
                      auc_gap1=auc(-st["gap"][:, 0]))
        print(f"  {a:8s} " + " ".join(f"{k}={v:.3f}" for k, v in out[a].items()), flush=True)
    return out

log = {}
for stop in (240, 600):
    while S.step < stop: S.plain_step()
    r = S.evaluate()
    print(attack, seed, "step", stop, "asr", r["asr"], "acc", r["clean_accuracy"], flush=True)
    log[stop] = score()
json.dump(log, open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "results", "research", f"diag_{attack}_{seed}.json"), "w"))
