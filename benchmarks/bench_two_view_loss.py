#!/usr/bin/env python
"""Benchmark of the fused two-view loss: forward, backward, forward+backward and peak memory.

Methods (each computes the same scalar objective from the six per-row statistics, unless
its entry in the record says otherwise):
    pcr_torch, pcr_triton, pcr_triton_chunked   ``two_view_stats(..., backend=...)``
                                                (the Triton ones on CUDA only)
    eager          materialised logits: ``h @ W.T`` then log_softmax etc. (written here)
    compile        ``torch.compile(eager, dynamic=True)`` (``--compile-static`` for static shapes)
    liger          Liger-Kernel fused linear CE (both views) + LigerFusedLinearJSD
                   (beta=0, a KL between the views): CUDA only, and a *subset* of the
                   objective (no entropy terms, KL gradient into one view only)
    cce            cut-cross-entropy ``linear_cross_entropy`` (both views) + a chunked,
                   checkpointed torch KL/entropy: CUDA only, the full objective

Single-view rows (objective: mean CE of view a, the plain fine-tuning loss; 6·N·D·V FLOPs):
    ce_pcr_torch, ce_pcr_triton   ``pcr_fast.fused_linear_cross_entropy(h_a, W, y, backend=...)``
    ce_eager       ``F.cross_entropy(h_a @ W.T)`` with materialised logits
    ce_liger       Liger-Kernel ``LigerFusedLinearCrossEntropyLoss`` (CUDA only)
    ce_cce         cut-cross-entropy ``linear_cross_entropy`` (CUDA only)
Rows are checked against the first available method of the same objective.

Objective timed (so that backward exercises every statistic):
    loss = (Σ ce_a + 0.5 Σ ce_b) / n_valid − 0.5 (mean kl_ab + mean kl_ba)
           + 0.1 (mean ent_a + mean ent_b)

Floor: 12·N·D·V FLOPs per view pair (forward 2 views × 2NDV; backward dh and dW, 2 views ×
4NDV) over the device's dense matmul rate measured in the same run (bf16 on CUDA, fp32 on
CPU). Run ``python benchmarks/bench_two_view_loss.py --help``.
"""
from __future__ import annotations

import argparse
import gc
import logging
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the harness lives next to this file

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402
from torch import Tensor  # noqa: E402

import harness  # noqa: E402

logger = logging.getLogger("bench_two_view_loss")

OBJECTIVE = {"ce_a": 1.0, "ce_b": 0.5, "kl_ab": -0.5, "kl_ba": -0.5, "ent_a": 0.1, "ent_b": 0.1}
OBJECTIVE_TEXT = ("(sum ce_a + 0.5 sum ce_b)/n_valid - 0.5 (mean kl_ab + mean kl_ba) "
                  "+ 0.1 (mean ent_a + mean ent_b)")
IGNORE_INDEX = -100
IGNORED_FRACTION = 0.1   # share of label positions set to ignore_index (prompt tokens)
LOGIT_STD = 3.0          # std of the logits, so distributions are peaked as in a trained LM
VIEW_NOISE = 0.3         # h_b = h_a + noise: the augmented view's hidden states are close
MODES = ("forward", "backward", "forward_backward")
FLOPS_PER_NDV = {"forward": 4, "backward": 8, "forward_backward": 12}
METHODS = ("pcr_torch", "pcr_triton", "pcr_triton_chunked", "eager", "compile", "liger", "cce",
           "ce_pcr_torch", "ce_pcr_triton", "ce_eager", "ce_liger", "ce_cce")
#: FLOPs of each objective per N·D·V, relative to the two-view one
OBJECTIVE_FLOP_SHARE = {"two_view": 1.0, "single_view": 0.5}


@dataclass(frozen=True)
class LossCase:
    n: int      # rows per view
    d: int
    v: int
    dtype: str  # "float32" | "bfloat16"

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def flops(self, mode: str, objective: str = "two_view") -> float:
        return float(FLOPS_PER_NDV[mode]) * self.n * self.d * self.v * OBJECTIVE_FLOP_SHARE[objective]


