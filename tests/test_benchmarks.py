"""The benchmark harness and scripts: timers, memory probe, records, and the loss baselines.

The benchmarks live outside the package (``benchmarks/``), so they are loaded from their
files here; every test runs at tiny sizes (CI runs ``--benchmark-disable``: a
``benchmark(...)`` call then runs the function once).
"""
from __future__ import annotations

import importlib.util
import json
import re
import sys
import time
from pathlib import Path

import pytest
import torch

BENCH_DIR = Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name: str):
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, BENCH_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def loss_bench():
    return _load("bench_two_view_loss")


@pytest.fixture(scope="module")
def harness(loss_bench):
    return loss_bench.harness


# --------------------------------------------------------------------------- harness
def test_summarize_samples_matches_numpy_quantiles(harness):
    np = pytest.importorskip("numpy")
    samples = (torch.rand(int(torch.randint(1, 40, ())))).tolist()
    t = harness.summarize_samples(samples)
    expected = np.quantile(np.asarray(samples) * 1e3, [0.5, 0.2, 0.8])
    assert [t.median_ms, t.p20_ms, t.p80_ms] == pytest.approx(expected.tolist(), rel=1e-12)
    assert t.samples == len(samples)
    with pytest.raises(ValueError, match="samples_s"):
        harness.summarize_samples([])


def test_time_cpu_measures_the_call_and_resets_grads(harness):
    leaf = torch.ones(3, requires_grad=True)
    seen_grads = []

    def fn():
        seen_grads.append(leaf.grad)
        (leaf * 2).sum().backward()
        time.sleep(0.004)

    t = harness.time_cpu(fn, grad_to_none=[leaf], warmup=1, min_reps=3, budget_s=0.02)
    assert t.samples >= 3
    assert 4.0 <= t.p20_ms <= t.median_ms <= t.p80_ms < 200.0
    assert all(g is None for g in seen_grads)  # never accumulates across calls


def test_time_training_step_cpu_splits_forward_and_backward(harness):
    def forward():
        time.sleep(0.001)
        return 0.012

    timings = harness.time_training_step(forward, time.sleep, "cpu", quick=True)
    assert set(timings) == {"forward", "backward", "forward_backward"}
    assert 1.0 <= timings["forward"].median_ms < timings["backward"].median_ms
    assert timings["backward"].median_ms >= 12.0
    assert timings["forward_backward"].median_ms == pytest.approx(
        timings["forward"].median_ms + timings["backward"].median_ms, rel=0.5)


def test_time_with_setup_excludes_setup(harness):
    t = harness.time_with_setup(lambda: time.sleep(0.004), lambda _: None, "cpu", quick=True)
    assert t.median_ms < 2.0


def test_peak_memory_cpu_sees_a_freed_temporary(harness):
    big, small = 2_000_000, 250_000  # float32 elements: 8 MB temporary, 1 MB result

    def fn():
        tmp = torch.rand(big)
        return tmp[:small].clone()

    out = harness.peak_memory(fn, "cpu", resident_bytes=small * 4)
    assert (big + small) * 4 <= out["peak_bytes"] < (big + small) * 4 + 64 * 1024
    assert out["extra_bytes"] == out["peak_bytes"] - small * 4


def test_peak_memory_cpu_is_relative_to_the_call(harness):
    # A tensor allocated in one measured call and freed outside it must not count in the next.
    kept = []
    n = int(torch.randint(100_000, 400_000, ()))

    def fn():
        kept.append(torch.rand(n))

    first = harness.peak_memory(fn, "cpu")["peak_bytes"]
    kept.clear()
    second = harness.peak_memory(fn, "cpu")["peak_bytes"]
    assert n * 4 <= first == second < n * 4 + 64 * 1024


