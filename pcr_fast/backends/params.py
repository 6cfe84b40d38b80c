"""The small records every backend takes or returns (no logic, so every layer can import them)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

from torch import Tensor


@dataclass(frozen=True)
class StatsParams:
    """Scalars of the per-row statistics (hashable, so it can key kernel caches).

    ``detach_b`` treats view b's distribution as a constant: no gradient flows into h_b,
    nor into weight/bias through view b's logits (a stop-gradient on the augmented view).
    ``chunk_size``: rows per forward chunk of the chunked backends (None: from the
    backend's memory budget, :data:`pcr_fast.kernels.launch.MEMORY_BUDGET`).
    """

    temperature: float = 1.0
    softcap: Optional[float] = None
    ignore_index: int = -100
    detach_b: bool = False
    chunk_size: Optional[int] = None


class TwoViewStats(NamedTuple):
    """Per-row statistics, each (N,) float32 (float64 for float64 inputs).

    ``p_a = softmax(softcap(h_a Wᵀ + b) / T)`` and likewise ``p_b``.
    ``ce_*`` is 0 where ``labels == ignore_index``; KL and entropy cover every row.
    """

    ce_a: Tensor
    ce_b: Tensor
    kl_ab: Tensor  # KL(p_a || p_b)
    kl_ba: Tensor  # KL(p_b || p_a)
    ent_a: Tensor  # H(p_a)
    ent_b: Tensor  # H(p_b)


class ViewExtras(NamedTuple):
    """Cheap by-products of one view's pass over the vocabulary, each (N,).

    ``lse`` (log-sum-exp of the scaled logits, for z-loss) and ``logit_mean`` (their mean
    over the vocabulary, for label smoothing) are differentiable; ``argmax`` (int64, for
    token accuracy) is not.
    """

    lse: Tensor
    logit_mean: Tensor
    argmax: Tensor


class SingleViewStats(NamedTuple):
    """Per-row statistics of one view (the plain cross-entropy's), each (N,).

    ``ce`` is 0 where ``labels == ignore_index``; ``lse``, ``entropy``, ``logit_mean`` cover
    every row and are differentiable like ``ce``; ``argmax`` is int64 (no gradient).
    """

    ce: Tensor
    lse: Tensor
    entropy: Tensor
    logit_mean: Tensor
    argmax: Tensor


@dataclass
class UnitGrid:
    """A pixel layout seen as a stack of images, each cut into units (see pcr_fast.augment).

    ``layout``: ``"images"`` (B, C, H, W), ``"tiles"`` (B, T, …) / (B, N, T, …), or
    ``"rows"`` (L, C·t·p·p flattened patches, one image per ``image_grid_thw`` segment).
    """

    layout: str
    lead_shape: tuple            # image dims of the pixel layouts; (1,) for rows
    n_images: int                # images the randomness and the fill are per
    n_units: int                 # total units over all images
    channels: int
    height: int                  # pixel layouts: H; rows: L
    width: int                   # pixel layouts: W; rows: C·t·p·p
    unit_h: int                  # pixel rows per unit (rows layout: merge²)
    unit_w: int                  # pixel cols per unit (rows layout: all columns)
    grid_h: int
    grid_w: int
    counts: Optional[Tensor] = None        # rows layout: units per image (device, int64)
    counts_host: Optional[list] = None
