"""``pcr-fast demo``: plain SFT vs PCR on poisoned data, side by side (table, results.json, PNG)."""
from __future__ import annotations

import argparse
import os
import time
from typing import List, Optional

from .options import (add_config_flags, config_from_args, fraction, int_list, parse_csv, positive_float, positive_int,
                      writable_dir)

DEMO_DEFAULT_ATTACKS = ("badnets", "badnets_solid", "blended", "sig", "wanet", "noise")


def add_demo_parser(sub) -> None:
    """The ``demo`` subcommand."""
    from ..eval.defaults import DEMO_PCR_CONFIG
    from ..eval.models import HARNESS_FAMILIES
    from ..eval.triggers import ATTACKS

    p = sub.add_parser(
        "demo", help="fine-tune a tiny VLM on poisoned data, plain SFT vs PCR, and compare",
        description="Fine-tunes a tiny vision-language model (built from a config: no download; by "
                    "default first pre-trained on clean data and cached) twice on the same poisoned "
                    "digits data -- plain SFT and SFT with PCR -- and prints, per attack, the attack "
                    "success rate (ASR), clean quality and the counted compute against plain SFT side by "
                    "side; writes results.json and results.png to --out. PCR's mode is inline for "
                    "--init pretrained (the test inside the training step) and scan for --init scratch "
                    "(where every answer is new at first), unless --mode says otherwise.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("experiment")
    g.add_argument("--attacks", type=parse_csv, default=",".join(DEMO_DEFAULT_ATTACKS),
                   help=f"comma-separated triggers, from: {', '.join(ATTACKS)}")
    g.add_argument("--init", default="pretrained", choices=("pretrained", "scratch"),
                   help="pretrained: a tiny VLM pre-trained on a clean, disjoint image split (cached under "
                        "~/.cache/pcr_fast), fine-tuned on the ~24k-sample instruction set; scratch: random "
                        "init, the two basic tasks (EVAL_NOTES sections 1-8)")
    g.add_argument("--poison-ratio", type=fraction, default=0.03, help="fraction of training samples poisoned")
    g.add_argument("--epochs", type=positive_float, default=None,
                   help="passes over the training set (default: 1 when pretrained; give --epochs or --steps)")
    g.add_argument("--steps", type=positive_int, default=None, help="optimisation steps per run (default from "
                   "scratch: 600)")
    g.add_argument("--batch-size", type=positive_int, default=32, help="training batch size")
    g.add_argument("--test-size", type=positive_int, default=300, help="held-out digits images for evaluation")
    g.add_argument("--lr", type=positive_float, default=None,
                   help="AdamW learning rate (default: 1e-3, the fine-tune's and from scratch)")
    g.add_argument("--seeds", type=int_list, default="0",
                   help="comma-separated seeds (split, poisoning, init, batches); results are averaged")
    g.add_argument("--seed", type=int, default=None, help="a single seed (overrides --seeds)")
    g.add_argument("--model", default="llava", choices=HARNESS_FAMILIES, help="model family")
    g.add_argument("--target", default=None, help="the attacker's target response (default: 'visit evil dot com')")
    g.add_argument("--defenses", type=parse_csv, default="none,pcr", help="which of none,pcr to run")
    g.add_argument("--out", default="pcr_demo_out", help="output folder for results.json and results.png")
    g.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    g.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads in all (default: all cores)")
    g.add_argument("--jobs", type=positive_int, default=None,
                   help="runs trained side by side in worker processes (default: 2 on a CPU with 2+ cores, 1 on a GPU)")
    g.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    add_config_flags(p, DEMO_PCR_CONFIG, "PCR (augmentation, detector, objective, schedule; defaults are the "
                     "library's measured values)")
    p.set_defaults(func=run_demo, parser=p, mode=None)   # None: by --init (see the description)


def run_demo(args) -> int:
    import torch

    from ..eval import report
    from ..eval.defaults import DEMO_PCR_CONFIG
    from ..eval.poison import DEFAULT_TARGET
    from ..eval.runner import DEFENSES, run_experiment
    from ..eval.triggers import ATTACKS

    for a in args.attacks:
        if a not in ATTACKS:
            args.parser.error(f"--attacks: unknown attack {a!r} (choose from {', '.join(ATTACKS)})")
    for d in args.defenses:
        if d not in DEFENSES:
            args.parser.error(f"--defenses: unknown defense {d!r} (choose from {', '.join(DEFENSES)})")
    seeds = [args.seed] if args.seed is not None else args.seeds
    try:
        writable_dir(args.out)  # fail now, not after training
    except argparse.ArgumentTypeError as err:
        args.parser.error(f"--out: {err}")
    if args.mode is None:
        args.mode = "inline" if args.init == "pretrained" else "scan"
    pcr = config_from_args(args.parser, args, DEMO_PCR_CONFIG)
    if args.epochs is not None and args.steps is not None:
        args.parser.error("give --epochs or --steps, not both")
    target = args.target or DEFAULT_TARGET
    from ..eval.runner import FINETUNE_EPOCHS, SCRATCH_STEPS, prepare_experiment, training_steps

    # the regime's step count (for the progress bar), and each seed's pre-trained model made
    # here once rather than by two workers at the same time (a fresh cache pre-trains)
    t0 = time.perf_counter()
    sizes = {}
    threads = torch.get_num_threads()
    if not _on_gpu(args):
        # the tiny model cannot use two cores; a second thread only fights other work for one
        torch.set_num_threads(args.threads or 1)
    for seed in seeds:
        try:
            exp = prepare_experiment(args.attacks[0], args.poison_ratio, seed, args.model, init=args.init,
                                     target=target, test_size=args.test_size)
        except ValueError as err:
            args.parser.error(str(err))
        sizes[seed] = exp.num_samples
        if args.init == "pretrained":
            exp.initial_model(args.device, progress=not args.no_progress)
    torch.set_num_threads(threads)
    epochs, steps = args.epochs, args.steps
    if epochs is None and steps is None:   # the runner's defaults, written out for the record
        epochs, steps = (FINETUNE_EPOCHS, None) if args.init == "pretrained" else (None, SCRATCH_STEPS)
    jobs_spec = []
    for attack in args.attacks:
        for seed in seeds:
            for defense in args.defenses:
                jobs_spec.append(dict(attack=attack, defense=defense, poison_ratio=args.poison_ratio, init=args.init,
                                      epochs=epochs, steps=steps, seed=seed, model=args.model,
                                      pcr=pcr if defense == "pcr" else None, batch_size=args.batch_size,
                                      lr=args.lr, target=target, test_size=args.test_size, device=args.device,
                                      total_steps=training_steps(sizes[seed], args.batch_size, epochs, steps)))
    jobs = _num_jobs(args, len(jobs_spec))
    if jobs > 1:
        runs = _run_parallel(jobs_spec, jobs, args)
    else:
        if args.threads:
            torch.set_num_threads(args.threads)
        runs = []
        for spec in jobs_spec:
            runs.append(run_experiment(progress=not args.no_progress, **_run_args(spec)))
            _print_run(runs[-1], len(runs), len(jobs_spec))
    config = {"attacks": args.attacks, "poison_ratio": args.poison_ratio, "init": args.init, "epochs": epochs,
              "steps": steps, "seeds": seeds, "model": args.model, "batch_size": args.batch_size,
              "lr": runs[0]["lr"] if runs else args.lr, "target": target, "pcr": pcr.to_dict(),
              "device": args.device, "jobs": jobs, "seconds": round(time.perf_counter() - t0, 1)}
    print()
    print(f"{report.title(runs)}, PCR mode {pcr.mode!r} (rates in %, mean ± std over seeds; cost = forward + "
          "2 × backward samples counted on the model, against plain SFT):")
    print(report.format_table(runs))
    path = report.write_results(runs, args.out, config)
    png = report.save_chart(runs, os.path.join(args.out, "results.png"))
    print(f"\nwrote {path} and {png} ({config['seconds']:.0f}s)")
    return 0


def _run_args(spec: dict) -> dict:
    return {k: v for k, v in spec.items() if k != "total_steps"}


def _print_run(r, done: int, total: int) -> None:
    c = r.get("compute") or {}
    print(f"[{done}/{total}] {r['attack']:<14} {r['defense']:<4} seed {r['seed']}: ASR {100 * r['asr']:5.1f}%  "
          f"accuracy {100 * r['clean_accuracy']:5.1f}%  BLEU-4 {100 * r['bleu']:5.1f}  "
          f"fwd {c.get('forward_samples', 0)} bwd {c.get('backward_samples', 0)}  "
          f"({r['train_seconds']:.0f}s)", flush=True)


def _on_gpu(args) -> bool:
    """Whether the runs train on a GPU (``--device``, else CUDA when available)."""
    import torch

    return (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")


def _num_jobs(args, n_runs: int) -> int:
    """Worker processes: --jobs, else one per CPU core (at most 2) when training on the CPU.

    Why processes: these tiny models cannot keep two cores busy with intra-op threads, so two
    runs side by side (one thread each) finish the default demo in about half the time.
    """
    if args.jobs is not None:
        return min(args.jobs, n_runs)
    if _on_gpu(args):
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
    from ..eval.runner import run_experiment

    return run_experiment(progress=_worker_progress, **_run_args(spec))


def _run_parallel(specs: List[dict], jobs: int, args) -> List[dict]:
    import multiprocessing as mp
    import queue as queue_mod
    from concurrent.futures import ProcessPoolExecutor

    from tqdm.auto import tqdm

    ctx = mp.get_context("spawn")
    manager = ctx.Manager()
    q = manager.Queue()
    threads = max(1, (args.threads or os.cpu_count() or 1) // jobs)
    total_steps = sum(s["total_steps"] for s in specs)
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
