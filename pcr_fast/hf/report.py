"""What the defense found, as one report: a dict (→ JSON), a CSV row per sample, and a
self-contained HTML page (thumbnails and a histogram of the scores embedded).

The input is the defense's memory — a :class:`~pcr_fast.BackdoorMemory` (scans) or an
:class:`~pcr_fast.InlineMemory` (the inline test); only their public ``flags``, ``targets``,
``token_shares()`` and ``summary()`` are read, and an inline memory's own per-sample scores —
the samples (:class:`SampleRecord`: ids, images, answers and the answers' token ids) and,
when a scan produced them, the per-sample cross-view scores. Whether the flags came from the
defense during training (``pcr-fast train``, ``trainer.pcr_report()``) or from one audit scan
(``pcr-fast scan``, ``pcr_fast.hf.scan_report``), the report has the same structure:

* ``counts``: samples, ``invariant`` (the cross-view test fired), ``flagged`` (the answer
  holds a target phrase: what the defense removes as poison), rows skipped in the file,
  scans (and, inline, the samples tested);
* ``targets``: each target phrase as text with its token ids, how many samples hold it and
  the share of them the cross-view test flagged; ``target_tokens``: the tokens themselves;
* ``thresholds``: the detector's and the target rule's settings;
* ``samples``: per sample its index, id, source line, image, answer, the three scores of
  :class:`~pcr_fast.defense.CrossViewScores` (``invariance``, ``view_ce``, ``confidence``:
  the original view's largest CE; null where the sample was not tested), ``invariant``,
  ``flagged`` and the phrase it holds.

Why ``flagged`` is "holds a target phrase" and not the cross-view test alone: the test also
fires on clean answers that half an image still supports (a content class, benchmarks/
EVAL_NOTES §8.1); what singles out poison is a *shared answer* most of whose samples are
invariant (DESIGN §4). Both are in the report.
"""
from __future__ import annotations

import base64
import csv
import datetime
import html
import io
import json
import logging
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..config import PCRConfig

logger = logging.getLogger(__name__)

REPORT_FORMAT = "pcr_fast.report/1"
SCORE_KEYS = ("invariance", "view_ce", "confidence")   # the names of CrossViewScores
CSV_COLUMNS = ("index", "id", "source", "image", "answer", "invariance", "view_ce", "confidence", "invariant",
               "flagged", "target")


@dataclass
class SampleRecord:
    """What a report shows of one sample (only ``index`` is required)."""

    index: int
    id: str = ""
    source: str = ""
    images: Sequence[str] = ()          # paths to open for thumbnails
    image_names: Sequence[str] = ()     # the paths as the data file writes them
    prompt: str = ""
    answer: str = ""
    answer_ids: Optional[Sequence[int]] = None   # token ids of the answers (as trained)
    extra: Dict[str, Any] = field(default_factory=dict)


def sample_records(dataset: Any, collator: Any = None) -> Optional[List[SampleRecord]]:
    """Records of a :class:`pcr_fast.data.ConversationDataset` (with its
    :class:`~pcr_fast.data.ConversationCollator`, for the answers' token ids); ``None`` for
    another dataset (the report then names samples by index)."""
    from ..data import ConversationCollator, ConversationDataset

    if not isinstance(dataset, ConversationDataset):
        return None
    use_ids = isinstance(collator, ConversationCollator)
    out = []
    for s in dataset.samples:
        ids = None
        if use_ids:
            ids = [t for answer in collator.answer_token_ids(s) for t in answer]
        out.append(SampleRecord(index=s.index, id=s.id, source=s.source, images=s.images, image_names=s.image_names,
                                prompt=s.prompt, answer=" / ".join(s.answers), answer_ids=ids))
    return out


def _decode(tokenizer: Any, ids: Sequence[int]) -> str:
    if tokenizer is None:
        return " ".join(str(i) for i in ids)
    text = tokenizer.decode(list(ids), skip_special_tokens=True).strip()
    return text or tokenizer.decode(list(ids)).strip()


