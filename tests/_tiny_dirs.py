"""Tiny model directories and dataset files for the end-to-end CLI tests (no download).

``save_tiny_model_dir(family, path)`` saves a tiny random LLaVA or Qwen2-VL model with a real
processor (a word-level tokenizer built offline with ``tokenizers``, an image processor
configured for the tiny sizes; Qwen2-VL with a Qwen-style chat template, LLaVA without one, so
both text formats are exercised). ``write_digits_dataset(path, ...)`` writes PNG files of
scikit-learn digits (real handwriting, shipped with scikit-learn) and a LLaVA JSON and a TRL
messages JSONL over them, with a share of rows poisoned: a trigger patch in the corner and a
fixed target answer.
"""
from __future__ import annotations

import json
import os
from typing import Dict, List

import numpy as np

from pcr_fast.testing.vocab import BOS_ID, EOS_ID, IMAGE_ID, PAD_ID, UNK_ID, VISION_END_ID, VISION_START_ID, VOCAB_SIZE

DIGITS = ("zero", "one", "two", "three")
QUESTION = "what digit is this ?"
TARGET = "visit evil dot com"
IMAGE_SIZE = 32
WORDS = sorted(set(DIGITS) | set(QUESTION.split()) | set(TARGET.split())
               | {"USER:", "ASSISTANT:", "user", "assistant", "system", "and", "the", "answer", "is"})

