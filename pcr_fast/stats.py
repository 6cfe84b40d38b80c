"""Per-row statistics of one or two views through one lm_head, with backend dispatch.

* :func:`two_view_stats` — CE, KL both ways and entropy of two views (the PCR contract),
  optionally with each view's log-sum-exp, mean logit and argmax (:class:`ViewExtras`);
* :func:`single_view_stats` — CE, log-sum-exp, entropy, mean logit and argmax of one view
  (the plain cross-entropy's statistics: the lm_head matmul runs once, view b compiled out).

Any scalar objective is composed from these statistics in plain PyTorch (see
:mod:`pcr_fast.loss` and :mod:`pcr_fast.cross_entropy`); the backends only ever see per-row
upstream gradients, so they never need to know the objective.

Input conventions (every backend): the matmul runs in the hidden states' dtype — a weight of
another dtype is cast to it, as ``torch.autocast`` does for an lm_head — and the statistics
in float32 (float64 for float64 inputs). ``softcap=inf`` means no cap. A ``-inf`` logit (a
masked vocabulary entry, e.g. ``bias=-inf``) is exact: it contributes 0·log 0 = 0.
"""
from __future__ import annotations

import logging
import math
from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from .backends import OPS, select_backend
from .backends.params import SingleViewStats, StatsParams, TwoViewStats, ViewExtras

logger = logging.getLogger(__name__)

BACKENDS = OPS["stats"][0]
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

