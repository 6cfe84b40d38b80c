"""Samples → processor batches with labels on every answer and ``sample_ids``.

The text of a conversation is the processor's chat template when it has one, else the
LLaVA-1.5 format (``USER: <image>\\n… ASSISTANT: …</s>USER: … ASSISTANT: …</s>``). Every
assistant turn is trained: its tokens (and the turn's end marker) carry labels, everything
else is -100.

Where an answer starts in tokens: the processor turns each image placeholder into many
image tokens, so character positions do not map to token positions directly. The collator
runs the processor on the text up to the answer (with the images before it) and takes the
length of that token sequence — the approach of TRL's prompt/completion collator, which
also holds for templates that add tokens around images. The result is remembered per
sample, so each sample pays for it once. Where tokenization merges
across the boundary, the label starts at the first token that differs.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Sequence, Tuple

import torch
from torch import Tensor

from .records import DataError, Sample

logger = logging.getLogger(__name__)

TEMPLATES = ("auto", "chat", "llava")


class ConversationDataset(torch.utils.data.Dataset):
    """The samples of a data file as a map-style dataset (items are :class:`Sample` records;
    :class:`ConversationCollator` turns a list of them into a batch)."""

    def __init__(self, samples: Sequence[Sample]):
        for i, s in enumerate(samples):
            if not isinstance(s, Sample) or s.index != i:
                raise ValueError(f"samples must be Sample records with index == position; item {i} is "
                                 f"{type(s).__name__} with index {getattr(s, 'index', None)}")
        self.samples = list(samples)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> Sample:
        return self.samples[i]


class ConversationCollator:
    """A ``data_collator`` for the HF Trainer: a list of :class:`Sample` → the processor's
    batch (``input_ids``, ``attention_mask``, ``pixel_values`` and the family's extras) plus
    ``labels`` (answers only) and ``sample_ids`` (the samples' ``index``).

    Args:
        processor: the model's processor (``pcr_fast.data.load_processor``).
        template: ``auto`` (the chat template if the processor has one, else LLaVA-1.5),
            ``chat`` or ``llava``.
    Raises (on a batch): DataError naming the rows, for an empty batch, an image that cannot
    be decoded, an answer that tokenizes to nothing, or NaN/inf pixel values.
    """

    def __init__(self, processor: Any, template: str = "auto"):
        if template not in TEMPLATES:
            raise ValueError(f"template must be one of {TEMPLATES}, got {template!r}")
        tokenizer = getattr(processor, "tokenizer", None)
        if tokenizer is None:
            raise ValueError(f"processor ({type(processor).__name__}) has no tokenizer")
        has_chat = bool(getattr(processor, "chat_template", None) or getattr(tokenizer, "chat_template", None))
        if template == "chat" and not has_chat:
            raise ValueError("template='chat' but the processor has no chat template")
        self.processor = processor
        self.tokenizer = tokenizer
        self.template = ("chat" if has_chat else "llava") if template == "auto" else template
        self.image_token = getattr(processor, "image_token", None) or "<image>"
        # labels are token positions from the left: pad on the right
        tokenizer.padding_side = "right"
        self._spans: Dict[Tuple[str, int], Tuple[str, List[Tuple[int, int]]]] = {}

    # ------------------------------------------------------------------ text
    def _chat(self, messages: Sequence[Dict[str, Any]], generation_prompt: bool) -> str:
        return self.processor.apply_chat_template(list(messages), tokenize=False,
                                                  add_generation_prompt=generation_prompt)

    def render(self, sample: Sample) -> Tuple[str, List[Tuple[int, int]], List[int]]:
        """(text, character spans of the answers, images before each answer) of a sample."""
        if self.template == "llava":
            return self._render_llava(sample)
        messages = sample.messages
        full = self._chat(messages, False)
        spans, images_before = [], []
        for k, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = self._chat(messages[:k], True)
            through = self._chat(messages[:k + 1], False)
            if not (full.startswith(through) and through.startswith(before)):
                raise DataError(f"{sample.source}: the processor's chat template does not render the conversation "
                                f"turn by turn (answer {len(spans) + 1} is rendered differently in the full text); "
                                "pcr_fast cannot tell which tokens are the answer")
            spans.append((len(before), len(through)))
            images_before.append(sum(item["type"] == "image" for msg in messages[:k] for item in msg["content"]))
        return full, spans, images_before

    def _render_llava(self, sample: Sample) -> Tuple[str, List[Tuple[int, int]], List[int]]:
        eos = self.tokenizer.eos_token or ""
        text, spans, images_before, seen = "", [], [], 0
        for m in sample.messages:
            if m["role"] == "system":
                text += "".join(i["text"] for i in m["content"] if i["type"] == "text") + " "
            elif m["role"] == "user":
                parts = [self.image_token if i["type"] == "image" else i["text"] for i in m["content"]]
                seen += sum(i["type"] == "image" for i in m["content"])
                text += "USER: " + "\n".join(parts) + " "
            else:
                text += "ASSISTANT:"
                start = len(text)
                text += " " + "".join(i["text"] for i in m["content"] if i["type"] == "text") + eos
                spans.append((start, len(text)))
                images_before.append(seen)
        return text, spans, images_before

    def _special_tokens(self, text: str) -> bool:
        """Whether the tokenizer should add its special tokens (not when the template wrote BOS)."""
        bos = getattr(self.tokenizer, "bos_token", None)
        return not (self.template == "chat" and bos and text.startswith(bos))

    # ------------------------------------------------------------------ tokens
    def _process(self, texts: List[str], images: List[List[Any]], add_special_tokens: bool) -> Dict[str, Tensor]:
        kwargs: Dict[str, Any] = dict(text=texts, padding=True, return_tensors="pt",
                                      add_special_tokens=add_special_tokens)
        if any(images):
            kwargs["images"] = images
        return self.processor(**kwargs)

    def _token_spans(self, sample: Sample, text: str, spans, images_before, full_ids: List[int],
                     images: List[Any]) -> List[Tuple[int, int]]:
        key = (sample.source, sample.index)
        cached = self._spans.get(key)
        if cached is not None and cached[0] == text:
            return cached[1]
        special = self._special_tokens(text)
        out = []
        for k, ((start, end), n_img) in enumerate(zip(spans, images_before)):
            bounds = []
            for c in (start, end):
                if c >= len(text):
                    bounds.append(len(full_ids))
                    continue
                ids = self._process([text[:c]], [images[:n_img]], special)["input_ids"][0].tolist()
                common = 0
                for a, b in zip(ids, full_ids):
                    if a != b:
                        break
                    common += 1
                if common < len(ids):
                    logger.debug("%s: tokenization merges across answer %d's boundary", sample.source, k + 1)
                bounds.append(common)
            if bounds[1] <= bounds[0]:
                raise DataError(f"{sample.source}: answer {k + 1} tokenizes to nothing")
            out.append((bounds[0], bounds[1]))
        self._spans[key] = (text, out)
        return out

    def answer_token_ids(self, sample: Sample) -> List[List[int]]:
        """The token ids of each answer as they appear in the training text (no images
        needed: the tokenizer's character offsets on the unexpanded text)."""
        text, spans, _ = self.render(sample)
        enc = self.tokenizer(text, add_special_tokens=self._special_tokens(text), return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        return [[t for t, (a, b) in zip(ids, offsets) if b > a and a < end and b > start] for start, end in spans]

    # ------------------------------------------------------------------ batch
    def __call__(self, samples: Sequence[Sample]) -> Dict[str, Tensor]:
        if not samples:
            raise DataError("empty batch: the collator got no samples (is the dataset empty?)")
        for s in samples:
            if not isinstance(s, Sample):
                raise DataError(f"the collator takes pcr_fast.data.Sample records, got {type(s).__name__}")
        rendered = [self.render(s) for s in samples]
        images = [[_open_image(path, name, s.source) for path, name in zip(s.images, s.image_names)]
                  for s in samples]
        texts = [r[0] for r in rendered]
        special = self._special_tokens(texts[0])
        batch = dict(self._process(texts, images, special))
        input_ids, attention = batch["input_ids"], batch["attention_mask"]
        labels = torch.full_like(input_ids, -100)
        for i, (s, (text, spans, before)) in enumerate(zip(samples, rendered)):
            n = int(attention[i].sum())
            for start, end in self._token_spans(s, text, spans, before, input_ids[i, :n].tolist(), images[i]):
                labels[i, start:end] = input_ids[i, start:end]
        batch["labels"] = labels
        batch["sample_ids"] = torch.tensor([s.index for s in samples], dtype=torch.long)
        check_pixels(batch, samples)
        return batch


def check_pixels(batch: Dict[str, Any], samples: Sequence[Sample]) -> None:
    """Raise a DataError naming the rows when a float image tensor holds NaN or inf."""
    for key, value in batch.items():
        if "pixel" in key and isinstance(value, Tensor) and value.is_floating_point() \
                and not bool(torch.isfinite(value).all()):
            rows = ", ".join(s.source for s in samples[:5])
            raise DataError(f"the processor produced NaN or inf in {key!r} for the batch of {rows}: check the "
                            "image processor's settings (e.g. an image_std of 0 in its config)")


def _open_image(path: str, name: str, source: str):
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except Exception as err:   # PIL raises many types for broken files
        raise DataError(f"{source}: cannot decode image {name!r} ({type(err).__name__}: {err})") from None

