#!/usr/bin/env python
"""Benchmark of the patch augmentation (PCR's augmented view) at real model input sizes.

Methods:
    pcr_triton   ``patch_augment(..., backend="triton")``: one gather kernel (CUDA only)
    pcr_torch    ``patch_augment(..., backend="torch")``: unfold / gather / where
    kornia       ``RandomJigsaw(grid) -> RandomErasing(25% square)``: the closest
                 off-the-shelf pair (CUDA grid by default; a different transform: one erased
                 rectangle instead of patch-aligned masking; no rows layout)

Cases (GPU): LLaVA-1.5 images (64, 3, 336, 336), LLaVA-NeXT anyres tiles
(16, 5, 3, 336, 336), Qwen2-VL rows for 8 images of 448×448 (patch 14, temporal 2,
merge 2: 8·1024 rows × 1176). CPU: smaller versions, torch path only.

Rate: bytes = read once + write once = 2 × tensor bytes, over the median time, compared with
the bandwidth of a same-size ``dst.copy_(src)`` measured in the same run. fill="mean"
needs one extra read for the per-image means (a floor of 3× bytes); fill="zero" does not.
"""
from __future__ import annotations

import argparse
import gc
import logging
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the harness lives next to this file

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402
from torch import Tensor  # noqa: E402

import harness  # noqa: E402

logger = logging.getLogger("bench_patch_augment")

METHODS = ("pcr_triton", "pcr_torch", "kornia")
SHUFFLE, MASK_RATIO = True, 0.25


@dataclass(frozen=True)
class AugmentCase:
    name: str
    layout: str                       # "image" | "tiles" | "rows"
    shape: Tuple[int, ...]
    patch_size: int
    merge_size: int = 1
    grid_thw: Optional[Tuple[Tuple[int, int, int], ...]] = None   # rows layout only
    fill: str = "mean"
    dtype: str = "float32"

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def bytes(self) -> int:
        return self.numel * torch.empty((), dtype=getattr(torch, self.dtype)).element_size()


def qwen_rows_case(n_images: int, side: int, fill: str, *, patch: int = 14, temporal: int = 2,
                   merge: int = 2, channels: int = 3) -> AugmentCase:
    """Qwen2-VL ``pixel_values`` rows for ``n_images`` square images of ``side`` pixels."""
    if side % (patch * merge):
        raise ValueError(f"side must be a multiple of patch*merge={patch * merge}, got {side}")
    g = side // patch
    rows = n_images * g * g
    return AugmentCase(f"qwen2vl_rows_{n_images}x{side}", "rows", (rows, channels * temporal * patch * patch),
                       patch, merge, tuple((1, g, g) for _ in range(n_images)), fill)


def gpu_cases(quick: bool = False) -> List[AugmentCase]:
    fills = ("mean",) if quick else ("mean", "zero")
    out = []
    for fill in fills:
        out += [AugmentCase("llava_64x336", "image", (64, 3, 336, 336), 14, fill=fill),
                AugmentCase("anyres_16x5x336", "tiles", (16, 5, 3, 336, 336), 14, fill=fill),
                qwen_rows_case(8, 448, fill)]
    return out


def cpu_cases(quick: bool = False) -> List[AugmentCase]:
    fills = ("mean",) if quick else ("mean", "zero")
    out = []
    for fill in fills:
        out += [AugmentCase("image_8x224", "image", (8, 3, 224, 224), 14, fill=fill),
                AugmentCase("tiles_2x5x224", "tiles", (2, 5, 3, 224, 224), 14, fill=fill),
                qwen_rows_case(2, 224, fill)]
    return out


# --------------------------------------------------------------------------- methods
@dataclass
class Method:
    name: str
    kind: str
    computes: str
    available: bool = True
    reason: str = ""
    version: Optional[str] = None
    fn: Optional[Callable[..., Tensor]] = field(default=None, repr=False)
    generator: Optional[torch.Generator] = field(default=None, repr=False)  # the draws (pcr methods)

    def record(self) -> Dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "computes": self.computes,
                "available": self.available, "reason": self.reason, "version": self.version}


