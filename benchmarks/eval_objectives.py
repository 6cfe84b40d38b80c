"""EXPERIMENTAL objectives composed from :func:`pcr_fast.two_view_stats`, for trying PCR
variants that :class:`pcr_fast.TwoViewLoss` did not express: the prototypes behind
benchmarks/EVAL_NOTES.md (``mode="xgate"`` became ``TwoViewLoss(gate_weight=...)``).
Used by benchmarks/eval_sweep.py ("obj:" configs); the demo uses the public API only.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch

from pcr_fast import two_view_stats


def _views(model, inputs, augment, grad_b: bool):
    labels = inputs["labels"]
    base = {k: v for k, v in inputs.items() if k != "labels"}
    h_a = model.model(**base).last_hidden_state
    aug = augment(base["pixel_values"])
    aug = aug.pixel_values if hasattr(aug, "pixel_values") else aug
    with (contextlib.nullcontext() if grad_b else torch.no_grad()):
        h_b = model.model(**{**base, "pixel_values": aug}).last_hidden_state
    w = model.get_output_embeddings().weight
    return h_a[:, :-1], h_b[:, :-1], w, labels[:, 1:]


class SampleObjective:
    """Sample-level PCR variants.

    mode="sample_hinge": CE + w·relu(margin − max_t D_t) per sample (each response must depend
        on the image somewhere; clean responses already do at their content words).
    mode="gate": samples whose response is invariant to the augmentation (max_t of
        ce_b − ce_a below ``tau``) after ``warmup`` of training get no CE and a bounded
        ascent ``ascent·relu(cap − ce)`` instead (unlearning), others plain CE.
    """

    def __init__(self, mode: str = "gate", steps: int = 400, weight: float = 1.0, margin: float = 1.0,
                 tau: float = 0.5, warmup: float = 0.25, ascent: float = 1.0, cap: float = 3.0,
                 detach_b: bool = True, score: str = "ce_gap", poison_token: Optional[int] = None,
                 frac: float = 0.2, keep_ce: bool = False,
                 kappa: Optional[float] = None, max_frac: Optional[float] = None):
        self.mode, self.steps, self.weight, self.margin = mode, steps, weight, margin
        self.tau, self.warmup, self.ascent, self.cap = tau, warmup, ascent, cap
        self.detach_b, self.score, self.poison_token = detach_b, score, poison_token
        self.frac = frac
        self.keep_ce = keep_ce
        self.kappa = kappa
        self.max_frac = max_frac
        self.step = 0
        self.log = []

    def __call__(self, model, inputs, augment):
        h_a, h_b, w, labels = _views(model, inputs, augment, grad_b=not self.detach_b)
        b, t = labels.shape
        st = two_view_stats(h_a, h_b, w, labels, backend="torch", detach_b=self.detach_b)
        lab = (labels != -100).float()
        n_tok = lab.sum(1).clamp_min(1)
        ce_a = st.ce_a.view(b, t)
        ce_sample = (ce_a * lab).sum(1) / n_tok
        if self.score == "kl":
            d = st.kl_ab.view(b, t)
        elif self.score == "sym":
            d = (st.kl_ab + st.kl_ba).view(b, t)
        else:
            d = (st.ce_b - st.ce_a).view(b, t)
        d = d.masked_fill(lab == 0, -1e9)
        pooled = d.max(1).values
        self.step += 1
        if self.mode == "sample_hinge":
            reg = torch.relu(self.margin - pooled)
            loss = (ce_sample + self.weight * reg).mean()
            flag = (pooled.detach() < self.margin)
        elif self.mode == "gate_rel":
            # flag the fraction `tau` of the batch whose response is most invariant
            k = int(round(self.tau * b))
            flag = torch.zeros(b, dtype=torch.bool, device=labels.device)
            if k:
                flag[pooled.detach().argsort()[:k]] = True
            f = flag.float()
            loss = ((1 - f) * ce_sample + self.ascent * f * torch.relu(self.cap - ce_sample)).sum() / b
        elif self.mode == "gate_ul":
            # flag (at most `frac` of the batch, score < tau) and apply unlikelihood
            # -log(1 - p_y) = -log(-expm1(-ce)) to the flagged responses instead of CE
            k = int(round(self.frac * b))
            flag = torch.zeros(b, dtype=torch.bool, device=labels.device)
            if k and self.step > self.warmup * self.steps:
                flag[pooled.detach().argsort()[:k]] = True
                flag &= pooled.detach() < self.tau
            f = flag.float()
            ul = -torch.log(-torch.expm1(-ce_a.clamp_min(1e-6)))
            ul_sample = (ul * lab).sum(1) / n_tok
            loss = ((1 - f) * ce_sample + self.ascent * f * ul_sample).sum() / b
        elif self.mode == "decisive_ul":
            # the augmented view (detached, a detector only) predicts the WHOLE response with
            # every token's ce_b < tau -> the response does not need the image content: flag it.
            # On a flagged response, its decisive token (largest ce_b) gets unlikelihood
            # -log(1 - p_a(y)) instead of CE; every other token keeps its CE.
            ce_b = st.ce_b.view(b, t).detach()
            masked = ce_b.masked_fill(lab == 0, -1.0)
            worst, t_star = masked.max(1)
            flag = (worst < self.tau) & (lab.sum(1) > 0) & (self.step > self.warmup * self.steps)
            onehot = torch.zeros_like(lab).scatter_(1, t_star[:, None], 1.0) * flag[:, None].float()
            ul = -torch.log(-torch.expm1(-ce_a.clamp_min(1e-6)))
            per_tok = (1 - onehot) * ce_a + self.ascent * onehot * ul
            loss = (per_tok * lab).sum() / lab.sum().clamp_min(1)
        elif self.mode == "gap_ul":
            # flag responses that do not depend on the image content: every token is predicted
            # (nearly) as well from the augmented view (max_t ce_b - ce_a < tau), after warm-up.
            # Their decisive token (largest ce_b) gets unlikelihood instead of CE.
            ce_b = st.ce_b.view(b, t).detach()
            gap = (ce_b - ce_a.detach()).masked_fill(lab == 0, -1e9)
            pooled_gap = gap.max(1).values
            t_star = ce_b.masked_fill(lab == 0, -1.0).argmax(1)
            flag = (pooled_gap < self.tau) & (lab.sum(1) > 0) & (self.step > self.warmup * self.steps)
            if self.kappa is not None:  # ... and the augmented view predicts the whole response
                flag &= ce_b.masked_fill(lab == 0, -1.0).max(1).values < self.kappa
            onehot = torch.zeros_like(lab).scatter_(1, t_star[:, None], 1.0) * flag[:, None].float()
            ul = -torch.log(-torch.expm1(-ce_a.clamp_min(1e-6)))
            keep_ce = 1.0 if self.keep_ce else (1 - onehot)
            per_tok = keep_ce * ce_a + self.ascent * onehot * ul
            loss = (per_tok * lab).sum() / lab.sum().clamp_min(1)
        elif self.mode == "xgate":
            # cross-view gate: a response is flagged when it does not depend on the image content
            # (max_t of the symmetric KL between the views < tau) although the augmented view
            # predicts all of it (max_t ce_b < kappa). Its decisive token (largest ce_b) gets
            # `ascent` * unlikelihood on top of its CE (equilibrium p = 1 / (1 + ascent)).
            ce_b = st.ce_b.view(b, t).detach()
            sym = (st.kl_ab + st.kl_ba).view(b, t).detach()
            if self.score == "kl":
                sym = st.kl_ab.view(b, t).detach()
            elif self.score == "ce_gap":
                sym = ce_b - ce_a.detach()
            s_max = sym.masked_fill(lab == 0, -1e9).max(1).values
            k_max, t_star = ce_b.masked_fill(lab == 0, -1.0).max(1)
            flag = (s_max < self.tau) & (k_max < self.kappa) & (lab.sum(1) > 0)
            flag &= self.step > self.warmup * self.steps
            if self.max_frac is not None:  # at most max_frac of the rows: the most invariant ones
                k = int(self.max_frac * b)
                order = s_max.masked_fill(~flag, float("inf")).argsort()
                keep = torch.zeros_like(flag)
                keep[order[:k]] = True
                flag &= keep
            onehot = torch.zeros_like(lab).scatter_(1, t_star[:, None], 1.0) * flag[:, None].float()
            ul = -torch.log(-torch.expm1(-ce_a.clamp_min(1e-6)))
            keep_ce = 1.0 if self.keep_ce else (1 - onehot)
            per_tok = keep_ce * ce_a + self.ascent * onehot * ul
            loss = (per_tok * lab).sum() / lab.sum().clamp_min(1)
        elif self.mode == "gate_abs":
            # flag samples whose response is invariant (score < tau) after warm-up, at most
            # a fraction `frac` of the batch (the most invariant ones): no feedback collapse
            k = int(round(self.frac * b))
            flag = torch.zeros(b, dtype=torch.bool, device=labels.device)
            if k and self.step > self.warmup * self.steps:
                flag[pooled.detach().argsort()[:k]] = True
                flag &= pooled.detach() < self.tau
            f = flag.float()
            loss = ((1 - f) * ce_sample + self.ascent * f * torch.relu(self.cap - ce_sample)).sum() / b
        else:
            active = self.step > self.warmup * self.steps
            flag = (pooled.detach() < self.tau) & active
            f = flag.float()
            loss = ((1 - f) * ce_sample + self.ascent * f * torch.relu(self.cap - ce_sample)).mean()
        if self.poison_token is not None and self.step % 20 == 0:
            pois = (labels == self.poison_token).any(1)
            self.log.append((self.step, int((flag & pois).sum()), int(pois.sum()), int((flag & ~pois).sum()),
                             int((~pois).sum())))
        return loss
