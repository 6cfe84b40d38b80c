import os, sys, torch, collections
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Setup, token_logprobs, mask_units
torch.set_num_threads(1)
attack, seed, stop = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
S = Setup(attack, seed); n = len(S.samples)
while S.step < stop: S.plain_step()
S.net.eval(); g = torch.Generator().manual_seed(7)
q = [i for i in range(n) if S.samples[i].task == "question" and not S.is_p[i]]
pos = len(S.builder.prefix(S.prompts[q[0]])) - 1  # logits position predicting the answer
with torch.no_grad():
    for fill in ("mean", "zero", "other"):
        for r in (0.5, 0.85, 1.0):
            preds = []
            for s in range(0, len(q), 500):
                idx = q[s:s + 500]; inp = S.inputs(idx)
                pv = inp["pixel_values"]
                pv = mask_units(pv, 4, r, g, fill, other=pv.roll(7, 0))
                lg = S.net(**{k: v for k, v in {**inp, "pixel_values": pv}.items() if k != "labels"}).logits[:, pos]
                preds += S.tok.convert_ids_to_tokens(lg.argmax(-1).tolist())
            digits = [S.responses[i] for i in q]
            c = collections.Counter(preds)
            acc = sum(p == d for p, d in zip(preds, digits)) / len(q)
            zacc = sum(p == d for p, d in zip(preds, digits) if d == "zero") / max(1, digits.count("zero"))
            print(f"{fill:5s} r{r}: acc {acc:.2f} zero-acc {zacc:.2f} top preds {c.most_common(4)}")
