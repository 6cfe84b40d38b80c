"""``two_view_stats``: the six per-row statistics of two views, with backend dispatch.

Any scalar objective is composed from these statistics in plain PyTorch (see
:mod:`pcr_fast.loss`); the backends only ever see per-row upstream gradients, so they
never need to know the objective.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch
from torch import Tensor

from .backends import OPS, select_backend
from .backends.params import StatsParams, TwoViewStats

logger = logging.getLogger(__name__)

BACKENDS = OPS["stats"][0]
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

__all__ = ["BACKENDS", "TwoViewStats", "two_view_stats", "fused_chunked_objective", "resolve_backend"]


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map ``auto`` (or the ``PCR_FAST_BACKEND`` env var) to a concrete backend."""
    return select_backend("stats", backend, device)


def default_chunk_size(backend: str, vocab: int, device: torch.device) -> int:
    """Rows per chunk so one (chunk × V) fp32 buffer stays ~16 MiB on CPU, ~256 MiB on GPU
    (large enough there for the matmuls to run at library speed)."""
    budget = (1 << 22) if device.type == "cpu" else (1 << 26)
    return int(max(16, min(8192, budget // max(1, vocab))))


def _check_hidden(name: str, h: Tensor) -> None:
    if not isinstance(h, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(h).__name__}")
    if h.dim() not in (2, 3):
        raise ValueError(f"{name} must have shape (N, D) or (B, T, D), got {tuple(h.shape)}")
    if h.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32, bfloat16, float16 or float64, got {h.dtype}")


def validate_inputs(h_a: Tensor, h_b: Tensor, weight: Tensor, labels: Tensor,
                    bias: Optional[Tensor], temperature: float, softcap: Optional[float],
                    ignore_index: int):
    """Check arguments and flatten to (N, D); raise ValueError naming the argument."""
    _check_hidden("h_a", h_a)
    _check_hidden("h_b", h_b)
    if h_a.shape != h_b.shape:
        raise ValueError(f"h_b must have the shape of h_a {tuple(h_a.shape)}, got {tuple(h_b.shape)}")
    if h_a.dtype != h_b.dtype:
        raise ValueError(f"h_b must have the dtype of h_a ({h_a.dtype}), got {h_b.dtype}")
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        raise ValueError(f"weight must be a (V, D) tensor, got "
                         f"{tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__}")
    if weight.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"weight must be a floating tensor, got {weight.dtype}")
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
    devices = {"h_b": h_b.device, "weight": weight.device, "labels": labels.device}
    if bias is not None:
        if not isinstance(bias, Tensor) or bias.shape != (weight.shape[0],):
            raise ValueError(f"bias must be a ({weight.shape[0]},) tensor, got "
                             f"{tuple(bias.shape) if isinstance(bias, Tensor) else type(bias).__name__}")
        devices["bias"] = bias.device
    for name, dev in devices.items():
        if dev != h_a.device:
            raise ValueError(f"{name} must be on the device of h_a ({h_a.device}), got {dev}")
    if not (isinstance(temperature, (int, float)) and temperature > 0):
        raise ValueError(f"temperature must be a positive float, got {temperature!r}")
    if softcap is not None and not (isinstance(softcap, (int, float)) and softcap > 0):
        raise ValueError(f"softcap must be None or a positive float, got {softcap!r}")
    h_a2 = h_a.reshape(-1, d)
    h_b2 = h_b.reshape(-1, d)
    labels1 = labels.reshape(-1).long()
    # Range check only where it costs no device sync (CPU); on CUDA an out-of-range label
    # makes that row's ce NaN inside the kernels instead of a silent wrong value.
    if labels1.device.type == "cpu" and labels1.numel():
        bad = (labels1 != ignore_index) & ((labels1 < 0) | (labels1 >= weight.shape[0]))
        if bool(bad.any()):
            raise ValueError(f"labels must lie in [0, {weight.shape[0]}) or equal ignore_index="
                             f"{ignore_index}; found {labels1[bad][:5].tolist()}")
    return h_a2, h_b2, labels1


def two_view_stats(h_a: Tensor, h_b: Tensor, weight: Tensor, labels: Tensor, *,
                   bias: Optional[Tensor] = None, temperature: float = 1.0,
                   softcap: Optional[float] = None, ignore_index: int = -100,
                   backend: str = "auto", detach_b: bool = False,
                   chunk_size: Optional[int] = None) -> TwoViewStats:
    """Per-row CE, KL and entropy of two views through one lm_head, without N×V logits.

    Args:
        h_a, h_b: hidden states of view a (original) and b (augmented), (N, D) or (B, T, D).
        weight: lm_head weight (V, D). bias: optional (V,).
        labels: (N,) or (B, T) targets; ``ignore_index`` rows get ce = 0. Already shifted:
            for a causal LM, ``labels[t]`` is the token that follows position t.
        temperature, softcap: ``z = softcap·tanh((hWᵀ+b)/softcap) / temperature``.
        backend: ``auto``, ``triton`` (fused kernels), ``triton_chunked`` (cuBLAS logits
            per chunk + a Triton statistics/gradient kernel), ``torch`` (chunked PyTorch),
            ``reference`` (materialised, float64-capable; tests only).
        detach_b: treat view b's distribution as a constant (stop-gradient).
        chunk_size: rows per chunk for the chunked backends.
    Returns:
        :class:`TwoViewStats`, each (N,) and differentiable w.r.t. h_a, h_b, weight, bias.
    """
    h_a2, h_b2, labels1 = validate_inputs(h_a, h_b, weight, labels, bias, temperature,
                                          softcap, ignore_index)
    resolved = resolve_backend(backend, h_a.device)
    if resolved.startswith("triton") and h_a.dtype == torch.float64:
        raise ValueError(f"backend={resolved!r} takes float32/bfloat16/float16 h_a; got float64 "
                         "(use backend='torch' or 'reference' for float64)")
    params = StatsParams(temperature=float(temperature),
                         softcap=None if softcap is None else float(softcap),
                         ignore_index=int(ignore_index), detach_b=bool(detach_b),
                         chunk_size=int(chunk_size or default_chunk_size(resolved, weight.shape[0], h_a.device)))
    if resolved == "reference":
        from .backends.reference import reference_two_view_stats

        out = reference_two_view_stats(h_a2, h_b2, weight, labels1, bias, temperature, softcap,
                                       ignore_index, detach_b=detach_b)
        dt = torch.float64 if h_a.dtype == torch.float64 else torch.float32
        return TwoViewStats(*(t.to(dt) for t in out))
    if resolved == "torch":
        from .backends.pytorch import TorchChunkedStats

        fn = TorchChunkedStats
    else:
        from .backends.triton import TritonChunkedStats, TritonFusedStats

        fn = TritonFusedStats if resolved == "triton" else TritonChunkedStats
    out = _opaque_apply(fn, h_a2, h_b2, weight, bias, labels1, params)
    return TwoViewStats(*out)


@torch.compiler.disable
def _opaque_apply(fn, *args):
    """Run an autograd Function outside torch.compile's tracing (one clean graph break:
    the kernels' Python-side chunk loops and launches are not traceable)."""
    return fn.apply(*args)


def fused_chunked_objective(h_a: Tensor, h_b: Tensor, weight: Tensor, labels: Tensor, row_losses,
                            *, bias: Optional[Tensor] = None, temperature: float = 1.0,
                            softcap: Optional[float] = None, ignore_index: int = -100,
                            backend: str = "triton_chunked", detach_b: bool = False,
                            chunk_size: Optional[int] = None):
    """Compute-minimal ``triton_chunked`` path for a scalar, row-separable objective.

    ``row_losses(stats, rows)`` maps the statistics of a block of rows to their loss
    contributions (whose sum over all rows is the loss). Because the objective is known in
    the forward, each chunk's logits are computed once: statistics, then d(loss)/d(stats)
    by autograd on the (chunk,)-sized objective, then the logit gradient in place and the
    two gradient matmuls; the backward only scales the stored gradients. Returns
    ``(loss, detached TwoViewStats)``.
    """
    h_a2, h_b2, labels1 = validate_inputs(h_a, h_b, weight, labels, bias, temperature, softcap, ignore_index)
    if h_a.dtype == torch.float64:
        raise ValueError("backend='triton_chunked' takes float32/bfloat16/float16 h_a; got float64")
    params = StatsParams(temperature=float(temperature), softcap=None if softcap is None else float(softcap),
                         ignore_index=int(ignore_index), detach_b=bool(detach_b),
                         chunk_size=int(chunk_size or default_chunk_size("triton_chunked", weight.shape[0], h_a.device)))
    from .backends.triton import TritonChunkedObjective

    loss, table = _opaque_apply(TritonChunkedObjective, h_a2, h_b2, weight, bias, labels1, params, row_losses)
    return loss, TwoViewStats(*table.unbind(0))
