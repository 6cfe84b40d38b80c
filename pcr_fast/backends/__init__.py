"""The implementations behind the public ops, and the one function that chooses between them.

* :mod:`.reference` — materialised, float64-capable (the truth of the tests);
* :mod:`.pytorch` — the ``torch`` backend: chunked PyTorch, any device (and the patch gather in torch);
* :mod:`.triton` — autograd Functions over :mod:`pcr_fast.kernels` (and the patch
  gather's launch).

:func:`select_backend` maps a user's ``backend=`` (or an environment override) to one of
them for a device; every op of the library calls it.
"""
from __future__ import annotations

import logging
import os

import torch

from ..kernels.launch import capability, interpreting

logger = logging.getLogger(__name__)

#: the ``backend=`` values each op accepts, and the environment variable that overrides ``auto``
OPS = {
    "stats": (("auto", "triton", "triton_chunked", "torch", "reference"), "PCR_FAST_BACKEND"),
    "augment": (("auto", "triton", "torch"), "PCR_FAST_AUGMENT_BACKEND"),
}


#: compute capabilities on which a GPU run has validated each op's Triton kernels. ``auto``
#: picks Triton on CUDA only there (empty: no GPU run yet; opt in with ``backend="triton"``
#: or the op's environment variable). The GPU validation run adds entries, e.g. ``(9, 0)``.
VALIDATED_CAPABILITIES = {"stats": frozenset(), "augment": frozenset()}
_ANNOUNCED = set()


def triton_available(device: torch.device) -> bool:
    """True where the Triton kernels can run: CUDA, or the CPU interpreter."""
    if device.type == "cuda":
        return True
    return device.type == "cpu" and interpreting()


def _auto(op: str, device: torch.device) -> str:
    """``triton`` on a CUDA device whose compute capability is validated for ``op``, else ``torch``."""
    if device.type != "cuda" or not triton_available(device):
        return "torch"
    cap = tuple(capability(device))
    if cap in VALIDATED_CAPABILITIES[op]:
        return "triton"
    if (op, cap) not in _ANNOUNCED:
        _ANNOUNCED.add((op, cap))
        logger.info("pcr_fast: backend='auto' uses the torch backend for %s on compute capability %d.%d: its "
                    "Triton kernels are not validated there yet (opt in with backend='triton')", op, *cap)
    return "torch"


def select_backend(op: str, backend: str, device: torch.device) -> str:
    """Validate ``backend`` for ``op`` (``"stats"`` or ``"augment"``); map ``auto`` (or the
    op's environment variable) to ``triton`` on a CUDA device of a validated compute
    capability (:data:`VALIDATED_CAPABILITIES`) and to ``torch`` everywhere else."""
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
        return _auto(op, torch.device(device))
    if backend.startswith("triton") and not triton_available(device):
        raise ValueError(f"backend={backend!r} needs a CUDA tensor (or TRITON_INTERPRET=1 on CPU); "
                         f"got a tensor on {device}. Use backend='torch' or 'auto'.")
    return backend
