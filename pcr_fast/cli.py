"""``pcr-fast``: the command line.

    pcr-fast demo [options]   plain SFT vs PCR on poisoned data: table, results.json, PNG chart
    pcr-fast bench [names]    run the benchmark scripts in benchmarks/ (if present)
"""
from __future__ import annotations

import argparse
import glob
import logging
import os
import subprocess
import sys
import time
from dataclasses import replace
from typing import List, Optional

logger = logging.getLogger("pcr_fast.cli")

DEMO_DEFAULT_ATTACKS = ("badnets", "badnets_solid", "blended", "sig", "wanet", "noise")


def _csv(text: str) -> List[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _bool(text: str) -> bool:
    v = text.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _opt_float(text: str) -> Optional[float]:
    return None if text.strip().lower() in ("none", "") else float(text)


def _fill(text: str):
    try:
        return float(text)
    except ValueError:
        return text


def _add_demo_parser(sub) -> None:
    from .eval.defaults import DEMO_PCR_CONFIG as D
    from .eval.defaults import DEMO_PCR_WARMUP
    from .eval.models import HARNESS_FAMILIES as FAMILIES
    from .eval.triggers import ATTACKS

    p = sub.add_parser(
        "demo", help="fine-tune a tiny VLM on poisoned data, plain SFT vs PCR, and compare",
        description="Fine-tunes a tiny vision-language model (random init, built from a config: no "
                    "download) twice on the same poisoned digits data -- plain SFT and SFT with PCR -- "
                    "and prints, per attack, the attack success rate (ASR) and clean quality side by "
                    "side; writes results.json and results.png to --out.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("experiment")
    g.add_argument("--attacks", type=_csv, default=",".join(DEMO_DEFAULT_ATTACKS),
                   help=f"comma-separated triggers, from: {', '.join(ATTACKS)}")
    g.add_argument("--poison-ratio", type=float, default=0.1, help="fraction of training samples poisoned")
    g.add_argument("--steps", type=int, default=600, help="optimisation steps per run")
    g.add_argument("--batch-size", type=int, default=32, help="training batch size")
    g.add_argument("--test-size", type=int, default=300, help="held-out digits images for evaluation")
    g.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    g.add_argument("--seeds", type=lambda s: [int(x) for x in _csv(s)], default="0",
                   help="comma-separated seeds (split, poisoning, init, batches); results are averaged")
    g.add_argument("--seed", type=int, default=None, help="a single seed (overrides --seeds)")
    g.add_argument("--model", default="llava", choices=FAMILIES, help="model family")
    g.add_argument("--target", default=None, help="the attacker's target response (default: 'visit evil dot com')")
    g.add_argument("--defenses", type=_csv, default="none,pcr", help="which of none,pcr to run")
    g.add_argument("--out", default="pcr_demo_out", help="output folder for results.json and results.png")
    g.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads in all (default: all cores)")
    g.add_argument("--jobs", type=int, default=None,
                   help="runs trained side by side in worker processes (default: 2 on a CPU with 2+ cores, 1 on a GPU)")
    g.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    k = p.add_argument_group("PCR (augmentation and objective; defaults are the library's tuned values)")
    k.add_argument("--mode", default=D.mode, choices=("scan", "online"),
                   help="scan: scan the training set for invariant responses, drop them, unlearn the target "
                        "tokens; online: the per-batch two-view objective (pull-apart / cross-view gate)")
    k.add_argument("--scan-at", type=lambda s: tuple(float(x) for x in _csv(s)),
                   default=",".join(str(f) for f in D.scan_at),
                   help="scan mode: when to scan, as comma-separated fractions of the steps")
    k.add_argument("--scan-original-confidence", type=float, default=D.scan_original_confidence,
                   help="scan mode: only responses the model predicts with every token's CE below this (nats) "
                        "can be flagged")
    k.add_argument("--target-share", type=float, default=D.target_share,
                   help="scan mode: a token is the target when this share of the samples containing it is flagged")
    k.add_argument("--min-support", type=int, default=D.min_support,
                   help="scan mode: ... and at least this many samples contain it")
    k.add_argument("--unlearn-weight", type=float, default=D.unlearn_weight,
                   help="scan mode: weight of the unlikelihood on target tokens")
    k.add_argument("--pcr-warmup", type=float, default=DEMO_PCR_WARMUP,
                   help="online mode: fraction of the steps trained with plain CE before PCR switches on (from "
                        "scratch, the model must first learn to answer from the image)")
    k.add_argument("--patch-size", type=int, default=D.patch_size,
                   help="augmentation unit in pixels (default: the vision tower's patch)")
    k.add_argument("--shuffle", type=_bool, default=D.shuffle, help="shuffle patches")
    k.add_argument("--mask-ratio", type=float, default=D.mask_ratio, help="fraction of patches masked")
    k.add_argument("--fill", type=_fill, default=D.fill, help="mask fill: mean, zero, noise or a number")
    k.add_argument("--ce-weight", type=float, default=D.ce_weight, help="weight of the next-token CE")
    k.add_argument("--divergence", default=D.divergence, help="kl | reverse_kl | symmetric_kl")
    k.add_argument("--divergence-weight", type=float, default=D.divergence_weight,
                   help="weight of the per-token pull-apart term (the literal PCR regulariser)")
    k.add_argument("--margin", type=_opt_float, default=D.margin, help="pull-apart bound in nats (none: unbounded)")
    k.add_argument("--divergence-form", default=D.divergence_form, help="hinge | clip")
    k.add_argument("--entropy-weight", type=float, default=D.entropy_weight, help="weight of the entropy term")
    k.add_argument("--entropy-view", default=D.entropy_view, help="a | b | both")
    k.add_argument("--entropy-target", type=_opt_float, default=D.entropy_target,
                   help="entropy level (nats) for the below/above/square forms")
    k.add_argument("--entropy-form", default=D.entropy_form, help="linear | below | above | square")
    k.add_argument("--regularize", default=D.regularize, help="labelled | all")
    k.add_argument("--gate-weight", type=float, default=D.gate_weight,
                   help="cross-view gate: unlikelihood weight on invariant responses (0: off)")
    k.add_argument("--gate-threshold", type=float, default=D.gate_threshold,
                   help="scan / cross-view gate: largest symmetric KL (nats) of a response that counts as invariant")
    k.add_argument("--gate-confidence", type=float, default=D.gate_confidence,
                   help="scan / cross-view gate: the augmented view must predict every token with CE below this (nats)")
    k.add_argument("--gate-max-fraction", type=_opt_float, default=D.gate_max_fraction,
                   help="cross-view gate: at most this share of a batch's responses is flagged (none: no cap)")
    k.add_argument("--gate-views", type=int, default=D.gate_views,
                   help="scan / cross-view gate: augmented draws per image; a response is flagged if invariant under any")
    k.add_argument("--detach-augmented", type=_bool, default=D.detach_augmented,
                   help="stop-gradient through the augmented view")
    p.set_defaults(func=_demo)


def _pcr_from_args(args):
    """DEMO_PCR_CONFIG with every PCR knob given on the command line (same names as the fields)."""
    from dataclasses import fields

    from .eval.defaults import DEMO_PCR_CONFIG

    run_level = {"seed", "backend"}  # run options, not PCR knobs, even where names coincide
    overrides = {f.name: getattr(args, f.name) for f in fields(DEMO_PCR_CONFIG)
                 if f.name not in run_level and hasattr(args, f.name)}
    return replace(DEMO_PCR_CONFIG, **overrides)


def _demo(args) -> int:
    import torch

    from .eval import report
    from .eval.poison import DEFAULT_TARGET
    from .eval.runner import DEFENSES, run_experiment
    from .eval.triggers import ATTACKS

    for a in args.attacks:
        if a not in ATTACKS:
            raise SystemExit(f"pcr-fast demo: --attacks: unknown attack {a!r} (choose from {', '.join(ATTACKS)})")
    for d in args.defenses:
        if d not in DEFENSES:
            raise SystemExit(f"pcr-fast demo: --defenses: unknown defense {d!r} (choose from {', '.join(DEFENSES)})")
    seeds = [args.seed] if args.seed is not None else args.seeds
    pcr = _pcr_from_args(args)
    target = args.target or DEFAULT_TARGET
    jobs_spec = []
    for attack in args.attacks:
        for seed in seeds:
            for defense in args.defenses:
                jobs_spec.append(dict(attack=attack, defense=defense, poison_ratio=args.poison_ratio,
                                      steps=args.steps, seed=seed, model=args.model,
                                      pcr=pcr if defense == "pcr" else None, batch_size=args.batch_size,
                                      lr=args.lr, target=target, test_size=args.test_size, device=args.device,
                                      pcr_warmup=args.pcr_warmup if (defense == "pcr" and pcr.mode == "online")
                                      else None))
    t0 = time.perf_counter()
    jobs = _num_jobs(args, len(jobs_spec))
    if jobs > 1:
        runs = _run_parallel(jobs_spec, jobs, args)
    else:
        if args.threads:
            torch.set_num_threads(args.threads)
        runs = []
        for spec in jobs_spec:
            runs.append(run_experiment(progress=not args.no_progress, **spec))
            _print_run(runs[-1], len(runs), len(jobs_spec))
    config = {"attacks": args.attacks, "poison_ratio": args.poison_ratio, "steps": args.steps, "seeds": seeds,
              "model": args.model, "batch_size": args.batch_size, "lr": args.lr, "target": target,
              "pcr": pcr.to_dict(), "pcr_warmup": args.pcr_warmup if pcr.mode == "online" else None,
              "device": args.device, "jobs": jobs, "seconds": round(time.perf_counter() - t0, 1)}
    print()
    print(f"Poison ratio {args.poison_ratio:.0%}, {args.steps} steps, model {args.model}, seeds {seeds} "
          "(rates in %, mean ± std over seeds):")
    print(report.format_table(runs))
    path = report.write_results(runs, args.out, config)
    png = report.save_chart(runs, os.path.join(args.out, "results.png"))
    print(f"\nwrote {path} and {png} ({config['seconds']:.0f}s)")
    return 0


def _print_run(r, done: int, total: int) -> None:
    print(f"[{done}/{total}] {r['attack']:<14} {r['defense']:<4} seed {r['seed']}: ASR {100 * r['asr']:5.1f}%  "
          f"accuracy {100 * r['clean_accuracy']:5.1f}%  BLEU-4 {100 * r['bleu']:5.1f}  "
          f"({r['train_seconds']:.0f}s)", flush=True)


def _num_jobs(args, n_runs: int) -> int:
    """Worker processes: --jobs, else one per CPU core (at most 2) when training on the CPU.

    Why processes: these tiny models cannot keep two cores busy with intra-op threads, so two
    runs side by side (one thread each) finish the default demo in about half the time.
    """
    import torch

    if args.jobs is not None:
        if args.jobs < 1:
            raise SystemExit("pcr-fast demo: --jobs must be >= 1")
        return min(args.jobs, n_runs)
    on_gpu = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    if on_gpu:
        return 1
    return max(1, min(2, os.cpu_count() or 1, n_runs))


_QUEUE = None


def _init_worker(threads: int, queue) -> None:
    import torch

    global _QUEUE
    _QUEUE = queue
    torch.set_num_threads(threads)


def _worker_progress(n: int) -> None:
    _QUEUE.put(n)


def _run_one(spec: dict) -> dict:
    from .eval.runner import run_experiment

    return run_experiment(progress=_worker_progress, **spec)


def _run_parallel(specs: List[dict], jobs: int, args) -> List[dict]:
    import multiprocessing as mp
    import queue as queue_mod
    from concurrent.futures import ProcessPoolExecutor

    from tqdm.auto import tqdm

    ctx = mp.get_context("spawn")
    manager = ctx.Manager()
    q = manager.Queue()
    threads = max(1, (args.threads or os.cpu_count() or 1) // jobs)
    total_steps = sum(s["steps"] for s in specs)
    results: List[Optional[dict]] = [None] * len(specs)
    done = 0
    with ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_init_worker, initargs=(threads, q)) as pool, \
            tqdm(total=total_steps, desc=f"training ({jobs} processes)", unit="step",
                 disable=args.no_progress, dynamic_ncols=True) as bar:
        futures = {pool.submit(_run_one, s): i for i, s in enumerate(specs)}
        pending = set(futures)
        while pending:
            try:
                while True:
                    bar.update(q.get(timeout=0.2))
            except queue_mod.Empty:
                pass
            for f in [f for f in pending if f.done()]:
                pending.discard(f)
                results[futures[f]] = f.result()
                done += 1
                bar.clear()
                _print_run(results[futures[f]], done, len(specs))
                bar.refresh()
        while not q.empty():
            bar.update(q.get())
    manager.shutdown()
    return results


def _bench_dir() -> Optional[str]:
    here = os.path.dirname(os.path.abspath(__file__))
    for cand in (os.path.join(os.getcwd(), "benchmarks"), os.path.join(os.path.dirname(here), "benchmarks")):
        if os.path.isdir(cand):
            return cand
    return None


def _bench(args) -> int:
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pcr-fast", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_demo_parser(sub)
    b = sub.add_parser("bench", help="run the benchmark scripts in benchmarks/ (bench_*.py)")
    b.add_argument("names", nargs="*", help="substrings selecting scripts (default: all)")
    b.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="arguments passed to every script")
    b.set_defaults(func=_bench)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
