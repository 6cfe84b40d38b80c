"""Model adapters: find the lm_head, capture the last hidden states, build the two views.

How the hidden states are taken: a forward *pre*-hook on the model's output-embedding
module (the lm_head) records its input — the post-norm last hidden states — and hands the
lm_head an empty slice, so the model's own forward runs end to end (through DDP, peft,
accelerate's autocast wrapper …) but computes a (B, 0, V) logits tensor instead of
(B, T, V). The fused loss then uses the recorded hidden states and the lm_head weight.

How the views are batched: every tensor input of the batch dict is concatenated with
itself along its leading dimension (per-sample tensors, per-image tensors, Qwen-VL patch
rows and ``image_grid_thw`` alike: the image order then still follows the order of the
image tokens in the concatenated ``input_ids``), and ``pixel_values`` is replaced by
``[original; augmented]``. Inputs that cannot be concatenated that way fall back to two
forwards.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Tuple

import torch
from torch import Tensor, nn

logger = logging.getLogger(__name__)

# batch-dict keys that are targets or Trainer bookkeeping, never model inputs
NON_MODEL_KEYS = frozenset({"labels", "shift_labels", "num_items_in_batch", "augmented_pixel_values",
                            "sample_ids"})
SAMPLE_IDS_KEY = "sample_ids"  # training-set row ids (scan-and-unlearn PCR's memory is indexed by them)
# keys shared by both views (not concatenated)
SHARED_KEYS = frozenset({"cache_position"})
PIXEL_KEY = "pixel_values"
AUGMENTED_KEY = "augmented_pixel_values"
# config attributes that change logits after the lm_head in ways the fused loss does not model
_UNSUPPORTED_LOGIT_TRANSFORMS = ("logit_scale", "logits_scaling", "output_multiplier_scale")


# --------------------------------------------------------------------------- unwrapping
def unwrap_model(model: nn.Module) -> nn.Module:
    """The ``PreTrainedModel`` under DDP/FSDP/accelerate/torch.compile/peft wrappers.

    peft injects its adapter layers in place, so the unwrapped model still runs them.
    """
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        if hasattr(model, "_orig_mod"):            # torch.compile
            model = model._orig_mod
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif type(model).__name__ in ("FullyShardedDataParallel",) and hasattr(model, "module"):
            model = model.module
        elif hasattr(model, "get_base_model") and callable(model.get_base_model):   # peft
            model = model.get_base_model()
    return model


def model_config(model: nn.Module):
    """The HF config of a (unwrapped) model, or a ValueError saying a PreTrainedModel is needed."""
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError(f"model ({type(model).__name__}) has no .config: pcr_fast needs a Hugging Face "
                         "PreTrainedModel (possibly wrapped by peft/DDP/accelerate)")
    return config


def _text_config(config):
    getter = getattr(config, "get_text_config", None)
    return getter() if callable(getter) else getattr(config, "text_config", config)


_SPECIAL_ID_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def special_token_ids(model: Optional[nn.Module] = None, tokenizer: Any = None,
                      vocab_size: Optional[int] = None) -> List[int]:
    """The special tokens of a model and its tokenizer (or processor): the tokenizer's
    ``all_special_ids`` and the bos/eos/pad ids of the model's config and generation config;
    with ``vocab_size``, only those the lm_head has (a tokenizer may list more).

    Why: the defense must never name one as a backdoor target (an end-of-answer token ends
    every response, so unlearning it would unlearn answering).
    """
    ids = set()
    tok = getattr(tokenizer, "tokenizer", tokenizer)
    ids.update(int(t) for t in (getattr(tok, "all_special_ids", None) or ()) if t is not None)
    if model is not None:
        inner = unwrap_model(model)
        for cfg in (getattr(inner, "config", None), getattr(inner, "generation_config", None)):
            if cfg is None:
                continue
            for c in {id(cfg): cfg, id(_text_config(cfg)): _text_config(cfg)}.values():
                for field in _SPECIAL_ID_FIELDS:
                    value = getattr(c, field, None)
                    for t in (value if isinstance(value, (list, tuple)) else [value]):
                        if isinstance(t, int) and t >= 0:
                            ids.add(t)
    return sorted(t for t in ids if vocab_size is None or t < vocab_size)


def find_lm_head(model: nn.Module) -> nn.Module:
    """The output-embedding module (lm_head), through wrappers and tied embeddings."""
    inner = unwrap_model(model)
    getter = getattr(inner, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    if head is None:
        raise ValueError(
            f"{type(inner).__name__} has no output embeddings (get_output_embeddings() returned "
            "nothing): pcr_fast needs a causal-LM head (e.g. *ForConditionalGeneration, not the bare "
            "*Model)")
    if hasattr(head, "base_layer") or hasattr(head, "lora_A"):
        raise ValueError(
            "the lm_head carries peft adapters (it is in target_modules): the fused loss reads the "
            "lm_head weight directly and would ignore them. Exclude lm_head from target_modules "
            "(use modules_to_save=['lm_head'] to train it fully) or merge the adapters first")
    if not isinstance(getattr(head, "weight", None), Tensor) or head.weight.dim() != 2:
        raise ValueError(f"the lm_head ({type(head).__name__}) has no 2-D .weight: pcr_fast needs a "
                         "linear output layer")
    return head


def softcap_candidates(model: nn.Module) -> Tuple[Optional[float], ...]:
    """Logit soft-capping values the model may apply after its lm_head (Gemma-style).

    The config alone does not say whether a multimodal wrapper applies the text model's
    ``final_logit_softcapping`` (PaliGemma does, Gemma 3 does not in transformers 5.x), so
    :func:`verify_logits` settles it on the first batch. Other logit transforms raise.
    """
    config = model_config(unwrap_model(model))
    text = _text_config(config)
    for cfg in (config, text):
        for name in _UNSUPPORTED_LOGIT_TRANSFORMS:
            value = getattr(cfg, name, None)
            if value is not None and value != 1 and value != 1.0:
                raise ValueError(f"the model's config sets {name}={value!r}: its logits are rescaled "
                                 "after the lm_head, which the fused PCR loss does not model")
    caps = [getattr(cfg, "final_logit_softcapping", None) for cfg in (config, text)]
    caps = [float(c) for c in caps if c is not None]
    return tuple(dict.fromkeys(caps)) + (None,)


_VERIFIED_ATTR = "_pcr_fast_logit_softcap"


def verified_softcap(model: nn.Module) -> Tuple[bool, Optional[float]]:
    """(checked?, softcap) cached on the unwrapped model by :func:`verify_logits`."""
    inner = unwrap_model(model)
    if hasattr(inner, _VERIFIED_ATTR):
        return True, getattr(inner, _VERIFIED_ATTR)
    return False, None


def verify_logits(model: nn.Module, head: nn.Module, hidden_tail: Tensor, logits_tail: Optional[Tensor],
                  weight: Optional[Tensor] = None) -> Optional[float]:
    """Check, once per model, that its logits are ``softcap(h Wᵀ + b)``; return the softcap.

    Why: the fused loss recomputes the logits from the hidden states and the lm_head
    weight; a model that post-processes its logits differently must fail loudly, not
    train on a wrong loss. Costs one host sync on the first batch only.
    """
    inner = unwrap_model(model)
    candidates = softcap_candidates(model)
    if logits_tail is None:
        cap = candidates[0]
        logger.warning("could not read the model's logits to verify the lm_head; assuming softcap=%s", cap)
    else:
        with torch.no_grad():
            weight = head.weight if weight is None else weight
            z = torch.nn.functional.linear(hidden_tail, weight, getattr(head, "bias", None)).float()
            own = logits_tail.float()
            if own.shape != z.shape:
                raise ValueError(f"the model returned logits of shape {tuple(own.shape)} for lm_head output "
                                 f"{tuple(z.shape)}: it post-processes its logits in a way pcr_fast cannot follow")
            tol = 1e-3 * (1.0 + float(z.abs().max()))
            cap = "unmatched"
            for candidate in candidates:
                ref = z if candidate is None else candidate * torch.tanh(z / candidate)
                if float((ref - own).abs().max()) <= tol:
                    cap = candidate
                    break
        if cap == "unmatched":
            raise ValueError(
                f"{type(inner).__name__}'s logits are not softcap(lm_head(hidden)) for any softcap in "
                f"{candidates}: the model transforms its logits after the lm_head in a way the fused PCR "
                "loss does not model")
    setattr(inner, _VERIFIED_ATTR, cap)
    return cap


def check_gradient_checkpointing(model: nn.Module) -> None:
    """Raise if gradient checkpointing runs with ``use_reentrant=True``.

    Why: PCR runs the backbone on two views (one concatenated forward, or two forwards, one
    of them possibly under ``no_grad``); reentrant checkpointing breaks with DDP when a
    module runs more than once per backward and silently drops gradients when no input of a
    checkpointed block requires grad (frozen embeddings under LoRA).
    """
    for module in unwrap_model(model).modules():
        if not getattr(module, "gradient_checkpointing", False):
            continue
        func = getattr(module, "_gradient_checkpointing_func", None)
        keywords = getattr(func, "keywords", None) or {}
        if keywords.get("use_reentrant") is True:
            raise ValueError(
                "gradient checkpointing is enabled with use_reentrant=True; PCR needs the non-reentrant "
                "variant: model.gradient_checkpointing_enable(gradient_checkpointing_kwargs="
                "{'use_reentrant': False}) or TrainingArguments(gradient_checkpointing_kwargs="
                "{'use_reentrant': False})")
        return


# --------------------------------------------------------------------------- hidden capture
class _HiddenCapture:
    """Forward pre-hook on the lm_head: record its input, give it an empty slice."""

    def __init__(self, keep_last: bool = False) -> None:
        self.hidden: List[Tensor] = []
        self.weights: List[Tensor] = []   # the weight as the lm_head sees it (unsharded under FSDP2)
        self.keep_last = keep_last   # hand the lm_head the last position (to verify the logits)

    def _slice(self, h: Tensor) -> Tensor:
        return h[..., -1:, :] if self.keep_last else h[..., :0, :]

    def __call__(self, module: nn.Module, args: Tuple, kwargs: Dict) -> Tuple[Tuple, Dict]:
        self.weights.append(module.weight)
        if args:
            h, rest = args[0], args[1:]
            self.hidden.append(h)
            return (self._slice(h),) + tuple(rest), kwargs
        if "input" in kwargs:
            h = kwargs["input"]
            self.hidden.append(h)
            return args, {**kwargs, "input": self._slice(h)}
        raise ValueError("the lm_head was called without a hidden-state argument")


@contextmanager
def capture_last_hidden(head: nn.Module, keep_last: bool = False) -> Iterator[_HiddenCapture]:
    capture = _HiddenCapture(keep_last)
    handle = head.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        yield capture
    finally:
        handle.remove()


def forward_hidden(model: nn.Module, head: nn.Module, model_inputs: Mapping[str, Any],
                   expected_shape: Tuple[int, int], verify: bool = False) -> Tuple[Tensor, Tensor]:
    """Run the model's own forward; return the last hidden states (B, T, D), without logits,
    and the lm_head weight as the lm_head saw it (FSDP2 unshards it for the forward).

    ``verify``: also let the lm_head compute the last position and check the model's
    logits against the fused loss's reconstruction (:func:`verify_logits`).
    """
    with capture_last_hidden(head, keep_last=verify) as capture:
        output = model(**model_inputs, use_cache=False)
    if len(capture.hidden) != 1:
        raise ValueError(
            f"the model called its lm_head {len(capture.hidden)} times in one forward (expected once): "
            f"{type(unwrap_model(model)).__name__} computes logits in a way pcr_fast cannot intercept")
    hidden = capture.hidden[0]
    if hidden.dim() != 3 or tuple(hidden.shape[:2]) != tuple(expected_shape):
        raise ValueError(
            f"the lm_head received hidden states of shape {tuple(hidden.shape)}, expected "
            f"{tuple(expected_shape)} + (hidden,) from input_ids: the model drops or adds positions "
            "(logits_to_keep, prompt tuning, packing?) which pcr_fast does not support")
    check_weight_usable(capture.weights[0])
    if verify and is_zero3_partitioned(capture.weights[0]):
        verify = False   # the weight is gone after the forward; nothing to compare against
        setattr(unwrap_model(model), _VERIFIED_ATTR, softcap_candidates(model)[0])
    if verify:
        logits = getattr(output, "logits", None)
        if logits is None and isinstance(output, (tuple, list)) and output:
            logits = output[0] if isinstance(output[0], Tensor) else None
        verify_logits(model, head, hidden[..., -1:, :].detach(), logits, capture.weights[0])
    return hidden, capture.weights[0]


# --------------------------------------------------------------------------- views
def model_inputs_of(inputs: Mapping[str, Any]) -> Dict[str, Any]:
    return {k: v for k, v in inputs.items() if k not in NON_MODEL_KEYS}


def call_augment(augment: Callable, pixel_values: Tensor, inputs: Mapping[str, Any],
                 generator: Optional[torch.Generator]) -> Tensor:
    """Call ``augment(pixel_values, image_grid_thw=..., generator=...)`` and check the result."""
    kwargs = {}
    grid = inputs.get("image_grid_thw")
    if grid is not None:
        kwargs["image_grid_thw"] = grid
    if generator is not None:
        kwargs["generator"] = generator
    from ..augment import PatchAugment

    tile_mask = inputs.get("aspect_ratio_mask")
    if isinstance(augment, PatchAugment) and isinstance(tile_mask, Tensor) \
            and tile_mask.shape == pixel_values.shape[:tile_mask.dim()] and pixel_values.dim() == 6:
        kwargs["tile_mask"] = tile_mask  # Mllama: padding tiles are copied unchanged
    out = augment(pixel_values, **kwargs)
    if not isinstance(out, Tensor):
        out = getattr(out, "pixel_values", out)   # an AugmentResult-like record
    if not isinstance(out, Tensor) or out.shape != pixel_values.shape:
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"augment must return a tensor shaped like pixel_values "
                         f"{tuple(pixel_values.shape)} (the image-token count must not change), got {shape}")
    return out.to(pixel_values.dtype)


def keep_padding_images(original: Tensor, augmented: Tensor) -> Tensor:
    """Keep all-zero padding images/tiles all-zero in the augmented view.

    Why: Idefics3/SmolVLM drop the padding images of (B, n_images, C, H, W) batches by
    testing them for all-zero pixels; a fill that turns one non-zero would add image tokens.
    """
    if original.dim() < 5:
        return augmented
    padding = (original.flatten(-3) == 0).all(-1)[..., None, None, None]
    return torch.where(padding, torch.zeros((), dtype=augmented.dtype, device=augmented.device), augmented)


def _concat(key: str, a: Any, b: Any) -> Any:
    if key in SHARED_KEYS or not isinstance(a, Tensor):
        return a
    if key == "position_ids" and a.dim() == 3:   # M-RoPE: (3, B, T)
        return torch.cat([a, b], dim=1)
    return torch.cat([a, b], dim=0)


def can_concatenate(model_inputs: Mapping[str, Any]) -> Tuple[bool, str]:
    """Whether both views fit one batched forward (and why not)."""
    for key, value in model_inputs.items():
        if key in SHARED_KEYS or value is None or isinstance(value, (bool, int, float, str)):
            continue
        if not isinstance(value, Tensor):
            return False, f"input {key!r} is a {type(value).__name__}, not a tensor"
        if value.dim() == 0:
            return False, f"input {key!r} is a 0-d tensor"
    return True, ""


def concatenate_views(model_inputs: Mapping[str, Any], pixels_b: Tensor) -> Dict[str, Any]:
    """One batch dict holding view a then view b along the batch."""
    view_b = dict(model_inputs)
    view_b[PIXEL_KEY] = pixels_b
    return {k: _concat(k, v, view_b[k]) for k, v in model_inputs.items()}


def check_weight_usable(weight: Tensor) -> None:
    """Refuse an lm_head weight that is still sharded or was freed after the lm_head's forward.

    Under FSDP2 the lm_head weight is gathered for the forward and stays gathered through the
    backward only when the lm_head belongs to the root FSDP unit (the root does not reshard
    after forward); as an FSDP unit of its own it is freed right after its forward.
    """
    if hasattr(weight, "full_tensor") or hasattr(weight, "_local_tensor"):
        raise ValueError("the lm_head weight is a sharded DTensor (FSDP2/tensor parallel): shard the "
                         "lm_head with the root module (fully_shard(model) without fully_shard(lm_head))")
    if weight.numel() > 0 and weight.untyped_storage().size() == 0:
        raise ValueError(
            "the lm_head weight was freed after the lm_head's forward: it is an FSDP unit of its own with "
            "reshard_after_forward=True. Shard the lm_head with the root module (do not call "
            "fully_shard(model.lm_head)) or use reshard_after_forward=False for it")


# --------------------------------------------------------------------------- ZeRO-3
def is_zero3_partitioned(weight: Tensor) -> bool:
    """True for a DeepSpeed ZeRO-3 parameter whose data is currently partitioned away."""
    return hasattr(weight, "ds_id") and weight.numel() == 0


@contextmanager
def gathered_weight(weight: Tensor) -> Iterator[None]:
    """Make a DeepSpeed ZeRO-3 partitioned lm_head weight whole for the loss (no-op otherwise).

    Under ZeRO-3 the lm_head weight is gathered for the lm_head's own forward and partitioned
    again right after it, so the fused loss (which reads the weight after the forward and
    again in its backward) needs it whole: a forward-only loss (evaluation, ``no_grad``) is
    computed inside ``deepspeed.zero.GatheredParameters``; for training keep the lm_head
    unpartitioned (``stage3_param_persistence_threshold`` above V·D, or exclude it from
    ``zero.Init``), because a gradient produced outside the lm_head's module hooks would not be
    reduce-scattered by DeepSpeed.
    """
    if not is_zero3_partitioned(weight):
        yield
        return
    if torch.is_grad_enabled() and weight.requires_grad:
        raise ValueError(
            "the lm_head weight is DeepSpeed ZeRO-3 partitioned: the fused PCR loss needs it whole for its "
            "backward. Keep it unpartitioned: set zero_optimization.stage3_param_persistence_threshold above "
            f"the lm_head size (V*D = {getattr(weight, 'ds_numel', '?')}) or use ZeRO-2")
    try:
        import deepspeed
    except ImportError as err:  # pragma: no cover - only with a ZeRO-3 model
        raise ValueError("the lm_head weight is ZeRO-3 partitioned but deepspeed cannot be imported") from err
    with deepspeed.zero.GatheredParameters([weight], modifier_rank=None):  # pragma: no cover
        yield
