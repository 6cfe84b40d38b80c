#!/usr/bin/env python
"""Ahead-of-time compile of every Triton kernel pcr_fast launches, for GPUs, on a CPU machine.

How: with ``TRITON_INTERPRET`` unset and the backend gate opened, the public API
(``two_view_stats``, ``single_view_stats``, ``fused_linear_cross_entropy``, ``patch_augment``)
runs forward + backward on meta tensors (loss) or small CPU tensors (augmentation) while
``JITFunction.run`` is intercepted: every launch the launchers make is recorded with the
arguments, constexprs and options they chose for the assumed architecture
(:func:`pcr_fast.kernels.launch.assume_capability`). Each distinct launch is then compiled
with ``triton.compile`` for that architecture, with the same specialisation the JIT would
use, and its cubin inspected with the wheel's ``cuobjdump``: registers, stack (spill)
bytes, local memory, shared memory, tensor-core instructions in the PTX (``mma.sync``,
``wgmma.mma_async``, ``tcgen05.mma``) and the resulting occupancy.

Outputs ``gpu_compile_<date>.json`` and ``gpu_compile_<date>.md`` (summary table + every
launch) in ``--out-dir``. Exit status 1 on a compile error, a spill (ptxas's own spill
bytes), or a matmul kernel without tensor-core instructions. ``--subset test`` is the
representative subset the test suite runs (tests/test_kernels_compile.py); ``make
gpu-report`` runs the full grid for sm_80, sm_86 (the "default" row), sm_90 and sm_100.
"""
from __future__ import annotations

import os

os.environ.pop("TRITON_INTERPRET", None)   # compile for GPUs: the kernels must be real JITFunctions
os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"  # ptxas -v's own spill counts, parsed from its log
os.environ["TRITON_ALWAYS_COMPILE"] = "1"  # a cached kernel would skip ptxas and its log

import argparse  # noqa: E402
import contextlib  # noqa: E402
import io  # noqa: E402
import datetime as _dt  # noqa: E402
import json  # noqa: E402
import multiprocessing  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
#: architectures compiled for: the three of the table, and sm_86 for its "default" row
#: (capabilities without their own row; 99 KB shared memory per block, 48 warps per SM)
ARCH_CAPS = {80: (8, 0), 86: (8, 6), 90: (9, 0), 100: (10, 0)}
ARCH_LIMITS = {  # per SM: registers, max warps, max blocks, shared memory (bytes), max per block
    80: dict(regs=65536, warps=64, blocks=32, smem=167936, smem_block=166912),
    86: dict(regs=65536, warps=48, blocks=16, smem=102400, smem_block=101376),
    90: dict(regs=65536, warps=64, blocks=32, smem=233472, smem_block=232448),
    100: dict(regs=65536, warps=64, blocks=32, smem=233472, smem_block=232448),
}
TC_PATTERNS = {"mma.sync": r"\bmma\.sync\.", "wgmma": r"\bwgmma\.mma_async\.", "tcgen05": r"\btcgen05\.mma\b"}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# --------------------------------------------------------------------------- capture
@dataclass
class Launch:
    kernel: JITFunction
    args: tuple
    kwargs: dict
    grid: Any
    scenario: str = ""


@contextlib.contextmanager
def captured_launches():
    """Record every Triton launch instead of running it (the backend gate opened)."""
    from pcr_fast import backends

    launches: List[Launch] = []

    def fake_run(self, *args, grid, warmup, **kwargs):
        launches.append(Launch(self, args, dict(kwargs), grid))
        return None

    saved = JITFunction.run, backends.triton_available
    JITFunction.run = fake_run
    backends.triton_available = lambda device: True
    try:
        yield launches
    finally:
        JITFunction.run, backends.triton_available = saved


@dataclass(frozen=True)
class LossCase:
    name: str
    n: int
    d: int
    v: int
    softcap: Optional[float] = None


LOSS_SHAPES = {
    "qwen2vl_2b": LossCase("qwen2vl_2b", 4096, 1536, 151936),
    "llama_8b": LossCase("llama_8b", 8192, 4096, 128256),
    "gemma3_4b": LossCase("gemma3_4b", 2048, 2560, 262144, softcap=30.0),
    "small_odd_n": LossCase("small_odd_n", 37, 1536, 32001),
}
# (name, two views?, detach_b?, bias?)
FEATURES = {
    "two_view": (True, False, False),
    "two_view_bias": (True, False, True),
    "two_view_detach_b": (True, True, False),
    "single_view": (False, False, False),
    "single_view_bias": (False, False, True),
}


