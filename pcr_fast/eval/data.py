"""Real images that ship with scikit-learn (the 1,797 handwritten digits), as two
vision-language tasks: a templated caption and a short-answer question.

Why digits: they install with scikit-learn (no download), they are real handwriting, and a
model trained from scratch on them reaches a clean accuracy high enough that a drop caused
by a defense is measurable.

Each 8×8 grey digit is upsampled to ``image_size``² and coloured: the strokes take one of
four colours (a property of the image, so it can appear in the caption), the background
stays black. Attributes the captions describe are computed from the image itself.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence

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


def task_words() -> List[str]:
    """Every word the tasks use (the tokenizer's vocabulary, before attack targets)."""
    words = set(CAPTION_PROMPT.split()) | set(QUESTION_PROMPT.split())
    words |= set(DIGIT_NAMES) | set(COLOURS) | set(THICKNESS) | {"a", "with", "strokes"}
    return sorted(words)