def test_assert_not_degenerate_refuses_zeros_nan_and_constant_labels(harness):
    harness.assert_not_degenerate("ok", torch.randn(5))
    harness.assert_not_degenerate("labels", torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="all zeros"):
        harness.assert_not_degenerate("h", torch.zeros(4, 3))
    with pytest.raises(ValueError, match="non-finite"):
        harness.assert_not_degenerate("h", torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="constant"):
        harness.assert_not_degenerate("labels", torch.full((6,), 7))


def test_rotation_count_exceeds_twice_the_cache(harness):
    cache = harness.cache_bytes(torch.device("cpu"))
    assert harness.rotation_count(4 * cache, "cpu") == 1
    k = harness.rotation_count(cache // 3 + 1, "cpu", max_sets=100)
    assert k * (cache // 3 + 1) >= 2 * cache and (k - 1) * (cache // 3 + 1) < 2 * cache
    assert harness.rotation_count(1024, "cpu", max_sets=8) == 8
    assert harness.rotation_count(1024, "cpu", memory_budget=3000) == 2
    with pytest.raises(ValueError, match="bytes_per_set"):
        harness.rotation_count(0, "cpu")


def test_environment_record(harness):
    env = harness.environment_record(torch.device("cpu"))
    assert env["device"]["type"] == "cpu" and env["device"]["name"]
    assert env["packages"]["torch"].split("+")[0] == torch.__version__.split("+")[0]
    commit = env["git"]["commit"]
    assert commit == "uncommitted" or re.fullmatch(r"[0-9a-f]{40}", commit)
    assert env["torch_num_threads"] == torch.get_num_threads()
    assert env["timestamp_utc"].endswith("+00:00")
    json.dumps(env)  # JSON-serialisable


def _ok_row(**timing):
    t = {"median_ms": 2.0, "p20_ms": 1.0, "p80_ms": 3.0, **timing}
    return {"method": "m", "status": "ok", "timings": {"forward": t}}


@pytest.mark.parametrize("mutate, message", [
    (lambda r: r.pop("results"), "missing 'results'"),
    (lambda r: r["results"].append({"method": "m", "status": "skipped"}), "without a reason"),
    (lambda r: r["results"].append(_ok_row(p20_ms=2.5)), "p20 <= median"),
    (lambda r: r["results"].append(_ok_row(median_ms=float("nan"))), "positive finite"),
    (lambda r: r["results"].append({"method": "other", "status": "ok"}), "not in methods"),
    (lambda r: r["methods"].update(x={"available": False}), "without a reason"),
    (lambda r: r["environment"]["git"].update(commit="abc"), "sha or 'uncommitted'"),
])
def test_validate_record_rejects_malformed_records(harness, mutate, message):
    record = {"benchmark": "b", "schema_version": 1, "settings": {},
              "environment": {"device": {}, "packages": {}, "git": {"commit": "uncommitted"},
                              "timestamp_utc": "t", "torch_num_threads": 1},
              "methods": {"m": {"available": True}}, "results": [_ok_row()]}
    harness.validate_record(record)
    mutate(record)
    with pytest.raises(ValueError, match=re.escape(message)):
        harness.validate_record(record)


# --------------------------------------------------------------------------- loss baselines
def test_eager_baseline_matches_reference_statistics(loss_bench):
    from pcr_fast import two_view_stats

    n, d, v = 23, 9, 37
    h_a, h_b = torch.randn(n, d, dtype=torch.float64), torch.randn(n, d, dtype=torch.float64)
    w = torch.randn(v, d, dtype=torch.float64)
    labels = torch.randint(0, v, (n,))
    labels[torch.rand(n) < 0.3] = -100
    got = loss_bench.eager_stats(h_a, h_b, w, labels)
    want = two_view_stats(h_a, h_b, w, labels, backend="reference")
    for g, e in zip(got, want):
        torch.testing.assert_close(g.double(), e.double(), rtol=1e-5, atol=1e-6)


def test_chunked_kl_entropy_matches_eager_values_and_gradients(loss_bench):
    n, d, v = 19, 8, 29
    leaves = [torch.randn(n, d, dtype=torch.float64, requires_grad=True),
              torch.randn(n, d, dtype=torch.float64, requires_grad=True),
              torch.randn(v, d, dtype=torch.float64, requires_grad=True)]
    labels = torch.randint(0, v, (n,))
    mix = torch.randn(4, dtype=torch.float64)
    chunked = loss_bench.chunked_kl_entropy(*leaves, chunk_size=6)
    _, _, kl_ab, kl_ba, ent_a, ent_b = loss_bench.eager_stats(*leaves, labels)
    eager = torch.stack([kl_ab.sum(), kl_ba.sum(), ent_a.sum(), ent_b.sum()])
    torch.testing.assert_close(chunked.double(), eager.double(), rtol=1e-5, atol=1e-5)
    g_chunked = torch.autograd.grad((chunked.double() * mix).sum(), leaves)
    g_eager = torch.autograd.grad((eager.double() * mix).sum(), leaves)
    for a, b in zip(g_chunked, g_eager):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_objective_counts_ce_over_valid_rows_only(loss_bench):
    stats = [torch.tensor([1.0, 3.0, 0.0]), torch.tensor([2.0, 2.0, 0.0])] + [torch.zeros(3)] * 4
    # (1 + 3 + 0.5 (2 + 2)) / 2 valid rows
    assert float(loss_bench.objective_from_stats(stats, 2)) == pytest.approx(3.0)


# --------------------------------------------------------------------------- whole records
def _check_png(path: Path):
    assert path.exists() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_loss_benchmark_record_is_well_formed(loss_bench, harness, benchmark, tmp_path):
    case = loss_bench.LossCase(37, 16, 101, "float32")
    record = benchmark(loss_bench.run_benchmark, [case], torch.device("cpu"),
                       method_names=("pcr_torch", "pcr_triton", "eager"), quick=True, progress=False)
    harness.validate_record(record)
    rows = {r["method"]: r for r in record["results"]}
    assert rows["pcr_triton"]["status"] == "skipped" and "CUDA" in rows["pcr_triton"]["reason"]
    assert record["methods"]["pcr_triton"]["available"] is False
    for name in ("pcr_torch", "eager"):
        r = rows[name]
        assert r["status"] == "ok", r.get("reason")
        assert set(r["timings"]) == {"forward", "backward", "forward_backward"}
        assert r["floor_ms"]["forward_backward"] == pytest.approx(
            12 * 37 * 16 * 101 / record["device_roofline"]["matmul"]["flops_per_s"] * 1e3)
        # a logits-sized temporary (37 x 101 float32) must show up; inputs+grads excluded
        assert r["memory"]["peak_bytes"] >= 37 * 101 * 4
        assert r["memory"]["resident_bytes"] == (2 * 37 * 16 + 101 * 16) * 4
    assert rows["pcr_torch"]["check"] == "reference" and rows["eager"]["check"] == "ok"
    path = harness.write_json(record, harness.result_path("two_view_loss", "cpu", tmp_path))
    assert re.fullmatch(r"two_view_loss_cpu_\d{4}-\d{2}-\d{2}\.json", path.name)
    assert json.loads(path.read_text()) == json.loads(json.dumps(record))
    _check_png(loss_bench.plot_record(record, path.with_suffix(".png")))
    table = harness.print_table("t", loss_bench.TABLE_COLUMNS, loss_bench.table_rows(record))
    assert "pcr_torch" in table and "skipped" in table


def test_loss_benchmark_single_view_rows(loss_bench, harness, tmp_path):
    """The fused CE rows next to the peers': checked against their own objective's reference
    (the eager F.cross_entropy), with the single-view floor of 6·N·D·V FLOPs."""
    case = loss_bench.LossCase(41, 16, 97, "float32")
    record = loss_bench.run_benchmark([case], torch.device("cpu"), quick=True, progress=False,
                                      method_names=("pcr_torch", "ce_eager", "ce_pcr_torch", "ce_pcr_triton",
                                                    "ce_liger", "ce_cce"))
    harness.validate_record(record)
    rows = {r["method"]: r for r in record["results"]}
    assert rows["ce_eager"]["check"] == "reference" and rows["ce_pcr_torch"]["check"] == "ok", rows["ce_pcr_torch"]
    assert rows["pcr_torch"]["check"] == "reference"   # each objective has its own reference
    rate = record["device_roofline"]["matmul"]["flops_per_s"]
    assert rows["ce_pcr_torch"]["floor_ms"]["forward_backward"] == pytest.approx(6 * 41 * 16 * 97 / rate * 1e3)
    assert rows["ce_pcr_torch"]["memory"]["resident_bytes"] == (41 * 16 + 97 * 16) * 4
    for name in ("ce_pcr_triton", "ce_liger", "ce_cce"):
        assert rows[name]["status"] == "skipped" and "CUDA" in rows[name]["reason"]
    value = rows["ce_eager"]["loss_value"]
    assert rows["ce_pcr_torch"]["loss_value"] == pytest.approx(value, rel=1e-5)


def test_patch_augment_benchmark_record_is_well_formed(harness, benchmark, tmp_path):
    pytest.importorskip("pcr_fast.augment")
    aug_bench = _load("bench_patch_augment")
    cases = [aug_bench.AugmentCase("img", "image", (2, 3, 28, 42), 14),
             aug_bench.AugmentCase("tiles", "tiles", (1, 2, 3, 28, 28), 14, fill="zero"),
             aug_bench.qwen_rows_case(2, 56, "mean")]
    record = benchmark(aug_bench.run_benchmark, cases, torch.device("cpu"),
                       method_names=("pcr_triton", "pcr_torch", "kornia"), quick=True, progress=False,
                       peers_on_cpu=True)
    harness.validate_record(record)
    rows = [r for r in record["results"] if r["method"] == "pcr_torch"]
    assert len(rows) == 3 and all(r["status"] == "ok" for r in rows), [r.get("reason") for r in rows]
    for r, case in zip(rows, cases):
        assert r["bytes_moved"] == 2 * case.numel * 4
        assert r["fraction_of_copy_bandwidth"] == pytest.approx(r["bytes_per_s"] / r["copy_bytes_per_s"])
        assert r["memory"]["peak_bytes"] >= case.numel * 4  # the output is allocated in the call
    kornia_rows = [r for r in record["results"] if r["method"] == "kornia"]
    assert all(r["status"] in ("ok", "skipped") for r in kornia_rows)
    assert next(r for r in kornia_rows if r["layout"] == "rows")["status"] == "skipped"
    path = harness.write_json(record, harness.result_path("patch_augment", "cpu", tmp_path))
    _check_png(aug_bench.plot_record(record, path.with_suffix(".png")))
    assert "pcr_torch" in harness.print_table("t", aug_bench.TABLE_COLUMNS, aug_bench.table_rows(record))


def test_step_benchmark_record_is_well_formed(harness, tmp_path):
    step_bench = _load("bench_step")
    record = step_bench.run_benchmark("tiny", torch.device("cpu"), batch_size=2, quick=True)
    harness.validate_record(record)
    rows = {r["method"]: r for r in record["results"]}
    assert set(rows) == set(step_bench.METHODS)
    for name, r in rows.items():
        assert r["status"] == "ok", (name, r.get("reason"))
        t = r["timings"]["step"]
        assert r["samples_per_s"] == pytest.approx(2 / (t["median_ms"] * 1e-3))
        assert r["tokens_per_s"] == pytest.approx(record["settings"]["tokens_per_batch"] / (t["median_ms"] * 1e-3))
        assert r["memory"]["peak_bytes"] > 0
    path = harness.write_json(record, harness.result_path("train_step", "cpu", tmp_path))
    _check_png(step_bench.plot_record(record, path.with_suffix(".png")))
    assert "pcr_online" in harness.print_table("t", step_bench.TABLE_COLUMNS, step_bench.table_rows(record))


def test_gpu_check_script_dry_run(tmp_path):
    """benchmarks/gpu_check.sh is correct by construction: the dry run prints the plan in
    order (the half-precision backward check first), within 8 minutes of limits, and every
    script it calls exists and parses its arguments."""
    import subprocess

    script = BENCH_DIR / "gpu_check.sh"
    proc = subprocess.run(["bash", str(script), "--dry-run", str(tmp_path / "out")], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip().startswith("[")]
    names = [ln.split("]")[1].split()[0] for ln in lines]
    assert names.index("gpu-tests-half-precision-backward-first") < names.index("gpu-tests-all")
    assert names[-3:] == ["loss-benchmark", "augment-benchmark", "step-benchmark"]
    total = sum(int(ln.split("]")[0].strip(" [s")) for ln in lines)
    assert total <= 480, total
    assert not (tmp_path / "out").exists()   # a dry run writes nothing
    for ln in lines:   # every benchmark command parses its arguments
        cmd = ln.split("]", 1)[1].split(None, 1)[1]
        if "benchmarks/bench_" in cmd:
            argv = cmd.split()[1:]
            name = Path(argv[0]).stem
            module = _load(name)
            parser_ok = subprocess.run([sys.executable, str(BENCH_DIR / f"{name}.py"), *argv[1:], "--help"],
                                       capture_output=True, text=True, timeout=120)
            assert parser_ok.returncode == 0, parser_ok.stderr
            assert hasattr(module, "main")
    collected = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "gpu",
                                str(BENCH_DIR.parent / "tests" / "test_gpu_kernels.py"), "-k", "half_precision_operands"],
                               capture_output=True, text=True, timeout=300, cwd=BENCH_DIR.parent)
    assert "half_precision_operands" in collected.stdout, collected.stdout[-2000:]


