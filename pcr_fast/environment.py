"""Where and with what a result was produced: the records the demo and the benchmarks write.

A number without its machine, versions and commit cannot be compared with another one.
"""
from __future__ import annotations

import datetime as _dt
import importlib.metadata
import os
import platform
import re
import subprocess
from pathlib import Path
from typing import Any, Dict, Iterable, Optional, Union

import torch


def package_version(dist: str) -> Optional[str]:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_commit(repo: Union[str, Path, None] = None) -> Dict[str, Any]:
    """``{"commit": sha or "uncommitted", "dirty": bool or None}`` of the repository at ``repo``
    (default: the one holding this package, e.g. an editable install)."""
    repo = Path(repo) if repo is not None else Path(__file__).resolve().parent.parent

    def _git(*args: str) -> Optional[str]:
        try:
            out = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    sha = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain")
    return {"commit": sha if sha and re.fullmatch(r"[0-9a-f]{40}", sha) else "uncommitted",
            "dirty": None if status is None else bool(status)}


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def basic_record(device: Union[str, torch.device, None] = None, packages: Iterable[str] = ()) -> Dict[str, Any]:
    """Device name, package versions, Python, platform, commit, time and CPU count."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else cpu_name()
    names = ("torch", "triton", "transformers", "peft", "numpy", "pcr_fast", *packages)
    return {"device": {"type": dev.type, "name": name},
            "packages": {n: package_version(n) for n in dict.fromkeys(names)},
            "python": platform.python_version(), "platform": platform.platform(), "git": git_commit(),
            "timestamp_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "cpu_count": os.cpu_count()}
