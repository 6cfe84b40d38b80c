"""Launch configuration of every kernel, chosen in one place.

Why one module: the tile sizes that suit the Triton interpreter (one program at a time, a
cost per program step, so few large tiles) are the opposite of what suits a GPU (many
small tiles that fit in registers). Each kernel asks :func:`tile_config` for its tiles;
whether we are interpreting is read here and nowhere else, as is the ``tl.dot`` precision
for an input dtype.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton

#: kernels that take a :class:`TileConfig` (names used by :func:`tile_config`)
KERNELS = ("two_view_fwd", "two_view_bwd", "chunk_stats", "chunk_grad", "patch_gather")


@dataclass(frozen=True)
class TileConfig:
    """Block sizes and launch shape (powers of two; >= 16 for tensor-core dots on a GPU).

    ``block_n``/``block_v``/``block_d`` tile rows, vocabulary and hidden size of the loss
    kernels; the patch gather reads ``block_n`` as pixel rows and ``block_v`` as pixel
    columns of one tile.
    """

    block_n: int = 64
    block_v: int = 128
    block_d: int = 64
    num_warps: int = 8
    num_stages: int = 2


def interpreting() -> bool:
    """True when Triton runs under its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def dot_mode(dtype: torch.dtype) -> tuple[bool, str]:
    """(upcast operands to fp32?, ``tl.dot`` input_precision) for an input dtype.

    The interpreter multiplies raw bits in bf16 dots, so it always upcasts; fp32 inputs use
    IEEE fp32 dots (TF32 would cost ~1e-3 relative accuracy).
    """
    if interpreting() or dtype == torch.float32:
        return True, "ieee"
    return False, "tf32"


# Tiles of the loss kernels on a GPU, the same for every shape.
_GPU = {
    "two_view_fwd": TileConfig(block_n=64, block_v=128, block_d=64, num_warps=8, num_stages=3),
    "two_view_bwd": TileConfig(block_n=64, block_v=64, block_d=64, num_warps=8, num_stages=2),
    "chunk_stats": TileConfig(block_n=16, block_v=1024, block_d=1, num_warps=4, num_stages=3),
    "chunk_grad": TileConfig(block_n=16, block_v=1024, block_d=1, num_warps=4, num_stages=3),
}

# Under the interpreter: caps on power-of-two tiles that cover the whole problem where it
# is small (its cost is per program step, not per element).
_INTERPRETER_CAPS = {
    "two_view_fwd": (64, 2048, 256),
    "two_view_bwd": (64, 1024, 128),
    "chunk_stats": (64, 4096, 1),
    "chunk_grad": (64, 4096, 1),
}


def _fit(size: int, cap: int, floor: int = 16) -> int:
    return min(cap, max(floor, triton.next_power_of_2(max(1, size))))


def tile_config(kernel: str, n: int, v: int, d: int = 1) -> TileConfig:
    """The tiles ``kernel`` launches with for an (n rows × v vocabulary × d hidden) problem.

    For ``patch_gather``, ``n`` and ``v`` are the image height and width in pixels.
    """
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if kernel == "patch_gather":
        # ~4k elements per program on a GPU; ~16k under the interpreter
        budget, cap_x = (16384, 4096) if interpreting() else (4096, 128)
        block_x = min(triton.next_power_of_2(max(1, v)), cap_x)
        block_y = max(1, min(triton.next_power_of_2(max(1, n)), budget // block_x))
        return TileConfig(block_n=block_y, block_v=block_x, block_d=1, num_warps=4)
    if not interpreting():
        return _GPU[kernel]
    cap_n, cap_v, cap_d = _INTERPRETER_CAPS[kernel]
    return TileConfig(block_n=_fit(n, cap_n), block_v=_fit(v, cap_v),
                      block_d=_fit(d, cap_d) if cap_d > 1 else 1, num_warps=4, num_stages=1)
