import os, sys, torch
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Setup, token_logprobs, mask_units
torch.set_num_threads(1)
attack, seed = sys.argv[1], int(sys.argv[2]); stops = [int(x) for x in sys.argv[3].split(",")]
S = Setup(attack, seed); n = len(S.samples); K = 6
RATIOS = [0.5, 0.7, 0.85]
@torch.no_grad()
def score():
    S.net.eval(); g = torch.Generator().manual_seed(7); perm = torch.randperm(n, generator=g)
    F = {r: [] for r in RATIOS}; NU = {r: [] for r in RATIOS}; KA = []
    for s in range(0, n, 500):
        idx = perm[s:s + 500].tolist()
        inp = S.inputs(idx); lab = inp["labels"][:, 1:]; m = lab != -100; yl = lab.clamp_min(0)[..., None]
        lpa = token_logprobs(S.net, inp)[0]; pa = lpa.exp()
        KA.append((-lpa.gather(-1, yl)[..., 0]).masked_fill(~m, -1).amax(1))
        other = inp["pixel_values"].roll(7, 0)
        for r in RATIOS:
            lpn = token_logprobs(S.net, {**inp, "pixel_values": mask_units(other, 4, r, g)})[0]
            NU[r].append(((pa - lpn.exp()) * (lpa - lpn)).sum(-1).masked_fill(~m, -1).amax(1))
            fs = []
            for k in range(K):
                lpb = token_logprobs(S.net, {**inp, "pixel_values": mask_units(inp["pixel_values"], 4, r, g)})[0]
                sym = ((pa - lpb.exp()) * (lpa - lpb)).sum(-1).masked_fill(~m, -1).amax(1)
                Kb = (-lpb.gather(-1, yl)[..., 0]).masked_fill(~m, -1).amax(1)
                fs.append((sym < .1) & (Kb < 3))
            F[r].append(torch.stack(fs, 1))
    S.net.train(); inv = perm.argsort()
    return torch.cat(KA)[inv], {r: torch.cat(v)[inv] for r, v in F.items()}, {r: torch.cat(v)[inv] for r, v in NU.items()}
P = S.is_p
for stop in stops:
    while S.step < stop: S.plain_step()
    Ka, F, NU = score(); conf = Ka < 0.3
    line = f"{attack:13s} s{seed} step{stop} |"
    for r in RATIOS:
        f = F[r] & conf[:, None] & (NU[r] > 1.0)[:, None]
        line += f" r{r}: null-ok {float((NU[r]>1)[P].float().mean()):.2f} draw {float(f[P].float().mean()):.2f}/{float(f[~P].float().mean()):.3f} any3 {float(f[:, :3].any(1)[P].float().mean()):.2f}/{float(f[:, :3].any(1)[~P].float().mean()):.3f} any6 {float(f.any(1)[P].float().mean()):.2f}/{float(f.any(1)[~P].float().mean()):.3f} |"
    print(line, flush=True)
