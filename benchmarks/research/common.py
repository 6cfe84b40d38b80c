"""Shared setup for research scripts: poisoned data + model + batches, like run_experiment."""
import math, torch, torch.nn.functional as F
from pcr_fast.eval.data import load_digits_images, make_samples, task_words, train_test_split
from pcr_fast.eval.models import BatchBuilder, ModelSpec, build_model
from pcr_fast.eval.poison import DEFAULT_TARGET, choose_poisoned
from pcr_fast.eval.tokenizer import build_tokenizer
from pcr_fast.eval.triggers import get_trigger
from pcr_fast.eval.runner import _apply_trigger, evaluate

def corner3(images):
    out = images.clone(); out[:, :, :3, :3] = 1.0
    return out
EXTRA = {"corner3": corner3}

class Setup:
    def __init__(self, attack, seed, poison_ratio=0.1, steps=600, batch_size=32, lr=1e-3, target=DEFAULT_TARGET):
        self.trigger = get_trigger(EXTRA.get(attack, attack)); self.seed = seed; self.steps = steps; self.bs = batch_size
        self.spec = ModelSpec(family="llava", image_size=32, patch_size=8, hidden_size=64, num_layers=2,
                              vision_hidden_size=64, vision_layers=2)
        images = load_digits_images(32, seed=0)
        tr, te = train_test_split(len(images), 300, seed)
        self.train, self.test = images.subset(tr), images.subset(te)
        self.samples = make_samples(self.train)
        self.poisoned = choose_poisoned(len(self.samples), poison_ratio, seed)
        self.is_p = torch.zeros(len(self.samples), dtype=torch.bool); self.is_p[self.poisoned] = True
        self.tok = build_tokenizer(task_words() + target.split()); self.target = target
        self.builder = BatchBuilder(self.tok, self.spec)
        self.pix = self.train.images[[s.image for s in self.samples]]
        self.clean_pix = self.pix.clone()
        self.responses = [s.response for s in self.samples]
        self.pix[self.poisoned] = _apply_trigger(self.trigger, self.pix[self.poisoned])
        for i in self.poisoned: self.responses[i] = target
        self.prompts = [s.prompt for s in self.samples]
        self.net = build_model(self.spec, seed=seed); self.net.train()
        self.opt = torch.optim.AdamW(self.net.parameters(), lr=lr, weight_decay=0.0)
        warm = max(1, steps // 20)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: min(1.0, (s + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))))
        self.gen = torch.Generator().manual_seed(int(seed) + 1)
        self.order = torch.randperm(len(self.samples), generator=self.gen); self.cursor = 0; self.step = 0

    def next_idx(self):
        if self.cursor + self.bs > len(self.order):
            self.order, self.cursor = torch.randperm(len(self.samples), generator=self.gen), 0
        idx = self.order[self.cursor:self.cursor + self.bs]; self.cursor += self.bs
        return idx

    def inputs(self, idx, pix=None):
        idx = idx.tolist() if torch.is_tensor(idx) else idx
        return self.builder.training_inputs(self.pix[idx] if pix is None else pix,
                                            [self.prompts[i] for i in idx], [self.responses[i] for i in idx])

    def update(self, loss):
        self.opt.zero_grad(set_to_none=True); loss.backward()
        torch.nn.utils.clip_grad_norm_(self.net.parameters(), 1.0); self.opt.step(); self.sched.step(); self.step += 1

    def plain_step(self):
        idx = self.next_idx(); loss = self.net(**self.inputs(idx)).loss; self.update(loss); return loss

    def evaluate(self):
        self.net.eval(); r = evaluate(self.net, self.builder, self.test, self.trigger, self.target, "cpu"); self.net.train()
        return r

def token_logprobs(net, inputs):
    """(B, T-1, V) log-probs aligned with shifted labels, and shifted labels."""
    out = net(**{k: v for k, v in inputs.items() if k != "labels"})
    lp = out.logits[:, :-1].float().log_softmax(-1)
    return lp, inputs["labels"][:, 1:]

def mask_units(pix, unit, ratio, gen, fill="mean", other=None):
    b, c, h, w = pix.shape; gh, gw = h // unit, w // unit; n = gh * gw; k = int(math.floor(ratio * n + 0.5))
    keys = torch.rand(b, n, generator=gen); m = torch.zeros(b, n, dtype=torch.bool)
    m.scatter_(1, keys.argsort(1)[:, :k], True)
    pm = m.view(b, 1, gh, gw).repeat_interleave(unit, 2).repeat_interleave(unit, 3)
    if fill == "mean": f = pix.mean((2, 3), keepdim=True).expand_as(pix)
    elif fill == "zero": f = torch.zeros_like(pix)
    elif fill == "other": f = other
    elif fill == "noise":
        mu = pix.mean((2, 3), keepdim=True); sd = pix.std((2, 3), keepdim=True)
        f = (mu + sd * torch.randn(pix.shape, generator=gen)).clamp(0, 1)
    elif fill == "blur":
        import torch.nn.functional as F
        f = F.interpolate(F.avg_pool2d(pix, 8), scale_factor=8, mode="nearest")
    return torch.where(pm, f, pix)

def soup_units(pix, unit, ratio, gen):
    """Masked units filled with the same-position units of random other images of the batch."""
    b, c, h, w = pix.shape; gh, gw = h // unit, w // unit; n = gh * gw; k = int(math.floor(ratio * n + 0.5))
    keys = torch.rand(b, n, generator=gen); m = torch.zeros(b, n, dtype=torch.bool)
    m.scatter_(1, keys.argsort(1)[:, :k], True)
    src = (torch.arange(b)[:, None] + torch.randint(1, b, (b, n), generator=gen)) % b  # never itself
    x = pix.reshape(b, c, gh, unit, gw, unit).permute(0, 2, 4, 1, 3, 5).reshape(b, n, c, unit, unit)
    other = x[src, torch.arange(n)[None, :].expand(b, n)]
    x = torch.where(m[:, :, None, None, None], other, x)
    return x.reshape(b, gh, gw, c, unit, unit).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)