def cpu_grid(quick: bool = False) -> List[LossCase]:
    if quick:
        return [LossCase(n, 256, 8000, "float32") for n in (256, 512)]
    # N = 2048 (> the torch backend's default 1024-row chunk) shows the chunked memory bound.
    return ([LossCase(n, 256, 8000, "float32") for n in (256, 512, 1024, 2048)]
            + [LossCase(n, 256, 32000, "float32") for n in (256, 512)])


def check_grid() -> List[LossCase]:
    """Two production shapes for the one-call GPU check (benchmarks/gpu_check.sh)."""
    return [LossCase(n, 4096, 151936, "bfloat16") for n in (4096, 16384)]


def gpu_grid(quick: bool = False) -> List[LossCase]:
    if quick:
        return [LossCase(n, 4096, v, "bfloat16") for v in (32000, 151936) for n in (1024, 4096, 16384)]
    return [LossCase(n, d, v, "bfloat16") for v in (32000, 128256, 151936, 262144)
            for d in (2048, 4096) for n in (1024, 2048, 4096, 8192, 16384, 32768)]


# --------------------------------------------------------------------------- the objective
def objective_from_stats(stats: Sequence[Tensor], n_valid: int) -> Tensor:
    """The benchmark's scalar loss from the six statistics (ce_a, ce_b, kl_ab, kl_ba, ent_a, ent_b)."""
    ce_a, ce_b, kl_ab, kl_ba, ent_a, ent_b = stats
    denom = max(n_valid, 1)
    return ((OBJECTIVE["ce_a"] * ce_a.sum() + OBJECTIVE["ce_b"] * ce_b.sum()) / denom
            + OBJECTIVE["kl_ab"] * kl_ab.mean() + OBJECTIVE["kl_ba"] * kl_ba.mean()
            + OBJECTIVE["ent_a"] * ent_a.mean() + OBJECTIVE["ent_b"] * ent_b.mean())


def eager_stats(h_a: Tensor, h_b: Tensor, weight: Tensor, labels: Tensor,
                ignore_index: int = IGNORE_INDEX) -> Tuple[Tensor, ...]:
    """The six statistics the way a plain PyTorch training loop computes them: full N×V
    logits in the input dtype, upcast to float32, log_softmax, elementwise sums."""
    z_a = (h_a @ weight.T).float()
    z_b = (h_b @ weight.T).float()
    logp = torch.log_softmax(z_a, dim=-1)
    logq = torch.log_softmax(z_b, dim=-1)
    p, q = logp.exp(), logq.exp()
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels)).unsqueeze(-1)
    ce_a = -logp.gather(-1, safe).squeeze(-1) * valid
    ce_b = -logq.gather(-1, safe).squeeze(-1) * valid
    kl_ab = (p * (logp - logq)).sum(-1)
    kl_ba = (q * (logq - logp)).sum(-1)
    ent_a = -(p * logp).sum(-1)
    ent_b = -(q * logq).sum(-1)
    return ce_a, ce_b, kl_ab, kl_ba, ent_a, ent_b


def eager_objective(h_a, h_b, weight, labels, n_valid: int) -> Tensor:
    return objective_from_stats(eager_stats(h_a, h_b, weight, labels), n_valid)


def _kl_entropy_chunk(h_a: Tensor, h_b: Tensor, weight: Tensor) -> Tensor:
    """Sums over a row chunk of (kl_ab, kl_ba, ent_a, ent_b), shape (4,)."""
    logp = torch.log_softmax((h_a @ weight.T).float(), dim=-1)
    logq = torch.log_softmax((h_b @ weight.T).float(), dim=-1)
    p, q = logp.exp(), logq.exp()
    diff = logp - logq
    return torch.stack([(p * diff).sum(), -(q * diff).sum(), -(p * logp).sum(), -(q * logq).sum()])