def run_loss(case: LossCase, dtype: torch.dtype, feature: str, backend: str) -> None:
    """Forward + backward of the statistics on meta tensors (every launch recorded)."""
    from pcr_fast.stats import single_view_stats, two_view_stats

    two, detach, has_bias = FEATURES[feature]
    meta = torch.device("meta")
    h_a = torch.empty(case.n, case.d, device=meta, dtype=dtype, requires_grad=True)
    w = torch.empty(case.v, case.d, device=meta, dtype=dtype, requires_grad=True)
    bias = torch.empty(case.v, device=meta, dtype=dtype, requires_grad=True) if has_bias else None
    labels = torch.empty(case.n, device=meta, dtype=torch.long)
    if two:
        h_b = torch.empty(case.n, case.d, device=meta, dtype=dtype, requires_grad=True)
        out = two_view_stats(h_a, h_b, w, labels, bias=bias, softcap=case.softcap, backend=backend,
                             detach_b=detach)
    else:
        out = single_view_stats(h_a, w, labels, bias=bias, softcap=case.softcap, backend=backend)[:4]
    sum(t.sum() for t in out).backward()


def run_augment(layout: str, fill: str, dtype: torch.dtype) -> None:
    """The patch gather on small CPU tensors of each pixel layout (launches recorded)."""
    from pcr_fast.augment import patch_augment

    if layout == "image":
        x = torch.rand(2, 3, 56, 56).to(dtype)
        patch_augment(x, patch_size=14, fill=fill, mask_ratio=0.5, seed=0, backend="triton")
    elif layout == "tiles":
        x = torch.rand(1, 2, 3, 56, 56).to(dtype) + 0.1
        patch_augment(x, patch_size=14, fill=fill, mask_ratio=0.5, seed=0, backend="triton")
    else:  # Qwen2-VL rows: 2 images of 4x4 patches, merge 2
        grid = torch.tensor([[1, 4, 4], [1, 4, 4]])
        x = torch.rand(32, 3 * 2 * 14 * 14).to(dtype)
        patch_augment(x, patch_size=14, merge_size=2, image_grid_thw=grid, fill=fill, mask_ratio=0.5, seed=0,
                      backend="triton")


def scenarios(subset: str, arch: int) -> List[Tuple[str, Callable[[], None]]]:
    """(name, callable) pairs whose launches are compiled for ``arch``.

    ``full``: every shape, dtype, feature, backend and pixel layout × fill. ``test`` (the
    suite's representative subset, ~1 minute): the softcapped Gemma 3 shape with bias, two
    views and one; bf16 everywhere, fp32 on sm_90, the patch gather once.
    """
    out = []
    if subset == "test":
        shapes, features = ["gemma3_4b"], ["two_view_bias", "single_view"]
        dtypes = ["bf16", "fp32"] if arch == 90 else ["bf16"]
        aug = [("rows", "noise")] if arch == 90 else []
    else:
        shapes, dtypes, features = list(LOSS_SHAPES), list(DTYPES), list(FEATURES)
        aug = [(layout, fill) for layout in ("image", "tiles", "rows") for fill in ("zero", "mean", "noise")]
    for dt in dtypes:
        for shape in shapes:
            for feature in features:
                for backend in ("triton", "triton_chunked"):
                    name = f"{backend}/{shape}/{feature}/{dt}"
                    out.append((name, lambda s=shape, d=dt, f=feature, b=backend:
                                run_loss(LOSS_SHAPES[s], DTYPES[d], f, b)))
        for layout, fill in aug:
            out.append((f"patch_augment/{layout}/{fill}/{dt}", lambda lay=layout, fi=fill, d=dt:
                        run_augment(lay, fi, DTYPES[d])))
    return out


def capture(arch: int, subset: str) -> List[Launch]:
    from pcr_fast.kernels.launch import assume_capability

    launches: List[Launch] = []
    with assume_capability(ARCH_CAPS[arch]), captured_launches() as recorded:
        for name, fn in scenarios(subset, arch):
            start = len(recorded)
            fn()
            for launch in recorded[start:]:
                launch.scenario = name
        launches.extend(recorded)
    return launches


# --------------------------------------------------------------------------- compile
def _binder(kernel: JITFunction, arch: int):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    return target, backend, create_function_from_signature(kernel.signature, kernel.params, backend)


def specialise(launch: Launch, arch: int):
    """(target, options, signature, constexprs, attrs) exactly as the JIT would compile them."""
    target, backend, binder = _binder(launch.kernel, arch)
    bound, spec, options = binder(*launch.args, **launch.kwargs)
    options, signature, constexprs, attrs = launch.kernel._pack_args(backend, launch.kwargs, bound, spec, options)
    return target, options, signature, constexprs, attrs


def launch_key(launch: Launch, arch: int) -> str:
    _, options, signature, constexprs, attrs = specialise(launch, arch)
    return json.dumps([launch.kernel.__name__, signature, sorted((str(k), str(v)) for k, v in constexprs.items()),
                       sorted((str(k), str(v)) for k, v in attrs.items()), options.num_warps, options.num_stages],
                      sort_keys=True)


