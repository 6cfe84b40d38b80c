"""Shared pieces of the pcr_fast benchmarks: environment record, timers, peak memory,
device roofline probes (matmul rate, copy bandwidth), JSON records and plots.

Why a harness: every benchmark must time the same way (warm-up, device events on CUDA,
cold caches, median with p20/p80), must say on which machine/commit a number was taken, and
must write a record that can be re-plotted and compared later. From pcr_fast it takes only
the environment record helpers (pcr_fast.environment), so it can measure anything.

Timing
    CUDA: ``triton.testing.do_bench`` (warm-up, CUDA events, an L2 flush before every call)
    with quantiles (0.5, 0.2, 0.8); on top, callers rotate through several input sets when
    one set would fit in L2 (:func:`rotation_count`).
    CPU: a ``time.perf_counter`` loop with warm-up, at least ``min_reps`` samples and a time
    budget; the same median/p20/p80 statistics.
Peak memory
    Meta tensors (any machine, real shapes): :class:`LiveBytes` counts the storage of every
    tensor an op returns fresh (no alias in its schema) until that storage is freed; with
    :func:`no_triton_launches` the launchers still allocate exactly what they would on a GPU.
    CUDA: ``torch.cuda.max_memory_allocated`` minus the allocation just before the call.
    CPU: the PyTorch profiler's allocation events (``profile_memory=True``): every CPU tensor
    allocation/free made by torch during the call is an event with its size; the maximum of
    their running sum is the peak of tensor memory over what existed before the call (the
    inputs are not counted). It does not see memory outside the torch allocator (e.g. stack
    buffers of inductor-generated C++ kernels).
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import re
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence

import torch

QUANTILES = (0.5, 0.2, 0.8)
RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parent.parent
SCHEMA_VERSION = 1


# --------------------------------------------------------------------------- environment
from pcr_fast.environment import cpu_name as _cpu_name  # noqa: E402  (shared with the demo's records)
from pcr_fast.environment import git_commit as _git_commit  # noqa: E402
from pcr_fast.environment import package_version as _version  # noqa: E402


def git_commit(repo: Path = REPO_ROOT) -> Dict[str, Any]:
    """``{"commit": sha or "uncommitted", "dirty": bool or None}`` of the repository."""
    return _git_commit(repo)


def _nvidia_driver() -> Optional[str]:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


def commit_label(env: Mapping[str, Any]) -> str:
    """Short commit for figure titles: ``abc1234567`` (+ ``-dirty`` for uncommitted changes)."""
    git = env.get("git", {})
    return str(git.get("commit", "?"))[:10] + ("-dirty" if git.get("dirty") else "")


def load_average() -> Optional[List[float]]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover - not on Linux
        return None


def environment_record(device: torch.device, extra_packages: Iterable[str] = ()) -> Dict[str, Any]:
    """Where and with what a measurement was taken (device, driver, versions, commit, time)."""
    device = torch.device(device)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        dev = {"type": "cuda", "name": torch.cuda.get_device_name(device),
               "driver": _nvidia_driver(), "cuda_runtime": torch.version.cuda,
               "memory_bytes": props.total_memory,
               "l2_cache_bytes": getattr(props, "L2_cache_size", None),
               "sm_count": props.multi_processor_count}
    else:
        dev = {"type": device.type, "name": _cpu_name(), "driver": "n/a (CPU)",
               "llc_bytes": cpu_cache_bytes()}
    packages = {name: _version(name) for name in ("torch", "triton", "transformers", "numpy",
                                                   "pcr_fast", *extra_packages)}
    return {
        "device": dev,
        "packages": packages,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git": git_commit(),
        "timestamp_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(),
        "torch_num_threads": torch.get_num_threads(),
        "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"),
        "triton_interpret_env": os.environ.get("TRITON_INTERPRET"),
        "load_average_start": load_average(),
    }


def device_slug(device: torch.device) -> str:
    """Short file-name-safe device name: ``cpu`` or e.g. ``nvidia-h100-80gb-hbm3``."""
    device = torch.device(device)
    if device.type != "cuda":
        return device.type
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


def cpu_cache_bytes() -> int:
    """Size of the largest CPU cache level (LLC), 32 MiB if it cannot be read."""
    best = 0
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    for idx in base.glob("index*"):
        try:
            text = (idx / "size").read_text().strip()
        except OSError:
            continue
        m = re.fullmatch(r"(\d+)([KMG]?)", text)
        if m:
            best = max(best, int(m.group(1)) * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[m.group(2)])
    return best or 32 << 20


def cache_bytes(device: torch.device) -> int:
    """The cache a benchmark's inputs must not fit in: GPU L2 or the CPU's LLC."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20))
    return cpu_cache_bytes()


