import os, sys, json, torch
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Setup, token_logprobs, mask_units
torch.set_num_threads(1)
attack, seed = sys.argv[1], int(sys.argv[2])
stops = [int(x) for x in sys.argv[3].split(",")] if len(sys.argv) > 3 else [240, 400]
S = Setup(attack, seed)
K = 6
def shuffle_units(pix, unit, gen, ratio=0.0):
    b, c, h, w = pix.shape; gh, gw = h // unit, w // unit; n = gh * gw
    x = pix.reshape(b, c, gh, unit, gw, unit).permute(0, 2, 4, 1, 3, 5).reshape(b, n, c, unit, unit)
    perm = torch.rand(b, n, generator=gen).argsort(1)
    x = x.gather(1, perm[:, :, None, None, None].expand_as(x))
    if ratio > 0:
        k = int(ratio * n + .5); m = torch.zeros(b, n, dtype=torch.bool); m.scatter_(1, torch.rand(b, n, generator=gen).argsort(1)[:, :k], True)
        mean = pix.mean((2, 3))[:, None, :, None, None].expand_as(x)
        x = torch.where(m[:, :, None, None, None], mean, x)
    return x.reshape(b, gh, gw, c, unit, unit).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)
VIEWS = {"m50": lambda p, g: mask_units(p, 4, .5, g), "m65": lambda p, g: mask_units(p, 4, .65, g),
         "sh4": lambda p, g: shuffle_units(p, 4, g), "sh8": lambda p, g: shuffle_units(p, 8, g)}
@torch.no_grad()
def score(view):
    S.net.eval(); n = len(S.samples); g = torch.Generator().manual_seed(123)
    out = {k: [] for k in ("S", "Kb", "Ka")}
    for s in range(0, n, 500):
        idx = list(range(s, min(n, s + 500)))
        inp = S.inputs(idx); lab = inp["labels"][:, 1:]; m = lab != -100
        lpa, _ = token_logprobs(S.net, inp); pa = lpa.exp()
        ya = lpa.gather(-1, lab.clamp_min(0)[..., None])[..., 0]
        Ss, Ks = [], []
        for k in range(K):
            lpb, _ = token_logprobs(S.net, {**inp, "pixel_values": VIEWS[view](S.pix[idx], g)})
            sym = ((pa - lpb.exp()) * (lpa - lpb)).sum(-1)
            yb = lpb.gather(-1, lab.clamp_min(0)[..., None])[..., 0]
            Ss.append(sym.masked_fill(~m, -1).amax(1)); Ks.append((-yb).masked_fill(~m, -1).amax(1))
        out["S"].append(torch.stack(Ss, 1)); out["Kb"].append(torch.stack(Ks, 1)); out["Ka"].append((-ya).masked_fill(~m, -1).amax(1))
    S.net.train()
    return {k: torch.cat(v) for k, v in out.items()}
P = S.is_p
for stop in stops:
    while S.step < stop: S.plain_step()
    print(f"== {attack} s{seed} step{stop}: Ka<.5 poisoned {float((0) if False else 0):.0f}", flush=True)
    for view in VIEWS:
        st = score(view)
        conf = (st["Ka"] < 0.5)[:, None]
        for name, flag in [("S.1K3", (st["S"] < .1) & (st["Kb"] < 3)), ("S.1K3Ka", (st["S"] < .1) & (st["Kb"] < 3) & conf),
                           ("S.3K1Ka", (st["S"] < .3) & (st["Kb"] < 1) & conf)]:
            cnt = flag.sum(1)
            row = " ".join(f">={j}: {float((cnt[P] >= j).float().mean()):.2f}/{float((cnt[~P] >= j).float().mean()):.3f}" for j in (1, 2, 3))
            print(f"  {view:4s} {name:8s} per-draw {float(flag[P].float().mean()):.2f}/{float(flag[~P].float().mean()):.3f}  {row}", flush=True)
    print(f"  conf(Ka<.5) poisoned {float(conf[P].float().mean()):.2f} clean {float(conf[~P].float().mean()):.2f}")