def _runs(ids: Sequence[int], targets: set) -> List[Tuple[int, ...]]:
    """Maximal runs of consecutive target tokens in a token sequence."""
    runs, current = [], []
    for t in ids:
        if t in targets:
            current.append(int(t))
        elif current:
            runs.append(tuple(current))
            current = []
    if current:
        runs.append(tuple(current))
    return runs


def _score_lists(scores: Any, n: int) -> Optional[Dict[str, List[Optional[float]]]]:
    """``{key: [float | None] * n}`` from three (N,) tensors/lists (a tuple or a mapping)."""
    if scores is None:
        return None
    if isinstance(scores, Mapping):
        columns = [scores[k] for k in SCORE_KEYS]
    else:
        columns = list(scores)
    out = {}
    for key, col in zip(SCORE_KEYS, columns):
        values = col.detach().float().cpu().tolist() if isinstance(col, Tensor) else list(col)
        if len(values) != n:
            raise ValueError(f"scores[{key!r}] has {len(values)} values for {n} samples")
        out[key] = [None if v is None or not math.isfinite(v) else round(float(v), 6) for v in values]
    return out


def build_report(memory: Any, *, records: Optional[Sequence[SampleRecord]] = None,
                 scores: Any = None, tokenizer: Any = None, config: Optional[PCRConfig] = None,
                 kind: str = "scan", num_samples: Optional[int] = None, skipped: Sequence[Any] = (),
                 meta: Optional[Mapping[str, Any]] = None, defense: Optional[str] = None) -> Dict[str, Any]:
    """The report (a JSON-ready dict; structure in the module docstring).

    Args:
        memory: the defense's memory, a :class:`~pcr_fast.BackdoorMemory` or an
            :class:`~pcr_fast.InlineMemory` (``None``: no defense ran; the report then has
            counts only).
        records: per sample what to show (:func:`sample_records`); without them samples are
            named by index and target phrases cannot be assembled (the tokens are listed).
        scores: the per-sample ``(invariance, view_ce, confidence)``: three (N,) tensors or
            lists (NaN/inf/None where a sample was not scored), or a mapping with those keys
            (default: the memory's own, where it keeps them: the inline test).
        tokenizer: decodes the target tokens to text.
        config: the settings used (thresholds in the report).
        kind: ``"scan"`` (an audit) or ``"train"``.
        num_samples: the dataset size when neither memory nor records give it.
        skipped: rows of the data file that were left out (``BadRow`` or strings).
        meta: anything else to keep (model and data paths, the command line, …).
        defense: ``"pcr"`` or ``"none"`` (default: ``"pcr"`` when a memory is given).
    """
    cfg = config or PCRConfig()
    if memory is not None and not all(hasattr(memory, a) for a in ("flags", "targets", "token_shares", "summary")):
        raise ValueError(f"memory must be a BackdoorMemory, an InlineMemory or None, got {type(memory).__name__}")
    n = memory.flags.numel() if memory is not None else (len(records) if records is not None else (num_samples or 0))
    if records is not None and len(records) != n:
        raise ValueError(f"records has {len(records)} samples, the memory {n}")
    invariant = memory.flags.detach().cpu().tolist() if memory is not None else [False] * n
    target_ids = torch.nonzero(memory.targets).flatten().cpu().tolist() if memory is not None else []
    shares = memory.token_shares().detach().cpu() if memory is not None else None
    special = set(getattr(tokenizer, "all_special_ids", None) or [])
    targets = set(target_ids) - special   # an end-of-turn token is no phrase (it ends every answer)
    if scores is None and memory is not None and all(hasattr(memory, k) for k in SCORE_KEYS):
        scores = {k: getattr(memory, k) for k in SCORE_KEYS}   # the inline test keeps its scores
    score_cols = _score_lists(scores, n)

    holds: List[Optional[Tuple[int, ...]]] = [None] * n
    phrase_samples: Counter = Counter()
    phrase_invariant: Counter = Counter()
    if records is not None and targets:
        for r in records:
            if r.answer_ids is None:
                continue
            runs = _runs(r.answer_ids, targets)
            if runs:
                main = max(runs, key=len)
                holds[r.index] = main
                for run in set(runs):
                    phrase_samples[run] += 1
                    phrase_invariant[run] += int(invariant[r.index])
    phrases = [{"text": _decode(tokenizer, run), "token_ids": list(run), "samples": count,
                "invariant": phrase_invariant[run], "invariant_share": round(phrase_invariant[run] / count, 4)}
               for run, count in sorted(phrase_samples.items(), key=lambda kv: (-kv[1], kv[0]))]
    token_rows = [{"id": t, "text": _decode(tokenizer, [t]),
                   "invariant_share": round(float(shares[t]), 4) if shares is not None else None}
                  for t in target_ids]

    samples = []
    for i in range(n):
        r = records[i] if records is not None else SampleRecord(index=i, id=str(i))
        row: Dict[str, Any] = {"index": i, "id": r.id, "source": r.source,
                               "image": ", ".join(r.image_names) if r.image_names else "",
                               "answer": r.answer}
        for key in SCORE_KEYS:
            row[key] = score_cols[key][i] if score_cols is not None else None
        row["invariant"] = bool(invariant[i])
        row["flagged"] = holds[i] is not None
        row["target"] = _decode(tokenizer, holds[i]) if holds[i] is not None else None
        samples.append(row)

    summary = memory.summary() if memory is not None else {}
    counts = {"samples": n, "invariant": int(sum(invariant)), "flagged": sum(h is not None for h in holds),
              "skipped_rows": len(skipped), "scans": int(summary.get("scans", 0))}
    if "tested" in summary:
        counts["tested"] = int(summary["tested"])
    thresholds = {**{k: getattr(cfg.detector, k) for k in ("invariance_threshold", "view_confidence",
                                                           "original_confidence")},
                  "target_share": cfg.unlearn.target_share, "min_support": cfg.unlearn.min_support,
                  "views": cfg.augment.views, "mask_ratio": cfg.augment.mask_ratio, "unit": cfg.augment.unit,
                  "fill": cfg.augment.fill}
    thresholds.update(getattr(memory, "thresholds", None) or {})   # the inline test's budget and rule
    report: Dict[str, Any] = {
        "format": REPORT_FORMAT,
        "kind": kind,
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
        "defense": defense or ("pcr" if memory is not None else "none"),
        "counts": counts,
        "targets": phrases,
        "target_tokens": token_rows,
        "mode": cfg.mode if memory is not None else None,
        "thresholds": thresholds,
        "meta": dict(meta or {}),
        "skipped_rows": [str(b) for b in skipped],
        "samples": samples,
    }
    if records is not None and targets and not any(r.answer_ids is not None for r in records):
        logger.warning("report: the records carry no answer token ids; target phrases are listed as tokens only")
    return report


