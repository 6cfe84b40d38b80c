"""The pretrained-setting grid of EVAL_NOTES §9: attacks × seeds × poison ratios × variants
(plain SFT, PCR inline, PCR scan, PCR online) through ``run_experiment``, with the counted
compute of every run and its cost ratio against plain SFT.

Resumable: every finished run is appended to ``--runs`` (JSON lines) and skipped next time;
``--report`` writes the results JSON + PNG (and prints the Markdown table) from what is there.

    python research/eval_grid.py --runs benchmarks/results/eval_pretrained_runs.jsonl \\
        --attacks badnets,badnets_solid,blended,sig,wanet,noise --seeds 0,1,2 \\
        --poison-ratios 0.01,0.03,0.05,0.1 --variants plain,inline
    python research/eval_grid.py --runs ... --report benchmarks/results/eval_pretrained_cpu_DATE \
        --poison-ratios 0,0.01,0.03,0.05,0.1 --variants plain,inline     # selects the runs reported
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed

VARIANTS = ("plain", "inline", "scan", "online", "control")


def config_of(variant: str):
    """The PCRConfig of a variant: the library's settings of each mode; ``control`` is the inline
    step with no test budget (nothing is ever tested, so nothing is dropped): plain SFT through
    the defense's own CE path, which measures how far a mere change of the training
    trajectory moves the clean metrics."""
    from pcr_fast import PCRConfig

    if variant == "plain":
        return None
    if variant == "control":
        return PCRConfig(mode="inline").override(test_budget=0.0)
    return PCRConfig(mode=variant)


def key(job: dict) -> tuple:
    return (job["attack"], job["seed"], float(job["poison_ratio"]), job["variant"], float(job["epochs"]))


def run_job(job: dict) -> dict:
    import torch

    torch.set_num_threads(1)
    from pcr_fast.eval import run_experiment

    cfg = config_of(job["variant"])
    t0 = time.time()
    r = run_experiment(job["attack"], "none" if cfg is None else "pcr", job["poison_ratio"], seed=job["seed"],
                       init="pretrained", epochs=job["epochs"], pcr=cfg, progress=False)
    from pcr_fast.environment import git_commit

    r.pop("loss_history", None)
    r["variant"] = job["variant"]
    r["git"] = git_commit()
    r["wall_seconds"] = round(time.time() - t0, 1)
    return r


def done_keys(path: str) -> set:
    if not os.path.exists(path):
        return set()
    out = set()
    with open(path) as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                out.add((r["attack"], r["seed"], float(r["poison_ratio"]), r["variant"], float(r["epochs_requested"])))
    return out


def load(path: str) -> list:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def report(runs_path: str, prefix: str, keep=None) -> None:
    """Results JSON + PNG + Markdown tables of the runs in ``runs_path`` that ``keep`` accepts."""
    from pcr_fast.eval import report as rep

    runs = [r for r in load(runs_path) if keep is None or keep(r)]
    order = {v: i for i, v in enumerate(VARIANTS)}
    runs.sort(key=lambda r: (r["poison_ratio"], r["attack"], r["seed"], order.get(r["variant"], 9)))
    config = {"command": " ".join(sys.argv), "runs_file": runs_path,
              "variants": {v: (config_of(v).to_dict() if config_of(v) else None) for v in VARIANTS}}
    path = rep.write_results(runs, os.path.dirname(prefix) or ".", config, name=os.path.basename(prefix) + ".json")
    png = rep.save_chart(runs, prefix + ".png")
    print(rep.title(runs))
    print(rep.format_table(runs, metrics=("asr", "clean_accuracy", "bleu")))
    print()
    print(per_seed_table(runs))
    print(f"\nwrote {path} and {png}")


def per_seed_table(runs: list) -> str:
    """Markdown, one row per (poison ratio, attack, seed): plain → inline ASR, accuracy, BLEU-4
    (%), the inline run's counted cost ratio (wall times of the grid's runs overlap other work: not compared), what it tested and
    flagged (split by the true poisoned ids) and the target tokens it named."""
    from pcr_fast.eval import report as rep

    by = {(r["poison_ratio"], r["attack"], r["seed"], r["variant"]): (r, c)
          for r, c in zip(runs, rep.cost_ratios(runs))}
    lines = ["| poison | attack | seed | ASR plain → inline | accuracy | BLEU-4 | cost ×plain | "
             "tested rows (poisoned / clean) | flagged (poisoned / clean) | targets named |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for (ratio, attack, seed, var), (r, c) in sorted(by.items(), key=lambda kv: kv[0][:3]):
        if var != "inline" or (ratio, attack, seed, "plain") not in by:
            continue
        p = by[(ratio, attack, seed, "plain")][0]
        summ = r.get("inline_summary") or r.get("scan_summary") or {}
        named = " ".join(t.get("token", str(t["token_id"])) for t in (r.get("inline") or {}).get("targets", [])) or "none"
        pct = lambda x: f"{100 * x:.1f}"  # noqa: E731
        lines.append(f"| {100 * ratio:g} % | {attack} | {seed} | {pct(p['asr'])} → {pct(r['asr'])} | "
                     f"{pct(p['clean_accuracy'])} → {pct(r['clean_accuracy'])} | {pct(p['bleu'])} → {pct(r['bleu'])} | "
                     f"{c:.3f} | "
                     f"{summ.get('tested_poisoned', '-')} / {summ.get('tested_clean', '-')} | "
                     f"{summ.get('flagged_poisoned', '-')} / {summ.get('flagged_clean', '-')} | {named} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", required=True, help="JSON-lines file of finished runs (appended to, resumable)")
    p.add_argument("--attacks", default="badnets,badnets_solid,blended,sig,wanet,noise")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--poison-ratios", default="0.03")
    p.add_argument("--variants", default="plain,inline")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--report", default=None, help="write PREFIX.json and PREFIX.png from --runs and exit")
    args = p.parse_args(argv)
    if args.report:   # --attacks/--seeds/--poison-ratios/--variants select the runs reported
        attacks, seeds = set(args.attacks.split(",")), {int(x) for x in args.seeds.split(",")}
        ratios, variants = {float(x) for x in args.poison_ratios.split(",")}, set(args.variants.split(","))
        report(args.runs, args.report, keep=lambda r: r["attack"] in attacks and r["seed"] in seeds
               and float(r["poison_ratio"]) in ratios and r["variant"] in variants)
        return 0
    variants = [v for v in args.variants.split(",") if v]
    for v in variants:
        if v not in VARIANTS:
            p.error(f"--variants: unknown variant {v!r} (choose from {', '.join(VARIANTS)})")
    seeds = [int(s) for s in args.seeds.split(",")]
    jobs = [dict(attack=a, seed=s, poison_ratio=float(pr), variant=v, epochs=args.epochs)
            for pr in args.poison_ratios.split(",") for s in seeds for a in args.attacks.split(",")
            for v in variants]
    done = done_keys(args.runs)
    todo = [j for j in jobs if key(j) not in done]
    print(f"{len(jobs)} runs, {len(jobs) - len(todo)} done, {len(todo)} to run", flush=True)
    # pre-train (or load) each seed's model once here, not in two workers at the same time
    from pcr_fast.eval.runner import prepare_experiment

    for s in sorted({j["seed"] for j in todo}):
        prepare_experiment("badnets", 0.0, s, init="pretrained").initial_model(progress=True)
    import multiprocessing as mp

    with ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("spawn")) as pool:
        futures = {pool.submit(run_job, j): j for j in todo}
        for f in as_completed(futures):
            j = futures[f]
            r = f.result()
            r["epochs_requested"] = j["epochs"]
            with open(args.runs, "a") as out:
                out.write(json.dumps(r, default=str) + "\n")
            print(f"{j['variant']:<7} {j['attack']:<14} seed {j['seed']} poison {j['poison_ratio']:.2f}: "
                  f"ASR {100 * r['asr']:5.1f} acc {100 * r['clean_accuracy']:5.1f} BLEU {100 * r['bleu']:5.1f} "
                  f"({r['wall_seconds']:.0f}s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
