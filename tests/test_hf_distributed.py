"""DDP and FSDP2 on CPU (gloo), 2 processes through torchrun: same loss/gradients as one process;
scan-and-unlearn's memory merges the ranks' scans; the inline memory merges every step."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

WORKER = Path(__file__).with_name("hf_ddp_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo")
def test_ddp_two_processes_match_a_single_process(tmp_path):
    out = tmp_path / "verdict.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PCR_DDP_FAMILY="qwen2_vl")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(WORKER), str(out)]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    verdict = json.loads(out.read_text())
    # 1. raw DDP: global loss and averaged gradients == single process on the global batch
    assert verdict["one_forward"]
    assert verdict["ddp_loss_err"] < 1e-5 * max(1.0, verdict["ref_loss"])
    assert verdict["ddp_grad_rel_err"] < 1e-4
    # 2. FSDP2 on CPU: same loss and gradients; a separately sharded lm_head is refused clearly
    assert verdict["fsdp_loss_err"] < 1e-5 * max(1.0, verdict["ref_loss"])
    assert verdict["fsdp_grad_rel_err"] < 1e-4
    assert "FSDP unit of its own" in verdict["fsdp_separate_head_error"]
    # 3. PCRTrainer under torchrun: one SGD step == params - lr * single-process gradient
    assert verdict["trainer_world_size"] == 2
    assert verdict["trainer_param_moved"] > 1e-3
    assert verdict["trainer_param_err"] < 1e-5
    assert set(verdict["trainer_logged"]) == {"pcr/ce", "pcr/divergence", "pcr/divergence_term", "pcr/entropy"}
    # 4. scan-and-unlearn: the ranks' scans merge into the whole training set's flags/targets
    assert verdict["scan_merge_ok"]
    assert verdict["scan_trainer_all_flagged"] and verdict["scan_trainer_scans"] == 1
    # 5. inline: each rank tests its rows, every step merges them: one process's memory and loss
    assert verdict["inline_ddp_memory_ok"] and verdict["inline_fsdp_memory_ok"]
    assert verdict["inline_ddp_loss_err"] < 1e-5 and verdict["inline_fsdp_loss_err"] < 1e-5
    assert verdict["inline_trainer_same_memory"] and verdict["inline_trainer_tested"] > 0