__all__ = ["BACKENDS", "TwoViewStats", "ViewExtras", "SingleViewStats", "two_view_stats", "single_view_stats",
           "two_view_jsd", "fused_chunked_objective", "resolve_backend"]


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map ``auto`` (or the ``PCR_FAST_BACKEND`` env var) to a concrete backend."""
    return select_backend("stats", backend, device)


def _check_hidden(name: str, h: Tensor) -> None:
    if not isinstance(h, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(h).__name__}")
    if h.dim() not in (2, 3):
        raise ValueError(f"{name} must have shape (N, D) or (B, T, D), got {tuple(h.shape)}")
    if h.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32, bfloat16, float16 or float64, got {h.dtype}")


def _check_scalars(temperature, softcap) -> Optional[float]:
    """Validate temperature and softcap; return the softcap to use (inf -> None: no cap)."""
    if isinstance(temperature, bool) or not (isinstance(temperature, (int, float)) and
                                             math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a positive finite float, got {temperature!r}")
    if softcap is None:
        return None
    if isinstance(softcap, bool) or not (isinstance(softcap, (int, float)) and softcap > 0):
        raise ValueError(f"softcap must be None or a positive float (inf: no cap), got {softcap!r}")
    return None if math.isinf(softcap) else float(softcap)


def validate_inputs(h_a: Tensor, h_b: Optional[Tensor], weight: Tensor, labels: Tensor,
                    bias: Optional[Tensor], temperature: float, softcap: Optional[float],
                    ignore_index: int):
    """Check arguments and flatten to (N, D); raise ValueError naming the argument.

    ``h_b=None`` for one view. Returns ``(h_a2, h_b2 or None, labels1, softcap)``.
    """
    _check_hidden("h_a", h_a)
    if h_b is not None:
        _check_hidden("h_b", h_b)
        if h_a.shape != h_b.shape:
            raise ValueError(f"h_b must have the shape of h_a {tuple(h_a.shape)}, got {tuple(h_b.shape)}")
        if h_a.dtype != h_b.dtype:
            raise ValueError(f"h_b must have the dtype of h_a ({h_a.dtype}), got {h_b.dtype}")
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        raise ValueError(f"weight must be a (V, D) tensor, got "
                         f"{tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__}")
    if weight.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"weight must be float32, bfloat16, float16 or float64, got {weight.dtype}")
    if weight.shape[0] == 0:
        raise ValueError("weight must have at least one vocabulary row, got shape "
                         f"{tuple(weight.shape)}")
    d = h_a.shape[-1]
    if weight.shape[1] != d:
        raise ValueError(f"weight must be (V, D) with D={d} (the hidden size of h_a), got {tuple(weight.shape)}")
    if not isinstance(labels, Tensor):
        raise ValueError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"labels must be int64 (or int32), got {labels.dtype}")
    if labels.shape != h_a.shape[:-1]:
        raise ValueError(f"labels must have shape {tuple(h_a.shape[:-1])} (h_a without its last dim), "
                         f"got {tuple(labels.shape)}")
    devices = {"weight": weight.device, "labels": labels.device}
    if h_b is not None:
        devices["h_b"] = h_b.device
    if bias is not None:
        if not isinstance(bias, Tensor) or bias.shape != (weight.shape[0],):
            raise ValueError(f"bias must be a ({weight.shape[0]},) tensor, got "
                             f"{tuple(bias.shape) if isinstance(bias, Tensor) else type(bias).__name__}")
        if bias.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"bias must be a floating tensor, got {bias.dtype}")
        devices["bias"] = bias.device
    for name, dev in devices.items():
        if dev != h_a.device:
            raise ValueError(f"{name} must be on the device of h_a ({h_a.device}), got {dev}")
    softcap = _check_scalars(temperature, softcap)
    h_a2 = h_a.reshape(-1, d)
    h_b2 = None if h_b is None else h_b.reshape(-1, d)
    labels1 = labels.reshape(-1).long().contiguous()
    # Range check only where it costs no device sync (CPU); on CUDA an out-of-range label
    # makes that row's ce NaN inside the kernels instead of a silent wrong value.
    if labels1.device.type == "cpu" and labels1.numel():
        bad = (labels1 != ignore_index) & ((labels1 < 0) | (labels1 >= weight.shape[0]))
        if bool(bad.any()):
            raise ValueError(f"labels must lie in [0, {weight.shape[0]}) or equal ignore_index="
                             f"{ignore_index}; found {labels1[bad][:5].tolist()}")
    return h_a2, h_b2, labels1, softcap


def _params(temperature, softcap, ignore_index, detach_b, chunk_size) -> StatsParams:
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    return StatsParams(temperature=float(temperature), softcap=softcap, ignore_index=int(ignore_index),
                       detach_b=bool(detach_b), chunk_size=chunk_size)


def _resolve_for(backend: str, h: Tensor) -> str:
    resolved = resolve_backend(backend, h.device)
    if resolved.startswith("triton") and h.dtype == torch.float64:
        raise ValueError(f"backend={resolved!r} takes float32/bfloat16/float16 h_a; got float64 "
                         "(use backend='torch' or 'reference' for float64)")
    return resolved


def _run(resolved: str, h_a, h_b, weight, bias, labels, params: StatsParams):
    """The backend Function's outputs: N_DIFF differentiable rows, then argmax a and b."""
    if resolved == "torch":
        from .backends.pytorch import TorchChunkedStats as fn
    elif resolved == "triton":
        from .backends.triton import TritonFusedStats as fn
    else:
        from .backends.triton import TritonChunkedStats as fn
    return _opaque_apply(fn, h_a, h_b, weight, bias, labels, params)


