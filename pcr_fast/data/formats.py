"""Dataset files → :class:`~pcr_fast.data.records.Sample` records, every row checked.

Two formats, told apart by their content (not the file name):

* **LLaVA conversations**: a JSON array (or JSONL) of ``{"id", "image": "path" | [paths],
  "conversations": [{"from": "human", "value": "<image>\\n…"}, {"from": "gpt", "value": "…"},
  …]}``; ``<image>`` marks where each image goes.
* **TRL messages**: JSONL (or a JSON array) of ``{"messages": [{"role": "user", "content":
  [{"type": "image"}, {"type": "text", "text": "…"}]}, {"role": "assistant", "content":
  …}, …], "images": ["path", …]}``; each ``{"type": "image"}`` item takes the next image.

A row is bad when it is not valid JSON, has neither shape, has no image or no image
placeholder (or their counts differ), has no answer or an empty one, or names an image
that is missing or unreadable. Every bad row is reported with the file and its line
(JSONL) or index (JSON array); ``skip_bad_rows=True`` drops them and returns them instead.
Image paths are relative to ``image_root`` (default: the data file's folder).
"""
from __future__ import annotations

import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from .records import BadRow, DataError, LoadedData, Sample

logger = logging.getLogger(__name__)

LLAVA_IMAGE_TOKEN = "<image>"
_LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                "system": "system"}
_ROLES = ("system", "user", "assistant")
MAX_LISTED = 10  # bad rows named in one error message


class _Bad(Exception):
    """A row's problem (internal: becomes a BadRow with the row's source)."""


def load_samples(path: str, *, image_root: Optional[str] = None, skip_bad_rows: bool = False,
                 check_images: bool = True, progress: bool = False) -> LoadedData:
    """Read and check a dataset file (LLaVA JSON or TRL messages JSONL).

    Args:
        path: the data file.
        image_root: the folder image paths are relative to (default: the file's folder).
        skip_bad_rows: drop bad rows (returned in ``.skipped``) instead of raising.
        check_images: open every image once (``PIL.Image.verify``) so a missing or broken
            file is found now, not mid-training.
        progress: a progress bar over the image checks.
    Raises:
        DataError: the file cannot be read or parsed, has no usable row, or (without
            ``skip_bad_rows``) has bad rows; the message names each (up to 10).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such data file")
    root = os.path.abspath(os.fspath(image_root) if image_root is not None else os.path.dirname(os.path.abspath(path)))
    if not os.path.isdir(root):
        raise DataError(f"image root {root}: no such folder")
    name = os.path.basename(path)
    rows, bad = _read_rows(path, name)
    parsed: List[Tuple[str, Dict[str, Any], str]] = []   # (source, fields, format)
    for source, row in rows:
        try:
            fields, kind = _parse_row(row, root)
        except _Bad as err:
            bad.append(BadRow(source, str(err)))
            continue
        parsed.append((source, fields, kind))
    if check_images and parsed:
        unreadable = _check_images(sorted({p for _, f, _ in parsed for p in f["images"]}), progress)
        kept = []
        for source, fields, kind in parsed:
            problem = next((unreadable[p] for p in fields["images"] if p in unreadable), None)
            if problem is not None:
                bad.append(BadRow(source, problem))
            else:
                kept.append((source, fields, kind))
        parsed = kept
    bad.sort(key=lambda b: _source_order(b.source))
    if bad and not skip_bad_rows:
        listed = "\n  ".join(str(b) for b in bad[:MAX_LISTED])
        more = f"\n  … and {len(bad) - MAX_LISTED} more" if len(bad) > MAX_LISTED else ""
        raise DataError(f"{path}: {len(bad)} bad row(s) (fix them, or pass --skip-bad-rows to leave them out):"
                        f"\n  {listed}{more}")
    if bad:
        logger.warning("%s: skipped %d bad row(s), e.g. %s", path, len(bad), bad[0])
    if not parsed:
        raise DataError(f"{path}: no usable rows" + (f" ({len(bad)} bad)" if bad else ""))
    samples = []
    for index, (source, fields, _) in enumerate(parsed):
        samples.append(Sample(index=index, id=fields["id"] if fields["id"] is not None else str(index),
                              source=source, messages=fields["messages"], images=fields["images"],
                              image_names=fields["image_names"]))
    _warn_duplicate_ids(path, samples)
    return LoadedData(path=path, image_root=root, samples=samples, skipped=bad,
                      formats=tuple(sorted({k for _, _, k in parsed})))


# --------------------------------------------------------------------------- reading
def _read_rows(path: str, name: str) -> Tuple[List[Tuple[str, Any]], List[BadRow]]:
    """(source, row) pairs of a JSON array or a JSONL file; malformed JSONL lines are bad rows."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err})") from None
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err.strerror or err})") from None
    stripped = text.lstrip()
    if not stripped:
        raise DataError(f"{path}: the file is empty")
    if stripped[0] == "[":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{err.lineno}:{err.colno}: malformed JSON ({err.msg})") from None
        return [(f"{name}[{i}]", row) for i, row in enumerate(data)], []
    rows, bad = [], []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        source = f"{name}:{lineno}"
        try:
            rows.append((source, json.loads(line)))
        except json.JSONDecodeError as err:
            hint = " (a JSON file must hold one array of rows; JSONL one row per line)" if lineno == 1 else ""
            bad.append(BadRow(source, f"malformed JSON line ({err.msg} at column {err.colno}){hint}"))
    return rows, bad