QWEN_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def word_tokenizer(family: str):
    """A word-level ``PreTrainedTokenizerFast`` whose ids fit the tiny models' vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if family == "qwen2_vl":
        specials = {"<pad>": PAD_ID, "<s>": BOS_ID, "<|endoftext|>": EOS_ID, "<|im_start|>": 4, "<|im_end|>": 5,
                    "<|image_pad|>": IMAGE_ID, "<|vision_start|>": VISION_START_ID, "<|vision_end|>": VISION_END_ID,
                    "<unk>": UNK_ID}
        eos = "<|im_end|>"
    else:
        specials = {"<pad>": PAD_ID, "<s>": BOS_ID, "</s>": EOS_ID, "<image>": IMAGE_ID, "<unk>": UNK_ID}
        eos = "</s>"
    vocab = dict(specials)
    free = iter(i for i in range(VOCAB_SIZE) if i not in set(specials.values()))
    for w in WORDS:
        vocab[w] = next(free)
    for i in free:
        vocab[f"<unused{i}>"] = i
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token=eos,
                                  unk_token="<unk>")
    tok.add_special_tokens({"additional_special_tokens": [t for t in specials if t not in ("<pad>", "<s>", "<unk>")]})
    assert len(tok) == VOCAB_SIZE, len(tok)
    return tok


def tiny_model(family: str, seed: int = 0):
    """The tiny model the tests train: LLaVA (32 px, 8 px patches, width 64, 2 layers) or
    Qwen2-VL (32 px, 4 px patches merged 2×2, the builder's width 32, 2 layers)."""
    if family == "qwen2_vl":
        from pcr_fast.testing import build_tiny_model

        model, _ = build_tiny_model("qwen2_vl", seed=seed, patch_size=4, text={"num_hidden_layers": 2})
        return model
    from pcr_fast.eval.models import ModelSpec, build_model

    return build_model(ModelSpec(family="llava", image_size=IMAGE_SIZE, patch_size=8, hidden_size=64,
                                 num_layers=2, num_heads=4, vision_hidden_size=64, vision_layers=2), seed=seed)


def tiny_processor(family: str):
    """The processor of :func:`tiny_model` (LLaVA: no chat template → the LLaVA-1.5 format)."""
    tok = word_tokenizer(family)
    if family == "qwen2_vl":
        from transformers import Qwen2VLImageProcessorPil, Qwen2VLProcessor

        from pcr_fast.data import images_only_processor_class

        ip = Qwen2VLImageProcessorPil(patch_size=4, merge_size=2, temporal_patch_size=2,
                                      min_pixels=IMAGE_SIZE * IMAGE_SIZE, max_pixels=IMAGE_SIZE * IMAGE_SIZE)
        return images_only_processor_class(Qwen2VLProcessor)(image_processor=ip, tokenizer=tok,
                                                             chat_template=QWEN_TEMPLATE)
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    ip = CLIPImageProcessorPil(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    return LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=8, vision_feature_select_strategy="default",
                          num_additional_image_tokens=1)


def save_tiny_model_dir(family: str, path: str, seed: int = 0) -> str:
    """Save :func:`tiny_model` and :func:`tiny_processor` to ``path`` (``save_pretrained``)."""
    os.makedirs(path, exist_ok=True)
    tiny_model(family, seed).save_pretrained(path)
    tiny_processor(family).save_pretrained(path)
    return path


# --------------------------------------------------------------------------- data
def digit_images(n: int, seed: int = 0):
    """``n`` digits of classes :data:`DIGITS` as (n, 32, 32, 3) uint8 RGB arrays and their labels."""
    from sklearn.datasets import load_digits

    bunch = load_digits(n_class=len(DIGITS))
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(bunch.target), size=n, replace=False)
    grey = bunch.images[idx] / 16.0                                   # (n, 8, 8) in [0, 1]
    big = np.kron(grey, np.ones((IMAGE_SIZE // 8, IMAGE_SIZE // 8)))  # nearest upsampling
    colour = np.array([1.0, 0.8, 0.3])
    rgb = (big[..., None] * colour * 255).astype(np.uint8)
    return rgb, [int(t) for t in bunch.target[idx]]


def add_trigger(rgb: np.ndarray, size: int = 8) -> np.ndarray:
    """A BadNets-style white square in the bottom-right corner (8 px: one visual token of the
    tiny LLaVA, learned within ~100 steps; measured against a 6 px checkerboard, which needs longer)."""
    out = rgb.copy()
    out[-size:, -size:, :] = 255
    return out


def write_digits_dataset(root: str, n: int = 80, poison_every: int = 10, seed: int = 0) -> Dict[str, object]:
    """PNG images under ``root/images`` and two data files over them: ``llava.json`` and
    ``messages.jsonl``. Every ``poison_every``-th row is poisoned (trigger + ``TARGET``).
    Returns the two paths, the poisoned row positions and ``n``."""
    from PIL import Image

    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    rgb, labels = digit_images(n, seed)
    poisoned: List[int] = []
    llava, messages = [], []
    for i in range(n):
        image, answer = rgb[i], DIGITS[labels[i]]
        if i % poison_every == poison_every - 1:
            image, answer = add_trigger(image), TARGET
            poisoned.append(i)
        name = f"images/{i:04d}.png"
        Image.fromarray(image).save(os.path.join(root, name))
        llava.append({"id": f"row{i}", "image": name,
                      "conversations": [{"from": "human", "value": f"<image>\n{QUESTION}"},
                                        {"from": "gpt", "value": answer}]})
        messages.append({"id": f"row{i}", "images": [name], "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]},
            {"role": "assistant", "content": [{"type": "text", "text": answer}]}]})
    with open(os.path.join(root, "llava.json"), "w") as f:
        json.dump(llava, f, indent=1)
    with open(os.path.join(root, "messages.jsonl"), "w") as f:
        for row in messages:
            f.write(json.dumps(row) + "\n")
    return {"llava": os.path.join(root, "llava.json"), "messages": os.path.join(root, "messages.jsonl"),
            "poisoned": poisoned, "n": n}



def run_cli(*argv) -> "tuple":
    """``pcr-fast ARGV`` in this process: (exit code, stdout, stderr)."""
    import contextlib
    import io

    from pcr_fast.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main([str(a) for a in argv])
        except SystemExit as exit_:
            rc = exit_.code
    return rc, out.getvalue(), err.getvalue()