# --------------------------------------------------------------------------- writers
def write_json(report: Mapping[str, Any], path: str) -> str:
    """Write the report as JSON (via a temporary file: a failed write leaves no half file)."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1, ensure_ascii=False)
    os.replace(tmp, path)
    return path


def write_csv(report: Mapping[str, Any], path: str) -> str:
    """One row per sample (:data:`CSV_COLUMNS`)."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in report["samples"]:
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in CSV_COLUMNS})
    os.replace(tmp, path)
    return path


def _png_base64(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def score_histogram(report: Mapping[str, Any]) -> Optional[str]:
    """A PNG (base64) with one histogram per score, flagged vs other samples, thresholds marked;
    ``None`` without scores."""
    rows = [r for r in report["samples"] if r.get("invariance") is not None]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    th = report["thresholds"]
    panels = (("invariance", "max symmetric KL, original vs masked (log10 nats)", th["invariance_threshold"], True),
              ("view_ce", "max CE of the masked view (nats)", th["view_confidence"], False),
              ("confidence", "max CE of the original view (nats)", th["original_confidence"], False))
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.2))
    for ax, (key, label, threshold, log) in zip(axes, panels):
        def values(flagged: bool):
            out = [r[key] for r in rows if bool(r["flagged"]) == flagged]
            return [math.log10(max(v, 1e-6)) for v in out] if log else out
        both = values(False) + values(True)
        lo, hi = min(both), max(both)
        bins = [lo + (hi - lo) * i / 30 for i in range(31)] if hi > lo else 10
        ax.hist([values(False), values(True)], bins=bins, stacked=True, color=["#9aa7b8", "#d9534f"],
                label=["other samples", "flagged"])
        ax.axvline(math.log10(threshold) if log else threshold, color="black", linestyle="--", linewidth=1,
                   label="threshold")
        ax.set_xlabel(label)
        ax.set_ylabel("samples")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    out = _png_base64(fig)
    plt.close(fig)
    return out


