import os, sys, torch, collections
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Setup, token_logprobs, mask_units
torch.set_num_threads(1)
attack, seed, stop = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
S = Setup(attack, seed)
while S.step < stop: S.plain_step()
S.net.eval(); n = len(S.samples); g = torch.Generator().manual_seed(123); K = 6
flags = []; Kas = []
with torch.no_grad():
    for s in range(0, n, 500):
        idx = list(range(s, min(n, s + 500)))
        inp = S.inputs(idx); lab = inp["labels"][:, 1:]; m = lab != -100
        lpa, _ = token_logprobs(S.net, inp); pa = lpa.exp()
        ya = lpa.gather(-1, lab.clamp_min(0)[..., None])[..., 0]; Ka = (-ya).masked_fill(~m, -1).amax(1)
        fs = []
        for k in range(K):
            lpb, _ = token_logprobs(S.net, {**inp, "pixel_values": mask_units(S.pix[idx], 4, .5, g)})
            sym = ((pa - lpb.exp()) * (lpa - lpb)).sum(-1); yb = lpb.gather(-1, lab.clamp_min(0)[..., None])[..., 0]
            fs.append((sym.masked_fill(~m, -1).amax(1) < .1) & ((-yb).masked_fill(~m, -1).amax(1) < 3) & (Ka < .3))
        flags.append(torch.stack(fs, 1))
flags = torch.cat(flags).sum(1)
P = S.is_p
cons = (flags >= 3) & ~P
print("clean consistent FPs:", int(cons.sum()), "of", int((~P).sum()))
print(" by task:", collections.Counter(S.samples[i].task for i in torch.nonzero(cons).flatten().tolist()))
print(" by digit:", sorted(collections.Counter(S.train.digits[S.samples[i].image] for i in torch.nonzero(cons).flatten().tolist()).items()))
print(" digit base:", sorted(collections.Counter(S.train.digits).items()))
print(" examples:", [S.responses[i] for i in torch.nonzero(cons).flatten().tolist()[:12]])
