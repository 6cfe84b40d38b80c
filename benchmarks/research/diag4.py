import os, sys, json, torch
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Setup, token_logprobs, mask_units
from diag3lib import shuffle_units
torch.set_num_threads(1)
attack, seed = sys.argv[1], int(sys.argv[2])
stops = [int(x) for x in sys.argv[3].split(",")]
S = Setup(attack, seed)
K = 3
VIEWS = {"m50": lambda p, g: mask_units(p, 4, .5, g), "sh8": lambda p, g: shuffle_units(p, 8, g)}
@torch.no_grad()
def score():
    S.net.eval(); n = len(S.samples); g = torch.Generator().manual_seed(123)
    out = {k: [] for k in ("Ka",)}; outv = {v: {"S": [], "Kb": []} for v in VIEWS}
    for s in range(0, n, 500):
        idx = list(range(s, min(n, s + 500)))
        inp = S.inputs(idx); lab = inp["labels"][:, 1:]; m = lab != -100
        lpa, _ = token_logprobs(S.net, inp); pa = lpa.exp()
        ya = lpa.gather(-1, lab.clamp_min(0)[..., None])[..., 0]
        out["Ka"].append((-ya).masked_fill(~m, -1).amax(1))
        for v in VIEWS:
            Ss, Ks = [], []
            for k in range(K):
                lpb, _ = token_logprobs(S.net, {**inp, "pixel_values": VIEWS[v](S.pix[idx], g)})
                sym = ((pa - lpb.exp()) * (lpa - lpb)).sum(-1)
                yb = lpb.gather(-1, lab.clamp_min(0)[..., None])[..., 0]
                Ss.append(sym.masked_fill(~m, -1).amax(1)); Ks.append((-yb).masked_fill(~m, -1).amax(1))
            outv[v]["S"].append(torch.stack(Ss, 1)); outv[v]["Kb"].append(torch.stack(Ks, 1))
    S.net.train()
    return torch.cat(out["Ka"]), {v: {k: torch.cat(x) for k, x in d.items()} for v, d in outv.items()}
P = S.is_p
for stop in stops:
    while S.step < stop: S.plain_step()
    r = S.evaluate()
    Ka, st = score()
    line = f"{attack} s{seed} step{stop} asr={r['asr']:.2f} acc={r['clean_accuracy']:.2f} | "
    for c in (0.1, 0.3, 1.0):
        line += f"Ka<{c}: {float((Ka[P] < c).float().mean()):.2f}/{float((Ka[~P] < c).float().mean()):.3f} "
    conf = (Ka < 0.3)[:, None]
    for v in VIEWS:
        f = (st[v]["S"] < .1) & (st[v]["Kb"] < 3) & conf
        line += f"| {v}&Ka<.3 any: {float(f.any(1)[P].float().mean()):.2f}/{float(f.any(1)[~P].float().mean()):.3f} "
    print(line, flush=True)
