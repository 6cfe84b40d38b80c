"""The implementations behind the public ops, and the one function that chooses between them.

* :mod:`.reference` — materialised, float64-capable (the truth of the tests);
* :mod:`.pytorch` — the ``torch`` backend: chunked PyTorch, any device (and the patch gather in torch);
* :mod:`.triton` — autograd Functions over :mod:`pcr_fast.kernels` (and the patch
  gather's launch).

:func:`select_backend` maps a user's ``backend=`` (or an environment override) to one of
them for a device; every op of the library calls it.
"""
from __future__ import annotations

import os

import torch

from ..kernels.launch import interpreting

#: the ``backend=`` values each op accepts, and the environment variable that overrides ``auto``
OPS = {
    "stats": (("auto", "triton", "triton_chunked", "torch", "reference"), "PCR_FAST_BACKEND"),
    "augment": (("auto", "triton", "torch"), "PCR_FAST_AUGMENT_BACKEND"),
}


def triton_available(device: torch.device) -> bool:
    """True where the Triton kernels can run: CUDA, or the CPU interpreter."""
    if device.type == "cuda":
        return True
    return device.type == "cpu" and interpreting()


def select_backend(op: str, backend: str, device: torch.device) -> str:
    """Validate ``backend`` for ``op`` (``"stats"`` or ``"augment"``); map ``auto`` (or the
    op's environment variable) to ``triton`` on CUDA and ``torch`` elsewhere."""
    if op not in OPS:
        raise ValueError(f"op must be one of {tuple(OPS)}, got {op!r}")
    allowed, env_var = OPS[op]
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
