"""Every Triton kernel compiles for real GPUs (sm_80, sm_90, sm_100) at the tiles the
launchers pick, with no register spills and tensor cores in every matmul kernel.

Runs ``benchmarks/gpu_compile_report.py --subset test`` in a fresh process (the kernels
must be real JITFunctions, so TRITON_INTERPRET must be unset there): launches are captured
from the public API on meta tensors, compiled with the triton wheel's ptxas, and checked.
The full grid (every shape, dtype, feature and pixel layout, plus sm_86) is ``make gpu-report``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("aot")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_compile_report.py"), "--subset", "test",
                           "--archs", "80,90,100", "--jobs", "2", "--out-dir", str(out), "--name", "report"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    path = out / "report.json"
    assert path.exists(), f"the report did not run:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    record = json.loads(path.read_text())
    record["returncode"] = proc.returncode
    record["markdown"] = (out / "report.md").read_text()
    return record


def test_every_kernel_the_library_launches_is_compiled(report):
    kernels = {r["kernel"] for r in report["results"]}
    assert kernels >= {"_two_view_fwd_kernel", "_two_view_grad_kernel", "_grad_dh_kernel", "_grad_dw_kernel",
                       "_chunk_stats_kernel", "_chunk_grad_kernel", "_patch_gather_kernel"}, kernels
    assert {r["arch"] for r in report["results"]} == {"sm_80", "sm_90", "sm_100"}
    assert {"bf16", "fp32"} <= {d for r in report["results"] for d in r["dtype"]}


def test_no_compile_error_no_spill_and_tensor_cores_in_matmuls(report):
    bad = [f"{r['kernel']} {r['arch']} {r['dtype']}: {r['problems']} {r.get('error') or ''}"
           for r in report["results"] if r["problems"]]
    assert not bad, "\n".join(bad) + "\n" + report["markdown"]
    assert report["returncode"] == 0
    for r in report["results"]:
        if r["matmul_kernel"]:
            family = {"sm_80": "mma.sync", "sm_90": "wgmma", "sm_100": "tcgen05"}[r["arch"]]
            assert r["tensor_core"][family] > 0, (r["kernel"], r["arch"], r["tensor_core"])
        assert r["shared_bytes"] <= {"sm_80": 166912, "sm_90": 232448, "sm_100": 232448}[r["arch"]]


def test_the_check_can_fail():
    """A kernel whose tile cannot live in registers is reported as spilling (so a spill
    would turn the test above red)."""
    code = """
import os, sys
sys.path.insert(0, 'benchmarks')
import gpu_compile_report as g
from pcr_fast.kernels import launch
launch.GPU_CONFIGS['chunk_stats']['sm90']['16'] = launch.ChunkStatsConfig(4, 1024, 2)
with launch.assume_capability((9, 0)), g.captured_launches() as rec:
    g.run_loss(g.LOSS_SHAPES['small_odd_n'], g.DTYPES['bf16'], 'two_view', 'triton_chunked')
row = g.compile_one([l for l in rec if 'chunk_stats' in l.kernel.__name__][0], 90)
print('SPILLS', row['spills'], row['spill_store_bytes'])
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert "SPILLS True" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]