def _thumbnail(path: str, side: int = 96) -> Optional[str]:
    """A PNG (base64) of the image scaled to ``side`` px (small images upscaled, pixels kept sharp)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            scale = side / max(im.size)
            size = (max(1, round(im.size[0] * scale)), max(1, round(im.size[1] * scale)))
            im = im.resize(size, Image.NEAREST if scale > 1 else Image.BILINEAR)
            buf = io.BytesIO()
            im.save(buf, format="PNG")
            return base64.b64encode(buf.getvalue()).decode("ascii")
    except Exception:   # a thumbnail is decoration: a broken image must not break the report
        return None


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:22px}h2{font-size:18px;margin-top:28px}
.found{padding:12px 16px;border-radius:6px;background:#fdf1f0;border:1px solid #e4b9b6}
.clean{padding:12px 16px;border-radius:6px;background:#eef7ee;border:1px solid #b9d9b9}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ddd;padding:4px 8px;text-align:left}
.cards{display:flex;flex-wrap:wrap;gap:10px}
.card{border:1px solid #ddd;border-radius:6px;padding:8px;width:210px;font-size:12px}
.card img{display:block;margin:0 auto 6px auto;image-rendering:pixelated;border:1px solid #888}
.answer{font-weight:600;word-break:break-word}.muted{color:#777}
"""


def _card(row: Mapping[str, Any], images: Mapping[int, Sequence[str]]) -> str:
    thumbs = "".join(f'<img src="data:image/png;base64,{t}" alt="">'
                     for t in (_thumbnail(p) for p in images.get(row["index"], ())[:2]) if t)
    scores = ""
    if row.get("invariance") is not None:
        scores = (f'<div class="muted">invariance {row["invariance"]:.3g} · view CE {row["view_ce"]:.3g} · '
                  f'original CE {row["confidence"]:.3g}</div>')
    return (f'<div class="card">{thumbs}<div><b>{html.escape(str(row["id"]))}</b> '
            f'<span class="muted">#{row["index"]} {html.escape(row.get("source") or "")}</span></div>'
            f'<div class="answer">{html.escape(row.get("answer") or "")}</div>{scores}</div>')


