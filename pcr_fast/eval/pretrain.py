"""The pretrained setting's starting point: a tiny VLM pre-trained on clean data, cached on disk.

Why: the paper's (and users') setting is a model that already answers from the image,
fine-tuned on data that may be poisoned. The harness builds that model itself — pre-trained
on its own clean split of the digits images (disjoint from the fine-tuning and test images),
every instruction template — deterministically per (model, seed), and caches the weights under
``~/.cache/pcr_fast/pretrained/`` (``PCR_FAST_CACHE`` moves the root) keyed by everything that
changes them, so every run after the first loads them instantly.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence

import torch

from .models import BatchBuilder, ModelSpec, build_model

logger = logging.getLogger(__name__)

#: bump when the pre-training procedure changes in a way the key does not capture
PRETRAIN_VERSION = 1


@dataclass(frozen=True)
class PretrainRecipe:
    """How the clean pre-training runs (AdamW, linear warm-up then cosine to 10 %)."""

    epochs: float = 6.0
    lr: float = 1e-3
    batch_size: int = 32

    def __post_init__(self):
        if not self.epochs > 0:
            raise ValueError(f"pretrain epochs must be > 0, got {self.epochs!r}")
        if not self.lr > 0:
            raise ValueError(f"pretrain lr must be > 0, got {self.lr!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"pretrain batch_size must be a positive int, got {self.batch_size!r}")


def cache_root() -> Path:
    """``$PCR_FAST_CACHE`` or ``~/.cache/pcr_fast``."""
    return Path(os.environ.get("PCR_FAST_CACHE") or Path.home() / ".cache" / "pcr_fast")


def lr_lambda(steps: int) -> Callable[[int], float]:
    """Linear warm-up over 5 % of ``steps``, then cosine decay to 10 % (the harness's schedule)."""
    warmup = max(1, steps // 20)
    return lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))


def pretrain_key(spec: ModelSpec, seed: int, recipe: PretrainRecipe, vocab: Dict[str, int],
                 data_fingerprint: str) -> str:
    """A hash of everything that changes the pre-trained weights."""
    import transformers

    record = {"version": PRETRAIN_VERSION, "spec": asdict(spec), "seed": int(seed), "recipe": asdict(recipe),
              "vocab": sorted(vocab.items()), "data": data_fingerprint, "torch": torch.__version__.split("+")[0],
              "transformers": transformers.__version__}
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:20]


def fingerprint(pixels: torch.Tensor, prompts: Sequence[str], responses: Sequence[str]) -> str:
    """A hash of the pre-training data (pixels, prompts, responses)."""
    h = hashlib.sha256()
    h.update(pixels.detach().to(torch.float32).contiguous().cpu().numpy().tobytes())
    h.update("\n".join(prompts).encode())
    h.update("\n".join(responses).encode())
    return h.hexdigest()[:20]


def pretrained_model(spec: ModelSpec, seed: int, builder: BatchBuilder, pixels: torch.Tensor,
                     prompts: Sequence[str], responses: Sequence[str], *,
                     recipe: Optional[PretrainRecipe] = None, device=None, progress=False,
                     evaluate: Optional[Callable[[torch.nn.Module], Dict]] = None) -> torch.nn.Module:
    """The tiny model of ``spec`` pre-trained on the clean ``(pixels, prompts, responses)``,
    from the cache when it is there (``evaluate(model)``'s metrics are stored next to it).

    Deterministic per (spec, seed, recipe, vocabulary, data): the first run writes the
    weights atomically (temporary file + rename), so concurrent first runs are safe.
    """
    recipe = recipe or PretrainRecipe()
    dev = torch.device(device) if device is not None else torch.device("cpu")
    key = pretrain_key(spec, seed, recipe, builder.tokenizer.get_vocab(), fingerprint(pixels, prompts, responses))
    folder = cache_root() / "pretrained"
    path = folder / f"{spec.family}_{key}.pt"
    net = build_model(spec, seed=seed)
    if path.exists():
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        logger.info("pre-trained %s (seed %d) from the cache: %s", spec.family, seed, path)
        return net.to(dev).train()
    t0 = time.perf_counter()
    net = net.to(dev).train()
    n = len(prompts)
    steps = max(1, math.ceil(recipe.epochs * n / recipe.batch_size))
    opt = torch.optim.AdamW(net.parameters(), lr=recipe.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(steps))
    gen = torch.Generator().manual_seed(int(seed) + 104729)
    order, cursor = torch.randperm(n, generator=gen), 0
    bar = None
    if progress is True:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc=f"pre-training {spec.family} (seed {seed})", leave=False, dynamic_ncols=True)
    for _ in range(steps):
        if cursor + recipe.batch_size > n:
            order, cursor = torch.randperm(n, generator=gen), 0
        idx = order[cursor:cursor + recipe.batch_size].tolist()
        cursor += recipe.batch_size
        inputs = builder.training_inputs(pixels[idx], [prompts[i] for i in idx], [responses[i] for i in idx])
        loss = net(**{k: v.to(dev) for k, v in inputs.items()}).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        sched.step()
        if bar is not None:
            bar.update(1)
        elif callable(progress):
            progress(1)
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - t0
    meta = {"family": spec.family, "seed": int(seed), "spec": asdict(spec), "recipe": asdict(recipe), "steps": steps,
            "samples": n, "seconds": round(seconds, 1), "key": key}
    if evaluate is not None:
        net.eval()
        meta["metrics"] = {k: v for k, v in evaluate(net).items() if isinstance(v, float)}
        net.train()
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{path.name}.{os.getpid()}.tmp"
    torch.save({k: v.detach().cpu() for k, v in net.state_dict().items()}, tmp)
    os.replace(tmp, path)
    path.with_suffix(".json").write_text(json.dumps(meta, indent=2))
    logger.info("pre-trained %s (seed %d) in %.0fs -> %s %s", spec.family, seed, seconds, path,
                meta.get("metrics", ""))
    return net


def pretrain_metadata(path: Path) -> Optional[dict]:
    """The JSON record written next to a cached model (None if absent)."""
    meta = Path(path).with_suffix(".json")
    return json.loads(meta.read_text()) if meta.exists() else None