def _pcr_method(backend: str, device: torch.device, generator: torch.Generator) -> Method:
    name = f"pcr_{backend}"
    m = Method(name, "ours", f"patch_augment(backend={backend!r}): shuffle + {MASK_RATIO:.0%} mask, "
               "patch-aligned, every layout", version=harness._version("pcr_fast"))
    if backend == "triton" and device.type != "cuda":
        m.available, m.reason = False, "the Triton backend is timed on CUDA only (the CPU interpreter is a test tool)"
        return m
    try:
        from pcr_fast.augment import patch_augment
    except Exception as exc:
        m.available, m.reason = False, f"pcr_fast.augment not importable: {exc!r}"
        return m

    def fn(x: Tensor, case: AugmentCase, grid_thw: Optional[Tensor]) -> Tensor:
        return patch_augment(x, patch_size=case.patch_size, merge_size=case.merge_size, shuffle=SHUFFLE,
                             mask_ratio=MASK_RATIO, fill=case.fill, image_grid_thw=grid_thw,
                             generator=generator, backend=backend).pixel_values

    m.fn, m.generator = fn, generator
    return m


def _kornia_method(device: torch.device, allow_cpu: bool) -> Method:
    m = Method("kornia", "peer", "RandomJigsaw(grid of patches) then RandomErasing(one 25% square): "
               "not patch-aligned masking; (B, C, H, W) only (tiles flattened, rows unsupported)",
               version=harness._version("kornia"))
    if device.type != "cuda" and not allow_cpu:
        m.available, m.reason = False, "CPU run: torch path only (pass --methods ...,kornia to include it)"
        return m
    try:
        import kornia.augmentation as K
    except Exception as exc:
        m.available, m.reason = False, f"kornia not importable: {exc!r} (pip install kornia)"
        return m
    cache: Dict[Tuple[int, int], Any] = {}

    def fn(x: Tensor, case: AugmentCase, grid_thw: Optional[Tensor]) -> Tensor:
        if case.layout == "rows":
            raise NotImplementedError("kornia has no flattened-rows (Qwen2-VL) layout")
        h, w = x.shape[-2:]
        grid = (h // case.patch_size, w // case.patch_size)
        if grid not in cache:
            cache[grid] = (K.RandomJigsaw(grid=grid, p=1.0),
                           K.RandomErasing(scale=(MASK_RATIO, MASK_RATIO), ratio=(1.0, 1.0), value=0.0, p=1.0))
        jigsaw, erasing = cache[grid]
        flat = x.reshape(-1, *x.shape[-3:])
        return erasing(jigsaw(flat)).reshape(x.shape)

    m.fn = fn
    return m


def build_methods(device: torch.device, names: Sequence[str], generator: torch.Generator, *,
                  peers_on_cpu: bool = False) -> Dict[str, Method]:
    """``peers_on_cpu``: also time kornia on a CPU run (by default a CPU run is the torch path only)."""
    out = {}
    for name in names:
        if name == "pcr_triton":
            out[name] = _pcr_method("triton", device, generator)
        elif name == "pcr_torch":
            out[name] = _pcr_method("torch", device, generator)
        elif name == "kornia":
            out[name] = _kornia_method(device, allow_cpu=peers_on_cpu)
        else:
            raise ValueError(f"methods must be drawn from {METHODS}, got {name!r}")
    return out


# --------------------------------------------------------------------------- one case
def make_input(case: AugmentCase, device: torch.device, generator: torch.Generator) -> Tensor:
    x = torch.rand(case.shape, device=device, generator=generator).to(getattr(torch, case.dtype))
    harness.assert_not_degenerate("pixel_values", x)
    return x


def run_case(case: AugmentCase, methods: Dict[str, Method], device: torch.device, *, quick: bool,
             seed: int, measure_memory: bool = True) -> List[Dict[str, Any]]:
    gen = torch.Generator(device=device).manual_seed(seed)
    budget = int(torch.cuda.mem_get_info(device)[0] * 0.15) if device.type == "cuda" else 1 << 30
    k = harness.rotation_count(case.bytes, device, memory_budget=budget)
    inputs = harness.Rotator([make_input(case, device, gen) for _ in range(k)])
    grid_thw = (torch.tensor(case.grid_thw, dtype=torch.int64, device=device) if case.grid_thw else None)
    copy = harness.measure_copy_bandwidth(device, case.bytes)
    moved = 2 * case.bytes
    rows = []
    reference: Optional[Tuple[str, Tensor]] = None  # (method, output) of the first pcr backend
    for name, method in methods.items():
        row: Dict[str, Any] = {"method": name, **{k2: v for k2, v in asdict(case).items() if k2 != "grid_thw"},
                               "n_images": len(case.grid_thw) if case.grid_thw else None,
                               "bytes_moved": moved, "input_sets_rotated": k,
                               "copy_bytes_per_s": copy["bytes_per_s"]}
        if not method.available:
            rows.append({**row, "status": "skipped", "reason": method.reason})
            continue
        fn = method.fn
        try:
            x0 = inputs.sets[0]
            if method.generator is not None:
                # Warm-up that is also a check: the same seed must give the same output on
                # either backend (patch_augment's documented contract).
                saved = method.generator.get_state()
                method.generator.manual_seed(seed + 1)
                out = fn(x0, case, grid_thw)
                method.generator.set_state(saved)
                if reference is None:
                    reference, row["check"] = (name, out), "reference"
                else:
                    same = torch.equal(out, reference[1])
                    row["check"] = (f"ok (identical to {reference[0]})" if same
                                    else f"MISMATCH vs {reference[0]} with the same seed")
                    if not same:
                        logger.warning("%s on %s: output differs from the other backend", name, case.name)
                del out
            else:
                fn(x0, case, grid_thw)  # warm-up
                row["check"] = "not comparable (different transform)"
            t = harness.time_fn(lambda: fn(inputs.next(), case, grid_thw), device, quick=quick, warmed_up=True)
            row["timings"] = {"augment": t.to_dict()}
            row["bytes_per_s"] = moved / (t.median_ms * 1e-3)
            row["fraction_of_copy_bandwidth"] = row["bytes_per_s"] / copy["bytes_per_s"]
            if measure_memory:
                row["memory"] = harness.peak_memory(lambda: fn(x0, case, grid_thw), device,
                                                    resident_bytes=case.bytes)
            row["status"] = "ok"
        except NotImplementedError as exc:
            row.update(status="skipped", reason=str(exc))
        except Exception as exc:  # one failing method must not end the run
            status = "oom" if "out of memory" in str(exc).lower() else "error"
            logger.warning("%s on %s: %s: %r", name, case.name, status, exc)
            row.update(status=status, reason=f"{type(exc).__name__}: {str(exc)[:300]}")
            row.pop("timings", None)
        finally:
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- run + output
def run_benchmark(cases: Sequence[AugmentCase], device: torch.device, *, method_names: Sequence[str] = METHODS,
                  quick: bool = False, seed: int = 0, note: str = "", measure_memory: bool = True,
                  progress: bool = True, peers_on_cpu: bool = False) -> Dict[str, Any]:
    """Run every case × method and return the JSON-ready record."""
    device = torch.device(device)
    env = harness.environment_record(device, extra_packages=("kornia",))
    gen = torch.Generator(device=device).manual_seed(seed)
    methods = build_methods(device, method_names, gen, peers_on_cpu=peers_on_cpu)
    results: List[Dict[str, Any]] = []
    it = tqdm(cases, desc="patch augment cases", disable=not progress)  # tqdm is a hard dependency
    t_start = time.perf_counter()
    for case in it:
        results.extend(run_case(case, methods, device, quick=quick, seed=seed, measure_memory=measure_memory))
    wall_s = time.perf_counter() - t_start
    record = {
        "benchmark": "patch_augment",
        "schema_version": harness.SCHEMA_VERSION,
        "environment": env,
        "settings": {"quick": quick, "seed": seed, "shuffle": SHUFFLE, "mask_ratio": MASK_RATIO,
                     "rate": "bytes_moved = 2 x tensor bytes (read once + write once) / median time; "
                             "roofline = same-size dst.copy_(src) measured in the same run",
                     "memory": "peak during one call over the input; extra_bytes = peak - output bytes",
                     "note": note, "run_wall_s": round(wall_s, 1)},
        "methods": {n: m.record() for n, m in methods.items()},
        "results": results,
    }
    return harness.finish_record(record)


TABLE_COLUMNS = ["case", "shape", "fill", "method", "median ms", "p20-p80", "GB/s", "% copy", "copy GB/s",
                 "extra mem"]


def table_rows(record: Dict[str, Any]) -> List[List[str]]:
    rows = []
    for r in record["results"]:
        head = [r["name"], "x".join(map(str, r["shape"])), r["fill"], r["method"]]
        if r["status"] != "ok":
            rows.append(head + [r["status"], "", "", "", "", r["reason"][:40]])
            continue
        t = r["timings"]["augment"]
        mem = harness.fmt_bytes(r["memory"]["extra_bytes"]) if "memory" in r else "n/a"
        check = r.get("check", "")
        rows.append(head + [f"{t['median_ms']:.2f}", f"{t['p20_ms']:.2f}-{t['p80_ms']:.2f}",
                            f"{r['bytes_per_s'] / 1e9:.2f}", f"{100 * r['fraction_of_copy_bandwidth']:.1f}%",
                            f"{r['copy_bytes_per_s'] / 1e9:.2f}",
                            mem + (" [" + check + "]" if check.startswith("MISMATCH") else "")])
    return rows


def plot_record(record: Dict[str, Any], path: Path) -> Path:
    """Grouped bars of GB/s per case and method, with each case's copy bandwidth as a marker."""
    cases = []
    for r in record["results"]:
        key = (r["name"], r["fill"])
        if key not in cases:
            cases.append(key)
    series: Dict[str, List[Optional[float]]] = {}
    errors: Dict[str, List[Optional[Tuple[float, float]]]] = {}
    for method in record["methods"]:
        vals, errs = [], []
        for key in cases:
            row = next((r for r in record["results"] if (r["name"], r["fill"]) == key and r["method"] == method
                        and r["status"] == "ok"), None)
            if row is None:
                vals.append(None)
                errs.append(None)
                continue
            t = row["timings"]["augment"]
            vals.append(row["bytes_moved"] / (t["median_ms"] * 1e-3) / 1e9)
            errs.append((row["bytes_moved"] / (t["p80_ms"] * 1e-3) / 1e9, row["bytes_moved"] / (t["p20_ms"] * 1e-3) / 1e9))
        if any(v is not None for v in vals):
            series[method] = vals
            errors[method] = errs
    copy_vals = []
    for key in cases:
        row = next(r for r in record["results"] if (r["name"], r["fill"]) == key)
        copy_vals.append(row["copy_bytes_per_s"] / 1e9)
    series["copy_ (roofline)"] = copy_vals
    env = record["environment"]
    title = (f"patch augment on {env['device']['name']} ({env['torch_num_threads']} threads), torch "
             f"{env['packages']['torch']}, commit {harness.commit_label(env)}; bars p20-p80")
    return harness.plot_bars(path, [f"{n}\nfill={f}" for n, f in cases], series, ylabel="GB/s (2 x bytes / time)",
                             title=title, errors=errors)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--grid", choices=("auto", "cpu", "gpu"), default="auto")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default=None)
    parser.add_argument("--methods", default=None, help=f"comma-separated subset of {','.join(METHODS)}")
    parser.add_argument("--out-dir", type=Path, default=harness.RESULTS_DIR)
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--note", default="")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    grid = args.grid if args.grid != "auto" else ("gpu" if device.type == "cuda" else "cpu")
    cases = gpu_cases(args.quick) if grid == "gpu" else cpu_cases(args.quick)
    names = METHODS if args.methods is None else tuple(m.strip() for m in args.methods.split(",") if m.strip())
    record = run_benchmark(cases, device, method_names=names, quick=args.quick, seed=args.seed, note=args.note,
                           peers_on_cpu=args.methods is not None)
    record["settings"]["grid"] = grid
    for name, info in record["methods"].items():
        if not info["available"]:
            print(f"skipped {name}: {info['reason']}")
    harness.print_table("patch augment: median ms, GB/s (2 x bytes) against same-size copy_",
                        TABLE_COLUMNS, table_rows(record))
    json_path = harness.write_json(record, harness.result_path("patch_augment", device, args.out_dir))
    print(f"wrote {json_path}")
    if not args.no_plot:
        print(f"wrote {plot_record(record, json_path.with_suffix('.png'))}")
    bad = [r for r in record["results"] if r["status"] == "error" and record["methods"][r["method"]]["kind"] == "ours"]
    bad += [r for r in record["results"] if str(r.get("check", "")).startswith("MISMATCH")]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
