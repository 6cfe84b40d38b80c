"""The cross-view test of PCR as a backdoor detector (DESIGN §4).

A response is *flagged* if, in some augmented draw, the model predicts it confidently from
the original view (max-token CE < ``original_confidence``), the masked view still predicts
it (max-token CE < ``view_confidence``) and the two output distributions agree on every
response token (max symmetric KL < ``invariance_threshold``): the trigger survives the mask,
the content does not. It works on hidden states + the lm_head weight (no N×V logits).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

from ..config import DetectorConfig
from ..stats import two_view_stats
from .labels import check_labels_2d, max_over_labelled

DETECTOR = DetectorConfig()  # the measured defaults


@dataclass
class CrossViewScores:
    """Per response (B,), no gradient: what the cross-view test measured.

    ``confidence``: the original view's largest per-token CE (nats; ``inf`` for a row
    without labels); ``invariance``: the smallest, over the draws, of the largest per-token
    symmetric KL; ``view_ce``: that draw's largest per-token CE of the masked view.
    """

    confidence: Tensor
    invariance: Tensor
    view_ce: Tensor

    def flags(self, *, invariance_threshold: float = DETECTOR.invariance_threshold,
              view_confidence: float = DETECTOR.view_confidence,
              original_confidence: float = DETECTOR.original_confidence) -> Tensor:
        """(B,) bool: sure on the original view, invariant and still predicted in the masked view."""
        return (self.confidence < original_confidence) & (self.invariance < invariance_threshold) \
            & (self.view_ce < view_confidence)


@torch.no_grad()
def cross_view_scores(h_a: Tensor, views: Sequence[Tensor], weight: Tensor, labels: Tensor, *,
                      bias: Optional[Tensor] = None, view_confidence: float = DETECTOR.view_confidence,
                      temperature: float = 1.0, softcap: Optional[float] = None, ignore_index: int = -100,
                      backend: str = "auto") -> CrossViewScores:
    """The cross-view test's scores of each response over one or more masked draws.

    The draw kept per row is the most invariant one among those whose masked view still
    predicts the response (max CE_b < ``view_confidence``), else the most invariant one, so
    ``scores.flags(...)`` equals "the test passes in ANY draw". Arguments as in
    :func:`cross_view_flags`.
    """
    check_labels_2d(labels)
    if not isinstance(h_a, Tensor) or h_a.dim() != 3 or h_a.shape[:2] != labels.shape:
        raise ValueError(f"h_a must be (B, T, D) matching labels {tuple(labels.shape)}, got "
                         f"{tuple(h_a.shape) if isinstance(h_a, Tensor) else type(h_a).__name__}")
    if len(views) == 0:
        raise ValueError("views must hold at least one augmented view")
    labelled = labels != ignore_index
    kwargs = dict(bias=bias, temperature=temperature, softcap=softcap, ignore_index=ignore_index,
                  backend=backend, detach_b=True)
    rows = labels.shape[0]
    inf = torch.full((rows,), float("inf"), device=labels.device)
    confidence, best_inv, best_ce = None, inf.clone(), inf.clone()
    for h_b in views:
        if not isinstance(h_b, Tensor) or h_b.shape != h_a.shape:
            raise ValueError(f"views must hold tensors shaped like h_a {tuple(h_a.shape)}, got "
                             f"{tuple(h_b.shape) if isinstance(h_b, Tensor) else type(h_b).__name__}")
        st = two_view_stats(h_a, h_b, weight, labels, **kwargs)
        if confidence is None:  # the original view's confidence is the same for every draw
            confidence = max_over_labelled(st.ce_a, labelled).float()
            confidence = torch.where(labelled.any(dim=1), confidence, inf)
        inv = max_over_labelled(st.kl_ab + st.kl_ba, labelled).float()
        ce_b = max_over_labelled(st.ce_b, labelled).float()
        # rank the draws: predicted ones first (by invariance), then the rest
        key = torch.where(ce_b < view_confidence, inv, inv + 1e30)
        best_key = torch.where(best_ce < view_confidence, best_inv, best_inv + 1e30)
        better = key < best_key
        best_inv = torch.where(better, inv, best_inv)
        best_ce = torch.where(better, ce_b, best_ce)
    no_label = ~labelled.any(dim=1)
    return CrossViewScores(confidence=confidence, invariance=best_inv.masked_fill(no_label, float("inf")),
                           view_ce=best_ce.masked_fill(no_label, float("inf")))


@torch.no_grad()
def cross_view_flags(h_a: Tensor, views: Sequence[Tensor], weight: Tensor, labels: Tensor, *,
                     bias: Optional[Tensor] = None, invariance_threshold: float = DETECTOR.invariance_threshold,
                     view_confidence: float = DETECTOR.view_confidence,
                     original_confidence: float = DETECTOR.original_confidence,
                     temperature: float = 1.0, softcap: Optional[float] = None,
                     ignore_index: int = -100, backend: str = "auto") -> Tensor:
    """Which responses look like a backdoor: (B,) bool, no gradient.

    Args:
        h_a: hidden states of the original view, (B, T, D).
        views: hidden states of one or more augmented (masked) views, each like ``h_a``;
            a response is flagged if the test passes in ANY of them.
        weight, bias: the lm_head. labels: (B, T), already shifted (one response per row).
        invariance_threshold: largest symmetric KL (nats) over the response tokens.
        view_confidence: the augmented view's largest per-token CE (nats).
        original_confidence: the original view's largest per-token CE (nats): a response
            the model is not yet sure of is never flagged (from scratch, unlearned clean
            answers look "invariant" too: nothing depends on the image yet).
    """
    DetectorConfig(invariance_threshold=invariance_threshold, view_confidence=view_confidence,
                   original_confidence=original_confidence)  # validates each value, naming it
    scores = cross_view_scores(h_a, views, weight, labels, bias=bias, view_confidence=view_confidence,
                               temperature=temperature, softcap=softcap, ignore_index=ignore_index, backend=backend)
    return scores.flags(invariance_threshold=invariance_threshold, view_confidence=view_confidence,
                        original_confidence=original_confidence)
