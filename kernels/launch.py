"""Launch configuration of every kernel, and the memory plans of the loss, chosen in one place.

Why one module: the tile sizes that suit the Triton interpreter (one program at a time, a
cost per program step, so few large tiles) are the opposite of what suits a GPU (many
small tiles that fit in registers), and what fits in registers differs by architecture.
Every launcher asks :func:`tile_config` for its tiles; whether we are interpreting is read
here and nowhere else, as is the ``tl.dot`` precision for an input dtype, the compute
capability a launch targets and the memory budget of each backend.

The GPU table (:data:`GPU_CONFIGS`) was chosen by compiling every launch ahead of time for
sm_80, sm_86, sm_90 and sm_100 on a CPU machine (``make gpu-report``): every entry compiles with 0
spill bytes and uses tensor cores in its matmuls. It has not been timed on a GPU yet.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
from dataclasses import dataclass
from typing import Dict, Iterator, Optional, Tuple, Union

import torch
import triton


# --------------------------------------------------------------------------- configs
@dataclass(frozen=True)
class FusedTileConfig:
    """A (rows × vocabulary) logit tile computed by ``tl.dot`` over D in ``block_d`` steps."""

    block_n: int
    block_v: int
    block_d: int
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class TwoViewFwdConfig(FusedTileConfig):
    """Fused forward (online statistics over the vocabulary)."""


@dataclass(frozen=True)
class TwoViewGradConfig(FusedTileConfig):
    """Fused logit-gradient tile: recomputed logits -> d(objective)/d(raw logits), stored."""


@dataclass(frozen=True)
class MatmulConfig:
    """A GEMM output tile (``block_m`` × ``block_n``), K in ``block_k`` steps, grouped rows."""

    block_m: int
    block_n: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class GradDhConfig(MatmulConfig):
    """dh (fp32, accumulated over vocabulary slabs) += g @ W[slab]."""


@dataclass(frozen=True)
class GradDwConfig(MatmulConfig):
    """dW[slab] = g_aᵀ h_a (+ g_bᵀ h_b), written once in the weight's dtype."""


@dataclass(frozen=True)
class RowTileConfig:
    """Elementwise tiles over precomputed logits (rows × vocabulary columns)."""

    block_n: int
    block_v: int
    num_warps: int


@dataclass(frozen=True)
class ChunkStatsConfig(RowTileConfig):
    """Online statistics of a precomputed logit chunk."""


@dataclass(frozen=True)
class ChunkGradConfig(RowTileConfig):
    """Logit gradient written over a precomputed logit slab, in place."""


@dataclass(frozen=True)
class PatchGatherConfig:
    """A (pixel rows × pixel columns) tile of one channel of one image."""

    block_y: int
    block_x: int
    num_warps: int


Config = Union[TwoViewFwdConfig, TwoViewGradConfig, GradDhConfig, GradDwConfig, ChunkStatsConfig,
               ChunkGradConfig, PatchGatherConfig]

KERNELS = ("two_view_fwd", "two_view_grad", "grad_dh", "grad_dw", "chunk_stats", "chunk_grad", "patch_gather")
#: the matmul kernels (must contain tensor-core instructions when compiled for a GPU)
MATMUL_KERNELS = ("two_view_fwd", "two_view_grad", "grad_dh", "grad_dw")
#: architectures with their own row in the table; any other capability uses "default"
ARCHS = ("sm80", "sm90", "sm100", "default")

