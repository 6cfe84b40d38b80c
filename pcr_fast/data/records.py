"""The records of a loaded dataset: one :class:`Sample` per usable row, one :class:`BadRow`
per row that could not be used, and :class:`DataError`, raised with the file and row named."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Sequence, Tuple


class DataError(ValueError):
    """A dataset file or row that cannot be trained on; the message names the file and the
    line (JSONL) or index (JSON array) of every row at fault."""


@dataclass(frozen=True)
class Sample:
    """One conversation with its images, in the Hugging Face chat format.

    Attributes:
        index: position among the usable rows (0 … N-1): the row id the defense's memory and
            the reports use (``sample_ids`` in a batch).
        id: the row's own ``"id"`` (its position in the file when it has none).
        source: where the row is, ``"data.jsonl:12"`` (line) or ``"data.json[11]"`` (index).
        messages: ``{"role": "system"|"user"|"assistant", "content": [{"type": "image"} |
            {"type": "text", "text": str}]}`` dicts, in order.
        images: absolute image paths, in the order of the image placeholders.
        image_names: the image paths as the file writes them (for reports).
    """

    index: int
    id: str
    source: str
    messages: Tuple[Dict[str, Any], ...]
    images: Tuple[str, ...]
    image_names: Tuple[str, ...]

    @property
    def answers(self) -> List[str]:
        """The text of every assistant turn (each one is trained)."""
        return [content_text(m["content"]) for m in self.messages if m["role"] == "assistant"]

    @property
    def prompt(self) -> str:
        """The text of the first user turn (for reports)."""
        for m in self.messages:
            if m["role"] == "user":
                return content_text(m["content"])
        return ""


@dataclass(frozen=True)
class BadRow:
    """A row that cannot be used: where it is and why."""

    source: str
    reason: str

    def __str__(self) -> str:
        return f"{self.source}: {self.reason}"


@dataclass
class LoadedData:
    """What :func:`load_samples` read: the usable samples, the rows skipped (with
    ``skip_bad_rows``), the row formats seen and where images were looked up."""

    path: str
    image_root: str
    samples: List[Sample]
    skipped: List[BadRow] = field(default_factory=list)
    formats: Tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.samples)


def content_text(content: Sequence[Dict[str, Any]]) -> str:
    """The text items of a message's content, joined by newlines."""
    return "\n".join(item["text"] for item in content if item.get("type") == "text")