def test_qwen_rows_case_geometry():
    aug_bench = _load("bench_patch_augment")
    case = aug_bench.qwen_rows_case(8, 448, "mean")
    assert case.shape == (8 * 32 * 32, 3 * 2 * 14 * 14) and case.merge_size == 2
    assert case.grid_thw == tuple((1, 32, 32) for _ in range(8))
    with pytest.raises(ValueError, match="multiple of patch"):
        aug_bench.qwen_rows_case(1, 100, "mean")


# --------------------------------------------------------------------------- CUDA paths
@pytest.mark.gpu
def test_loss_benchmark_on_cuda_times_every_backend(loss_bench, harness):
    case = loss_bench.LossCase(256, 128, 4099, "bfloat16")
    record = loss_bench.run_benchmark([case], torch.device("cuda"), quick=True, progress=False,
                                      method_names=("pcr_torch", "pcr_triton", "pcr_triton_chunked", "eager"))
    harness.validate_record(record)
    assert record["environment"]["device"]["type"] == "cuda"
    for r in record["results"]:
        assert r["status"] == "ok", (r["method"], r.get("reason"))
        assert r["check"] in ("reference", "ok"), (r["method"], r["check"])
        assert r["timings"]["backward"]["timer"].startswith("cuda events")
        assert r["memory"]["peak_bytes"] > 0


@pytest.mark.gpu
def test_patch_augment_benchmark_on_cuda_backends_agree(harness):
    pytest.importorskip("pcr_fast.augment")
    aug_bench = _load("bench_patch_augment")
    cases = [aug_bench.AugmentCase("img", "image", (4, 3, 56, 56), 14), aug_bench.qwen_rows_case(2, 56, "zero")]
    record = aug_bench.run_benchmark(cases, torch.device("cuda"), method_names=("pcr_triton", "pcr_torch"),
                                     quick=True, progress=False)
    harness.validate_record(record)
    for r in record["results"]:
        assert r["status"] == "ok", (r["method"], r.get("reason"))
        assert r["check"] == "reference" or r["check"].startswith("ok"), r["check"]