# GPU tiles: kernel -> arch -> operand width ("16": bf16/fp16, "32": fp32) -> config.
# How they were chosen: candidates in order of preference (largest tile first) compiled for
# every launch variant (views, bias, softcap, detach) and the first kept whose variants all
# compile with 0 spill bytes, at most 240 registers (headroom under 255) and tensor-core
# instructions; "default" was checked on sm_86 (99 KB shared memory per block). The rules
# are re-checked by `make gpu-report` and tests/test_kernels_compile.py. Untimed: a GPU
# run may prefer other tiles among the spill-free ones.
_F, _G, _H, _W = TwoViewFwdConfig, TwoViewGradConfig, GradDhConfig, GradDwConfig
_S, _C = ChunkStatsConfig, ChunkGradConfig
GPU_CONFIGS: Dict[str, Dict[str, Dict[str, Config]]] = {
    "two_view_fwd": {
        "sm80": {"16": _F(32, 64, 64, 8, 3), "32": _F(64, 32, 16, 8, 3)},
        "sm90": {"16": _F(64, 64, 64, 8, 3), "32": _F(64, 32, 32, 8, 3)},
        "sm100": {"16": _F(64, 64, 64, 8, 3), "32": _F(64, 64, 32, 8, 2)},
        "default": {"16": _F(32, 64, 64, 8, 3), "32": _F(64, 32, 16, 8, 3)},
    },
    "two_view_grad": {
        "sm80": {"16": _G(32, 64, 64, 8, 3), "32": _G(64, 32, 32, 8, 3)},
        "sm90": {"16": _G(64, 64, 64, 8, 3), "32": _G(64, 64, 32, 8, 3)},
        "sm100": {"16": _G(64, 64, 64, 8, 3), "32": _G(64, 64, 32, 8, 3)},
        "default": {"16": _G(32, 64, 64, 8, 3), "32": _G(64, 32, 32, 8, 3)},
    },
    "grad_dh": {
        "sm80": {"16": _H(128, 128, 64, 8, 8, 3), "32": _H(64, 64, 16, 8, 4, 2)},
        "sm90": {"16": _H(128, 128, 32, 8, 8, 3), "32": _H(128, 64, 32, 8, 8, 3)},
        "sm100": {"16": _H(128, 128, 32, 8, 8, 3), "32": _H(128, 64, 32, 8, 8, 3)},
        "default": {"16": _H(128, 128, 64, 8, 8, 3), "32": _H(64, 64, 16, 8, 4, 2)},
    },
    "grad_dw": {
        "sm80": {"16": _W(128, 128, 32, 8, 8, 3), "32": _W(64, 32, 16, 4, 4, 2)},
        "sm90": {"16": _W(128, 128, 64, 8, 8, 3), "32": _W(64, 64, 16, 8, 4, 2)},
        "sm100": {"16": _W(128, 128, 64, 8, 8, 3), "32": _W(64, 64, 16, 8, 4, 2)},
        "default": {"16": _W(128, 128, 32, 8, 8, 3), "32": _W(64, 32, 16, 4, 4, 2)},
    },
    "chunk_stats": {
        "sm80": {"16": _S(2, 1024, 8), "32": _S(2, 1024, 8)},
        "sm90": {"16": _S(2, 1024, 8), "32": _S(2, 1024, 8)},
        "sm100": {"16": _S(2, 512, 4), "32": _S(2, 1024, 8)},
        "default": {"16": _S(2, 1024, 8), "32": _S(2, 1024, 8)},
    },
    "chunk_grad": {
        "sm80": {"16": _C(4, 512, 8), "32": _C(4, 512, 8)},
        "sm90": {"16": _C(4, 512, 8), "32": _C(4, 512, 8)},
        "sm100": {"16": _C(4, 512, 8), "32": _C(4, 512, 8)},
        "default": {"16": _C(4, 512, 8), "32": _C(4, 512, 8)},
    },
}

# Under the interpreter: caps of power-of-two tiles that cover small problems whole (its
# cost is per program step, not per element). (block_n, block_v, block_d) of the loss
# kernels; (block_m, block_n, block_k) of the GEMMs.
_INTERPRETER_CAPS = {
    "two_view_fwd": (64, 2048, 256),
    "two_view_grad": (64, 2048, 256),
    "grad_dh": (64, 256, 2048),
    "grad_dw": (256, 256, 256),
    "chunk_stats": (64, 4096, 1),
    "chunk_grad": (64, 4096, 1),
}

#: streaming multiprocessors per architecture (used when no CUDA device can be asked)
SM_COUNT = {"sm80": 108, "sm90": 132, "sm100": 148, "default": 80}