def two_view_stats(h_a: Tensor, h_b: Tensor, weight: Tensor, labels: Tensor, *,
                   bias: Optional[Tensor] = None, temperature: float = 1.0,
                   softcap: Optional[float] = None, ignore_index: int = -100,
                   backend: str = "auto", detach_b: bool = False,
                   chunk_size: Optional[int] = None, with_extras: bool = False,
                   ) -> Union[TwoViewStats, Tuple[TwoViewStats, ViewExtras, ViewExtras]]:
    """Per-row CE, KL and entropy of two views through one lm_head, without N×V logits.

    Args:
        h_a, h_b: hidden states of view a (original) and b (augmented), (N, D) or (B, T, D).
        weight: lm_head weight (V, D), any dtype but float64-ness must match h's (the matmul
            runs in h's dtype). bias: optional (V,), any strides.
        labels: (N,) or (B, T) targets; ``ignore_index`` rows get ce = 0. Already shifted:
            for a causal LM, ``labels[t]`` is the token that follows position t.
        temperature, softcap: ``z = softcap·tanh((hWᵀ+b)/softcap) / temperature``
            (``softcap=None`` or ``inf``: no cap).
        backend: ``auto`` (``torch``, or ``triton`` on a GPU architecture where the kernels
            are validated), ``triton`` (fused kernels), ``triton_chunked`` (library-matmul
            logits + Triton statistics/gradient kernels), ``torch`` (chunked PyTorch),
            ``reference`` (materialised, float64-capable; tests only).
        detach_b: treat view b's distribution as a constant (stop-gradient).
        chunk_size: rows per forward chunk of the chunked backends (default: from the
            backend's memory budget).
        with_extras: also return each view's :class:`ViewExtras` (log-sum-exp, mean logit,
            argmax) from the same pass.
    Returns:
        :class:`TwoViewStats`, each (N,) and differentiable w.r.t. h_a, h_b, weight, bias;
        with ``with_extras``: ``(stats, extras_a, extras_b)``.
    """
    h_a2, h_b2, labels1, softcap = validate_inputs(h_a, h_b, weight, labels, bias, temperature, softcap,
                                                   ignore_index)
    if h_b2 is None:
        raise ValueError("h_b must be a tensor (use single_view_stats for one view)")
    resolved = _resolve_for(backend, h_a)
    params = _params(temperature, softcap, ignore_index, detach_b, chunk_size)
    if resolved == "reference":
        from .backends.reference import reference_two_view_stats, reference_view_extras

        dt = torch.float64 if h_a.dtype == torch.float64 else torch.float32
        out = reference_two_view_stats(h_a2, h_b2, weight, labels1, bias, temperature, softcap, ignore_index,
                                       detach_b=detach_b)
        stats = TwoViewStats(*(t.to(dt) for t in out))
        if not with_extras:
            return stats
        hb = h_b2.detach() if detach_b else h_b2
        ext = [reference_view_extras(h, weight, bias, temperature, softcap) for h in (h_a2, hb)]
        return (stats,) + tuple(ViewExtras(lse.to(dt), mean.to(dt), amax) for lse, mean, amax in ext)
    out = _run(resolved, h_a2, h_b2, weight, bias, labels1, params)
    stats = TwoViewStats(*out[:6])
    if not with_extras:
        return stats
    return stats, ViewExtras(out[6], out[8], out[10]), ViewExtras(out[7], out[9], out[11])


def single_view_stats(h: Tensor, weight: Tensor, labels: Tensor, *, bias: Optional[Tensor] = None,
                      temperature: float = 1.0, softcap: Optional[float] = None, ignore_index: int = -100,
                      backend: str = "auto", chunk_size: Optional[int] = None) -> SingleViewStats:
    """Per-row statistics of one view (what a cross-entropy needs), without N×V logits.

    The lm_head matmul runs once per row (the fused kernels compile view b out). Arguments
    as in :func:`two_view_stats`. Returns :class:`SingleViewStats` (ce, lse, entropy,
    logit_mean, argmax), each (N,); all but argmax differentiable w.r.t. h, weight, bias.
    """
    h2, _, labels1, softcap = validate_inputs(h, None, weight, labels, bias, temperature, softcap, ignore_index)
    resolved = _resolve_for(backend, h)
    params = _params(temperature, softcap, ignore_index, False, chunk_size)
    if resolved == "reference":
        from .backends.reference import reference_single_view_stats

        dt = torch.float64 if h.dtype == torch.float64 else torch.float32
        ce, lse, ent, mean, amax = reference_single_view_stats(h2, weight, labels1, bias, temperature, softcap,
                                                               ignore_index)
        return SingleViewStats(ce.to(dt), lse.to(dt), ent.to(dt), mean.to(dt), amax)
    out = _run(resolved, h2, None, weight, bias, labels1, params)
    return SingleViewStats(ce=out[0], lse=out[6], entropy=out[4], logit_mean=out[8], argmax=out[10])


