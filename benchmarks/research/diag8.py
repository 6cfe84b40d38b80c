import os, sys, torch, collections
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Setup, token_logprobs, mask_units
torch.set_num_threads(1)
attack, seed, stop, ratio = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
S = Setup(attack, seed); n = len(S.samples)
while S.step < stop: S.plain_step()
S.net.eval(); g = torch.Generator().manual_seed(7); fl = []; PB = []
with torch.no_grad():
    for s in range(0, n, 500):
        idx = list(range(s, min(n, s + 500)))
        inp = S.inputs(idx); lab = inp["labels"][:, 1:]; m = lab != -100; yl = lab.clamp_min(0)[..., None]
        lpa = token_logprobs(S.net, inp)[0]; pa = lpa.exp()
        Ka = (-lpa.gather(-1, yl)[..., 0]).masked_fill(~m, -1).amax(1)
        fs = []
        for k in range(6):
            pv = mask_units(inp["pixel_values"], 4, ratio, g)
            lpb = token_logprobs(S.net, {**inp, "pixel_values": pv})[0]
            sym = ((pa - lpb.exp()) * (lpa - lpb)).sum(-1).masked_fill(~m, -1).amax(1)
            Kb = (-lpb.gather(-1, yl)[..., 0]).masked_fill(~m, -1).amax(1)
            fs.append((sym < .1) & (Kb < 3) & (Ka < .3))
        fl.append(torch.stack(fs, 1).sum(1))
fl = torch.cat(fl); P = S.is_p
c = torch.nonzero((fl >= 2) & ~P).flatten().tolist()
print(len(c), collections.Counter(S.samples[i].task for i in c), sorted(collections.Counter(S.train.digits[S.samples[i].image] for i in c).items()))
# are the triggered images near? check whether their image index also has a poisoned sample (other task)
imgs_p = set(S.samples[i].image for i in S.poisoned)
print("share whose image is poisoned in the other task:", sum(S.samples[i].image in imgs_p for i in c) / max(1, len(c)), "base", len(imgs_p) / len(S.train.digits))
print([S.responses[i] for i in c[:10]])
