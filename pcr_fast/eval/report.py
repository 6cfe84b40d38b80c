"""Side-by-side reporting of runs: a Markdown table, results.json and a PNG chart.

Runs are grouped by (poison ratio, attack, variant), where the variant is ``plain`` (no
defense) or the PCR mode (``inline``, ``scan``, ``online``). Every defended run is paired
with the plain run of the same attack, seed, poison ratio and schedule: its *cost ratio*
is ``(forward + 2 × backward samples) / the same of plain SFT``, counted on the model.
"""
from __future__ import annotations

import json
import math
import os
from collections import OrderedDict
from typing import Dict, Iterable, List, Optional, Sequence

from ..environment import basic_record

METRICS = ("asr", "clean_accuracy", "bleu", "false_trigger_rate")
LABELS = {"asr": "ASR", "clean_accuracy": "accuracy", "bleu": "BLEU-4", "false_trigger_rate": "false-trigger",
          "cost_ratio": "cost ×plain"}
VARIANT_NAMES = {"plain": "plain SFT", "inline": "PCR inline", "scan": "PCR scan", "online": "PCR online",
                 "control": "inline path, no test"}


def variant(run: Dict) -> str:
    """The run's ``variant`` if it names one, else ``plain`` for a run without defense and its
    PCR mode otherwise."""
    if run.get("variant"):
        return str(run["variant"])
    if run.get("defense", "none") == "none":
        return "plain"
    pcr = run.get("pcr") or {}
    return str(pcr.get("mode", "pcr"))


def compute_cost(run: Dict) -> Optional[int]:
    """Forward + 2 × backward samples of a run (None if it did not count them)."""
    c = run.get("compute")
    if not c:
        return None
    return int(c["forward_samples"]) + 2 * int(c["backward_samples"])


def _pair_key(run: Dict) -> tuple:
    return (run["attack"], run["seed"], run["poison_ratio"], run.get("init"), run.get("steps"), run.get("model"))


def cost_ratios(runs: Sequence[Dict]) -> List[Optional[float]]:
    """Per run: its counted cost over the cost of the matching plain SFT run (None without one)."""
    plain = {_pair_key(r): compute_cost(r) for r in runs if variant(r) == "plain"}
    out = []
    for r in runs:
        base, cost = plain.get(_pair_key(r)), compute_cost(r)
        out.append(cost / base if base and cost is not None else None)
    return out


def _mean_std(values: Sequence[float]):
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std


def summarize(runs: Iterable[Dict]) -> List[Dict]:
    """Mean and standard deviation over seeds, per (poison ratio, attack, variant), with the
    mean cost ratio against plain SFT."""
    runs = list(runs)
    ratios = cost_ratios(runs)
    groups: "OrderedDict[tuple, List[tuple]]" = OrderedDict()
    for r, c in zip(runs, ratios):
        groups.setdefault((r["poison_ratio"], r["attack"], variant(r)), []).append((r, c))
    out = []
    for (ratio, attack, var), rs in groups.items():
        row = {"poison_ratio": ratio, "attack": attack, "variant": var, "defense": rs[0][0]["defense"],
               "seeds": [r["seed"] for r, _ in rs], "init": rs[0][0].get("init"), "epochs": rs[0][0].get("epochs")}
        for m in METRICS:
            mean, std = _mean_std([float(r[m]) for r, _ in rs])
            row[m], row[m + "_std"] = mean, std
        costs = [c for _, c in rs if c is not None]
        if costs:
            row["cost_ratio"], row["cost_ratio_std"] = _mean_std(costs)
        out.append(row)
    return out


def _fmt(row: Optional[Dict], key: str, percent: bool = True) -> str:
    if row is None or key not in row:
        return "-"
    scale = 100 if percent else 1
    s = f"{scale * row[key]:.1f}" if percent else f"{row[key]:.3f}"
    if len(row["seeds"]) > 1:
        s += f"±{scale * row[key + '_std']:.1f}" if percent else f"±{row[key + '_std']:.3f}"
    return s


def _variants(summary: Sequence[Dict]) -> List[str]:
    found = list(OrderedDict.fromkeys(r["variant"] for r in summary))
    order = [v for v in ("plain", "inline", "scan", "online", "control") if v in found]
    return order + [v for v in found if v not in order]


