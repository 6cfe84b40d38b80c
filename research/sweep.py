"""Run research jobs two at a time: each line of the jobs file is a JSON list of arguments
for a script, e.g. ["research/proto_inline.py", "p4", {"theta": 0.2}, "wanet", 1].

    python research/sweep.py jobs.jsonl [parallel]
"""
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor


def run(args):
    argv = [sys.executable] + [json.dumps(a) if isinstance(a, dict) else str(a) for a in args]
    out = subprocess.run(argv, capture_output=True, text=True)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    return lines[-1] if lines else f"FAILED {args}: {out.stderr[-800:]}"


if __name__ == "__main__":
    jobs = [json.loads(ln) for ln in open(sys.argv[1]) if ln.strip()]
    with ThreadPoolExecutor(int(sys.argv[2]) if len(sys.argv) > 2 else 2) as pool:
        for line in pool.map(run, jobs):
            print(line[:600], flush=True)