def chunked_kl_entropy(h_a: Tensor, h_b: Tensor, weight: Tensor, chunk_size: int = 1024) -> Tensor:
    """Sums of (kl_ab, kl_ba, ent_a, ent_b) over all rows with O(chunk·V) memory: each chunk
    is checkpointed, so its logits are recomputed in the backward instead of kept."""
    from torch.utils.checkpoint import checkpoint

    total = h_a.new_zeros(4, dtype=torch.float32)
    for start in range(0, h_a.shape[0], chunk_size):
        sl = slice(start, start + chunk_size)
        total = total + checkpoint(_kl_entropy_chunk, h_a[sl], h_b[sl], weight, use_reentrant=False)
    return total


# --------------------------------------------------------------------------- methods
@dataclass
class Method:
    name: str
    kind: str                      # "ours" | "baseline" | "peer"
    computes: str
    comparable: bool               # same objective as ours (its loss value is checked)
    objective: str = "two_view"    # "two_view" (the PCR objective) or "single_view" (CE of view a)
    available: bool = True
    reason: str = ""
    version: Optional[str] = None
    fn: Optional[Callable[..., Tensor]] = None

    def record(self) -> Dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k != "fn"}
        return out


def _pcr_method(backend: str, device: torch.device) -> Method:
    from pcr_fast import two_view_stats

    name = {"torch": "pcr_torch", "triton": "pcr_triton", "triton_chunked": "pcr_triton_chunked"}[backend]
    computes = {"torch": "six statistics, chunked PyTorch (chunk logits only)",
                "triton": "six statistics, fused Triton forward + one recompute backward",
                "triton_chunked": "six statistics, cuBLAS logits per chunk + Triton stats/grad kernel"}[backend]
    m = Method(name, "ours", computes, comparable=True, version=harness._version("pcr_fast"))
    if backend.startswith("triton") and device.type != "cuda":
        m.available, m.reason = False, "Triton backends are timed on CUDA only (the CPU interpreter is a test tool)"
        return m

    def fn(h_a, h_b, weight, labels, n_valid):
        return objective_from_stats(two_view_stats(h_a, h_b, weight, labels, backend=backend), n_valid)

    m.fn = fn
    return m


def _compile_method(static_shapes: bool = False) -> Method:
    # Dynamic shapes by default: one compile serves the whole grid (static shapes recompile
    # per grid point: ~48 inductor compiles on the GPU grid, minutes each on a CPU).
    dynamic = not static_shapes
    m = Method("compile", "baseline",
               f"torch.compile(eager, dynamic={dynamic}): materialised logits, fused elementwise",
               comparable=True, version=torch.__version__)
    try:
        import torch._dynamo as dynamo

        for limit in ("recompile_limit", "cache_size_limit"):  # renamed across torch versions
            if hasattr(dynamo.config, limit):
                setattr(dynamo.config, limit, max(getattr(dynamo.config, limit), 64))
        m.fn = torch.compile(eager_objective, dynamic=dynamic)
    except Exception as exc:  # pragma: no cover - depends on the install
        m.available, m.reason = False, f"torch.compile unavailable: {exc!r}"
    return m


def _liger_method(device: torch.device) -> Method:
    m = Method("liger", "peer",
               "ce_a + 0.5 ce_b (LigerFusedLinearCrossEntropyLoss) - 0.5 KL between views "
               "(LigerFusedLinearJSD beta=0; gradient into view a only); no entropy terms",
               comparable=False, version=harness._version("liger-kernel"))
    if device.type != "cuda":
        m.available, m.reason = False, "Liger-Kernel's Triton kernels need CUDA"
        return m
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss, LigerFusedLinearJSD
    except Exception as exc:
        m.available, m.reason = False, f"liger-kernel not importable: {exc!r} (pip install liger-kernel)"
        return m
    ce = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="mean")
    jsd = LigerFusedLinearJSD(jsd_beta=0.0, ignore_index=IGNORE_INDEX)

    def fn(h_a, h_b, weight, labels, n_valid):
        return (ce(weight, h_a, labels) + 0.5 * ce(weight, h_b, labels)
                - 0.5 * jsd(h_a, weight, h_b, weight, labels))

    m.fn = fn
    return m