def _source_order(source: str) -> Tuple[int, str]:
    tail = source.rsplit(":", 1)[-1] if not source.endswith("]") else source.rsplit("[", 1)[-1][:-1]
    return (int(tail), source) if tail.isdigit() else (-1, source)


# --------------------------------------------------------------------------- rows
def _parse_row(row: Any, root: str) -> Tuple[Dict[str, Any], str]:
    if not isinstance(row, dict):
        raise _Bad(f"expected a JSON object, got {type(row).__name__}")
    if "conversations" in row:
        return _parse_llava(row, root), "llava"
    if "messages" in row:
        return _parse_messages(row, root), "messages"
    raise _Bad("expected a LLaVA row ('conversations') or a messages row ('messages'); keys: "
               f"{sorted(row)[:8]}")


def _row_id(row: Dict[str, Any]) -> Optional[str]:
    value = row.get("id")
    if value is None:
        return None
    if isinstance(value, (str, int)) and not isinstance(value, bool):
        return str(value)
    raise _Bad(f"'id' must be a string or an integer, got {type(value).__name__}")


def _image_names(value: Any, key: str) -> List[str]:
    if value is None:
        raise _Bad(f"no image ('{key}' is missing): PCR compares two views of each sample's image; "
                   "text-only rows are not supported")
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n.strip() for n in names):
        raise _Bad(f"'{key}' must be an image path or a non-empty list of paths, got {value!r}"[:200])
    return names


def _resolve(names: Sequence[str], root: str) -> Tuple[str, ...]:
    return tuple(os.path.normpath(os.path.join(root, n)) for n in names)


def _check_answers(messages: Sequence[Dict[str, Any]]) -> None:
    answers = [m for m in messages if m["role"] == "assistant"]
    if not answers:
        raise _Bad("no answer: the conversation has no assistant turn")
    for k, m in enumerate(answers):
        text = "".join(item.get("text", "") for item in m["content"] if item["type"] == "text")
        if not text.strip():
            raise _Bad(f"empty answer (assistant turn {k + 1})")
        if any(item["type"] == "image" for item in m["content"]):
            raise _Bad(f"an image placeholder in an answer (assistant turn {k + 1}): images belong to user turns")


def _placeholders_match(n_placeholders: int, n_images: int, token: str) -> None:
    if n_placeholders == 0:
        raise _Bad(f"no image placeholder ({token}) in the conversation for its {n_images} image(s)")
    if n_placeholders != n_images:
        raise _Bad(f"{n_placeholders} image placeholder(s) ({token}) for {n_images} image(s)")