def interpreting() -> bool:
    """True when Triton runs under its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


# --------------------------------------------------------------------------- target
_ASSUMED_CAPABILITY: contextvars.ContextVar[Optional[Tuple[int, int]]] = contextvars.ContextVar(
    "pcr_fast_assumed_capability", default=None)
DEFAULT_CAPABILITY = (9, 0)


@contextlib.contextmanager
def assume_capability(capability: Tuple[int, int]) -> Iterator[None]:
    """Launch as if for a GPU of this compute capability (ahead-of-time compiles and memory
    accounting on meta tensors, where no device can be asked)."""
    token = _ASSUMED_CAPABILITY.set(tuple(capability))
    try:
        yield
    finally:
        _ASSUMED_CAPABILITY.reset(token)


def capability(device: Optional[torch.device] = None) -> Tuple[int, int]:
    """Compute capability a launch on ``device`` targets (see :func:`assume_capability`)."""
    assumed = _ASSUMED_CAPABILITY.get()
    if assumed is not None:
        return assumed
    if device is not None and torch.device(device).type == "cuda":
        return tuple(torch.cuda.get_device_capability(device))
    if torch.cuda.is_available():
        return tuple(torch.cuda.get_device_capability())
    return DEFAULT_CAPABILITY


def arch_of(cap: Tuple[int, int]) -> str:
    """The row of :data:`GPU_CONFIGS` for a compute capability."""
    return {(8, 0): "sm80", (9, 0): "sm90", (10, 0): "sm100"}.get(tuple(cap), "default")


def sm_count(device: Optional[torch.device] = None) -> int:
    """Streaming multiprocessors of ``device`` (or of the assumed architecture)."""
    if _ASSUMED_CAPABILITY.get() is None and device is not None and torch.device(device).type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return SM_COUNT[arch_of(capability(device))]


def dot_mode(dtype: torch.dtype) -> Tuple[bool, str]:
    """(upcast operands to fp32?, ``tl.dot`` input_precision) for an input dtype.

    The interpreter multiplies raw bits in bf16 dots, so it always upcasts (and computes in
    IEEE fp32). On a GPU, bf16/fp16 operands go to the tensor cores as they are; fp32
    operands use ``tf32x3`` (each operand split into a TF32 head and tail, three
    tensor-core products): tensor-core speed at close to fp32 accuracy, where plain TF32
    would cost ~5e-4 relative error per product.
    """
    if interpreting():
        return True, "ieee"
    return False, "tf32x3" if dtype == torch.float32 else "tf32"


# --------------------------------------------------------------------------- tiles
def _fit(size: int, cap: int, floor: int = 16) -> int:
    return min(cap, max(floor, triton.next_power_of_2(max(1, size))))


def tile_config(kernel: str, n: int, v: int, d: int = 1, *, dtype: torch.dtype = torch.bfloat16,
                device: Optional[torch.device] = None) -> Config:
    """The tiles ``kernel`` launches with for an (n × v × d) problem on ``device``.

    Loss kernels: n rows, v vocabulary columns, d hidden size. GEMMs (``grad_dh``,
    ``grad_dw``): an (n × v) output with reduction depth d. ``patch_gather``: n and v are
    the image height and width in pixels.
    """
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if kernel == "patch_gather":
        # ~4k elements per program on a GPU; ~16k under the interpreter
        budget, cap_x = (16384, 4096) if interpreting() else (4096, 128)
        block_x = min(triton.next_power_of_2(max(1, v)), cap_x)
        block_y = max(1, min(triton.next_power_of_2(max(1, n)), budget // block_x))
        return PatchGatherConfig(block_y=block_y, block_x=block_x, num_warps=4)
    if not interpreting():
        width = "32" if dtype == torch.float32 else "16"
        return GPU_CONFIGS[kernel][arch_of(capability(device))][width]
    cap_a, cap_b, cap_c = _INTERPRETER_CAPS[kernel]
    if kernel in ("grad_dh", "grad_dw"):
        cls = GradDhConfig if kernel == "grad_dh" else GradDwConfig
        return cls(block_m=_fit(n, cap_a), block_n=_fit(v, cap_b), block_k=_fit(d, cap_c), group_m=1,
                   num_warps=4, num_stages=1)
    if kernel in ("chunk_stats", "chunk_grad"):
        cls = ChunkStatsConfig if kernel == "chunk_stats" else ChunkGradConfig
        return cls(block_n=_fit(n, cap_a, floor=1), block_v=_fit(v, cap_b), num_warps=4)
    cls = TwoViewFwdConfig if kernel == "two_view_fwd" else TwoViewGradConfig
    return cls(block_n=_fit(n, cap_a), block_v=_fit(v, cap_b), block_d=_fit(d, cap_c), num_warps=4,
               num_stages=1)


def vocab_splits(n: int, v: int, cfg: FusedTileConfig, device: Optional[torch.device] = None) -> int:
    """How many vocabulary ranges the fused forward splits each row block into, so that
    small N still fills the GPU (about two programs per SM); 1 under the interpreter."""
    if interpreting():
        return 1
    row_blocks = triton.cdiv(max(1, n), cfg.block_n)
    v_blocks = triton.cdiv(max(1, v), cfg.block_v)
    want = triton.cdiv(2 * sm_count(device), row_blocks)
    # keep at least 8 vocabulary tiles per split so the partial states stay few
    return int(max(1, min(want, v_blocks // 8)))


# --------------------------------------------------------------------------- memory plans
#: bytes of temporaries each backend may hold beyond its inputs, outputs and gradients
MEMORY_BUDGET = {"triton": 48 << 20, "triton_chunked": 768 << 20, "torch": 768 << 20}
#: vocabulary columns of a slab are a multiple of this (a GPU vocabulary tile)
SLAB_ALIGN = 256


@dataclass(frozen=True)
class BackwardPlan:
    """How the backward walks the (rows × vocabulary) plane within a memory budget.

    Every gradient is produced by a pass that sees its whole reduction: dW (and dbias) for
    a slab of vocabulary rows from all N rows, written once in the weight's dtype; dh for a
    group of rows from the whole vocabulary, accumulated in fp32 over vocabulary slabs.
    ``fused``: one pass does both (the fp32 dh of all rows fits the budget). Otherwise the
    dh pass (row groups × ``slab_dh``) and the dW pass (``slab_dw`` × all rows) each
    recompute the logits: 20·N·D·V FLOPs for two views instead of 16.
    """

    rows_per_group: int
    slab_dh: int
    slab_dw: int
    fused: bool


def _slab(columns_budget: int, v: int) -> int:
    if columns_budget >= v:
        return v
    return max(SLAB_ALIGN, columns_budget // SLAB_ALIGN * SLAB_ALIGN)


def backward_plan(n: int, v: int, d: int, *, slab_bytes_per_cell: int, dh_bytes_per_row: int,
                  need_dh: bool, need_dw: bool, budget: int) -> BackwardPlan:
    """Plan the backward of an (n × v) problem of hidden size d.

    ``slab_bytes_per_cell``: temporary bytes per (row, vocabulary column) of a slab (all
    views, every temporary of the backend); ``dh_bytes_per_row``: bytes of the fp32 dh
    accumulators per row beyond the gradients themselves (0 when they are the gradients).
    One pass when the dh accumulators of all rows take at most half the budget. A slab is
    at least ``SLAB_ALIGN`` columns, whatever the budget.
    """
    n, v = max(1, n), max(1, v)
    if not need_dh or 2 * n * dh_bytes_per_row <= budget:
        left = budget - (n * dh_bytes_per_row if need_dh else 0)
        slab = _slab(left // (n * slab_bytes_per_cell), v)
        return BackwardPlan(rows_per_group=n, slab_dh=slab, slab_dw=slab, fused=True)
    # two passes: half the budget to the fp32 dh of a row group, half to its slabs
    rows = max(64, min(n, (budget // 2) // dh_bytes_per_row // 64 * 64))
    slab_dh = _slab((budget - rows * dh_bytes_per_row) // (rows * slab_bytes_per_cell), v)
    slab_dw = _slab(budget // (n * slab_bytes_per_cell), v) if need_dw else 0
    return BackwardPlan(rows_per_group=rows, slab_dh=slab_dh, slab_dw=slab_dw, fused=False)


def forward_rows(n: int, v: int, *, bytes_per_cell: int, budget: int) -> int:
    """Rows per chunk of a forward that materialises (rows × v) temporaries."""
    return int(max(16, min(max(1, n), budget // max(1, v * bytes_per_cell))))