def _cce_method(device: torch.device) -> Method:
    m = Method("cce", "peer",
               "ce_a + 0.5 ce_b (cut-cross-entropy linear_cross_entropy) + KL/entropy terms "
               "from a chunked, checkpointed torch pass (full objective)",
               comparable=True, version=harness._version("cut-cross-entropy"))
    if device.type != "cuda":
        m.available, m.reason = False, "cut-cross-entropy's default (cce) kernels need CUDA"
        return m
    try:
        from cut_cross_entropy import linear_cross_entropy
    except Exception as exc:
        m.available, m.reason = False, f"cut-cross-entropy not importable: {exc!r} (pip install cut-cross-entropy)"
        return m

    def fn(h_a, h_b, weight, labels, n_valid):
        ce_a = linear_cross_entropy(h_a, weight, labels, ignore_index=IGNORE_INDEX, reduction="mean")
        ce_b = linear_cross_entropy(h_b, weight, labels, ignore_index=IGNORE_INDEX, reduction="mean")
        kl_ab, kl_ba, ent_a, ent_b = chunked_kl_entropy(h_a, h_b, weight).unbind(0)
        n = h_a.shape[0]
        return (OBJECTIVE["ce_a"] * ce_a + OBJECTIVE["ce_b"] * ce_b
                + (OBJECTIVE["kl_ab"] * kl_ab + OBJECTIVE["kl_ba"] * kl_ba
                   + OBJECTIVE["ent_a"] * ent_a + OBJECTIVE["ent_b"] * ent_b) / n)

    m.fn = fn
    return m


def _ce_method(name: str, device: torch.device) -> Method:
    """The single-view rows: mean CE of view a (ignored labels excluded), ours and peers'."""
    import torch.nn.functional as F

    m = Method(name, "ours" if name.startswith("ce_pcr") else ("baseline" if name == "ce_eager" else "peer"),
               "", comparable=True, objective="single_view")
    if name.startswith("ce_pcr"):
        from pcr_fast import fused_linear_cross_entropy

        backend = name[len("ce_pcr_"):]
        m.computes = f"fused_linear_cross_entropy(backend={backend!r}): one view, no logits"
        m.version = harness._version("pcr_fast")
        if backend.startswith("triton") and device.type != "cuda":
            m.available, m.reason = False, "Triton backends are timed on CUDA only (the CPU interpreter is a test tool)"
            return m
        m.fn = lambda h_a, h_b, weight, labels, n_valid: fused_linear_cross_entropy(
            h_a, weight, labels, ignore_index=IGNORE_INDEX, backend=backend)
    elif name == "ce_eager":
        m.computes, m.version = "F.cross_entropy on materialised N×V logits", torch.__version__
        m.fn = lambda h_a, h_b, weight, labels, n_valid: F.cross_entropy((h_a @ weight.T).float(), labels,
                                                                         ignore_index=IGNORE_INDEX)
    elif name == "ce_liger":
        m.computes, m.version = "LigerFusedLinearCrossEntropyLoss (one view)", harness._version("liger-kernel")
        if device.type != "cuda":
            m.available, m.reason = False, "Liger-Kernel's Triton kernels need CUDA"
            return m
        try:
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        except Exception as exc:
            m.available, m.reason = False, f"liger-kernel not importable: {exc!r} (pip install liger-kernel)"
            return m
        ce = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="mean")
        m.fn = lambda h_a, h_b, weight, labels, n_valid: ce(weight, h_a, labels)
    else:
        m.computes, m.version = "cut-cross-entropy linear_cross_entropy (one view)", harness._version("cut-cross-entropy")
        if device.type != "cuda":
            m.available, m.reason = False, "cut-cross-entropy's default (cce) kernels need CUDA"
            return m
        try:
            from cut_cross_entropy import linear_cross_entropy
        except Exception as exc:
            m.available, m.reason = False, f"cut-cross-entropy not importable: {exc!r} (pip install cut-cross-entropy)"
            return m
        m.fn = lambda h_a, h_b, weight, labels, n_valid: linear_cross_entropy(
            h_a, weight, labels, ignore_index=IGNORE_INDEX, reduction="mean")
    return m


