"""Choosing between a Triton kernel and its torch twin, shared by every op of the library."""
from __future__ import annotations

import os
from typing import Sequence

import torch


def triton_available(device: torch.device) -> bool:
    """True where the Triton kernels can run: CUDA with Triton, or the CPU interpreter."""
    try:
        import triton  # noqa: F401
    except Exception:  # pragma: no cover - triton is a hard dependency
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def select_backend(backend: str, device: torch.device, *, allowed: Sequence[str], env_var: str) -> str:
    """Validate ``backend``; map ``auto`` (or ``env_var``) to ``triton`` on CUDA, ``torch`` elsewhere."""
    allowed = tuple(allowed)
    if backend not in allowed:
        raise ValueError(f"backend must be one of {allowed}, got {backend!r}")
    if backend == "auto":
        backend = os.environ.get(env_var, "auto")
        if backend not in allowed:
            raise ValueError(f"{env_var} must be one of {allowed}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available(device) else "torch"
    if backend.startswith("triton") and not triton_available(device):
        raise ValueError(f"backend={backend!r} needs a CUDA tensor (or TRITON_INTERPRET=1 on CPU); "
                         f"got a tensor on {device}. Use backend='torch' or 'auto'.")
    return backend