def rotation_count(bytes_per_set: int, device: torch.device, *, max_sets: int = 32,
                   memory_budget: Optional[int] = None) -> int:
    """How many distinct input sets to cycle through so that together they exceed twice the
    cache (so a timed call never finds its inputs warm from the previous call)."""
    if bytes_per_set <= 0:
        raise ValueError(f"bytes_per_set must be positive, got {bytes_per_set}")
    want = max(1, math.ceil(2 * cache_bytes(device) / bytes_per_set))
    if memory_budget is not None:
        want = min(want, max(1, memory_budget // bytes_per_set))
    return int(min(want, max_sets))


def assert_not_degenerate(name: str, tensor: torch.Tensor) -> None:
    """Refuse to time on all-zero (or non-finite) inputs: they hide data-dependent costs."""
    if tensor.is_floating_point():
        if tensor.numel() and not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"{name} has non-finite values; benchmarks need real-valued inputs")
        if tensor.numel() > 1 and bool((tensor == 0).all()):
            raise ValueError(f"{name} is all zeros; benchmarks must not time on zeros")
    elif tensor.numel() > 1 and bool((tensor == tensor.reshape(-1)[0]).all()):
        raise ValueError(f"{name} is constant; benchmarks need varied integer inputs")


# --------------------------------------------------------------------------- timing
@dataclass
class Timing:
    """Median and 20th/80th percentile of a timed call, in milliseconds."""

    median_ms: float
    p20_ms: float
    p80_ms: float
    samples: Optional[int]
    timer: str

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def _quantile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default) of an already sorted sequence."""
    pos = q * (len(sorted_values) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def summarize_samples(samples_s: Sequence[float], timer: str = "perf_counter") -> Timing:
    """Timing from samples in seconds."""
    if not samples_s:
        raise ValueError("samples_s must hold at least one timing")
    ordered = sorted(float(s) * 1e3 for s in samples_s)
    return Timing(*(_quantile(ordered, q) for q in QUANTILES), samples=len(ordered), timer=timer)


def _reset_grads(tensors: Optional[Iterable[torch.Tensor]]) -> None:
    for t in tensors or ():
        t.grad = None


def time_cpu(fn: Callable[[], Any], *, grad_to_none: Optional[Sequence[torch.Tensor]] = None,
             warmup: int = 1, min_reps: int = 3, max_reps: int = 100,
             budget_s: float = 1.0) -> Timing:
    """``time.perf_counter`` loop: ``warmup`` untimed calls, then at least ``min_reps`` timed
    calls and more until ``budget_s`` seconds of timed calls or ``max_reps``."""
    if min_reps < 1:
        raise ValueError(f"min_reps must be >= 1, got {min_reps}")
    for _ in range(warmup):
        _reset_grads(grad_to_none)
        fn()
    samples: List[float] = []
    spent = 0.0
    while len(samples) < min_reps or (spent < budget_s and len(samples) < max_reps):
        _reset_grads(grad_to_none)
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        samples.append(dt)
        spent += dt
    return summarize_samples(samples, "perf_counter")


def time_cuda(fn: Callable[[], Any], *, grad_to_none: Optional[Sequence[torch.Tensor]] = None,
              warmup_ms: int = 25, rep_ms: int = 100) -> Timing:
    """``triton.testing.do_bench``: CUDA events, warm-up, L2 flush before each call."""
    from triton.testing import do_bench

    med, p20, p80 = do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grad_to_none,
                             quantiles=list(QUANTILES))
    return Timing(float(med), float(p20), float(p80), samples=None, timer="triton.testing.do_bench")


def time_fn(fn: Callable[[], Any], device: torch.device, *,
            grad_to_none: Optional[Sequence[torch.Tensor]] = None, quick: bool = False,
            warmed_up: bool = False) -> Timing:
    """Time ``fn`` the right way for ``device`` (see module docstring). ``warmed_up``: the
    caller already ran ``fn`` (skips the CPU warm-up call; do_bench always warms up)."""
    if torch.device(device).type == "cuda":
        return time_cuda(fn, grad_to_none=grad_to_none, warmup_ms=10 if quick else 25,
                         rep_ms=40 if quick else 100)
    return time_cpu(fn, grad_to_none=grad_to_none, warmup=0 if warmed_up else 1,
                    min_reps=2 if quick else 3, budget_s=0.3 if quick else 0.5)


def time_with_setup(setup: Callable[[], Any], fn: Callable[[Any], Any], device: torch.device, *,
                    grad_to_none: Optional[Sequence[torch.Tensor]] = None, quick: bool = False,
                    warmed_up: bool = False) -> Timing:
    """Time ``fn(setup())`` excluding ``setup`` (e.g. the backward of a freshly built graph).

    ``do_bench`` cannot exclude a per-call setup, and ``backward(retain_graph=True)`` on one
    graph is not what training does (torch.compile's donated buffers even forbid it), so:
    CPU: the perf_counter loop of :func:`time_cpu` with the clock started after ``setup``.
    CUDA: the same procedure as do_bench (warm-up, L2 flush by zeroing a 256 MiB buffer,
    CUDA events around each call) with the events placed after ``setup``'s kernels.
    """
    device = torch.device(device)
    if device.type != "cuda":
        state = None
        samples: List[float] = []
        if not warmed_up:
            _reset_grads(grad_to_none)
            fn(setup())
        spent, min_reps, budget = 0.0, (2 if quick else 3), (0.3 if quick else 0.5)
        while len(samples) < min_reps or (spent < budget and len(samples) < 100):
            _reset_grads(grad_to_none)
            state = setup()
            t0 = time.perf_counter()
            fn(state)
            dt = time.perf_counter() - t0
            del state
            samples.append(dt)
            spent += dt
        return summarize_samples(samples, "perf_counter (setup excluded)")
    warmup_ms, rep_ms = (10, 40) if quick else (25, 100)
    flush = torch.empty(256 << 20, dtype=torch.int8, device=device)

    def timed_calls(count: int) -> List[float]:
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(count)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(count)]
        for i in range(count):
            _reset_grads(grad_to_none)
            state = setup()
            flush.zero_()
            starts[i].record()
            fn(state)
            ends[i].record()
            del state
        torch.cuda.synchronize(device)
        return [s.elapsed_time(e) for s, e in zip(starts, ends)]

    timed_calls(1)  # first call: compilation, autotuning
    estimate = max(sum(timed_calls(5)) / 5, 1e-3)
    timed_calls(max(1, int(warmup_ms / estimate)))
    samples_ms = timed_calls(min(1000, max(5, int(rep_ms / estimate))))
    return summarize_samples([t * 1e-3 for t in samples_ms], "cuda events, setup excluded (do_bench procedure)")


def time_training_step(forward: Callable[[], Any], backward: Callable[[Any], Any], device: torch.device, *,
                       grad_to_none: Optional[Sequence[torch.Tensor]] = None, quick: bool = False,
                       warmed_up: bool = False) -> Dict[str, Timing]:
    """Timings of ``forward``, ``backward(forward())`` excluding the forward, and both.

    CUDA: forward and forward+backward with do_bench, backward with :func:`time_with_setup`.
    CPU (synchronous, so the clock can be read between the two calls): one perf_counter
    loop whose samples give all three (each call is timed in pieces, ``both`` = their sum).
    """
    device = torch.device(device)
    if device.type == "cuda":
        return {"forward": time_fn(forward, device, grad_to_none=grad_to_none, quick=quick),
                "backward": time_with_setup(forward, backward, device, grad_to_none=grad_to_none, quick=quick),
                "forward_backward": time_fn(lambda: backward(forward()), device,
                                            grad_to_none=grad_to_none, quick=quick)}
    if not warmed_up:
        _reset_grads(grad_to_none)
        backward(forward())
    fwd: List[float] = []
    bwd: List[float] = []
    min_reps, budget = (2, 0.3) if quick else (3, 0.5)
    spent = 0.0
    while len(fwd) < min_reps or (spent < budget and len(fwd) < 100):
        _reset_grads(grad_to_none)
        t0 = time.perf_counter()
        out = forward()
        t1 = time.perf_counter()
        backward(out)
        t2 = time.perf_counter()
        del out
        fwd.append(t1 - t0)
        bwd.append(t2 - t1)
        spent += t2 - t0
    _reset_grads(grad_to_none)
    return {"forward": summarize_samples(fwd, "perf_counter"),
            "backward": summarize_samples(bwd, "perf_counter"),
            "forward_backward": summarize_samples([a + b for a, b in zip(fwd, bwd)], "perf_counter")}


class Rotator:
    """Cycles through prepared input sets; ``next()`` returns the next one."""

    def __init__(self, sets: Sequence[Any]):
        if not sets:
            raise ValueError("sets must not be empty")
        self.sets = list(sets)
        self._i = -1

    def next(self) -> Any:
        self._i = (self._i + 1) % len(self.sets)
        return self.sets[self._i]

    def __len__(self) -> int:
        return len(self.sets)


# --------------------------------------------------------------------------- memory
def _profiler_peak_bytes(fn: Callable[[], Any]) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path, encoding="utf-8") as f:
            events = json.load(f).get("traceEvents", [])
    # Each "[memory]" event carries the bytes allocated (> 0) or freed (< 0). The event's
    # "Total Allocated" field is a process-wide counter that also keeps allocations made in
    # earlier profiling sessions and freed outside them, so the running sum of "Bytes" from
    # the start of this session is used instead.
    mem = [ev for ev in events if ev.get("name") == "[memory]"
           and ev.get("args", {}).get("Device Type", 0) == 0 and "Bytes" in ev.get("args", {})]
    mem.sort(key=lambda ev: float(ev.get("ts", 0.0)))
    running = peak = 0
    for ev in mem:
        running += int(ev["args"]["Bytes"])
        peak = max(peak, running)
    return peak


class LiveBytes:
    """Context manager counting live tensor bytes allocated inside it (``.live``, ``.peak``).

    A ``TorchDispatchMode``: every op output whose schema return has no alias annotation is
    a fresh storage, added when created and subtracted when its storage is freed (a weakref
    finalizer). Works on meta tensors, so a production shape is accounted in seconds.
    """

    def __init__(self) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                outs = out if isinstance(out, (tuple, list)) else (out,)
                for ret, o in zip(func._schema.returns, outs):
                    if ret.alias_info is None:
                        for t in (o if isinstance(o, (tuple, list)) else (o,)):
                            if isinstance(t, torch.Tensor):
                                counter._add(t)
                return out

        self._mode = _Mode()
        self.live = 0
        self.peak = 0

    def _add(self, t: torch.Tensor) -> None:
        import weakref

        storage = t.untyped_storage()
        n = storage.nbytes()
        self.live += n
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, n)

    def _free(self, n: int) -> None:
        self.live -= n

    def __enter__(self) -> "LiveBytes":
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)


def no_triton_launches():
    """Context manager: Triton kernel launches do nothing (compiled or interpreted kernels);
    their Python launchers still run and allocate. Yields the list of launched kernel names."""
    import contextlib

    from triton.runtime.jit import JITFunction

    classes = [JITFunction]
    try:
        from triton.runtime.interpreter import InterpretedFunction

        classes.append(InterpretedFunction)
    except ImportError:  # pragma: no cover - depends on the triton version
        pass

    @contextlib.contextmanager
    def manager():
        launched: List[str] = []
        saved = [(cls, cls.run) for cls in classes]

        def fake_run(self, *args, grid, warmup, **kwargs):
            launched.append(getattr(self, "__name__", type(self).__name__))
            return None

        for cls in classes:
            cls.run = fake_run
        try:
            yield launched
        finally:
            for cls, run in saved:
                cls.run = run

    return manager()


def peak_memory(fn: Callable[[], Any], device: torch.device, *,
                grad_to_none: Optional[Sequence[torch.Tensor]] = None,
                resident_bytes: int = 0) -> Dict[str, Any]:
    """Peak memory allocated during one call of ``fn`` beyond what existed before it.

    ``resident_bytes`` are bytes that must exist after the call anyway (e.g. the gradients):
    ``extra_bytes`` = peak − resident_bytes is the temporary memory the method needs.
    """
    device = torch.device(device)
    _reset_grads(grad_to_none)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        how = "torch.cuda.max_memory_allocated - memory_allocated before the call"
    else:
        peak = _profiler_peak_bytes(fn)
        how = "torch.profiler(profile_memory=True): maximum running sum of allocation events"
    _reset_grads(grad_to_none)
    return {"peak_bytes": int(peak), "resident_bytes": int(resident_bytes),
            "extra_bytes": int(peak - resident_bytes), "method": how}


# --------------------------------------------------------------------------- device probes
def measure_matmul_rate(device: torch.device, dtype: Optional[torch.dtype] = None,
                        size: Optional[int] = None) -> Dict[str, Any]:
    """Achieved dense matmul rate (FLOP/s) of a square ``size``³ matmul on ``device``.

    The roofline for the loss: bf16 on CUDA, float32 on CPU (CPU bf16 matmul is not what a
    CPU run of the benchmark uses)."""
    device = torch.device(device)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if size is None:
        size = 8192 if device.type == "cuda" else 2048
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, dtype=dtype, generator=gen)
    b = torch.randn(size, size, device=device, dtype=dtype, generator=gen)
    out = torch.empty(size, size, device=device, dtype=dtype)
    if device.type == "cuda":
        t = time_cuda(lambda: torch.matmul(a, b, out=out))
    else:
        t = time_cpu(lambda: torch.matmul(a, b, out=out), warmup=1, min_reps=3, budget_s=0.5)
    flops = 2.0 * size ** 3
    return {"dtype": str(dtype).replace("torch.", ""), "m=n=k": size, "flops": flops,
            "timing": t.to_dict(), "flops_per_s": flops / (t.median_ms * 1e-3)}


def measure_copy_bandwidth(device: torch.device, nbytes: int, *, memory_budget: int = 1 << 30) -> Dict[str, Any]:
    """Achieved bytes/s of ``dst.copy_(src)`` on ``nbytes``-sized tensors (read + write),
    rotating through enough (src, dst) pairs that they never sit in the cache."""
    device = torch.device(device)
    n = max(1, nbytes // 4)
    k = rotation_count(2 * n * 4, device, max_sets=32, memory_budget=memory_budget)
    pairs = Rotator([(torch.rand(n, device=device), torch.empty(n, device=device)) for _ in range(k)])

    def copy() -> None:
        src, dst = pairs.next()
        dst.copy_(src)

    t = time_fn(copy, device)
    moved = 2 * n * 4
    return {"bytes_moved": moved, "pairs_rotated": k, "timing": t.to_dict(),
            "bytes_per_s": moved / (t.median_ms * 1e-3)}


# --------------------------------------------------------------------------- records
def finish_record(record: Dict[str, Any]) -> Dict[str, Any]:
    """Stamp the end-of-run load average and check the record's shape."""
    record.setdefault("environment", {})["load_average_end"] = load_average()
    validate_record(record)
    return record


_REQUIRED_TOP = ("benchmark", "schema_version", "environment", "settings", "methods", "results")
_REQUIRED_ENV = ("device", "packages", "git", "timestamp_utc", "torch_num_threads")
_STATUSES = ("ok", "skipped", "oom", "error")


def validate_record(record: Mapping[str, Any]) -> None:
    """Raise ValueError if ``record`` is not a well-formed benchmark record."""
    for key in _REQUIRED_TOP:
        if key not in record:
            raise ValueError(f"record is missing {key!r}")
    for key in _REQUIRED_ENV:
        if key not in record["environment"]:
            raise ValueError(f"record['environment'] is missing {key!r}")
    commit = record["environment"]["git"].get("commit")
    if not (commit == "uncommitted" or re.fullmatch(r"[0-9a-f]{40}", str(commit))):
        raise ValueError(f"environment.git.commit must be a sha or 'uncommitted', got {commit!r}")
    for name, info in record["methods"].items():
        if "available" not in info:
            raise ValueError(f"methods[{name!r}] is missing 'available'")
        if not info["available"] and not info.get("reason"):
            raise ValueError(f"methods[{name!r}] is unavailable without a reason")
    for i, row in enumerate(record["results"]):
        if row.get("method") not in record["methods"]:
            raise ValueError(f"results[{i}].method {row.get('method')!r} is not in methods")
        status = row.get("status")
        if status not in _STATUSES:
            raise ValueError(f"results[{i}].status must be one of {_STATUSES}, got {status!r}")
        if status != "ok":
            if not row.get("reason"):
                raise ValueError(f"results[{i}] has status {status!r} without a reason")
            continue
        timings = row.get("timings") or {}
        if not timings:
            raise ValueError(f"results[{i}] is ok but has no timings")
        for mode, t in timings.items():
            vals = [t.get("median_ms"), t.get("p20_ms"), t.get("p80_ms")]
            if not all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in vals):
                raise ValueError(f"results[{i}].timings[{mode!r}] must hold positive finite times, got {t}")
            if not (t["p20_ms"] <= t["median_ms"] <= t["p80_ms"]):
                raise ValueError(f"results[{i}].timings[{mode!r}]: need p20 <= median <= p80, got {t}")


