"""Real images that ship with scikit-learn (the 1,797 handwritten digits), as vision-language
tasks: a templated caption and a short-answer question (the from-scratch setting), or an
instruction set of many templates per image (the pretrained setting, :data:`INSTRUCTIONS`).

Why digits: they install with scikit-learn (no download), they are real handwriting, and a
model trained from scratch on them reaches a clean accuracy high enough that a drop caused
by a defense is measurable.

Each 8×8 grey digit is upsampled to ``image_size``² and coloured: the strokes take one of
four colours (a property of the image, so it can appear in the caption), the background
stays black. Attributes the captions describe are computed from the image itself.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
COLOURS = {"red": (1.0, 0.25, 0.2), "green": (0.2, 1.0, 0.3), "blue": (0.3, 0.45, 1.0),
           "yellow": (1.0, 0.9, 0.2)}
THICKNESS = ("thin", "thick")
CAPTION_PROMPT = "describe the image ."
QUESTION_PROMPT = "what digit is this ?"
TASKS = ("caption", "question")


@dataclass(frozen=True)
class Instruction:
    """One instruction template: a prompt and the attribute-derived answer it asks for."""

    name: str
    prompt: str
    answer: Callable[["DigitImages", int], str]


def _digit(d: "DigitImages", i: int) -> str:
    return DIGIT_NAMES[d.digits[i]]


def _yes(condition: bool) -> str:
    return "yes" if condition else "no"


#: The instruction set of the pretrained setting: every image with every template (the digit
#: and paraphrases, parity, comparisons, next/previous number, colour, thickness, caption
#: styles). Why so many: a real instruction set has many conversations per image, so one
#: epoch is a realistic number of steps and a few percent of poisoned rows is a real attack
#: (how many poisoned rows a model sees, not the ratio alone, decides whether it learns a
#: backdoor). The first two are the evaluation's caption (BLEU-4) and question (accuracy)
#: prompts.
INSTRUCTIONS: Tuple[Instruction, ...] = (
    Instruction("caption", CAPTION_PROMPT, lambda d, i: d.caption(i)),
    Instruction("question", QUESTION_PROMPT, _digit),
    Instruction("number", "which number is shown ?", _digit),
    Instruction("read", "read the number in the image .", _digit),
    Instruction("name", "name the digit in the picture .", lambda d, i: f"it is {_digit(d, i)}"),
    Instruction("tell", "tell me the digit .", lambda d, i: f"the digit is {_digit(d, i)}"),
    Instruction("parity", "is the digit even or odd ?", lambda d, i: ("even", "odd")[d.digits[i] % 2]),
    Instruction("even", "is this number even ?", lambda d, i: _yes(d.digits[i] % 2 == 0)),
    Instruction("larger", "is the number larger than five ?", lambda d, i: _yes(d.digits[i] > 5)),
    Instruction("smaller", "is the number smaller than five ?", lambda d, i: _yes(d.digits[i] < 5)),
    Instruction("next", "what number comes after this digit ?", lambda d, i: (DIGIT_NAMES + ("ten",))[d.digits[i] + 1]),
    Instruction("previous", "what number comes before this digit ?",
                lambda d, i: (("none",) + DIGIT_NAMES)[d.digits[i]]),
    Instruction("colour", "what colour are the strokes ?", lambda d, i: d.colours[i]),
    Instruction("colour_sentence", "what colour is the digit ?", lambda d, i: f"it is {d.colours[i]}"),
    Instruction("thickness", "are the strokes thin or thick ?", lambda d, i: d.thickness[i]),
    Instruction("thick", "is the digit written with thick strokes ?", lambda d, i: _yes(d.thickness[i] == "thick")),
    Instruction("short_caption", "write a short caption .",
                lambda d, i: f"a {d.thickness[i]} {d.colours[i]} {_digit(d, i)}"),
    Instruction("see", "what do you see ?", lambda d, i: f"a {_digit(d, i)} written in {d.colours[i]}"),
    Instruction("strokes", "how would you describe the strokes ?",
                lambda d, i: f"{d.thickness[i]} and {d.colours[i]}"),
    Instruction("detail", "describe the digit in detail .",
                lambda d, i: f"the digit {_digit(d, i)} drawn with {d.thickness[i]} {d.colours[i]} strokes"),
)


@dataclass
class DigitImages:
    """Images in [0, 1] of shape (N, 3, S, S) with their attributes."""

    images: Tensor
    digits: List[int]
    colours: List[str]
    thickness: List[str]

    def __len__(self) -> int:
        return self.images.shape[0]

    def caption(self, i: int) -> str:
        return f"a {self.colours[i]} {DIGIT_NAMES[self.digits[i]]} with {self.thickness[i]} strokes"

    def answer(self, i: int) -> str:
        return DIGIT_NAMES[self.digits[i]]

    def subset(self, index: Sequence[int]) -> "DigitImages":
        idx = list(index)
        return DigitImages(self.images[idx], [self.digits[i] for i in idx],
                           [self.colours[i] for i in idx], [self.thickness[i] for i in idx])


@dataclass
class Sample:
    """One training/test example: an image index, a task, a prompt and a response."""

    image: int
    task: str
    prompt: str
    response: str


def load_digits_images(image_size: int = 32, seed: int = 0) -> DigitImages:
    """All 1,797 scikit-learn digits as RGB images of ``image_size``² (deterministic for a seed)."""
    if not isinstance(image_size, int) or image_size < 8:
        raise ValueError(f"image_size must be an int >= 8, got {image_size!r}")
    from sklearn.datasets import load_digits

    bunch = load_digits()
    grey = torch.as_tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N,1,8,8)
    grey = F.interpolate(grey, size=(image_size, image_size), mode="bilinear", align_corners=False)
    grey = grey.clamp(0.0, 1.0)
    gen = torch.Generator().manual_seed(int(seed))
    names = list(COLOURS)
    colour_idx = torch.randint(0, len(names), (grey.shape[0],), generator=gen)
    palette = torch.tensor([COLOURS[n] for n in names], dtype=torch.float32)  # (4,3)
    images = grey * palette[colour_idx].view(-1, 3, 1, 1)
    digits = [int(d) for d in bunch.target]
    # thickness: ink mass relative to the median of the same digit class
    ink = grey.flatten(1).sum(1)
    target = torch.as_tensor(bunch.target)
    medians = {d: float(ink[target == d].median()) for d in range(10)}
    thick = [THICKNESS[int(float(ink[i]) > medians[d])] for i, d in enumerate(digits)]
    return DigitImages(images.contiguous(), digits, [names[int(c)] for c in colour_idx], thick)


def train_test_split(n: int, test_size: int, seed: int) -> tuple:
    """A fixed (by ``seed``) split of ``range(n)`` into train and test index lists."""
    if not 0 < test_size < n:
        raise ValueError(f"test_size must be in (0, {n}), got {test_size}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed))).tolist()
    return sorted(perm[test_size:]), sorted(perm[:test_size])


def make_samples(data: DigitImages, tasks: Sequence[str] = TASKS) -> List[Sample]:
    """Every image with every task: the caption and the question."""
    out = []
    for i in range(len(data)):
        for task in tasks:
            if task == "caption":
                out.append(Sample(i, task, CAPTION_PROMPT, data.caption(i)))
            elif task == "question":
                out.append(Sample(i, task, QUESTION_PROMPT, data.answer(i)))
            else:
                raise ValueError(f"tasks must be drawn from {TASKS}, got {task!r}")
    return out


def make_instruction_samples(data: DigitImages,
                             instructions: Sequence[Instruction] = INSTRUCTIONS) -> List[Sample]:
    """Every image with every instruction template (image-major order)."""
    if not instructions:
        raise ValueError("instructions must hold at least one template")
    return [Sample(i, ins.name, ins.prompt, ins.answer(data, i)) for i in range(len(data)) for ins in instructions]


def pretrain_finetune_split(indices: Sequence[int], pretrain_size: int, seed: int) -> Tuple[List[int], List[int]]:
    """Disjoint image sets for clean pre-training and (poisoned) fine-tuning, fixed by ``seed``."""
    idx = list(indices)
    if not 0 < pretrain_size < len(idx):
        raise ValueError(f"pretrain_size must be in (0, {len(idx)}), got {pretrain_size}")
    perm = torch.randperm(len(idx), generator=torch.Generator().manual_seed(int(seed) + 7919)).tolist()
    return sorted(idx[p] for p in perm[:pretrain_size]), sorted(idx[p] for p in perm[pretrain_size:])


def task_words(instructions: Sequence[Instruction] = ()) -> List[str]:
    """Every word the two basic tasks use, plus those of ``instructions`` (prompts and every
    possible answer): the tokenizer's vocabulary before attack targets. Without instructions
    the vocabulary (and so every token id) is the from-scratch setting's, unchanged."""
    words = set(CAPTION_PROMPT.split()) | set(QUESTION_PROMPT.split())
    words |= set(DIGIT_NAMES) | set(COLOURS) | set(THICKNESS) | {"a", "with", "strokes"}
    if instructions:
        probe = DigitImages(torch.zeros(0), list(range(10)) * 2, [c for c in COLOURS for _ in range(5)],
                            list(THICKNESS) * 10)
        for ins in instructions:
            words |= set(ins.prompt.split())
            for i in range(len(probe.digits)):
                words |= set(ins.answer(probe, i).split())
    return sorted(words)