def build_methods(device: torch.device, names: Sequence[str], *, compile_static: bool = False) -> Dict[str, Method]:
    out: Dict[str, Method] = {}
    for name in names:
        if name == "pcr_torch":
            out[name] = _pcr_method("torch", device)
        elif name == "pcr_triton":
            out[name] = _pcr_method("triton", device)
        elif name == "pcr_triton_chunked":
            out[name] = _pcr_method("triton_chunked", device)
        elif name == "eager":
            out[name] = Method("eager", "baseline", "materialised N×V logits, plain PyTorch autograd",
                               comparable=True, version=torch.__version__, fn=eager_objective)
        elif name == "compile":
            out[name] = _compile_method(compile_static)
        elif name == "liger":
            out[name] = _liger_method(device)
        elif name == "cce":
            out[name] = _cce_method(device)
        elif name.startswith("ce_"):
            out[name] = _ce_method(name, device)
        else:
            raise ValueError(f"methods must be drawn from {METHODS}, got {name!r}")
    return out


# --------------------------------------------------------------------------- inputs
def make_inputs(case: LossCase, device: torch.device, generator: torch.Generator):
    """One input set: (h_a, h_b, weight, labels, n_valid) with h_*, weight as grad leaves."""
    dt = case.torch_dtype
    h_a = torch.randn(case.n, case.d, device=device, generator=generator)
    h_b = h_a + VIEW_NOISE * torch.randn(case.n, case.d, device=device, generator=generator)
    weight = torch.randn(case.v, case.d, device=device, generator=generator) * (LOGIT_STD / case.d ** 0.5)
    labels = torch.randint(0, case.v, (case.n,), device=device, generator=generator)
    ignored = torch.rand(case.n, device=device, generator=generator) < IGNORED_FRACTION
    labels = labels.masked_fill(ignored, IGNORE_INDEX)
    n_valid = int((labels != IGNORE_INDEX).sum())  # setup only: the timed calls take an int
    leaves = [t.to(dt).requires_grad_(True) for t in (h_a, h_b, weight)]
    for name, t in zip(("h_a", "h_b", "weight", "labels"), (*leaves, labels)):
        harness.assert_not_degenerate(name, t)
    return (*leaves, labels, n_valid)


def set_bytes(case: LossCase) -> int:
    esize = torch.empty((), dtype=case.torch_dtype).element_size()
    return (2 * case.n * case.d + case.v * case.d) * esize + case.n * 8


def grads_bytes(case: LossCase, objective: str = "two_view") -> int:
    """The gradients a method must leave behind: dh_a (and dh_b for two views), dW, in the input dtype."""
    esize = torch.empty((), dtype=case.torch_dtype).element_size()
    views = 2 if objective == "two_view" else 1
    return (views * case.n * case.d + case.v * case.d) * esize


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, getattr(torch, "OutOfMemoryError", ())) or "out of memory" in str(exc).lower()


