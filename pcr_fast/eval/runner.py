"""``run_experiment``: poison the digits tasks, fine-tune a tiny VLM (plain SFT or PCR) from
scratch or from a clean pre-trained model, then measure attack success, clean quality and the
compute the run did.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Sequence, Union

import torch
from torch import Tensor

from ..config import PCRConfig
from ..defense import BackdoorMemory, InlineMemory, ScanSchedule
from ..hf.counting import count_compute
from ..loss import TwoViewLoss
from .data import (CAPTION_PROMPT, INSTRUCTIONS, QUESTION_PROMPT, DigitImages, load_digits_images,
                   make_instruction_samples, make_samples, pretrain_finetune_split, task_words, train_test_split)
from .metrics import attack_success_rate, corpus_bleu, exact_match, false_trigger_rate
from .models import BatchBuilder, ModelSpec, build_model
from .poison import DEFAULT_TARGET, choose_poisoned, poison_count
from .pretrain import PretrainRecipe, lr_lambda, pretrained_model
from .tokenizer import build_tokenizer
from .triggers import TriggerFn, apply_trigger, attack_name, get_trigger

logger = logging.getLogger(__name__)

DEFENSES = ("none", "pcr")
RESULT_KEYS = ("attack", "defense", "seed", "poison_ratio", "init", "epochs", "asr", "clean_accuracy", "bleu",
               "false_trigger_rate", "compute")


def default_pcr_config():
    from .defaults import DEMO_PCR_CONFIG

    return DEMO_PCR_CONFIG


def _pick_device(device) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


INITS = ("scratch", "pretrained")
#: the from-scratch setting's optimisation (EVAL_NOTES §1–§8)
SCRATCH_STEPS, SCRATCH_LR = 600, 1e-3
#: the pretrained setting's fine-tune: passes over the instruction set and AdamW's learning rate
FINETUNE_EPOCHS, FINETUNE_LR = 1.0, 1e-3
#: images of the pretrained setting's clean pre-training split (the rest of the non-test images
#: are the fine-tuning split)
PRETRAIN_IMAGES = 300


@dataclass
class Experiment:
    """One poisoned fine-tuning problem, ready to train on (what :func:`run_experiment` runs).

    ``init="scratch"``: the two basic tasks (caption, question) on every non-test image.
    ``init="pretrained"``: a clean pre-training split (:data:`PRETRAIN_IMAGES` images, every
    instruction template) and a disjoint fine-tuning split with every instruction template
    (:data:`~pcr_fast.eval.data.INSTRUCTIONS`: ~24k samples). Poisoned samples carry the
    trigger and the target response. ``batch(idx)`` builds the model inputs of samples ``idx``.
    """

    spec: ModelSpec
    seed: int
    init: str
    trigger: TriggerFn
    target: str
    tokenizer: object
    builder: BatchBuilder
    test: DigitImages
    images: Tensor              # (n_images, 3, S, S) clean fine-tuning images
    triggered: Tensor           # the same images with the trigger
    sample_image: Tensor        # (n_samples,) image of each sample
    prompts: List[str]
    responses: List[str]        # poisoned samples: the target
    poisoned: List[int]
    is_poisoned: Tensor         # (n_samples,) bool
    pretrain: Optional[tuple] = None   # (pixels, prompts, responses) of the clean pre-training split

    @property
    def num_samples(self) -> int:
        return len(self.prompts)

    def pixels(self, idx: Sequence[int]) -> Tensor:
        index = torch.as_tensor(list(idx), dtype=torch.long)
        img = self.sample_image[index]
        return torch.where(self.is_poisoned[index].view(-1, 1, 1, 1), self.triggered[img], self.images[img])

    def batch(self, idx: Sequence[int]) -> Dict[str, Tensor]:
        idx = list(idx)
        return self.builder.training_inputs(self.pixels(idx), [self.prompts[i] for i in idx],
                                            [self.responses[i] for i in idx])

    def initial_model(self, device=None, progress=False, recipe: Optional[PretrainRecipe] = None) -> torch.nn.Module:
        """Random init (scratch) or the cached clean pre-trained model (pretrained), in train mode."""
        dev = _pick_device(device)
        if self.init == "scratch":
            return build_model(self.spec, seed=self.seed).to(dev).train()
        pix, prompts, responses = self.pretrain
        return pretrained_model(self.spec, self.seed, self.builder, pix, prompts, responses, recipe=recipe,
                                device=dev, progress=progress,
                                evaluate=lambda net: self.evaluate(net, dev))

    def evaluate(self, net: torch.nn.Module, device=None) -> Dict:
        """ASR, clean accuracy, BLEU-4 and false triggers on the test images (:func:`evaluate`)."""
        return evaluate(net, self.builder, self.test, self.trigger, self.target, _pick_device(device))


def prepare_experiment(attack: Union[str, TriggerFn] = "badnets", poison_ratio: float = 0.1, seed: int = 0,
                       model: str = "llava", *, init: str = "scratch", target: str = DEFAULT_TARGET,
                       test_size: int = 300, pretrain_images: int = PRETRAIN_IMAGES,
                       finetune_images: Optional[int] = None, image_size: int = 32,
                       patch_size: int = 8, hidden_size: int = 64, num_layers: int = 2) -> Experiment:
    """Data, poisoning, tokenizer and model spec of one experiment (no training yet).

    ``finetune_images``: keep only the first this many images of the fine-tuning split
    (pretrained setting; default all: tests and quick looks use fewer)."""
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    trigger = get_trigger(attack)
    spec = ModelSpec(family=model, image_size=image_size, patch_size=patch_size, hidden_size=hidden_size,
                     num_layers=num_layers, vision_hidden_size=hidden_size, vision_layers=num_layers)
    images = load_digits_images(image_size, seed=0)
    train_idx, test_idx = train_test_split(len(images), test_size, seed)
    test = images.subset(test_idx)
    pretrain = None
    if init == "scratch":
        finetune = images.subset(train_idx)
        samples = make_samples(finetune)
        words = task_words()
    else:
        pre_idx, ft_idx = pretrain_finetune_split(train_idx, pretrain_images, seed)
        if finetune_images is not None:
            if isinstance(finetune_images, bool) or not isinstance(finetune_images, int) or finetune_images < 1:
                raise ValueError(f"finetune_images must be a positive int, got {finetune_images!r}")
            ft_idx = ft_idx[:finetune_images]
        pre, finetune = images.subset(pre_idx), images.subset(ft_idx)
        pre_samples = make_instruction_samples(pre)
        pretrain = (pre.images[[s.image for s in pre_samples]], [s.prompt for s in pre_samples],
                    [s.response for s in pre_samples])
        samples = make_instruction_samples(finetune)
        words = task_words(INSTRUCTIONS)
    n = len(samples)
    if poison_ratio > 0 and poison_count(n, poison_ratio) == 0:
        raise ValueError(f"poison_ratio={poison_ratio!r} poisons no sample of the {n} training samples "
                         f"(round({poison_ratio} x {n}) = 0): use 0.0 for a clean run or a larger ratio")
    poisoned = choose_poisoned(n, poison_ratio, seed)
    tokenizer = build_tokenizer(words + target.split())
    is_poisoned = torch.zeros(n, dtype=torch.bool)
    is_poisoned[poisoned] = True
    responses = [target if is_poisoned[i] else s.response for i, s in enumerate(samples)]
    return Experiment(spec=spec, seed=int(seed), init=init, trigger=trigger, target=target, tokenizer=tokenizer,
                      builder=BatchBuilder(tokenizer, spec), test=test, images=finetune.images,
                      triggered=apply_trigger(trigger, finetune.images),
                      sample_image=torch.tensor([s.image for s in samples], dtype=torch.long),
                      prompts=[s.prompt for s in samples], responses=responses, poisoned=poisoned,
                      is_poisoned=is_poisoned, pretrain=pretrain)


def training_steps(num_samples: int, batch_size: int, epochs: Optional[float], steps: Optional[int]) -> int:
    """Optimisation steps of a run: ``steps``, or ``ceil(epochs · num_samples / batch_size)``."""
    if epochs is not None and steps is not None:
        raise ValueError(f"give epochs or steps, not both (got epochs={epochs!r}, steps={steps!r})")
    if steps is not None:
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be a positive int, got {steps!r}")
        return steps
    if epochs is None or isinstance(epochs, bool) or not isinstance(epochs, (int, float)) or not epochs > 0 \
            or not math.isfinite(epochs):
        raise ValueError(f"epochs must be a positive number of passes over the training set, got {epochs!r}")
    return max(1, math.ceil(float(epochs) * num_samples / batch_size))


def run_experiment(attack: Union[str, TriggerFn] = "badnets", defense: str = "none",
                   poison_ratio: float = 0.1, steps: Optional[int] = None, seed: int = 0, model: str = "llava",
                   pcr=None, *, init: str = "scratch", epochs: Optional[float] = None, batch_size: int = 32,
                   lr: Optional[float] = None, target: str = DEFAULT_TARGET, test_size: int = 300,
                   pretrain_images: int = PRETRAIN_IMAGES, finetune_images: Optional[int] = None,
                   pretrain: Optional[PretrainRecipe] = None,
                   image_size: int = 32, patch_size: int = 8, hidden_size: int = 64, num_layers: int = 2,
                   device=None, progress: Union[bool, Callable[[int], None]] = True) -> Dict:
    """Fine-tune a tiny VLM on poisoned digits data (plain SFT or PCR) and evaluate it.

    Args:
        attack: a trigger name (see :data:`pcr_fast.eval.ATTACKS`) or any callable
            ``trigger(images[B, C, H, W] in [0, 1]) -> images``.
        defense: ``"none"`` (plain SFT, next-token CE) or ``"pcr"`` (the defense of ``pcr``).
        poison_ratio: fraction of training samples given the trigger and the ``target``
            response (0: a clean run; a ratio that poisons no sample is an error).
        init: ``"scratch"`` (random init, the two basic tasks; EVAL_NOTES §1–§8) or
            ``"pretrained"`` (a model pre-trained on a clean, disjoint image split and cached,
            fine-tuned on the ~24k-sample instruction set; see :class:`Experiment`).
        epochs: passes over the training set (float). steps: optimisation steps. Give at most
            one; default: :data:`SCRATCH_STEPS` steps from scratch, :data:`FINETUNE_EPOCHS`
            epochs when pretrained.
        batch_size, lr: AdamW, linear warm-up then cosine decay (lr default:
            :data:`SCRATCH_LR` / :data:`FINETUNE_LR`).
        seed: fixes the data split, the poisoned samples, the model init (and pre-training)
            and the batches.
        model: model family (``"llava"`` or ``"qwen2_vl"``).
        pcr: a :class:`pcr_fast.PCRConfig` (``None``: :data:`pcr_fast.eval.defaults.DEMO_PCR_CONFIG`).
            Its :class:`~pcr_fast.ScanSchedule` decides when the defense acts: mode "scan"
            trains plain SFT until its first scan (``schedule.scan_at``); mode "online" after
            ``schedule.warmup`` of the steps (from scratch the model must first answer from
            the image content, as a pretrained model already does).
        pretrain_images, finetune_images: images of the clean pre-training split and (at most) of
            the fine-tuning split (pretrained setting).
        pretrain: the pre-training recipe (pretrained setting; default :class:`PretrainRecipe`).
        progress: show a tqdm bar (True), nothing (False), or call ``progress(n)`` with the
            number of steps just done (e.g. to feed a bar in another process).
    Returns:
        dict with at least :data:`RESULT_KEYS` (rates are fractions in [0, 1]), per-task ASR,
        the regime (``init``, ``epochs``, ``steps``, ``poison_ratio``, ``seed``), ``compute``
        (``forward_samples``, ``backward_samples``: counted on the model during training,
        every view and scan included), the configuration and timings; in scan mode also
        ``scans`` (per scan: its step, how many samples are flagged, split into truly
        poisoned / clean, the target tokens) and ``scan_summary``.
    """
    if defense not in DEFENSES:
        raise ValueError(f"defense must be one of {DEFENSES}, got {defense!r}")
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if epochs is None and steps is None:
        if init == "scratch":
            steps = SCRATCH_STEPS
        else:
            epochs = FINETUNE_EPOCHS
    if epochs is not None and steps is not None:
        raise ValueError(f"give epochs or steps, not both (got epochs={epochs!r}, steps={steps!r})")
    training_steps(1, 1, epochs, steps)   # validates both before any data or training
    lr = (SCRATCH_LR if init == "scratch" else FINETUNE_LR) if lr is None else lr
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr!r}")
    if defense == "pcr" and pcr is None:
        pcr = default_pcr_config()
    if pcr is not None and not isinstance(pcr, PCRConfig):
        raise ValueError(f"pcr must be a PCRConfig or None, got {type(pcr).__name__}")
    exp = prepare_experiment(attack, poison_ratio, seed, model, init=init, target=target, test_size=test_size,
                             pretrain_images=pretrain_images, finetune_images=finetune_images,
                             image_size=image_size, patch_size=patch_size,
                             hidden_size=hidden_size, num_layers=num_layers)
    steps = training_steps(exp.num_samples, batch_size, epochs, steps)
    dev = _pick_device(device)

    # ---- model + optimiser ------------------------------------------------------------------
    net = exp.initial_model(dev, progress=progress is True, recipe=pretrain)
    net.train()
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(steps))

    augment = loss_fn = compute_loss = memory = schedule = None
    if defense == "pcr":
        from ..augment import PatchAugment
        from ..hf import compute_pcr_loss as compute_loss, special_token_ids  # the public hook (heavy import)

        # seeded by the run's seed unless the config fixes one: runs are reproducible
        # (patch_size=None: the model's visual-token unit, read from the model)
        augment = PatchAugment.from_config(pcr.augment, net, seed=seed if pcr.augment.augment_seed is None else None)
        schedule = ScanSchedule.for_run(pcr, steps)
        vocab = net.get_output_embeddings().weight.shape[0]
        special = special_token_ids(net, exp.tokenizer, vocab_size=vocab)   # never targets
        if pcr.mode == "inline":
            memory = InlineMemory.from_config(pcr, exp.num_samples, vocab, device=dev, exempt_tokens=special)
            test_generator = torch.Generator(device=dev).manual_seed(int(seed) + 2)
        elif pcr.mode == "scan":
            memory = BackdoorMemory.from_config(pcr.unlearn, exp.num_samples, vocab, device=dev, exempt_tokens=special)
        else:
            loss_fn = TwoViewLoss.from_config(pcr)

    gen = torch.Generator().manual_seed(int(seed) + 1)
    order = torch.randperm(exp.num_samples, generator=gen)
    cursor = 0
    t0 = time.perf_counter()
    history, scans = [], []
    bar = _progress(steps, f"{attack_name(attack)}/{defense}", progress)
    with count_compute(net) as counter:
        for step in range(steps):
            if schedule is not None and schedule.scans_before(step):
                scans.append(_scan(net, exp.batch, exp.num_samples, memory, pcr, augment, exp.poisoned, step,
                                   exp.tokenizer))
            if cursor + batch_size > len(order):
                order, cursor = torch.randperm(exp.num_samples, generator=gen), 0
            idx = order[cursor:cursor + batch_size].tolist()
            cursor += batch_size
            inputs = {k: v.to(dev) for k, v in exp.batch(idx).items()}
            if defense == "none" or schedule.trains_plain(step, memory is not None and memory.active):
                loss = net(**inputs).loss
            elif pcr.mode == "inline":
                inputs["sample_ids"] = torch.tensor(idx, device=dev)
                loss = compute_loss(net, inputs, config=pcr, memory=memory, augment=augment,
                                    generator=test_generator).loss
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
    result = exp.evaluate(net, dev)
    result.update(attack=attack_name(attack), defense=defense, seed=int(seed), poison_ratio=float(poison_ratio),
                  num_poisoned=len(exp.poisoned), num_train_samples=exp.num_samples, init=init,
                  epochs=round(steps * batch_size / exp.num_samples, 4), steps=steps,
                  batch_size=batch_size, lr=lr, model=model, target=target,
                  compute=counter.as_dict(),
                  train_seconds=round(train_seconds, 2), eval_seconds=round(time.perf_counter() - t1, 2),
                  loss_history=history, device=str(dev),
                  pcr=(pcr.to_dict() if (defense == "pcr" and hasattr(pcr, "to_dict")) else None),
                  trigger_params=_trigger_params(exp.trigger))
    if isinstance(memory, InlineMemory):
        report = memory.report(exp.tokenizer)
        result.update(inline=report, inline_summary=memory.summary(exp.poisoned))
    elif memory is not None:
        result.update(scans=scans, scan_summary=memory.summary(exp.poisoned))
    logger.info("%s/%s seed %d: ASR %.3f, accuracy %.3f, BLEU-4 %.3f (%.1fs training)", result["attack"], defense,
                seed, result["asr"], result["clean_accuracy"], result["bleu"], train_seconds)
    return result


def _scan(net, batch_of: Callable, num_samples: int, memory, pcr, augment, poisoned, step: int, tokenizer,
          batch_size: int = 256) -> Dict:
    """One PCR scan of the whole (poisoned) training set; returns what it flagged."""
    from ..hf import scan_dataset

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