def render_html(report: Mapping[str, Any], images: Optional[Mapping[int, Sequence[str]]] = None,
                max_cards: int = 120) -> str:
    """The report as one self-contained HTML page. ``images``: sample index → image paths
    for thumbnails (at most ``max_cards`` samples per section)."""
    images = images or {}
    c = report["counts"]
    meta = report.get("meta", {})
    esc = html.escape
    title = "pcr_fast audit" if report["kind"] == "scan" else "pcr_fast training report"
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{esc(title)}</title>"
             f"<style>{_CSS}</style></head><body><h1>{esc(title)}</h1>"]
    where = " · ".join(f"{k}: <code>{esc(str(meta[k]))}</code>" for k in ("model", "adapter", "data") if meta.get(k))
    parts.append(f"<p class='muted'>{where} · {esc(report['created'])} · defense: {esc(report['defense'])}</p>")
    flagged = [r for r in report["samples"] if r["flagged"]]
    invariant_only = [r for r in report["samples"] if r["invariant"] and not r["flagged"]]
    if report["defense"] == "none":
        parts.append("<div class='clean'>No defense ran in this training run, so nothing was scanned. Audit the "
                     "data with <code>pcr-fast scan --model OUT --data FILE --out DIR</code>.</div>")
    elif report["targets"]:
        items = "".join(
            f"<li><b>“{esc(t['text'])}”</b> (token ids {t['token_ids']}): held by {t['samples']} sample(s), "
            f"{t['invariant']} of them ({100 * t['invariant_share']:.0f} %) flagged by the cross-view test</li>"
            for t in report["targets"])
        parts.append(f"<div class='found'><b>Likely poisoned: {c['flagged']} of {c['samples']} samples.</b> Their "
                     f"answer holds a target phrase — an answer most of whose samples the model keeps giving when "
                     f"half of the image is masked:<ul>{items}</ul></div>")
    elif report["target_tokens"]:
        toks = ", ".join(f"“{esc(t['text'])}” ({t['id']})" for t in report["target_tokens"])
        parts.append(f"<div class='found'><b>Target tokens found:</b> {toks}.</div>")
    else:
        parts.append(f"<div class='clean'><b>No target phrase found</b> in {c['samples']} samples: no answer is "
                     f"shared by mostly invariant samples. {c['invariant']} sample(s) looked invariant on their "
                     f"own (usually clean answers that half an image still supports).</div>")
    parts.append("<h2>Counts</h2><table>" + "".join(
        f"<tr><th>{esc(k.replace('_', ' '))}</th><td>{v}</td></tr>" for k, v in c.items()) + "</table>")
    hist = score_histogram(report)
    if hist:
        parts.append("<h2>Scores</h2><p class='muted'>A sample is flagged by the cross-view test when all three "
                     "scores are left of their dashed threshold in one masked draw; red: samples holding a target "
                     f"phrase.</p><img alt='score histograms' src='data:image/png;base64,{hist}'>")
    for name, rows, note in (("Flagged samples", flagged, "answer holds a target phrase"),
                             ("Invariant, no target phrase", invariant_only,
                              "the cross-view test fired, but the answer is not a shared target")):
        if not rows:
            continue
        more = f" (first {max_cards} of {len(rows)}; all in the CSV)" if len(rows) > max_cards else ""
        cards = "".join(_card(r, images) for r in rows[:max_cards])
        parts.append(f"<h2>{esc(name)}: {len(rows)}</h2><p class='muted'>{esc(note)}{esc(more)}</p>"
                     f"<div class='cards'>{cards}</div>")
    parts.append("<h2>Settings</h2><table>" + "".join(
        f"<tr><th>{esc(k)}</th><td>{esc(str(v))}</td></tr>" for k, v in report["thresholds"].items()) + "</table>")
    if report["skipped_rows"]:
        rows = "".join(f"<li>{esc(s)}</li>" for s in report["skipped_rows"][:200])
        parts.append(f"<h2>Skipped rows: {len(report['skipped_rows'])}</h2><ul>{rows}</ul>")
    parts.append("</body></html>")
    return "".join(parts)


def write_html(report: Mapping[str, Any], path: str, images: Optional[Mapping[int, Sequence[str]]] = None) -> str:
    """Write :func:`render_html` to ``path``."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(render_html(report, images))
    os.replace(tmp, path)
    return path


def write_report(report: Mapping[str, Any], out_dir: str, stem: str = "report",
                 images: Optional[Mapping[int, Sequence[str]]] = None) -> Dict[str, str]:
    """``{stem}.json``, ``{stem}.csv`` and ``{stem}.html`` in ``out_dir``; returns their paths.
    ``images``: sample index → image paths, for the HTML's thumbnails."""
    return {"json": write_json(report, os.path.join(out_dir, f"{stem}.json")),
            "csv": write_csv(report, os.path.join(out_dir, f"{stem}.csv")),
            "html": write_html(report, os.path.join(out_dir, f"{stem}.html"), images)}