# --------------------------------------------------------------------------- one case
def run_case(case: LossCase, methods: Dict[str, Method], device: torch.device, *,
             quick: bool, matmul_rate: float, seed: int, measure_memory: bool = True) -> List[Dict[str, Any]]:
    gen = torch.Generator(device=device).manual_seed(seed)
    budget = (int(torch.cuda.mem_get_info(device)[0] * 0.15) if device.type == "cuda" else 1 << 30)
    k = harness.rotation_count(set_bytes(case), device, memory_budget=budget)
    sets = [make_inputs(case, device, gen) for _ in range(k)]
    leaves = [t for s in sets for t in s[:3]]
    tol = 2e-2 if case.dtype in ("bfloat16", "float16") else 1e-4
    references: Dict[str, Tuple[float, Tensor]] = {}  # objective -> (loss, grad of h_a) of its first method
    rows = []
    for name, method in methods.items():
        row: Dict[str, Any] = {"method": name, **asdict(case), "input_sets_rotated": k}
        if not method.available:
            rows.append({**row, "status": "skipped", "reason": method.reason})
            continue
        fn = method.fn
        t_method = time.perf_counter()
        try:
            # Warm-up call (compiles where needed) that is also a correctness check.
            loss = fn(*sets[0])
            value = float(loss.detach())
            loss.backward()
            del loss
            grad_h_a = sets[0][0].grad.detach().float()
            row["loss_value"] = value
            row["objective"] = method.objective
            reference = references.get(method.objective)
            if method.comparable:
                if reference is None:
                    references[method.objective] = (value, grad_h_a.clone())
                    row["check"] = "reference"
                else:
                    rel = abs(value - reference[0]) / max(abs(reference[0]), 1e-6)
                    grad_rel = float((grad_h_a - reference[1]).norm() / reference[1].norm().clamp_min(1e-30))
                    row["rel_diff_vs_reference"] = {"loss": rel, "grad_h_a": grad_rel}
                    bad = rel > tol or not grad_rel <= 10 * tol
                    row["check"] = (f"MISMATCH (loss rel {rel:.1e}, grad_h_a rel {grad_rel:.1e})" if bad else "ok")
                    if bad:
                        logger.warning("%s on %s: %s", name, case, row["check"])
            else:
                row["check"] = "not comparable (different objective)"
            rot = harness.Rotator(sets)
            timings = harness.time_training_step(lambda: fn(*rot.next()), lambda loss: loss.backward(), device,
                                                 grad_to_none=leaves, quick=quick, warmed_up=True)
            row["timings"] = {m: t.to_dict() for m, t in timings.items()}
            row["achieved_flops_per_s"] = {m: case.flops(m, method.objective) / (t.median_ms * 1e-3)
                                           for m, t in timings.items()}
            row["fraction_of_matmul_rate"] = {m: f / matmul_rate for m, f in row["achieved_flops_per_s"].items()}
            row["floor_ms"] = {m: case.flops(m, method.objective) / matmul_rate * 1e3 for m in timings}
            if measure_memory:
                row["memory"] = harness.peak_memory(lambda: fn(*sets[0]).backward(), device,
                                                    grad_to_none=leaves,
                                                    resident_bytes=grads_bytes(case, method.objective))
            row["status"] = "ok"
            row["wall_s"] = round(time.perf_counter() - t_method, 2)  # incl. compile + checks
        except Exception as exc:  # one failing method must not end the run: record it
            status = "oom" if _is_oom(exc) else "error"
            logger.warning("%s on %s: %s: %r", name, case, status, exc)
            row.update(status=status, reason=f"{type(exc).__name__}: {str(exc)[:300]}")
            row.pop("timings", None)
        finally:
            for t in leaves:
                t.grad = None
            grad_h_a = None
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        rows.append(row)
    del sets, leaves
    gc.collect()
    return rows


# --------------------------------------------------------------------------- run + output
def run_benchmark(cases: Sequence[LossCase], device: torch.device, *, method_names: Sequence[str] = METHODS,
                  quick: bool = False, seed: int = 0, note: str = "", measure_memory: bool = True,
                  progress: bool = True, compile_static: bool = False) -> Dict[str, Any]:
    """Run every case × method and return the JSON-ready record."""
    device = torch.device(device)
    env = harness.environment_record(device, extra_packages=("liger-kernel", "cut-cross-entropy"))
    methods = build_methods(device, method_names, compile_static=compile_static)
    mm_size = None if not quick else (4096 if device.type == "cuda" else 512)
    matmul = harness.measure_matmul_rate(device, size=mm_size)
    rate = matmul["flops_per_s"]
    results: List[Dict[str, Any]] = []
    it = tqdm(cases, desc="two-view loss cases", disable=not progress)  # tqdm is a hard dependency
    t_start = time.perf_counter()
    for case in it:
        results.extend(run_case(case, methods, device, quick=quick, matmul_rate=rate, seed=seed,
                                measure_memory=measure_memory))
    wall_s = time.perf_counter() - t_start
    # The roofline is the best rate this run saw: measured before and after the cases (on a
    # shared machine one of them may fall in a busy moment). Rates above were computed with
    # the first measurement; recompute them with the best one.
    matmul_end = harness.measure_matmul_rate(device, size=mm_size)
    matmul["flops_per_s_start"], matmul["flops_per_s_end"] = rate, matmul_end["flops_per_s"]
    matmul["flops_per_s"] = rate = max(rate, matmul_end["flops_per_s"])
    matmul["rule"] = "max of the rates measured before and after the cases"
    if device.type != "cuda":
        matmul["note"] = "CPU run: the roofline is an fp32 matmul (no bf16 tensor cores)"
    for row in results:
        if row.get("status") == "ok":
            cfg = LossCase(row["n"], row["d"], row["v"], row["dtype"])
            row["fraction_of_matmul_rate"] = {m: f / rate for m, f in row["achieved_flops_per_s"].items()}
            row["floor_ms"] = {m: cfg.flops(m, row.get("objective", "two_view")) / rate * 1e3 for m in row["timings"]}
    record = {
        "benchmark": "two_view_loss",
        "schema_version": harness.SCHEMA_VERSION,
        "environment": env,
        "settings": {"quick": quick, "seed": seed, "objective": OBJECTIVE_TEXT,
                     "ignore_index": IGNORE_INDEX, "ignored_fraction": IGNORED_FRACTION,
                     "logit_std": LOGIT_STD, "view_noise": VIEW_NOISE, "modes": list(MODES),
                     "floor": "12*N*D*V FLOPs per view pair fwd+bwd (fwd 4NDV, bwd 8NDV) / matmul rate; "
                              "single-view rows: 6*N*D*V",
                     "single_view_objective": "mean CE of view a over labelled tokens",
                     "memory": "peak during one forward+backward over the inputs; extra_bytes = peak - "
                               "gradient bytes (dh_a, dh_b, dW in the input dtype)",
                     "note": note, "run_wall_s": round(wall_s, 1)},
        "device_roofline": {"matmul": matmul},
        "methods": {n: m.record() for n, m in methods.items()},
        "results": results,
    }
    return harness.finish_record(record)


