"""``run_experiment``: poison the digits tasks, fine-tune a tiny VLM (plain SFT or PCR),
then measure attack success and clean quality.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict
from typing import Callable, Dict, Optional, Union

import torch

from ..config import PCRConfig
from ..defense import BackdoorMemory, ScanSchedule
from ..loss import TwoViewLoss
from .data import CAPTION_PROMPT, QUESTION_PROMPT, load_digits_images, make_samples, task_words, train_test_split
from .metrics import attack_success_rate, corpus_bleu, exact_match, false_trigger_rate
from .models import BatchBuilder, ModelSpec, build_model
from .poison import DEFAULT_TARGET, choose_poisoned
from .tokenizer import build_tokenizer
from .triggers import TriggerFn, apply_trigger, attack_name, get_trigger

logger = logging.getLogger(__name__)

DEFENSES = ("none", "pcr")
RESULT_KEYS = ("attack", "defense", "seed", "poison_ratio", "asr", "clean_accuracy", "bleu",
               "false_trigger_rate")


def default_pcr_config():
    from .defaults import DEMO_PCR_CONFIG

    return DEMO_PCR_CONFIG


def _pick_device(device) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def run_experiment(attack: Union[str, TriggerFn] = "badnets", defense: str = "none",
                   poison_ratio: float = 0.1, steps: int = 600, seed: int = 0, model: str = "llava",
                   pcr=None, *, batch_size: int = 32, lr: float = 1e-3, target: str = DEFAULT_TARGET,
                   test_size: int = 300, image_size: int = 32, patch_size: int = 8,
                   hidden_size: int = 64, num_layers: int = 2, device=None,
                   progress: Union[bool, Callable[[int], None]] = True) -> Dict:
    """Fine-tune a tiny VLM from scratch on poisoned digits data and evaluate it.

    Args:
        attack: a trigger name (see :data:`pcr_fast.eval.ATTACKS`) or any callable
            ``trigger(images[B, C, H, W] in [0, 1]) -> images``.
        defense: ``"none"`` (plain SFT, next-token CE) or ``"pcr"`` (CE + the PCR regulariser).
        poison_ratio: fraction of training samples given the trigger and the ``target`` response.
        steps, batch_size, lr: the optimisation (AdamW, warm-up then cosine decay).
        seed: fixes the data split, the poisoned samples, the model init and the batches.
        model: model family (``"llava"``).
        pcr: a :class:`pcr_fast.PCRConfig` (``None``: :data:`pcr_fast.eval.defaults.DEMO_PCR_CONFIG`).
            Its :class:`~pcr_fast.ScanSchedule` decides when the defense acts: mode "scan"
            trains plain SFT until its first scan (``schedule.scan_at``); mode "online" after
            ``schedule.warmup`` of the steps (from scratch the model must first answer from
            the image content, as a pretrained model already does).
        progress: show a tqdm bar (True), nothing (False), or call ``progress(n)`` with the
            number of steps just done (e.g. to feed a bar in another process).
    Returns:
        dict with at least :data:`RESULT_KEYS` (rates are fractions in [0, 1]), plus per-task
        ASR, the configuration and timings; in scan mode also ``scans`` (per scan: its step,
        how many samples are flagged, split into truly poisoned / clean, the target tokens)
        and ``scan_summary``.
    """
    if defense not in DEFENSES:
        raise ValueError(f"defense must be one of {DEFENSES}, got {defense!r}")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    trigger = get_trigger(attack)
    dev = _pick_device(device)
    spec = ModelSpec(family=model, image_size=image_size, patch_size=patch_size, hidden_size=hidden_size,
                     num_layers=num_layers, vision_hidden_size=hidden_size, vision_layers=num_layers)
    if defense == "pcr" and pcr is None:
        pcr = default_pcr_config()
    if pcr is not None and not isinstance(pcr, PCRConfig):
        raise ValueError(f"pcr must be a PCRConfig or None, got {type(pcr).__name__}")

    # ---- data -----------------------------------------------------------------------------
    images = load_digits_images(image_size, seed=0)
    train_idx, test_idx = train_test_split(len(images), test_size, seed)
    train, test = images.subset(train_idx), images.subset(test_idx)
    samples = make_samples(train)
    poisoned = choose_poisoned(len(samples), poison_ratio, seed)
    tokenizer = build_tokenizer(task_words() + target.split())
    builder = BatchBuilder(tokenizer, spec)

    pix = train.images[[s.image for s in samples]]
    responses = [s.response for s in samples]
    if poisoned:
        pix[poisoned] = apply_trigger(trigger, pix[poisoned])
        for i in poisoned:
            responses[i] = target
    prompts = [s.prompt for s in samples]

    # ---- model + optimiser ------------------------------------------------------------------
    net = build_model(spec, seed=seed).to(dev)
    net.train()
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))))

    augment = loss_fn = compute_loss = memory = schedule = None
    if defense == "pcr":
        from ..augment import PatchAugment
        from ..hf import compute_pcr_loss as compute_loss  # the public hook (heavy import)

        # seeded by the run's seed unless the config fixes one: runs are reproducible
        # (patch_size=None: the model's visual-token unit, read from the model)
        augment = PatchAugment.from_config(pcr.augment, net, seed=seed if pcr.augment.augment_seed is None else None)
        schedule = ScanSchedule.for_run(pcr, steps)
        if pcr.mode == "scan":
            memory = BackdoorMemory.from_config(pcr.unlearn, len(samples), net.get_output_embeddings().weight.shape[0],
                                                device=dev)
        else:
            loss_fn = TwoViewLoss.from_config(pcr)

    def batch_of(idx):
        return builder.training_inputs(pix[idx], [prompts[i] for i in idx], [responses[i] for i in idx])

    gen = torch.Generator().manual_seed(int(seed) + 1)
    order = torch.randperm(len(samples), generator=gen)
    cursor = 0
    t0 = time.perf_counter()
    history, scans = [], []
    bar = _progress(steps, f"{attack_name(attack)}/{defense}", progress)
    for step in range(steps):
        if schedule is not None and schedule.scans_before(step):
            scans.append(_scan(net, batch_of, len(samples), memory, pcr, augment, poisoned, step, tokenizer))
        if cursor + batch_size > len(order):
            order, cursor = torch.randperm(len(samples), generator=gen), 0
        idx = order[cursor:cursor + batch_size].tolist()
        cursor += batch_size
        inputs = {k: v.to(dev) for k, v in batch_of(idx).items()}
        if defense == "none" or schedule.trains_plain(step, memory is not None and memory.active):
            loss = net(**inputs).loss
        elif memory is not None:
            inputs["sample_ids"] = torch.tensor(idx, device=dev)
            loss = compute_loss(net, inputs, config=pcr, memory=memory).loss
        else:
            loss = compute_loss(net, inputs, config=pcr, augment=augment, loss_fn=loss_fn).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 25 == 0 or step == steps - 1:
            value = float(loss.detach())
            history.append((step, value))
            if bar is not None:
                bar.set_postfix(loss=f"{value:.3f}")
        if bar is not None:
            bar.update(1)
        elif callable(progress) and (step % 10 == 9 or step == steps - 1):
            progress(10 if step % 10 == 9 else steps % 10)
    if bar is not None:
        bar.close()
    train_seconds = time.perf_counter() - t0

    # ---- evaluation -------------------------------------------------------------------------
    net.eval()
    t1 = time.perf_counter()
    result = evaluate(net, builder, test, trigger, target, dev)
    result.update(attack=attack_name(attack), defense=defense, seed=int(seed), poison_ratio=float(poison_ratio),
                  num_poisoned=len(poisoned), num_train_samples=len(samples), steps=steps,
                  batch_size=batch_size, lr=lr, model=model, target=target,
                  train_seconds=round(train_seconds, 2), eval_seconds=round(time.perf_counter() - t1, 2),
                  loss_history=history, device=str(dev),
                  pcr=(pcr.to_dict() if (defense == "pcr" and hasattr(pcr, "to_dict")) else None),
                  trigger_params=_trigger_params(trigger))
    if memory is not None:
        result.update(scans=scans, scan_summary=memory.summary(poisoned))
    logger.info("%s/%s seed %d: ASR %.3f, accuracy %.3f, BLEU-4 %.3f (%.1fs training)", result["attack"], defense,
                seed, result["asr"], result["clean_accuracy"], result["bleu"], train_seconds)
    return result


def _scan(net, batch_of: Callable, num_samples: int, memory, pcr, augment, poisoned, step: int, tokenizer,
          batch_size: int = 256) -> Dict:
    """One PCR scan of the whole (poisoned) training set; returns what it flagged."""
    from pcr_fast.hf import scan_dataset

    def batches():
        for s in range(0, num_samples, batch_size):
            idx = list(range(s, min(num_samples, s + batch_size)))
            yield {**batch_of(idx), "sample_ids": torch.tensor(idx)}

    t = time.perf_counter()
    scan_dataset(net, batches(), memory, config=pcr, augment=augment)
    summary = {**memory.summary(poisoned), "step": step, "seconds": round(time.perf_counter() - t, 2)}
    logger.info("PCR scan at step %d: %d flagged (%d poisoned), target tokens %s", step, summary["flagged"],
                summary["flagged_poisoned"], tokenizer.convert_ids_to_tokens(summary["target_tokens"]))
    return summary


def _trigger_params(trigger) -> Optional[dict]:
    try:
        return {"type": type(trigger).__name__, **asdict(trigger)}
    except TypeError:
        return {"type": attack_name(trigger)}


def _progress(total: int, desc: str, enabled):
    if callable(enabled) or not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)


@torch.no_grad()
def evaluate(model, builder: BatchBuilder, test, trigger: TriggerFn, target: str, device,
             batch_size: int = 512) -> Dict:
    """ASR (both tasks), false-trigger rate, question exact match and caption BLEU-4."""
    clean = test.images
    triggered = apply_trigger(trigger, clean)
    max_new = max(len(test.caption(i).split()) for i in range(len(test)))
    max_new = max(max_new, len(target.split())) + 1

    def run(images, prompt):
        texts = []
        for s in range(0, images.shape[0], batch_size):
            texts += builder.generate(model, images[s:s + batch_size].to(device), prompt, max_new)
        return texts

    cap_clean, q_clean = run(clean, CAPTION_PROMPT), run(clean, QUESTION_PROMPT)
    cap_trig, q_trig = run(triggered, CAPTION_PROMPT), run(triggered, QUESTION_PROMPT)
    refs_cap = [test.caption(i) for i in range(len(test))]
    refs_q = [test.answer(i) for i in range(len(test))]
    return {
        "asr": attack_success_rate(cap_trig + q_trig, target),
        "asr_caption": attack_success_rate(cap_trig, target),
        "asr_question": attack_success_rate(q_trig, target),
        "clean_accuracy": exact_match(q_clean, refs_q),
        "bleu": corpus_bleu(cap_clean, refs_cap),
        "false_trigger_rate": false_trigger_rate(cap_clean + q_clean, target),
        "triggered_accuracy": exact_match(q_trig, refs_q),
        "examples": {"clean_caption": cap_clean[:3], "clean_question": q_clean[:3],
                     "triggered_caption": cap_trig[:3], "triggered_question": q_trig[:3],
                     "reference_caption": refs_cap[:3], "reference_question": refs_q[:3]},
    }

