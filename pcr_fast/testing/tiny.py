"""Tiny random Hugging Face vision-language models, built from configs (no downloads).

``build_tiny_model(family) -> (model, make_batch)``: a model of the named family with
hidden size 32, one text layer and a one-layer vision tower, and a function that makes a
batch dict with the shapes the family's processor/collator produces (``input_ids``,
``attention_mask``, ``labels`` and the family's pixel/grid tensors). Tests, the
evaluation harness and the benchmarks share these builders, so every family is exercised
with its real layout.

``make_batch(batch_size=2, generator=None)``: ragged prompts/responses, right padding
(``attention_mask`` 0, ``labels`` -100 on padding), labels only on the response tokens
(HF convention: labels aligned with ``input_ids``, the model shifts them).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .vocab import (BOI_ID, BOS_ID, EOI_ID, EOS_ID, IMAGE_ID, NEWLINE_ID, PAD_ID, TEXT_HIGH, TEXT_LOW, VIDEO_ID,
                    VISION_END_ID, VISION_START_ID, VOCAB_SIZE)

logger = logging.getLogger(__name__)

MakeBatch = Callable[..., Dict[str, Tensor]]


def _text_kwargs(hidden: int = 32, **extra) -> dict:
    kw = dict(vocab_size=VOCAB_SIZE, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
              num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
              pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID)
    kw.update(extra)
    return kw


@dataclass
class _Sample:
    """One sequence: token ids and which positions are labelled."""

    ids: List[int]
    labelled: List[bool] = field(default_factory=list)


def _rand_text(n: int, gen: torch.Generator) -> List[int]:
    return torch.randint(TEXT_LOW, TEXT_HIGH, (n,), generator=gen).tolist()


def _assemble(samples: Sequence[_Sample], extra_rows: Optional[Dict[str, List[List[int]]]] = None
              ) -> Dict[str, Tensor]:
    """Right-pad the samples into input_ids / attention_mask / labels (+ per-token extras)."""
    length = max(len(s.ids) for s in samples)
    b = len(samples)
    input_ids = torch.full((b, length), PAD_ID, dtype=torch.long)
    attention_mask = torch.zeros((b, length), dtype=torch.long)
    labels = torch.full((b, length), -100, dtype=torch.long)
    for i, s in enumerate(samples):
        n = len(s.ids)
        ids = torch.tensor(s.ids, dtype=torch.long)
        input_ids[i, :n] = ids
        attention_mask[i, :n] = 1
        lab = torch.tensor(s.labelled, dtype=torch.bool)
        labels[i, :n] = torch.where(lab, ids, torch.full_like(ids, -100))
    out = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    for key, rows in (extra_rows or {}).items():
        t = torch.zeros((b, length), dtype=torch.long)
        for i, r in enumerate(rows):
            t[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        out[key] = t
    return out


def _chat_sample(image_block: List[int], gen: torch.Generator, *, prefix: Sequence[int] = (BOS_ID,),
                 image_first: bool = False) -> _Sample:
    """``prefix + text + image_block + text + response + EOS_ID`` with labels on the response."""
    pre = _rand_text(int(torch.randint(1, 4, (1,), generator=gen)), gen)
    mid = _rand_text(int(torch.randint(1, 3, (1,), generator=gen)), gen)
    resp = _rand_text(int(torch.randint(2, 6, (1,), generator=gen)), gen) + [EOS_ID]
    if image_first:
        prompt = list(image_block) + list(prefix) + pre + mid
    else:
        prompt = list(prefix) + pre + list(image_block) + mid
    return _Sample(prompt + resp, [False] * len(prompt) + [True] * len(resp))


def _generator(generator: Optional[torch.Generator]) -> torch.Generator:
    if generator is not None:
        return generator
    g = torch.Generator()
    g.manual_seed(int(torch.randint(0, 2 ** 31 - 1, (1,))))
    return g


# --------------------------------------------------------------------------- families
def _llava(**ov):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    image_size, patch = ov.pop("image_size", 16), ov.pop("patch_size", 4)
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=2, image_size=image_size, patch_size=patch,
                                       projection_dim=32),
        text_config=LlamaConfig(**_text_kwargs(**ov.pop("text", {}))), image_token_index=IMAGE_ID,
        vision_feature_layer=-1, vision_feature_select_strategy="default",
        image_seq_length=(image_size // patch) ** 2, **ov)
    model = LlavaForConditionalGeneration(cfg)
    n_tok = (image_size // patch) ** 2

    def make_batch(batch_size: int = 2, generator: Optional[torch.Generator] = None):
        g = _generator(generator)
        samples = [_chat_sample([IMAGE_ID] * n_tok, g) for _ in range(batch_size)]
        out = _assemble(samples)
        out["pixel_values"] = torch.randn(batch_size, 3, image_size, image_size, generator=g)
        return out

    return model, make_batch


def _llava_next_like(onevision: bool, **ov):
    import transformers as tr

    image_size, patch = ov.pop("image_size", 16), ov.pop("patch_size", 4)
    text = tr.Qwen2Config(**_text_kwargs(**ov.pop("text", {}))) if onevision else \
        tr.LlamaConfig(**_text_kwargs(**ov.pop("text", {})))
    if onevision:
        vision = tr.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=2, image_size=image_size, patch_size=patch)
        cfg_cls, model_cls = tr.LlavaOnevisionConfig, tr.LlavaOnevisionForConditionalGeneration
        extra = dict(vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9")
    else:
        vision = tr.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=2, image_size=image_size, patch_size=patch,
                                     projection_dim=32)
        cfg_cls, model_cls = tr.LlavaNextConfig, tr.LlavaNextForConditionalGeneration
        extra = dict(vision_feature_select_strategy="default")
    pinpoints = [[image_size, image_size], [image_size, 2 * image_size], [2 * image_size, image_size]]
    cfg = cfg_cls(vision_config=vision, text_config=text, image_token_index=IMAGE_ID,
                  vision_feature_layer=-1, image_grid_pinpoints=pinpoints, **extra, **ov)
    if onevision:
        cfg.video_token_index = VIDEO_ID
    model = model_cls(cfg)
    side = image_size // patch

    def n_tokens(h: int, w: int) -> int:
        # anyres: base image (side²) + the best-fit grid of tiles, unpadded to the image's
        # aspect ratio, with one newline token per row (the processor's count)
        from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

        gh, gw = get_anyres_image_grid_shape((h, w), pinpoints, image_size)
        feat = torch.zeros(1, gh * side, gw * side)
        rows, cols = unpad_image(feat, (h, w)).shape[1:]
        return side * side + rows * (cols + 1)

    def make_batch(batch_size: int = 2, generator: Optional[torch.Generator] = None):
        g = _generator(generator)
        sizes = [[image_size, 2 * image_size] if i % 2 == 0 else [2 * image_size - 6, image_size]
                 for i in range(batch_size)]
        samples = []
        for (h, w) in sizes:
            samples.append(_chat_sample([IMAGE_ID] * n_tokens(h, w), g))
        out = _assemble(samples)
        # processor layout: (num_images, 1 + max tiles, C, tile, tile), zero-padded tiles
        out["pixel_values"] = torch.randn(batch_size, 3, 3, image_size, image_size, generator=g)
        out["image_sizes"] = torch.tensor(sizes, dtype=torch.long)
        return out

    return model, make_batch


def _qwen_vl(version: str, **ov):
    import transformers as tr

    patch, merge, tp = ov.pop("patch_size", 4), 2, 2
    head_dim = 16
    rope = {"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 3, 3]}
    text_kw = _text_kwargs(rope_parameters=rope, **ov.pop("text", {}))
    if version == "2":
        vision = dict(depth=1, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=patch,
                      spatial_merge_size=merge, temporal_patch_size=tp)
        cfg = tr.Qwen2VLConfig(text_config=text_kw, vision_config=vision, image_token_id=IMAGE_ID,
                               video_token_id=VIDEO_ID, vision_start_token_id=VISION_START_ID,
                               vision_end_token_id=VISION_END_ID, **ov)
        model = tr.Qwen2VLForConditionalGeneration(cfg)
    elif version == "2.5":
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=patch,
                      spatial_merge_size=merge, temporal_patch_size=tp, out_hidden_size=32,
                      window_size=2 * merge * patch, fullatt_block_indexes=[1])
        cfg = tr.Qwen2_5_VLConfig(text_config=text_kw, vision_config=vision, image_token_id=IMAGE_ID,
                                  video_token_id=VIDEO_ID, vision_start_token_id=VISION_START_ID,
                                  vision_end_token_id=VISION_END_ID, **ov)
        model = tr.Qwen2_5_VLForConditionalGeneration(cfg)
    else:
        text_kw["rope_parameters"] = dict(rope, mrope_interleaved=True)
        text_kw["head_dim"] = head_dim
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=patch,
                      spatial_merge_size=merge, temporal_patch_size=tp, out_hidden_size=32,
                      num_position_embeddings=64, deepstack_visual_indexes=[0])
        cfg = tr.Qwen3VLConfig(text_config=text_kw, vision_config=vision, image_token_id=IMAGE_ID,
                               video_token_id=VIDEO_ID, vision_start_token_id=VISION_START_ID,
                               vision_end_token_id=VISION_END_ID, **ov)
        model = tr.Qwen3VLForConditionalGeneration(cfg)
    row_dim = 3 * tp * patch * patch
    grids = [(1, 4, 4), (1, 2, 6), (1, 4, 2), (1, 6, 4)]

    def make_batch(batch_size: int = 2, generator: Optional[torch.Generator] = None):
        g = _generator(generator)
        thw = [grids[i % len(grids)] for i in range(batch_size)]
        samples = []
        for t, h, w in thw:
            block = [VISION_START_ID] + [IMAGE_ID] * (t * h * w // merge ** 2) + [VISION_END_ID]
            samples.append(_chat_sample(block, g, prefix=()))
        out = _assemble(samples)
        rows = sum(t * h * w for t, h, w in thw)
        out["pixel_values"] = torch.randn(rows, row_dim, generator=g)
        out["image_grid_thw"] = torch.tensor(thw, dtype=torch.long)
        out["mm_token_type_ids"] = (out["input_ids"] == IMAGE_ID).to(torch.int)
        return out

    return model, make_batch


def _idefics3(smolvlm: bool = False, **ov):
    import transformers as tr

    image_size, patch, scale = ov.pop("image_size", 16), ov.pop("patch_size", 4), 2
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  image_size=image_size, patch_size=patch)
    text = _text_kwargs(**ov.pop("text", {}))
    if smolvlm:
        cfg = tr.SmolVLMConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_ID,
                               scale_factor=scale, **ov)
        model = tr.SmolVLMForConditionalGeneration(cfg)
    else:
        cfg = tr.Idefics3Config(vision_config=vision, text_config=text, image_token_id=IMAGE_ID,
                                scale_factor=scale, **ov)
        model = tr.Idefics3ForConditionalGeneration(cfg)
    per_image = (image_size // patch) ** 2 // scale ** 2

    def make_batch(batch_size: int = 2, generator: Optional[torch.Generator] = None):
        g = _generator(generator)
        # image splitting: sample i has 1 + (i % 2) images (padded with all-zero images, as the
        # processor does); each image block is <fake><image>*k<fake>
        n_imgs = [1 + (i % 2) for i in range(batch_size)]
        samples = []
        for n in n_imgs:
            block = []
            for _ in range(n):
                block += [BOI_ID] + [IMAGE_ID] * per_image + [EOI_ID]
            samples.append(_chat_sample(block, g))
        out = _assemble(samples)
        max_n = max(n_imgs)
        pix = torch.zeros(batch_size, max_n, 3, image_size, image_size)
        pam = torch.zeros(batch_size, max_n, image_size, image_size, dtype=torch.bool)
        for i, n in enumerate(n_imgs):
            pix[i, :n] = torch.randn(n, 3, image_size, image_size, generator=g)
            pam[i, :n] = True
        out["pixel_values"] = pix
        out["pixel_attention_mask"] = pam
        return out

    return model, make_batch


def _paligemma(**ov):
    import transformers as tr

    image_size, patch = ov.pop("image_size", 16), ov.pop("patch_size", 4)
    n_tok = (image_size // patch) ** 2
    text = tr.GemmaConfig(**_text_kwargs(head_dim=16, **ov.pop("text", {})))
    vision = tr.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, image_size=image_size, patch_size=patch,
                                   projection_dim=32)
    cfg = tr.PaliGemmaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_ID,
                             projection_dim=32, hidden_size=32, **ov)
    model = tr.PaliGemmaForConditionalGeneration(cfg)

    def make_batch(batch_size: int = 2, generator: Optional[torch.Generator] = None):
        g = _generator(generator)
        samples, types = [], []
        for _ in range(batch_size):
            s = _chat_sample([IMAGE_ID] * n_tok, g, image_first=True)
            samples.append(s)
            # token_type_ids: 0 on the prefix (image + prompt), 1 on the suffix (response)
            types.append([int(x) for x in s.labelled])
        out = _assemble(samples, {"token_type_ids": types})
        out["pixel_values"] = torch.randn(batch_size, 3, image_size, image_size, generator=g)
        return out

    return model, make_batch


def _gemma3(**ov):
    import transformers as tr

    image_size, patch, mm_tokens = ov.pop("image_size", 16), ov.pop("patch_size", 4), 4
    text = _text_kwargs(head_dim=16, sliding_window=8, layer_types=["sliding_attention", "full_attention"],
                        num_hidden_layers=2, **ov.pop("text", {}))
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  image_size=image_size, patch_size=patch, vision_use_head=False)
    cfg = tr.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=mm_tokens,
                          boi_token_index=BOI_ID, eoi_token_index=EOI_ID, image_token_index=IMAGE_ID, **ov)
    model = tr.Gemma3ForConditionalGeneration(cfg)

    def make_batch(batch_size: int = 2, generator: Optional[torch.Generator] = None):
        g = _generator(generator)
        samples = [_chat_sample([BOI_ID] + [IMAGE_ID] * mm_tokens + [EOI_ID], g) for _ in range(batch_size)]
        out = _assemble(samples)
        out["token_type_ids"] = (out["input_ids"] == IMAGE_ID).long()
        out["pixel_values"] = torch.randn(batch_size, 3, image_size, image_size, generator=g)
        return out

    return model, make_batch


def _mllama(**ov):
    import transformers as tr

    image_size, patch, tiles = ov.pop("image_size", 16), ov.pop("patch_size", 4), 2
    vision = tr.MllamaVisionConfig(hidden_size=32, num_hidden_layers=2, num_global_layers=1,
                                   attention_heads=2, intermediate_size=64, vision_output_dim=64,
                                   image_size=image_size, patch_size=patch, max_num_tiles=tiles,
                                   intermediate_layers_indices=[0],
                                   supported_aspect_ratios=[[1, 1], [1, 2], [2, 1]])
    text = tr.MllamaTextConfig(**_text_kwargs(num_hidden_layers=2, cross_attention_layers=[1],
                                              **ov.pop("text", {})))
    cfg = tr.MllamaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_ID, **ov)
    model = tr.MllamaForConditionalGeneration(cfg)

    def make_batch(batch_size: int = 2, generator: Optional[torch.Generator] = None):
        g = _generator(generator)
        samples = [_chat_sample([IMAGE_ID], g) for _ in range(batch_size)]
        out = _assemble(samples)
        # one image per sample; sample i uses 1 + (i % 2) tiles (aspect ratio id 1 = 1×1, 2 = 1×2)
        n_tiles = [1 + (i % 2) for i in range(batch_size)]
        pix = torch.zeros(batch_size, 1, tiles, 3, image_size, image_size)
        ar_mask = torch.zeros(batch_size, 1, tiles, dtype=torch.long)
        xmask = torch.zeros(batch_size, out["input_ids"].shape[1], 1, tiles, dtype=torch.long)
        for i, n in enumerate(n_tiles):
            pix[i, 0, :n] = torch.randn(n, 3, image_size, image_size, generator=g)
            ar_mask[i, 0, :n] = 1
            start = out["input_ids"][i].tolist().index(IMAGE_ID)
            xmask[i, start:int(out["attention_mask"][i].sum()), 0, :n] = 1
        out["pixel_values"] = pix
        out["aspect_ratio_ids"] = torch.tensor([[n] for n in n_tiles], dtype=torch.long)
        out["aspect_ratio_mask"] = ar_mask
        out["cross_attention_mask"] = xmask
        return out

    return model, make_batch


def _internvl(**ov):
    import transformers as tr

    image_size, patch = ov.pop("image_size", 16), ov.pop("patch_size", 4)
    vision = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                  image_size=[image_size, image_size], patch_size=[patch, patch])
    text = _text_kwargs(**ov.pop("text", {}))
    per_tile = (image_size // patch) ** 2 // 4
    cfg = tr.InternVLConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_ID,
                            image_seq_length=per_tile, downsample_ratio=0.5, **ov)
    model = tr.InternVLForConditionalGeneration(cfg)

    def make_batch(batch_size: int = 2, generator: Optional[torch.Generator] = None):
        g = _generator(generator)
        # dynamic tiling: sample i has 1 + (i % 2) tiles, all tiles stacked along dim 0
        n_tiles = [1 + (i % 2) for i in range(batch_size)]
        samples = [_chat_sample([BOI_ID] + [IMAGE_ID] * (per_tile * n) + [EOI_ID], g) for n in n_tiles]
        out = _assemble(samples)
        out["pixel_values"] = torch.randn(sum(n_tiles), 3, image_size, image_size, generator=g)
        return out

    return model, make_batch


_BUILDERS: Dict[str, Callable[..., Tuple[torch.nn.Module, MakeBatch]]] = {
    "llava": _llava,
    "llava_next": lambda **ov: _llava_next_like(False, **ov),
    "llava_onevision": lambda **ov: _llava_next_like(True, **ov),
    "qwen2_vl": lambda **ov: _qwen_vl("2", **ov),
    "qwen2_5_vl": lambda **ov: _qwen_vl("2.5", **ov),
    "qwen3_vl": lambda **ov: _qwen_vl("3", **ov),
    "idefics3": _idefics3,
    "smolvlm": lambda **ov: _idefics3(smolvlm=True, **ov),
    "paligemma": _paligemma,
    "gemma3": _gemma3,
    "mllama": _mllama,
    "internvl": _internvl,
}

TINY_FAMILIES: Tuple[str, ...] = tuple(_BUILDERS)
__all__ = ["TINY_FAMILIES", "build_tiny_model", "sample_batches", "collate", "tiny_tokenizer"]


def build_tiny_model(family: str, *, seed: Optional[int] = 0, **overrides) -> Tuple[torch.nn.Module, MakeBatch]:
    """Build a tiny random model of ``family`` (one of :data:`TINY_FAMILIES`) and its batch maker.

    ``overrides`` go to the family's top-level config (``text={...}`` to its text config;
    ``image_size``/``patch_size`` for the vision tower). ``seed`` fixes the weights
    (``None``: use the global RNG). The model is in eval mode, float32, on CPU.
    """
    if family not in _BUILDERS:
        raise ValueError(f"family must be one of {TINY_FAMILIES}, got {family!r}")
    if seed is None:
        model, make_batch = _BUILDERS[family](**overrides)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model, make_batch = _BUILDERS[family](**overrides)
    model.eval()
    return model, make_batch


# --------------------------------------------------------------------------- datasets
SEQUENCE_KEYS = {"input_ids": PAD_ID, "attention_mask": 0, "labels": -100, "token_type_ids": 0,
                 "mm_token_type_ids": 0, "cross_attention_mask": 0}


def sample_batches(make_batch: MakeBatch, n: int, seed: int = 0) -> List[Dict[str, Tensor]]:
    """``n`` single-sample batch dicts (each as ``make_batch(1)`` makes it), reproducibly."""
    gen = torch.Generator().manual_seed(seed)
    return [make_batch(1, generator=gen) for _ in range(n)]


def collate(samples: Sequence[Dict[str, Tensor]]) -> Dict[str, Tensor]:
    """Merge single-sample batch dicts like the family's collator: right-pad the sequence
    tensors, concatenate the rest along dim 0 (zero-padding ragged image/tile dims)."""
    if not samples:
        raise ValueError("samples must be a non-empty sequence of batch dicts")
    length = max(s["input_ids"].shape[1] for s in samples)
    out: Dict[str, Tensor] = {}
    for key in samples[0]:
        parts = [s[key] for s in samples]
        if key in SEQUENCE_KEYS:
            padded = []
            for p in parts:
                pad_shape = list(p.shape)
                pad_shape[1] = length - p.shape[1]
                padded.append(torch.cat([p, torch.full(pad_shape, SEQUENCE_KEYS[key], dtype=p.dtype)], 1))
            out[key] = torch.cat(padded, 0)
            continue
        shape = [max(p.shape[d] for p in parts) for d in range(parts[0].dim())]
        grown = []
        for p in parts:
            if list(p.shape[1:]) != shape[1:]:
                q = torch.zeros([p.shape[0]] + shape[1:], dtype=p.dtype)
                q[tuple(slice(0, n) for n in p.shape)] = p
                p = q
            grown.append(p)
        out[key] = torch.cat(grown, 0)
    return out


def tiny_tokenizer():
    """A word-level tokenizer over the tiny vocabulary (``t0`` … ``t127``), for Trainers that
    insist on a ``processing_class`` (TRL's SFTTrainer). No downloads."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB_SIZE)}, unk_token=f"t{NEWLINE_ID}"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=f"t{PAD_ID}", bos_token=f"t{BOS_ID}",
                                   eos_token=f"t{EOS_ID}", unk_token=f"t{NEWLINE_ID}")