def format_table(runs: Iterable[Dict], metrics: Sequence[str] = METRICS) -> str:
    """A Markdown table, one row per (poison ratio, attack): each metric per variant (%,
    mean ± std over seeds), then each defense's cost ratio against plain SFT."""
    summary = summarize(runs)
    variants = _variants(summary)
    keys = list(OrderedDict.fromkeys((r["poison_ratio"], r["attack"]) for r in summary))
    by = {(r["poison_ratio"], r["attack"], r["variant"]): r for r in summary}
    several = len({k[0] for k in keys}) > 1
    head = (["poison"] if several else []) + ["attack"]
    for m in metrics:
        head += [f"{LABELS[m]} {v}" for v in variants]
    head += [f"{LABELS['cost_ratio']} {v}" for v in variants if v != "plain"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for ratio, attack in keys:
        cells = ([f"{100 * ratio:g} %"] if several else []) + [attack]
        for m in metrics:
            cells += [_fmt(by.get((ratio, attack, v)), m) for v in variants]
        cells += [_fmt(by.get((ratio, attack, v)), "cost_ratio", percent=False) for v in variants if v != "plain"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def regime(runs: Sequence[Dict]) -> Dict:
    """The regime the runs share: model, init, poison ratios, epochs, steps, seeds."""
    def values(key):
        return sorted({r.get(key) for r in runs if r.get(key) is not None})
    return {"model": values("model"), "init": values("init"), "poison_ratio": values("poison_ratio"),
            "epochs": values("epochs"), "steps": values("steps"), "seeds": values("seed"),
            "variants": _variants(summarize(runs))}


def title(runs: Sequence[Dict]) -> str:
    """One line naming the model, init, poison ratio(s), epochs and seeds of the runs."""
    reg = regime(runs)
    ratios = ", ".join(f"{100 * p:g} %" for p in reg["poison_ratio"])
    epochs = ", ".join(f"{e:.2f}".rstrip("0").rstrip(".") for e in reg["epochs"]) if reg["epochs"] else "?"
    steps = ", ".join(str(s) for s in reg["steps"])
    seeds = ",".join(str(s) for s in reg["seeds"])
    return (f"{'/'.join(reg['model']) or 'llava'} · init {'/'.join(reg['init']) or 'scratch'} · poison {ratios} · "
            f"{epochs} epoch(s) ({steps} steps) · seeds {seeds}")


def write_results(runs: List[Dict], out_dir: str, config: Dict, name: str = "results.json") -> str:
    """results.json: the runs (top-level ``runs``, each with its ``cost_ratio``), the summary,
    the regime, the config and the environment (machine, versions, commit)."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, name)
    for r, c in zip(runs, cost_ratios(runs)):
        r["cost_ratio"] = c
    record = {"runs": runs, "summary": summarize(runs), "regime": regime(runs),
              "cost": "forward_samples + 2 * backward_samples, counted on the model; ratio to the plain SFT run "
                      "of the same attack, seed, poison ratio and schedule",
              "config": config, "environment": basic_record(config.get("device"))}
    with open(path, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2, default=str)
    return path


_COLOURS = {"plain": "#d1495b", "inline": "#00798c", "scan": "#edae49", "online": "#66a182", "control": "#8d96a3"}


def save_chart(runs: Iterable[Dict], path: str) -> str:
    """PNG: per poison ratio one row of panels — ASR, clean accuracy, BLEU-4 (mean ± std,
    %) and the cost ratio against plain SFT — grouped bars per attack and variant, every bar
    labelled with its value (a 0 % bar stays visible); the title states the regime."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = list(runs)
    summary = summarize(runs)
    variants = _variants(summary)
    ratios = sorted({r["poison_ratio"] for r in summary})
    attacks = list(OrderedDict.fromkeys(r["attack"] for r in summary))
    by = {(r["poison_ratio"], r["attack"], r["variant"]): r for r in summary}
    panels = [("asr", "attack success rate % (lower is better)", True), ("clean_accuracy", "clean accuracy %", True),
              ("bleu", "clean caption BLEU-4 %", True), ("cost_ratio", "cost × plain SFT (fwd + 2·bwd)", False)]
    fig, axes = plt.subplots(len(ratios), len(panels), figsize=(4.6 * len(panels), 3.4 * len(ratios) + 0.6),
                             squeeze=False)
    width = 0.8 / max(1, len(variants))
    for row, ratio in enumerate(ratios):
        for ax, (key, label, percent) in zip(axes[row], panels):
            for k, var in enumerate(variants):
                xs, ys, es = [], [], []
                for i, a in enumerate(attacks):
                    r = by.get((ratio, a, var))
                    if r is not None and key in r:
                        scale = 100 if percent else 1
                        xs.append(i + (k - (len(variants) - 1) / 2) * width)
                        ys.append(scale * r[key])
                        es.append(scale * r[key + "_std"])
                if not xs:
                    continue
                bars = ax.bar(xs, ys, width, yerr=es, label=VARIANT_NAMES.get(var, var),
                              color=_COLOURS.get(var, "#888888"), capsize=2, edgecolor="black", linewidth=0.4)
                ax.bar_label(bars, labels=[f"{y:.0f}" if percent else f"{y:.2f}" for y in ys], fontsize=6,
                             padding=1, rotation=90 if len(variants) > 2 else 0)
            ax.set_xticks(range(len(attacks)))
            ax.set_xticklabels(attacks, rotation=30, ha="right", fontsize=8)
            if percent:
                ax.set_ylim(0, 118)
            else:
                ax.axhline(1.0, color="black", linewidth=0.6)
                ax.set_ylim(0, max(1.2, ax.get_ylim()[1] * 1.15))
            ax.set_title(f"{label} — poison {100 * ratio:g} %", fontsize=9)
            ax.grid(axis="y", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=len(variants), fontsize=9, frameon=False,
               bbox_to_anchor=(0.5, 1.0 - 0.25 / fig.get_figheight()))
    fig.suptitle(title(runs), fontsize=10, y=1.0 - 0.02 / fig.get_figheight())
    fig.tight_layout(rect=(0, 0, 1, 1.0 - 0.75 / fig.get_figheight()))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
