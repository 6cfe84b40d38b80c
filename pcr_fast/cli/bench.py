"""``pcr-fast bench``: run the benchmark scripts of the repository's ``benchmarks/`` folder."""
from __future__ import annotations

import glob
import os
import subprocess
import sys
from typing import Optional


def _bench_dir() -> Optional[str]:
    here = os.path.dirname(os.path.abspath(__file__))
    for cand in (os.path.join(os.getcwd(), "benchmarks"), os.path.join(os.path.dirname(here), "benchmarks")):
        if os.path.isdir(cand):
            return cand
    return None


def run_bench(args) -> int:
    folder = _bench_dir()
    if folder is None:
        print("pcr-fast bench: no benchmarks/ folder found (run from the repository root)", file=sys.stderr)
        return 1
    scripts = sorted(glob.glob(os.path.join(folder, "bench_*.py")))
    if args.names:
        scripts = [s for s in scripts if any(n in os.path.basename(s) for n in args.names)]
    if not scripts:
        print(f"pcr-fast bench: no matching bench_*.py scripts in {folder}", file=sys.stderr)
        return 1
    rc = 0
    for s in scripts:
        print(f"== {os.path.basename(s)}", flush=True)
        rc = max(rc, subprocess.call([sys.executable, s, *args.extra]))
    return rc


def add_bench_parser(sub) -> None:
    """The ``bench`` subcommand."""
    import argparse

    b = sub.add_parser("bench", help="run the benchmark scripts in benchmarks/ (bench_*.py)")
    b.add_argument("names", nargs="*", help="substrings selecting scripts (default: all)")
    b.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="arguments passed to every script")
    b.set_defaults(func=run_bench, parser=b)