def _cuobjdump() -> str:
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")


def occupancy(regs: int, warps: int, shared: int, arch: int) -> Dict[str, Any]:
    lim = ARCH_LIMITS[arch]
    regs_per_warp = -(-max(regs, 1) * 32 // 256) * 256
    by_regs = (lim["regs"] // regs_per_warp) // warps
    by_warps = lim["warps"] // warps
    by_smem = lim["smem"] // (shared + 1024) if shared else lim["blocks"]
    blocks = max(0, min(by_regs, by_warps, by_smem, lim["blocks"]))
    limiter = min((("registers", by_regs), ("warps", by_warps), ("shared memory", by_smem)), key=lambda x: x[1])[0]
    return {"blocks_per_sm": blocks, "warps_per_sm": blocks * warps, "fraction": blocks * warps / lim["warps"],
            "limited_by": limiter}


def compile_one(launch: Launch, arch: int) -> Dict[str, Any]:
    from triton.compiler import ASTSource

    name = launch.kernel.__name__
    row: Dict[str, Any] = {"kernel": name, "arch": f"sm_{arch}"}
    t0 = time.perf_counter()
    try:
        target, options, signature, constexprs, attrs = specialise(launch, arch)
        row["num_warps"], row["num_stages"] = options.num_warps, options.num_stages
        row["constexprs"] = {launch.kernel.arg_names[k[0]]: (v if isinstance(v, (int, float, str, bool)) else str(v))
                             for k, v in constexprs.items()}
        row["pointer_dtypes"] = sorted({v for v in signature.values() if isinstance(v, str) and v.startswith("*")})
        log = io.StringIO()
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(ASTSource(launch.kernel, signature, constexprs, attrs), target=target,
                                      options=options.__dict__)
        spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log.getvalue())
        if spill is None:
            raise RuntimeError(f"no ptxas -v report in the compile log: {log.getvalue()[-300:]!r}")
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(compiled.asm["cubin"])
            f.flush()
            usage = subprocess.run([_cuobjdump(), "--dump-resource-usage", f.name], capture_output=True,
                                   text=True, check=True).stdout
        m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", usage)
        if m is None:
            raise RuntimeError(f"cuobjdump printed no resource usage: {usage[-300:]!r}")
        regs, stack, static_shared, local = (int(x) for x in m.groups())
        ptx = compiled.asm["ptx"]
        shared = int(compiled.metadata.shared)
        spill_stores, spill_loads = int(spill.group(1)), int(spill.group(2))
        row.update(registers=regs, stack_bytes=stack, local_bytes=local, static_shared_bytes=static_shared,
                   shared_bytes=shared, spill_store_bytes=spill_stores, spill_load_bytes=spill_loads,
                   spills=spill_stores > 0 or spill_loads > 0,
                   tensor_core={k: len(re.findall(p, ptx)) for k, p in TC_PATTERNS.items()},
                   occupancy=occupancy(regs, options.num_warps, shared, arch), error=None)
    except Exception as exc:  # a compile error is a result, not a crash of the report
        row.update(error=f"{type(exc).__name__}: {str(exc)[:500]}")
    row["compile_s"] = round(time.perf_counter() - t0, 2)
    return row


_TASKS: List[Tuple[Launch, int]] = []


def _compile_task(i: int) -> Dict[str, Any]:
    launch, arch = _TASKS[i]
    return compile_one(launch, arch)


def build(archs: Sequence[int], subset: str, jobs: int) -> Dict[str, Any]:
    from pcr_fast.kernels.launch import MATMUL_KERNELS

    matmul_names = {f"_{k}_kernel" for k in MATMUL_KERNELS}
    tasks: Dict[str, Tuple[Launch, int, List[str]]] = {}
    for arch in archs:
        for launch in capture(arch, subset):
            key = f"{arch}:{launch_key(launch, arch)}"
            if key not in tasks:
                tasks[key] = (launch, arch, [])
            tasks[key][2].append(launch.scenario)
    _TASKS[:] = [(launch, arch) for launch, arch, _ in tasks.values()]
    t0 = time.perf_counter()
    if jobs > 1:
        with multiprocessing.get_context("fork").Pool(jobs) as pool:
            rows = pool.map(_compile_task, range(len(_TASKS)), chunksize=1)
    else:
        rows = [_compile_task(i) for i in range(len(_TASKS))]
    for row, (_, _, scen) in zip(rows, tasks.values()):
        row["scenarios"] = sorted(set(scen))
        row["dtype"] = sorted({s.rsplit("/", 1)[-1] for s in scen})
        row["matmul_kernel"] = row["kernel"] in matmul_names
        problems = []
        if row["error"]:
            problems.append("compile error")
        else:
            if row["spills"]:
                problems.append(f"spills ({row['spill_store_bytes']} B stores, {row['spill_load_bytes']} B loads; "
                                f"stack frame {row['stack_bytes']} B)")
            if row["matmul_kernel"] and not any(row["tensor_core"].values()):
                problems.append("matmul kernel without tensor-core instructions")
        row["problems"] = problems
    import harness

    env = harness.environment_record(torch.device("cpu"))
    env["note"] = "compiled ahead of time on this CPU machine (no GPU): registers and spills, not speed"
    return {"report": "gpu_compile", "subset": subset, "archs": [f"sm_{a}" for a in archs],
            "environment": env, "compile_wall_s": round(time.perf_counter() - t0, 1),
            "launches_compiled": len(rows), "failures": sum(bool(r["problems"]) for r in rows), "results": rows}


# --------------------------------------------------------------------------- output
def summary_rows(record: Dict[str, Any]) -> List[Dict[str, Any]]:
    """One row per (kernel, arch, dtype class): worst registers/stack/shared, TC counts, min occupancy."""
    groups: Dict[Tuple[str, str, str], List[Dict[str, Any]]] = {}
    for r in record["results"]:
        for dt in r["dtype"]:
            groups.setdefault((r["kernel"], r["arch"], dt), []).append(r)
    out = []
    for (kernel, arch, dt), rows in sorted(groups.items()):
        ok = [r for r in rows if not r["error"]]
        tc = {k: max((r["tensor_core"][k] for r in ok), default=0) for k in TC_PATTERNS}
        out.append({
            "kernel": kernel, "arch": arch, "dtype": dt, "variants": len(rows),
            "errors": len(rows) - len(ok),
            "registers_max": max((r["registers"] for r in ok), default=None),
            "stack_bytes_max": max((r["stack_bytes"] for r in ok), default=None),
            "spill_bytes_max": max((r["spill_store_bytes"] + r["spill_load_bytes"] for r in ok), default=None),
            "shared_kb_max": round(max((r["shared_bytes"] for r in ok), default=0) / 1024, 1),
            "tensor_core": ", ".join(f"{k} {v}" for k, v in tc.items() if v) or "-",
            "occupancy_min": min((r["occupancy"]["fraction"] for r in ok), default=None),
            "warps": sorted({r["num_warps"] for r in ok}),
        })
    return out


def markdown(record: Dict[str, Any]) -> str:
    env = record["environment"]
    lines = [f"# AOT compile report ({record['subset']} grid) — {env['timestamp_utc']}", "",
             f"triton {env['packages'].get('triton')}, torch {env['packages'].get('torch')}, commit "
             f"{env['git'].get('commit', '?')[:10]}{'-dirty' if env['git'].get('dirty') else ''}; "
             f"{record['launches_compiled']} distinct launches compiled for {', '.join(record['archs'])}, "
             f"{record['failures']} with problems.", "",
             "| kernel | arch | dtype | variants | regs (max) | spill B (max) | stack B (max) | smem KB (max) "
             "| tensor-core instr. | occupancy (min) | errors |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in summary_rows(record):
        occ = f"{100 * s['occupancy_min']:.0f}%" if s["occupancy_min"] is not None else "-"
        lines.append(f"| {s['kernel'].strip('_')} | {s['arch']} | {s['dtype']} | {s['variants']} | "
                     f"{s['registers_max']} | {s['spill_bytes_max']} | {s['stack_bytes_max']} | {s['shared_kb_max']} | "
                     f"{s['tensor_core']} | "
                     f"{occ} | {s['errors']} |")
    bad = [r for r in record["results"] if r["problems"]]
    if bad:
        lines += ["", "## Problems", ""]
        lines += [f"- {r['kernel']} {r['arch']} {r['dtype']}: {'; '.join(r['problems'])}"
                  + (f" — {r['error']}" if r["error"] else "") for r in bad]
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--subset", choices=("test", "full"), default="full")
    parser.add_argument("--archs", default="80,86,90,100", help="comma-separated: 80, 86, 90, 100")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--jobs", type=int, default=max(1, min(4, os.cpu_count() or 1)))
    parser.add_argument("--name", default=None, help="file stem (default gpu_compile_<date>)")
    args = parser.parse_args(argv)
    archs = [int(a) for a in args.archs.split(",") if a.strip()]
    for a in archs:
        if a not in ARCH_CAPS:
            parser.error(f"--archs must be drawn from {sorted(ARCH_CAPS)}, got {a}")
    record = build(archs, args.subset, args.jobs)
    stem = args.name or f"gpu_compile_{_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d')}"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"{stem}.json").write_text(json.dumps(record, indent=1) + "\n")
    md = markdown(record)
    (args.out_dir / f"{stem}.md").write_text(md)
    print(md)
    print(f"wrote {args.out_dir / (stem + '.json')} and .md")
    return 1 if record["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