def result_path(name: str, device: torch.device, out_dir: Optional[Path] = None,
                suffix: str = ".json") -> Path:
    """``<out_dir>/<name>_<device>_<YYYY-MM-DD><suffix>``."""
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")
    return Path(out_dir or RESULTS_DIR) / f"{name}_{device_slug(device)}_{date}{suffix}"


def write_json(record: Mapping[str, Any], path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1, sort_keys=False, allow_nan=False)
        f.write("\n")
    return path


# --------------------------------------------------------------------------- presentation
def fmt_bytes(n: Optional[float]) -> str:
    if n is None:
        return "n/a"
    sign = "-" if n < 0 else ""
    n = abs(float(n))
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{sign}{n:.0f} {unit}" if unit == "B" else f"{sign}{n:.1f} {unit}"
        n /= 1024
    return f"{sign}{n:.1f} TiB"  # pragma: no cover


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Print a table (rich when installed, plain text otherwise); return the plain text."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in cells)) if cells else len(str(h))
              for i, h in enumerate(columns)]
    lines = [title, "  ".join(str(h).rjust(w) for h, w in zip(columns, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    plain = "\n".join(lines)
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(plain)
        return plain
    table = Table(title=title)
    for h in columns:
        table.add_column(str(h), justify="right")
    for r in cells:
        table.add_row(*r)
    Console(width=max(120, sum(widths) + 3 * len(widths) + 4)).print(table)
    return plain


def plot_panels(path: Path, panels: Sequence[Mapping[str, Any]], *, suptitle: str = "",
                ncols: int = 2) -> Path:
    """Write a PNG of line panels.

    Each panel: ``{"title", "xlabel", "ylabel", "logx", "logy", "series": {label:
    {"x": [...], "y": [...], "lo": [...]|None, "hi": [...]|None, "style": "-o"}},
    "hlines": {label: y}}``. ``lo``/``hi`` draw an error band (e.g. p20/p80).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(1, len(panels))
    ncols = min(ncols, n)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 3.8 * nrows), squeeze=False)
    for ax, panel in zip(axes.flat, panels):
        for label, s in panel.get("series", {}).items():
            if not s["x"]:
                continue
            line, = ax.plot(s["x"], s["y"], s.get("style", "-o"), label=label, markersize=4)
            if s.get("lo") is not None and s.get("hi") is not None:
                ax.fill_between(s["x"], s["lo"], s["hi"], alpha=0.2, color=line.get_color())
        for label, y in panel.get("hlines", {}).items():
            ax.axhline(y, linestyle="--", color="gray", linewidth=1)
            ax.annotate(label, xy=(0.01, y), xycoords=("axes fraction", "data"), fontsize=7,
                        color="gray", va="bottom")
        if panel.get("logx"):
            ax.set_xscale("log", base=2)
        if panel.get("logy"):
            ax.set_yscale("log")
        ax.set_title(panel.get("title", ""), fontsize=9)
        ax.set_xlabel(panel.get("xlabel", ""))
        ax.set_ylabel(panel.get("ylabel", ""))
        ax.grid(True, alpha=0.3)
        if panel.get("series"):
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    return _save_figure(fig, path)


def _save_figure(fig, path) -> Path:
    """Lay out, write (creating the folder) and close a matplotlib figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_bars(path: Path, groups: Sequence[str], series: Mapping[str, Sequence[Optional[float]]], *,
              ylabel: str, title: str = "", hlines: Optional[Mapping[str, float]] = None,
              errors: Optional[Mapping[str, Sequence[Optional[Sequence[float]]]]] = None) -> Path:
    """Grouped bar chart (one group per case, one bar per series); ``None`` bars are left out.
    ``errors[label][i] = (lo, hi)`` draws an asymmetric error bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6.0, 1.9 * len(groups) + 2), 4.2))
    width = 0.8 / max(1, len(series))
    for j, (label, values) in enumerate(series.items()):
        xs = [i + (j - (len(series) - 1) / 2) * width for i, v in enumerate(values) if v is not None]
        ys = [v for v in values if v is not None]
        yerr = None
        if errors and label in errors:
            pairs = [e for e, v in zip(errors[label], values) if v is not None]
            if all(p is not None for p in pairs) and pairs:
                yerr = [[y - p[0] for y, p in zip(ys, pairs)], [p[1] - y for y, p in zip(ys, pairs)]]
        ax.bar(xs, ys, width=width, label=label, yerr=yerr, capsize=2)
    for label, y in (hlines or {}).items():
        ax.axhline(y, linestyle="--", color="gray", linewidth=1)
        ax.annotate(label, xy=(0.01, y), xycoords=("axes fraction", "data"), fontsize=7,
                    color="gray", va="bottom")
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=7)
    return _save_figure(fig, path)


def plot_bar_panels(path: Path, panels: Sequence[Mapping[str, Any]], *, suptitle: str = "") -> Path:
    """Side-by-side bar charts, one per panel: ``{"title", "ylabel", "groups": [...],
    "values": [...], "errors": [(lo, hi) or None, ...] (optional)}``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(1, len(panels))
    width = max(4.5, 1.2 * max((len(p.get("groups", ())) for p in panels), default=1) + 1.5)
    fig, axes = plt.subplots(1, n, figsize=(width * n, 4.0), squeeze=False)
    for ax, panel in zip(axes.flat, panels):
        groups, values = list(panel.get("groups", ())), list(panel.get("values", ()))
        errors = panel.get("errors")
        yerr = None
        if errors and all(e is not None for e in errors):
            yerr = [[v - e[0] for v, e in zip(values, errors)], [e[1] - v for v, e in zip(values, errors)]]
        ax.bar(range(len(values)), values, yerr=yerr, capsize=3)
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels(groups, fontsize=8, rotation=15)
        ax.set_title(panel.get("title", ""), fontsize=9)
        ax.set_ylabel(panel.get("ylabel", ""))
        ax.grid(True, axis="y", alpha=0.3)
    if suptitle:
        fig.suptitle(suptitle, fontsize=9)
    return _save_figure(fig, path)
