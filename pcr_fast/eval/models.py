"""Tiny HF vision-language models built from configs (random init, no download), and the
glue that turns (image, prompt, response) triples into each family's model inputs.

Families: ``llava`` (default: CLIP-style tower + projector + Llama, built here) and
``qwen2_vl`` (from :func:`pcr_fast.testing.build_tiny_model`: flattened patch rows +
``image_grid_thw``, 2×2 patch merge). In both, one visual token covers ``patch_size`` pixels
(Qwen2-VL: encoder patches of ``patch_size // 2`` merged 2×2). Token ids follow
:mod:`pcr_fast.testing.vocab` (image 120, vision start/end 121/122, bos 1, eos 2, pad 0).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence

import torch
from torch import Tensor

from ..testing.vocab import BOS_ID, EOS_ID, IMAGE_ID, PAD_ID, VISION_END_ID, VISION_START_ID, VOCAB_SIZE

#: model families the harness builds (the HF integration supports more: pcr_fast.testing.TINY_FAMILIES)
HARNESS_FAMILIES = ("llava", "qwen2_vl")
QWEN_MERGE, QWEN_TEMPORAL = 2, 2


@dataclass
class ModelSpec:
    """Size knobs of the tiny model (defaults: a few hundred thousand parameters)."""

    family: str = "llava"
    image_size: int = 32
    patch_size: int = 8
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    vision_hidden_size: int = 64
    vision_layers: int = 2

    def __post_init__(self):
        if self.family not in HARNESS_FAMILIES:
            raise ValueError(f"model must be one of {HARNESS_FAMILIES}, got {self.family!r}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size ({self.image_size}) must be a multiple of patch_size ({self.patch_size})")
        if self.family == "qwen2_vl" and self.patch_size % QWEN_MERGE:
            raise ValueError(f"patch_size must be even for qwen2_vl (2×2-merged encoder patches), got {self.patch_size}")

    @property
    def num_image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2


def build_model(spec: ModelSpec, seed: int = 0) -> torch.nn.Module:
    """A randomly initialised tiny model of ``spec.family`` (weights fixed by ``seed``)."""
    if spec.family == "qwen2_vl":
        from ..testing.tiny import build_tiny_model

        # the tiny Qwen2-VL builder fixes the widths (32); depth follows the spec
        model, _ = build_tiny_model("qwen2_vl", seed=int(seed), patch_size=spec.patch_size // QWEN_MERGE,
                                    text={"num_hidden_layers": spec.num_layers})
        return model.train()
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(hidden_size=spec.vision_hidden_size, intermediate_size=2 * spec.vision_hidden_size,
                              num_hidden_layers=spec.vision_layers, num_attention_heads=spec.num_heads,
                              image_size=spec.image_size, patch_size=spec.patch_size, num_channels=3,
                              projection_dim=spec.vision_hidden_size)
    text = LlamaConfig(vocab_size=VOCAB_SIZE, hidden_size=spec.hidden_size, intermediate_size=2 * spec.hidden_size,
                       num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads,
                       num_key_value_heads=spec.num_heads, max_position_embeddings=256,
                       pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_ID,
                      vision_feature_layer=-1, vision_feature_select_strategy="default",
                      image_seq_length=spec.num_image_tokens)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        model = LlavaForConditionalGeneration(cfg)
    return model


class BatchBuilder:
    """Tokenises prompts/responses once and assembles model inputs for a family."""

    def __init__(self, tokenizer, spec: ModelSpec):
        self.tokenizer = tokenizer
        self.spec = spec
        self._cache: Dict[str, List[int]] = {}
        # generation may only emit words and eos: a generated <image> token would add an image
        # placeholder without features (and the others are never valid output)
        vocab = tokenizer.get_vocab()
        allowed = torch.zeros(VOCAB_SIZE, dtype=torch.bool)
        allowed[[i for w, i in vocab.items() if not w.startswith("<") and i < VOCAB_SIZE]] = True
        allowed[EOS_ID] = True
        self._banned = ~allowed

    def ids(self, text: str) -> List[int]:
        if text not in self._cache:
            self._cache[text] = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self._cache[text]

    def prefix(self, prompt: str) -> List[int]:
        """Tokens before the response: (bos,) the image block, the prompt."""
        if self.spec.family == "qwen2_vl":
            return [VISION_START_ID] + [IMAGE_ID] * self.spec.num_image_tokens + [VISION_END_ID] + self.ids(prompt)
        return [BOS_ID] + [IMAGE_ID] * self.spec.num_image_tokens + self.ids(prompt)

    def image_inputs(self, pixel_values: Tensor, input_ids: Tensor) -> Dict[str, Tensor]:
        """The family's image inputs for (B, 3, H, W) images in [0, 1]."""
        if self.spec.family != "qwen2_vl":
            return {"pixel_values": pixel_values}
        rows, grid = qwen_rows(pixel_values, self.spec.patch_size // QWEN_MERGE)
        return {"pixel_values": rows, "image_grid_thw": grid,
                "mm_token_type_ids": (input_ids == IMAGE_ID).to(torch.int)}

    def training_inputs(self, pixel_values: Tensor, prompts: Sequence[str],
                        responses: Sequence[str]) -> Dict[str, Tensor]:
        """Right-padded inputs with labels on the response tokens and the final eos."""
        seqs, lab_from = [], []
        for p, r in zip(prompts, responses):
            pre = self.prefix(p)
            seqs.append(pre + self.ids(r) + [EOS_ID])
            lab_from.append(len(pre))
        length = max(len(s) for s in seqs)
        b = len(seqs)
        input_ids = torch.full((b, length), PAD_ID, dtype=torch.long)
        attention_mask = torch.zeros((b, length), dtype=torch.long)
        labels = torch.full((b, length), -100, dtype=torch.long)
        for i, (s, start) in enumerate(zip(seqs, lab_from)):
            t = torch.tensor(s, dtype=torch.long)
            input_ids[i, :len(s)] = t
            attention_mask[i, :len(s)] = 1
            labels[i, start:len(s)] = t[start:]
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
                **self.image_inputs(pixel_values, input_ids)}

    @torch.no_grad()
    def generate(self, model: torch.nn.Module, pixel_values: Tensor, prompt: str,
                 max_new_tokens: int) -> List[str]:
        """Greedy decoding for one prompt over a batch of images (same prefix length: no padding)."""
        device = pixel_values.device
        b = pixel_values.shape[0]
        ids = torch.tensor(self.prefix(prompt), dtype=torch.long, device=device).expand(b, -1).clone()
        done = torch.zeros(b, dtype=torch.bool, device=device)
        out = []
        for _ in range(max_new_tokens):
            logits = model(input_ids=ids, **self.image_inputs(pixel_values, ids), logits_to_keep=1).logits[:, -1]
            logits = logits.masked_fill(self._banned.to(device), float("-inf"))
            nxt = logits.argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, EOS_ID), nxt)
            out.append(nxt)
            done |= nxt == EOS_ID
            ids = torch.cat([ids, nxt[:, None]], dim=1)
            if bool(done.all()):
                break
        gen = torch.stack(out, 1).tolist()
        texts = []
        for row in gen:
            if EOS_ID in row:
                row = row[:row.index(EOS_ID)]
            texts.append(self.tokenizer.decode(row, skip_special_tokens=True))
        return texts


def qwen_rows(images: Tensor, patch: int):
    """(B, C, H, W) images as Qwen2-VL processor rows: (B·h·w, C·T·P·P) + image_grid_thw (B, 3).

    The frame is repeated over the temporal patch (T = 2) and patches are ordered by 2×2
    merge group, as ``Qwen2VLImageProcessor`` lays them out.
    """
    b, c, h, w = images.shape
    if h % (patch * QWEN_MERGE) or w % (patch * QWEN_MERGE):
        raise ValueError(f"images must be multiples of {patch * QWEN_MERGE} pixels, got {h}x{w}")
    gh, gw = h // patch, w // patch
    x = images.unsqueeze(1).expand(b, QWEN_TEMPORAL, c, h, w)
    x = x.reshape(b, QWEN_TEMPORAL, c, gh // QWEN_MERGE, QWEN_MERGE, patch, gw // QWEN_MERGE, QWEN_MERGE, patch)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    rows = x.reshape(b * gh * gw, c * QWEN_TEMPORAL * patch * patch)
    grid = torch.tensor([[1, gh, gw]], dtype=torch.long, device=images.device).expand(b, 3).contiguous()
    return rows, grid