def _parse_llava(row: Dict[str, Any], root: str) -> Dict[str, Any]:
    conversations = row["conversations"]
    if not isinstance(conversations, list) or not conversations:
        raise _Bad("'conversations' must be a non-empty list of {'from', 'value'} turns")
    messages, placeholders = [], 0
    for k, turn in enumerate(conversations):
        if not isinstance(turn, dict) or turn.get("from") not in _LLAVA_ROLES or not isinstance(turn.get("value"), str):
            raise _Bad(f"turn {k + 1} must be {{'from': 'human'|'gpt'|'system', 'value': str}}, got {turn!r}"[:200])
        role = _LLAVA_ROLES[turn["from"]]
        value = turn["value"]
        if role == "user":
            pieces = value.split(LLAVA_IMAGE_TOKEN)
            placeholders += len(pieces) - 1
            content: List[Dict[str, Any]] = []
            for i, piece in enumerate(pieces):
                if i:
                    content.append({"type": "image"})
                piece = piece.strip("\n")
                if piece.strip():
                    content.append({"type": "text", "text": piece})
        else:
            if role == "assistant" and LLAVA_IMAGE_TOKEN in value:
                raise _Bad(f"an image placeholder in an answer (turn {k + 1}): images belong to human turns")
            content = [{"type": "text", "text": value}]
        messages.append({"role": role, "content": content})
    names = _image_names(row.get("image"), "image")
    _placeholders_match(placeholders, len(names), LLAVA_IMAGE_TOKEN)
    _check_answers(messages)
    return {"id": _row_id(row), "messages": tuple(messages), "images": _resolve(names, root),
            "image_names": tuple(names)}


def _parse_messages(row: Dict[str, Any], root: str) -> Dict[str, Any]:
    raw = row["messages"]
    if not isinstance(raw, list) or not raw:
        raise _Bad("'messages' must be a non-empty list of {'role', 'content'} messages")
    messages, placeholders = [], 0
    for k, message in enumerate(raw):
        if not isinstance(message, dict) or message.get("role") not in _ROLES:
            raise _Bad(f"message {k + 1} must be {{'role': 'system'|'user'|'assistant', 'content': …}}, got "
                       f"{message!r}"[:200])
        content = message.get("content")
        if isinstance(content, str):
            items = [{"type": "text", "text": content}]
        elif isinstance(content, list):
            items = []
            for item in content:
                kind = item.get("type") if isinstance(item, dict) else None
                if kind == "image":
                    items.append({"type": "image"})
                    placeholders += 1
                elif kind == "text" and isinstance(item.get("text"), str):
                    items.append({"type": "text", "text": item["text"]})
                else:
                    raise _Bad(f"message {k + 1}: content items must be {{'type': 'image'}} or "
                               f"{{'type': 'text', 'text': str}}, got {item!r}"[:200])
        else:
            raise _Bad(f"message {k + 1}: 'content' must be a string or a list of items, got "
                       f"{type(content).__name__}")
        messages.append({"role": message["role"], "content": items})
    key = "images" if "images" in row else "image"
    names = _image_names(row.get(key), "images")
    _placeholders_match(placeholders, len(names), "{'type': 'image'}")
    _check_answers(messages)
    return {"id": _row_id(row), "messages": tuple(messages), "images": _resolve(names, root),
            "image_names": tuple(names)}


# --------------------------------------------------------------------------- images
def _image_problem(path: str) -> Optional[str]:
    """Why an image cannot be used (None: it opens and verifies)."""
    if not os.path.isfile(path):
        return f"image not found: {path}"
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.verify()
    except Exception as err:   # PIL raises many types for broken files
        return f"unreadable image {path} ({type(err).__name__}: {err})"
    return None


def _check_images(paths: Sequence[str], progress: bool) -> Dict[str, str]:
    """path → problem for every image that is missing or unreadable (threads: file I/O)."""
    problems: Dict[str, str] = {}
    workers = min(8, (os.cpu_count() or 1) * 2)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results: Iterable[Optional[str]] = pool.map(_image_problem, paths)
        if progress:
            from tqdm.auto import tqdm

            results = tqdm(results, total=len(paths), desc="checking images", unit="image", leave=False)
        for path, problem in zip(paths, results):
            if problem is not None:
                problems[path] = problem
    return problems


def _warn_duplicate_ids(path: str, samples: Sequence[Sample]) -> None:
    seen: Dict[str, int] = {}
    for s in samples:
        seen[s.id] = seen.get(s.id, 0) + 1
    dups = [i for i, n in seen.items() if n > 1]
    if dups:
        logger.warning("%s: %d id(s) occur more than once (e.g. %r); reports also give each row's index",
                       path, len(dups), dups[0])

