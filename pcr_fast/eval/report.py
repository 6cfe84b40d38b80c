"""Side-by-side reporting of runs: a text table, results.json and a PNG chart."""
from __future__ import annotations

import json
import math
import os
from collections import OrderedDict
from typing import Dict, Iterable, List, Sequence

from ..environment import basic_record

METRICS = ("asr", "clean_accuracy", "bleu", "false_trigger_rate")


def _mean_std(values: Sequence[float]):
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std


def summarize(runs: Iterable[Dict]) -> List[Dict]:
    """Mean and standard deviation over seeds, per (attack, defense)."""
    groups: "OrderedDict[tuple, List[Dict]]" = OrderedDict()
    for r in runs:
        groups.setdefault((r["attack"], r["defense"]), []).append(r)
    out = []
    for (attack, defense), rs in groups.items():
        row = {"attack": attack, "defense": defense, "seeds": [r["seed"] for r in rs],
               "poison_ratio": rs[0]["poison_ratio"]}
        for m in METRICS:
            mean, std = _mean_std([float(r[m]) for r in rs])
            row[m], row[m + "_std"] = mean, std
        out.append(row)
    return out


def _fmt(row: Dict, key: str) -> str:
    if row is None:
        return "-"
    s = f"{100 * row[key]:.1f}"
    if len(row["seeds"]) > 1:
        s += f"±{100 * row[key + '_std']:.1f}"
    return s


def format_table(runs: Iterable[Dict]) -> str:
    """A Markdown table, one row per attack: ASR / accuracy / BLEU / false triggers, plain vs PCR (%)."""
    summary = summarize(runs)
    attacks = list(OrderedDict.fromkeys(r["attack"] for r in summary))
    by = {(r["attack"], r["defense"]): r for r in summary}
    head = ("| attack | ASR plain | ASR PCR | accuracy plain | accuracy PCR | BLEU-4 plain | BLEU-4 PCR "
            "| false-trigger plain | false-trigger PCR |")
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for a in attacks:
        p, d = by.get((a, "none")), by.get((a, "pcr"))
        cells = [a]
        for key in METRICS:
            cells += [_fmt(p, key), _fmt(d, key)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_results(runs: List[Dict], out_dir: str, config: Dict) -> str:
    """results.json with the runs (top-level ``runs``), the per-attack summary and the config."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "results.json")
    record = {"runs": runs, "summary": summarize(runs), "config": config,
              "environment": basic_record(config.get("device"))}
    with open(path, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2, default=str)
    return path


def save_chart(runs: Iterable[Dict], path: str) -> str:
    """PNG: ASR and clean quality (accuracy, BLEU-4) per attack, plain SFT vs PCR (mean ± std)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = summarize(runs)
    attacks = list(OrderedDict.fromkeys(r["attack"] for r in summary))
    by = {(r["attack"], r["defense"]): r for r in summary}
    panels = [("asr", "attack success rate (lower is better)"), ("clean_accuracy", "clean answer accuracy"),
              ("bleu", "clean caption BLEU-4")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    width = 0.38
    for ax, (key, title) in zip(axes[0], panels):
        for k, (defense, label, colour) in enumerate((("none", "plain SFT", "#d1495b"), ("pcr", "PCR", "#00798c"))):
            xs, ys, es = [], [], []
            for i, a in enumerate(attacks):
                row = by.get((a, defense))
                if row is not None:
                    xs.append(i + (k - 0.5) * width)
                    ys.append(100 * row[key])
                    es.append(100 * row[key + "_std"])
            ax.bar(xs, ys, width, yerr=es, label=label, color=colour, capsize=2)
        ax.set_xticks(range(len(attacks)))
        ax.set_xticklabels(attacks, rotation=30, ha="right", fontsize=8)
        ax.set_ylim(0, 105)
        ax.set_ylabel("%")
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=2, fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
