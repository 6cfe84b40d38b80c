"""``TwoViewLoss``: the PCR objective composed from the fused two-view statistics.

Per token t (DESIGN §3)::

    ℓ_t = ce_weight · CE_ε(p_a, y_t) + z_loss · lse_a,t²  (labelled tokens)
        + divergence_weight · φ(D_t)                     (selected tokens)
        + entropy_weight · ψ(H_t)                        (selected tokens)

with ``CE_ε`` the label-smoothed CE ``(1 − ε)·CE + ε·(lse − mean logit)`` (``F.cross_entropy``'s),
``D`` one of KL(p_a‖p_b), KL(p_b‖p_a), their sum, or the generalised JSD_β (its own pass,
:func:`pcr_fast.stats.two_view_jsd`), ``φ`` a bounded "pull apart"
(``hinge``: relu(margin − D), zero once the views differ by ``margin`` nats; ``clip``:
−min(D, margin), same gradient, negative values), and ``ψ`` the entropy penalty of the
chosen view(s). Everything here is plain PyTorch on (N,) vectors: the heavy lifting is
in :func:`pcr_fast.two_view_stats`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn

from .config import DetectorConfig, ObjectiveConfig, PCRConfig
from .stats import TwoViewStats, fused_chunked_objective, resolve_backend, two_view_jsd, two_view_stats

REDUCTIONS = ("mean", "sum", "none")


@dataclass
class TwoViewLossOutput:
    """The objective and detached per-term values for logging (no host sync)."""

    loss: Tensor            # scalar for mean/sum, labels' shape for reduction="none"
    ce: Tensor              # mean CE of view a over labelled tokens
    divergence: Tensor      # mean D over the regularised tokens
    divergence_term: Tensor  # mean φ(D) (what the loss adds, before its weight)
    entropy: Tensor         # mean H of the entropy view(s) over the regularised tokens
    num_tokens: Tensor      # labelled tokens in this batch
    stats: TwoViewStats     # detached per-row statistics
    gated_fraction: Optional[Tensor] = None  # share of responses the cross-view gate flagged
    accuracy: Optional[Tensor] = None   # share of labelled tokens whose view-a argmax is the label
    lse: Optional[Tensor] = None        # log-sum-exp of view a per token (labels' shape)
    z_loss: Optional[Tensor] = None     # mean z_loss·lse² over labelled tokens (what the loss adds)

    def log_dict(self, prefix: str = "") -> dict:
        """Detached scalars keyed for a logger (call ``.item()`` off the hot path)."""
        out = {f"{prefix}ce": self.ce, f"{prefix}divergence": self.divergence,
               f"{prefix}divergence_term": self.divergence_term, f"{prefix}entropy": self.entropy}
        for name in ("gated_fraction", "z_loss"):
            if getattr(self, name) is not None:
                out[f"{prefix}{name}"] = getattr(self, name)
        return out


def unlikelihood_from_ce(ce: Tensor) -> Tensor:
    """−log(1 − p(y)) from the CE −log p(y), stable near p(y) → 1."""
    return -torch.log(-torch.expm1(-ce.clamp_min(1e-6)))


class TwoViewLoss(nn.Module):
    """The PCR objective on hidden states of two views and the lm_head weight.

    Per token: ``ce_weight·CE(p_a, y) + divergence_weight·φ(D) + entropy_weight·ψ(H)``
    and, with ``gate_weight > 0``, the cross-view gate: per response (a row of 2-D
    labels), with S = max over its labelled tokens of KL(p_a‖p_b) + KL(p_b‖p_a) and K, t* =
    max / argmax of ce_b, a response that does not depend on the image
    (S < ``invariance_threshold``) although the augmented view still predicts all of it
    (K < ``view_confidence``) — the backdoor signature — gets λ·(−log(1 − p_a(y)))
    (unlikelihood) at its decisive token t*, normalised like the CE. The gate is detached.

    Args:
        objective: the terms and their weights (:class:`~pcr_fast.config.ObjectiveConfig`;
            its fields can also be given as keywords: ``TwoViewLoss(divergence_weight=2.0)``).
        detector: the gate's thresholds (:class:`~pcr_fast.config.DetectorConfig`;
            ``invariance_threshold`` / ``view_confidence`` as keywords too).
        reduction: ``mean`` (over labelled tokens, or ``num_items_in_batch``), ``sum``, ``none``.
        detach_b: stop-gradient through view b (its distribution is a constant target).
        temperature, softcap, ignore_index, backend, chunk_size: passed to
            :func:`pcr_fast.two_view_stats`.

    Defaults: the literal PCR objective (pull apart the views by up to 3 nats, gate off).
    """

    def __init__(self, objective: Optional[ObjectiveConfig] = None, detector: Optional[DetectorConfig] = None, *,
                 reduction: str = "mean", backend: str = "auto", detach_b: bool = False,
                 temperature: float = 1.0, softcap: Optional[float] = None, ignore_index: int = -100,
                 chunk_size: Optional[int] = None, **fields: Any):
        super().__init__()
        objective = objective if objective is not None else ObjectiveConfig()
        detector = detector if detector is not None else DetectorConfig()
        if not isinstance(objective, ObjectiveConfig):
            raise ValueError(f"objective must be an ObjectiveConfig, got {type(objective).__name__}")
        if not isinstance(detector, DetectorConfig):
            raise ValueError(f"detector must be a DetectorConfig, got {type(detector).__name__}")
        own = {f.name for f in dataclasses.fields(ObjectiveConfig)}
        gate = {"invariance_threshold", "view_confidence"}
        unknown = sorted(set(fields) - own - gate)
        if unknown:
            raise TypeError(f"TwoViewLoss got unexpected keyword(s) {unknown}")
        self.objective = dataclasses.replace(objective, **{k: v for k, v in fields.items() if k in own})
        self.detector = dataclasses.replace(detector, **{k: v for k, v in fields.items() if k in gate})
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        self.reduction = reduction
        self.backend = backend
        self.detach_b = bool(detach_b)
        self.temperature = temperature
        self.softcap = softcap
        self.ignore_index = ignore_index
        self.chunk_size = chunk_size

    @classmethod
    def from_config(cls, config: PCRConfig, *, softcap: Optional[float] = None) -> "TwoViewLoss":
        """The objective of ``PCRConfig(mode="online")`` (for a model whose logits are soft-capped
        at ``softcap``)."""
        return cls(config.objective, config.detector, backend=config.execution.backend,
                   detach_b=config.execution.detach_b, softcap=softcap)

    def extra_repr(self) -> str:
        o = self.objective
        return (f"ce_weight={o.ce_weight}, divergence={o.divergence!r}, divergence_weight={o.divergence_weight}, "
                f"margin={o.margin}, entropy_weight={o.entropy_weight}, entropy_view={o.entropy_view!r}, "
                f"reduction={self.reduction!r}, detach_b={self.detach_b}, gate_weight={o.gate_weight}")

    # -- the pieces, each on (N,) vectors -------------------------------------------------
    def divergence_values(self, stats: TwoViewStats, jsd: Optional[Tensor] = None) -> Tensor:
        """D per row (``jsd``: the per-row JSD_β, required for ``divergence="jsd"``)."""
        if self.objective.divergence == "jsd":
            if jsd is None:
                raise ValueError("divergence='jsd' needs the per-row JSD (pcr_fast.stats.two_view_jsd)")
            return jsd
        if self.objective.divergence == "kl":
            return stats.kl_ab
        if self.objective.divergence == "reverse_kl":
            return stats.kl_ba
        return stats.kl_ab + stats.kl_ba

    def pull_apart(self, d: Tensor) -> Tensor:
        """φ(D): decreasing in D, bounded by the margin (zero gradient beyond it)."""
        if self.objective.margin is None:
            return -d
        if self.objective.divergence_form == "hinge":
            return torch.relu(self.objective.margin - d)
        return -torch.clamp(d, max=self.objective.margin)

    def entropy_values(self, stats: TwoViewStats) -> Tensor:
        if self.objective.entropy_view == "a":
            return stats.ent_a
        if self.objective.entropy_view == "b":
            return stats.ent_b
        return stats.ent_a + stats.ent_b

    def entropy_penalty(self, h: Tensor) -> Tensor:
        t = self.objective.entropy_target
        if self.objective.resolved_entropy_form == "linear":
            return h
        if self.objective.resolved_entropy_form == "below":
            return torch.relu(h - t)
        if self.objective.resolved_entropy_form == "above":
            return torch.relu(t - h)
        return (h - t) ** 2

    def gate(self, stats: TwoViewStats, labelled: Tensor, rows: int):
        """The cross-view gate (detached): (flag per response, one-hot of its decisive token)."""
        with torch.no_grad():
            lab = labelled.view(rows, -1)
            sym = (stats.kl_ab + stats.kl_ba).view(rows, -1).masked_fill(~lab, float("-inf"))
            ce_b = stats.ce_b.view(rows, -1).masked_fill(~lab, float("-inf"))
            invariance = sym.max(dim=1).values
            confidence, decisive = ce_b.max(dim=1)
            flag = (lab.any(dim=1) & (invariance < self.detector.invariance_threshold)
                    & (confidence < self.detector.view_confidence))
            if self.objective.gate_max_fraction is not None:  # keep only the most invariant responses
                k = max(1, int(self.objective.gate_max_fraction * rows))
                order = invariance.masked_fill(~flag, float("inf")).argsort()
                keep = torch.zeros_like(flag)
                keep[order[:k]] = True
                flag = flag & keep
            onehot = torch.zeros_like(lab, dtype=stats.ce_a.dtype).scatter_(1, decisive[:, None], 1.0)
            return flag, (onehot * flag[:, None]).reshape(-1)

    def _union_gate(self, flag: Tensor, decisive: Tensor, h_a: Tensor, h_k: Tensor, weight: Tensor,
                    labels: Tensor, bias: Optional[Tensor], labelled: Tensor):
        """Fold one more augmented draw into the gate: flagged if invariant under any draw
        (the decisive token comes from the first draw that flags the response)."""
        if not isinstance(h_k, Tensor) or h_k.shape != h_a.shape:
            raise ValueError(f"extra_views must hold tensors shaped like h_a {tuple(h_a.shape)}, got "
                             f"{tuple(h_k.shape) if isinstance(h_k, Tensor) else type(h_k).__name__}")
        rows = labels.shape[0]
        with torch.no_grad():
            st = two_view_stats(h_a.detach(), h_k.detach(), weight.detach(), labels,
                                bias=None if bias is None else bias.detach(), **self._stats_kwargs())
            flag_k, decisive_k = self.gate(st, labelled, rows)
            new = (flag_k & ~flag)[:, None]
            decisive = torch.where(new, decisive_k.view(rows, -1), decisive.view(rows, -1)).reshape(-1)
            return flag | flag_k, decisive

    unlikelihood = staticmethod(unlikelihood_from_ce)

    def _stats_kwargs(self) -> dict:
        return dict(temperature=self.temperature, softcap=self.softcap, ignore_index=self.ignore_index,
                    backend=self.backend, detach_b=self.detach_b, chunk_size=self.chunk_size)

    def _use_fused_chunked(self, h_a: Tensor, weight: Tensor, bias: Optional[Tensor]) -> bool:
        """The compute-minimal path: triton_chunked, a scalar loss, and gradients wanted."""
        if self.reduction == "none" or not torch.is_grad_enabled() or self.objective.gate_weight > 0:
            return False  # the gate pools whole responses: not separable into row chunks
        o = self.objective
        if o.label_smoothing > 0 or o.z_loss > 0 or o.divergence == "jsd":
            return False  # terms on the extras or on the JSD's own pass
        if not any(t is not None and t.requires_grad for t in (h_a, weight, bias)):
            return False
        return resolve_backend(self.backend, h_a.device) == "triton_chunked"

    def forward(self, h_a: Tensor, h_b: Tensor, weight: Tensor, labels: Tensor,
                bias: Optional[Tensor] = None, num_items_in_batch=None,
                token_mask: Optional[Tensor] = None,
                extra_views: Optional[Sequence[Tensor]] = None) -> TwoViewLossOutput:
        """Compute the objective.

        ``labels`` must already be shifted for a causal LM. ``token_mask`` (same shape as
        labels, bool) restricts the regularised rows when ``regularize="all"``.
        ``num_items_in_batch`` (int or tensor: labelled tokens over all gradient-accumulation
        micro-batches, the HF Trainer convention) replaces the per-batch token count.
        ``extra_views``: hidden states of further augmented draws (each shaped like ``h_b``),
        used only by the cross-view gate's detector (no gradient): a response is flagged if
        it looks invariant under ANY draw (a trigger the first draw happens to break can
        survive another).
        """
        if extra_views and self.objective.gate_weight == 0:
            raise ValueError("extra_views only feed the cross-view gate: set gate_weight > 0")
        if self.objective.gate_weight > 0 and labels.dim() != 2:
            raise ValueError(f"labels must be 2-D (B, T) with gate_weight > 0 (the gate pools each "
                             f"response, a row); got shape {tuple(labels.shape)}")
        labels1 = labels.reshape(-1)
        labelled = labels1 != self.ignore_index
        if self.objective.regularize == "labelled":
            reg = labelled
        elif token_mask is not None:
            if token_mask.numel() != labels1.numel():
                raise ValueError(f"token_mask must have the shape of labels {tuple(labels.shape)}, "
                                 f"got {tuple(token_mask.shape)}")
            reg = token_mask.reshape(-1).to(torch.bool)
        else:
            reg = torch.ones_like(labelled)
        dtype = torch.float64 if h_a.dtype == torch.float64 else torch.float32
        lab_f, reg_f = labelled.to(dtype), reg.to(dtype)
        n_lab, n_reg = lab_f.sum(), reg_f.sum()
        if self.reduction in ("sum", "none"):
            den_ce = den_reg = torch.ones((), dtype=dtype, device=lab_f.device)
        elif num_items_in_batch is not None:
            den_ce = den_reg = torch.as_tensor(num_items_in_batch, dtype=dtype, device=lab_f.device)
        elif self.objective.regularize == "labelled":
            den_ce = den_reg = n_lab.clamp_min(1)
        else:  # separate normalisers when CE and regulariser cover different rows
            den_ce, den_reg = n_lab.clamp_min(1), n_reg.clamp_min(1)

        o = self.objective
        jsd = None
        if o.divergence == "jsd" and o.divergence_weight != 0.0:
            jsd = two_view_jsd(h_a, h_b, weight, beta=o.jsd_beta, bias=bias, temperature=self.temperature,
                               softcap=self.softcap, detach_b=self.detach_b, chunk_size=self.chunk_size)

        def row_losses(st: TwoViewStats, rows: slice = slice(None), extras=None) -> Tensor:
            """Per-row contributions whose sum is the loss (row-separable by design)."""
            ce = st.ce_a
            if o.label_smoothing > 0:
                smooth = (extras.lse - extras.logit_mean) * lab_f[rows]
                ce = (1.0 - o.label_smoothing) * ce + o.label_smoothing * smooth
            out = o.ce_weight * ce / den_ce
            if o.z_loss > 0:
                out = out + o.z_loss * extras.lse.square() * lab_f[rows] / den_ce
            reg_rows = reg_f[rows]
            if self.objective.divergence_weight != 0.0:
                out = out + self.objective.divergence_weight * self.pull_apart(self.divergence_values(st, jsd)) * reg_rows / den_reg
            if self.objective.entropy_weight != 0.0:
                out = out + self.objective.entropy_weight * self.entropy_penalty(self.entropy_values(st)) * reg_rows / den_reg
            return out

        gated_fraction = None
        fused = self._use_fused_chunked(h_a, weight, bias)
        if fused:
            loss, stats, extras = fused_chunked_objective(h_a, h_b, weight, labels, row_losses, bias=bias,
                                                          with_extras=True, **self._stats_kwargs())
        else:
            stats, extras, _ = two_view_stats(h_a, h_b, weight, labels, bias=bias, with_extras=True,
                                              **self._stats_kwargs())
            per_row = row_losses(stats, extras=extras)
            gated_fraction = None
            if self.objective.gate_weight > 0:
                flag, decisive = self.gate(stats, labelled, labels.shape[0])
                for h_k in extra_views or ():
                    flag, decisive = self._union_gate(flag, decisive, h_a, h_k, weight, labels, bias,
                                                      labelled)
                per_row = per_row + self.objective.gate_weight * decisive * self.unlikelihood(stats.ce_a) / den_ce
                gated_fraction = flag.to(dtype).mean()
            loss = per_row.view(labels.shape) if self.reduction == "none" else per_row.sum()
        with torch.no_grad():
            stats = TwoViewStats(*(x.detach() for x in stats))
            div = self.divergence_values(stats, None if jsd is None else jsd.detach())
            lab_den, reg_den = n_lab.clamp_min(1), n_reg.clamp_min(1)
            lse = extras.lse.detach()
            hits = (extras.argmax == labels1) & labelled
            return TwoViewLossOutput(
                loss=loss,
                ce=stats.ce_a.sum() / lab_den,
                divergence=(div * reg_f).sum() / reg_den,
                divergence_term=(self.pull_apart(div) * reg_f).sum() / reg_den,
                entropy=(self.entropy_values(stats) * reg_f).sum() / reg_den,
                num_tokens=n_lab,
                stats=stats,
                gated_fraction=gated_fraction,
                accuracy=hits.to(dtype).sum() / lab_den,
                lse=lse.view(labels.shape),
                z_loss=(o.z_loss * lse.square() * lab_f).sum() / lab_den if o.z_loss > 0 else None,
            )


def two_view_loss(h_a: Tensor, h_b: Tensor, weight: Tensor, labels: Tensor,
                  bias: Optional[Tensor] = None, num_items_in_batch=None, **options: Any) -> TwoViewLossOutput:
    """Functional form of :class:`TwoViewLoss` (``options`` are its constructor arguments)."""
    return TwoViewLoss(**options)(h_a, h_b, weight, labels, bias=bias,
                                  num_items_in_batch=num_items_in_batch)