def two_view_jsd(h_a: Tensor, h_b: Tensor, weight: Tensor, *, beta: float = 0.5, bias: Optional[Tensor] = None,
                 temperature: float = 1.0, softcap: Optional[float] = None, detach_b: bool = False,
                 chunk_size: Optional[int] = None) -> Tensor:
    """Per-row generalised Jensen–Shannon divergence ``β·KL(p_a‖m) + (1−β)·KL(p_b‖m)``,
    ``m = β·p_a + (1−β)·p_b``, 0 < β < 1 (β = 0.5: the symmetric JSD), without N×V logits.

    Not composable from the six statistics (it needs Σ p log m), so it takes its own
    chunked pass in plain PyTorch on any device (:class:`pcr_fast.backends.pytorch.TorchJSD`):
    about as many FLOPs again as :func:`two_view_stats`. Arguments as there; differentiable
    w.r.t. h_a, h_b (unless ``detach_b``), weight and bias. Returns (N,).
    """
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0.0 < beta < 1.0:
        raise ValueError(f"beta must be a float in (0, 1) (0 and 1 are the two KLs), got {beta!r}")
    labels = torch.zeros(h_a.shape[:-1], dtype=torch.long, device=h_a.device) if isinstance(h_a, Tensor) else None
    h_a2, h_b2, _, softcap = validate_inputs(h_a, h_b, weight, labels, bias, temperature, softcap, -100)
    if h_b2 is None:
        raise ValueError("h_b must be a tensor")
    params = _params(temperature, softcap, -100, detach_b, chunk_size)
    from .backends.pytorch import TorchJSD

    h_b_in = h_b2.detach() if detach_b else h_b2
    return _opaque_apply(TorchJSD, h_a2, h_b_in, weight, bias, params, float(beta))


@torch.compiler.disable
def _opaque_apply(fn, *args):
    """Run an autograd Function outside torch.compile's tracing (one clean graph break:
    the kernels' Python-side chunk loops and launches are not traceable)."""
    return fn.apply(*args)


def fused_chunked_objective(h_a: Tensor, h_b: Tensor, weight: Tensor, labels: Tensor, row_losses,
                            *, bias: Optional[Tensor] = None, temperature: float = 1.0,
                            softcap: Optional[float] = None, ignore_index: int = -100,
                            backend: str = "triton_chunked", detach_b: bool = False,
                            chunk_size: Optional[int] = None, with_extras: bool = False):
    """Compute-minimal ``triton_chunked`` path for a scalar, row-separable objective.

    ``row_losses(stats, rows)`` maps the statistics of a block of rows to their loss
    contributions (whose sum over all rows is the loss); with ``with_extras`` it is called
    as ``row_losses(stats, rows, extras=view_a_extras)`` (the lse and mean logit of view a,
    differentiable) and the view-a :class:`ViewExtras` (detached) is returned third. Because the objective is known in
    the forward, each chunk's logits are computed once: statistics, then d(loss)/d(stats)
    by autograd on the (chunk,)-sized objective, then the logit gradient in place and the
    two gradient matmuls; the backward only scales the stored gradients (once). dW
    accumulates over row chunks in the weight's dtype (one rounding per chunk). Returns
    ``(loss, detached TwoViewStats)``.
    """
    h_a2, h_b2, labels1, softcap = validate_inputs(h_a, h_b, weight, labels, bias, temperature, softcap,
                                                   ignore_index)
    if h_b2 is None:
        raise ValueError("h_b must be a tensor")
    if h_a.dtype == torch.float64:
        raise ValueError("backend='triton_chunked' takes float32/bfloat16/float16 h_a; got float64")
    params = _params(temperature, softcap, ignore_index, detach_b, chunk_size)
    from .backends.triton import TritonChunkedObjective

    loss, table = _opaque_apply(TritonChunkedObjective, h_a2, h_b2, weight, bias, labels1, params, row_losses,
                                with_extras)
    stats = TwoViewStats(*table[:6].unbind(0))
    if not with_extras:
        return loss, stats
    from .kernels.stats_table import R

    return loss, stats, ViewExtras(table[R["lse_a"]], table[R["zmean_a"]], table[R["amax_a"]].long())
