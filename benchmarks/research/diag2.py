import os, sys, json, torch
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Setup, token_logprobs, mask_units
torch.set_num_threads(1)
attack, seed = sys.argv[1], int(sys.argv[2])
stops = [int(x) for x in sys.argv[3].split(",")] if len(sys.argv) > 3 else [240, 600]
S = Setup(attack, seed)
K = 8
@torch.no_grad()
def score(u, r):
    S.net.eval(); n = len(S.samples); g = torch.Generator().manual_seed(123)
    Sall, Kall = [], []
    for s in range(0, n, 500):
        idx = list(range(s, min(n, s + 500)))
        inp = S.inputs(idx); lab = inp["labels"][:, 1:]; m = lab != -100
        lpa, _ = token_logprobs(S.net, inp); pa = lpa.exp()
        Ss, Ks = [], []
        for k in range(K):
            lpb, _ = token_logprobs(S.net, {**inp, "pixel_values": mask_units(S.pix[idx], u, r, g)})
            sym = ((pa - lpb.exp()) * (lpa - lpb)).sum(-1)
            yb = lpb.gather(-1, lab.clamp_min(0)[..., None])[..., 0]
            Ss.append(sym.masked_fill(~m, -1).amax(1)); Ks.append((-yb).masked_fill(~m, -1).amax(1))
        Sall.append(torch.stack(Ss, 1)); Kall.append(torch.stack(Ks, 1))
    S.net.train()
    return torch.cat(Sall), torch.cat(Kall)
task = torch.tensor([s.task == "caption" for s in S.samples])
for stop in stops:
    while S.step < stop: S.plain_step()
    for (u, r) in [(4, .5), (4, .6), (4, .75)]:
        Sv, Kv = score(u, r)
        flag = (Sv < .1) & (Kv < 3)
        frac = flag.float().mean(1)
        P = S.is_p
        hist = lambda x: [round(float((x == i / K).float().mean()), 3) for i in range(K + 1)]
        print(f"{attack} s{seed} step{stop} u{u} r{r}: poisoned flag-count hist", hist(frac[P]))
        print(f"   clean caption hist", hist(frac[~P & task]), " clean question hist", hist(frac[~P & ~task]))
