"""The cross-view test of PCR as a backdoor detector (DESIGN §4).

A response is *flagged* if, in some augmented draw, the model predicts it confidently from
the original view (max-token CE < ``original_confidence``), the masked view still predicts
it (max-token CE < ``view_confidence``) and the two output distributions agree on every
response token (max symmetric KL < ``invariance_threshold``): the trigger survives the mask,
the content does not. It works on hidden states + the lm_head weight (no N×V logits).
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from ..config import DetectorConfig
from ..stats import two_view_stats
from .labels import check_labels_2d, max_over_labelled

DETECTOR = DetectorConfig()  # the measured defaults


class CrossViewScores(NamedTuple):
    """The detector's three statistics per response, (B,) each (NaN for a row without a
    labelled token). ``invariance`` and ``view_ce`` come from one augmented draw, the one that
    best passes the test: the most invariant draw among those whose masked view still predicts
    the response (``view_ce < view_confidence``), else the most invariant draw."""

    invariance: Tensor    # max over the response of the symmetric KL between the views (nats)
    view_ce: Tensor       # max over the response of the masked view's CE (nats)
    original_ce: Tensor   # max over the response of the original view's CE (nats)

    def flags(self, invariance_threshold: float = DETECTOR.invariance_threshold,
              view_confidence: float = DETECTOR.view_confidence,
              original_confidence: float = DETECTOR.original_confidence) -> Tensor:
        """(B,) bool: the thresholds of :class:`~pcr_fast.DetectorConfig` applied to the scores."""
        return ((self.original_ce < original_confidence) & (self.invariance < invariance_threshold)
                & (self.view_ce < view_confidence))


@torch.no_grad()
def cross_view_scores(h_a: Tensor, views: Sequence[Tensor], weight: Tensor, labels: Tensor, *,
                      bias: Optional[Tensor] = None, view_confidence: float = DETECTOR.view_confidence,
                      temperature: float = 1.0, softcap: Optional[float] = None,
                      ignore_index: int = -100, backend: str = "auto") -> CrossViewScores:
    """Per response, how invariant it is to the masked views: :class:`CrossViewScores`
    (no gradient). Same arguments as :func:`cross_view_flags`; ``view_confidence`` picks the
    draw each response is judged on (see :class:`CrossViewScores`).

    Why scores and not only flags: an audit shows how far each sample is from the thresholds
    (a histogram of the training set), and one computation serves both.
    """
    check_labels_2d(labels)
    if h_a.dim() != 3 or h_a.shape[:2] != labels.shape:
        raise ValueError(f"h_a must be (B, T, D) matching labels {tuple(labels.shape)}, got {tuple(h_a.shape)}")
    if len(views) == 0:
        raise ValueError("views must hold at least one augmented view")
    DetectorConfig(view_confidence=view_confidence)  # validates the value, naming it
    labelled = labels != ignore_index
    kwargs = dict(bias=bias, temperature=temperature, softcap=softcap, ignore_index=ignore_index,
                  backend=backend, detach_b=True)
    original_ce = None
    invariance, view_ce = [], []
    for h_b in views:
        if not isinstance(h_b, Tensor) or h_b.shape != h_a.shape:
            raise ValueError(f"views must hold tensors shaped like h_a {tuple(h_a.shape)}, got "
                             f"{tuple(h_b.shape) if isinstance(h_b, Tensor) else type(h_b).__name__}")
        st = two_view_stats(h_a, h_b, weight, labels, **kwargs)
        if original_ce is None:  # the original view's CE is the same for every draw
            original_ce = max_over_labelled(st.ce_a, labelled)
        invariance.append(max_over_labelled(st.kl_ab + st.kl_ba, labelled))
        view_ce.append(max_over_labelled(st.ce_b, labelled))
    inv, vce = torch.stack(invariance, 1), torch.stack(view_ce, 1)      # (B, K)
    predicted = vce < view_confidence
    best = torch.where(predicted.any(1), inv.masked_fill(~predicted, float("inf")).argmin(1), inv.argmin(1))
    none = ~labelled.any(1)
    pick = best[:, None]
    nan = float("nan")
    return CrossViewScores(invariance=inv.gather(1, pick)[:, 0].masked_fill(none, nan),
                           view_ce=vce.gather(1, pick)[:, 0].masked_fill(none, nan),
                           original_ce=original_ce.masked_fill(none, nan))


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

    The thresholds applied to :func:`cross_view_scores` (one computation).
    """
    DetectorConfig(invariance_threshold=invariance_threshold, view_confidence=view_confidence,
                   original_confidence=original_confidence)  # validates each value, naming it
    scores = cross_view_scores(h_a, views, weight, labels, bias=bias, view_confidence=view_confidence,
                               temperature=temperature, softcap=softcap, ignore_index=ignore_index, backend=backend)
    return scores.flags(invariance_threshold, view_confidence, original_confidence)