def _rate_text(flops_per_s: float) -> str:
    return f"{flops_per_s / 1e12:.2f} TF/s" if flops_per_s >= 1e12 else f"{flops_per_s / 1e9:.1f} GF/s"


def table_rows(record: Dict[str, Any]) -> List[List[str]]:
    rows = []
    for r in record["results"]:
        head = [r["n"], r["d"], r["v"], r["method"]]
        if r["status"] != "ok":
            rows.append(head + [r["status"], "", "", "", "", "", "", r["reason"][:40]])
            continue
        t = r["timings"]

        def cell(mode):
            return f"{t[mode]['median_ms']:.2f}" if mode in t else "-"

        fb = t.get("forward_backward")
        spread = f"{fb['p20_ms']:.2f}-{fb['p80_ms']:.2f}" if fb else "-"
        rate = r["achieved_flops_per_s"].get("forward_backward")
        frac = r["fraction_of_matmul_rate"].get("forward_backward")
        floor = r["floor_ms"].get("forward_backward")
        mem = harness.fmt_bytes(r["memory"]["extra_bytes"]) if "memory" in r else "n/a"
        rows.append(head + [cell("forward"), cell("backward"), cell("forward_backward"), spread,
                            _rate_text(rate) if rate else "-", f"{100 * frac:.1f}%" if frac else "-",
                            f"{floor:.2f}" if floor else "-", mem + ("" if r.get("check") in ("ok", "reference")
                                                                    else f" [{r.get('check')}]")])
    return rows


TABLE_COLUMNS = ["N", "D", "V", "method", "fwd ms", "bwd ms", "fwd+bwd ms", "p20-p80", "rate",
                 "% matmul", "floor ms", "extra mem"]


def plot_record(record: Dict[str, Any], path: Path) -> Path:
    """Time (fwd+bwd, p20-p80 band) and extra memory against N, one panel per (D, V, dtype)."""
    ok = [r for r in record["results"] if r["status"] == "ok" and "forward_backward" in r["timings"]]
    keys = sorted({(r["d"], r["v"], r["dtype"]) for r in record["results"]})
    rate = record["device_roofline"]["matmul"]["flops_per_s"]
    panels = []
    for d, v, dt in keys:
        rows = [r for r in ok if (r["d"], r["v"], r["dtype"]) == (d, v, dt)]
        series = {}
        for method in record["methods"]:
            mr = sorted((r for r in rows if r["method"] == method), key=lambda r: r["n"])
            if mr:
                series[method] = {"x": [r["n"] for r in mr],
                                  "y": [r["timings"]["forward_backward"]["median_ms"] for r in mr],
                                  "lo": [r["timings"]["forward_backward"]["p20_ms"] for r in mr],
                                  "hi": [r["timings"]["forward_backward"]["p80_ms"] for r in mr]}
        ns = sorted({r["n"] for r in record["results"] if (r["d"], r["v"], r["dtype"]) == (d, v, dt)})
        series["floor 12NDV/matmul"] = {"x": ns, "y": [12.0 * n * d * v / rate * 1e3 for n in ns],
                                        "style": "k--"}
        panels.append({"title": f"fwd+bwd time, D={d} V={v} {dt}", "xlabel": "N rows per view",
                       "ylabel": "ms (median, p20-p80 band)", "logx": True, "logy": True, "series": series})
        mem_series = {}
        for method in record["methods"]:
            mr = sorted((r for r in rows if r["method"] == method and "memory" in r), key=lambda r: r["n"])
            if mr:
                mem_series[method] = {"x": [r["n"] for r in mr],
                                      "y": [max(r["memory"]["extra_bytes"], 1) / 2 ** 20 for r in mr]}
        panels.append({"title": f"extra memory over inputs+grads, D={d} V={v}", "xlabel": "N rows per view",
                       "ylabel": "MiB", "logx": True, "logy": True, "series": mem_series})
    env = record["environment"]
    title = (f"two-view loss on {env['device']['name']} ({env['torch_num_threads']} threads), "
             f"torch {env['packages']['torch']}, commit {harness.commit_label(env)}")
    return harness.plot_panels(path, panels, suptitle=title, ncols=2)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--grid", choices=("auto", "cpu", "gpu", "check"), default="auto",
                        help="size grid: gpu (bf16, large V), cpu (fp32, small) or check (two production "
                             "shapes, benchmarks/gpu_check.sh); auto picks gpu or cpu by device")
    parser.add_argument("--quick", action="store_true", help="fewer sizes, shorter timing loops")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"comma-separated subset of {','.join(METHODS)}")
    parser.add_argument("--out-dir", type=Path, default=harness.RESULTS_DIR)
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--note", default="", help="free text stored in the record (e.g. 'shared machine')")
    parser.add_argument("--compile-static", action="store_true",
                        help="torch.compile with static shapes (one compile per grid point) instead of dynamic")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    grid = args.grid if args.grid != "auto" else ("gpu" if device.type == "cuda" else "cpu")
    cases = {"gpu": lambda: gpu_grid(args.quick), "cpu": lambda: cpu_grid(args.quick), "check": check_grid}[grid]()
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    record = run_benchmark(cases, device, method_names=names, quick=args.quick, seed=args.seed, note=args.note,
                           compile_static=args.compile_static)
    record["settings"]["grid"] = grid

    for name, info in record["methods"].items():
        if not info["available"]:
            print(f"skipped {name}: {info['reason']}")
    mm = record["device_roofline"]["matmul"]
    print(f"matmul roofline: {_rate_text(mm['flops_per_s'])} ({mm['dtype']}, {mm['m=n=k']}^3) on "
          f"{record['environment']['device']['name']}, {record['environment']['torch_num_threads']} thread(s)"
          + (f"; {mm['note']}" if mm.get("note") else ""))
    harness.print_table("two-view loss: median ms (fwd+bwd p20-p80), rate and floor for fwd+bwd",
                        TABLE_COLUMNS, table_rows(record))
    json_path = harness.write_json(record, harness.result_path("two_view_loss", device, args.out_dir))
    print(f"wrote {json_path}")
    if not args.no_plot:
        png = plot_record(record, json_path.with_suffix(".png"))
        print(f"wrote {png}")
    failed = [r for r in record["results"]
              if record["methods"][r["method"]]["kind"] == "ours" and r["status"] == "error"]
    mismatched = [r for r in record["results"] if str(r.get("check", "")).startswith("MISMATCH")]
    return 1 if failed or mismatched else 0


if __name__ == "__main__":
    sys.exit(main())
