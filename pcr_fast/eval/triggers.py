"""Backdoor triggers: deterministic functions on a batch of [0, 1] images (B, C, H, W).

Each trigger is a small callable object (its parameters are attributes, so a run records
them); any user callable ``trigger(images) -> images`` of the same contract works
wherever a trigger name is accepted. Fixed patterns are drawn from their own seeded
generator at the image size they meet, so the same trigger gives the same output for the
same input, run after run.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, Union

import torch
import torch.nn.functional as F
from torch import Tensor

TriggerFn = Callable[[Tensor], Tensor]


def _check_images(images: Tensor) -> None:
    if not isinstance(images, Tensor) or images.dim() != 4 or not images.is_floating_point():
        raise ValueError("images must be a float tensor of shape (B, C, H, W) with values in [0, 1], got "
                         f"{tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__}")


def _pattern(seed: int, shape, device, dtype) -> Tensor:
    g = torch.Generator().manual_seed(int(seed))
    return torch.rand(shape, generator=g).to(device=device, dtype=dtype)


@dataclass
class BadNets:
    """A square patch stamped into a corner (BadNets). ``pattern``: ``checkerboard`` or ``solid``.

    ``size`` is in pixels (``None``: a quarter of the image side, at least 3: 8 px on the
    harness's 32-px digits, straddling four visual tokens). Calibrated on the pretrained
    setting (EVAL_NOTES §9.1): at 3/16 of the side (6 px, the from-scratch notes' size) plain
    SFT does not learn the trigger at 3 % poison in one epoch.
    """

    size: int = None
    pattern: str = "checkerboard"
    corner: str = "bottom_right"
    margin: int = 1
    value: float = 1.0

    def __post_init__(self):
        if self.pattern not in ("checkerboard", "solid"):
            raise ValueError(f"pattern must be 'checkerboard' or 'solid', got {self.pattern!r}")
        if self.corner not in ("bottom_right", "bottom_left", "top_right", "top_left"):
            raise ValueError(f"corner must be one of bottom_right/bottom_left/top_right/top_left, got {self.corner!r}")

    def box(self, h: int, w: int):
        """(top, left, size) of the patch on an h×w image."""
        s = self.size if self.size is not None else max(3, round(min(h, w) / 4))
        if s + self.margin > min(h, w):
            raise ValueError(f"size={s} does not fit a {h}x{w} image")
        top = h - s - self.margin if self.corner.startswith("bottom") else self.margin
        left = w - s - self.margin if self.corner.endswith("right") else self.margin
        return top, left, s

    def __call__(self, images: Tensor) -> Tensor:
        _check_images(images)
        _, _, h, w = images.shape
        top, left, s = self.box(h, w)
        out = images.clone()
        if self.pattern == "solid":
            patch = torch.full((s, s), self.value, dtype=images.dtype, device=images.device)
        else:
            ii = torch.arange(s, device=images.device)
            patch = ((ii[:, None] + ii[None, :]) % 2 == 0).to(images.dtype) * self.value
        out[:, :, top:top + s, left:left + s] = patch
        return out


@dataclass
class Blended:
    """Blend a fixed random pattern into the whole image: ``(1 − α)·x + α·pattern``."""

    alpha: float = 0.2
    seed: int = 1234

    def __post_init__(self):
        if not 0.0 < self.alpha < 1.0:
            raise ValueError(f"alpha must be in (0, 1), got {self.alpha!r}")

    def pattern(self, c: int, h: int, w: int, device=None, dtype=torch.float32) -> Tensor:
        return _pattern(self.seed, (c, h, w), device, dtype)

    def __call__(self, images: Tensor) -> Tensor:
        _check_images(images)
        _, c, h, w = images.shape
        return (1 - self.alpha) * images + self.alpha * self.pattern(c, h, w, images.device, images.dtype)


@dataclass
class SIG:
    """Add a horizontal sinusoidal signal: ``x + δ·sin(2π·f·j / W)`` (clamped to [0, 1])."""

    delta: float = 0.15
    frequency: float = 6.0

    def signal(self, w: int, device=None, dtype=torch.float32) -> Tensor:
        j = torch.arange(w, device=device, dtype=dtype)
        return self.delta * torch.sin(2 * math.pi * self.frequency * j / w)

    def __call__(self, images: Tensor) -> Tensor:
        _check_images(images)
        return (images + self.signal(images.shape[-1], images.device, images.dtype)).clamp(0.0, 1.0)


@dataclass
class WaNet:
    """WaNet-style warp: a fixed smooth random displacement field (k×k control grid,
    bicubic-upsampled), ``strength`` = largest displacement in pixels.

    The defaults (10 px on an 8×8 control grid) are stronger than WaNet's CIFAR setting: the
    digits are smooth strokes on a black background, where a 1-3 px warp is not learned
    as a trigger in a few hundred steps (measured from scratch: ASR 0.5-0.6 at 3 px, 4×4
    grid), and a pretrained model fine-tuned for one epoch at 3 % poison does not learn
    the 5 px warp of the from-scratch notes (EVAL_NOTES §9.1).
    """

    strength: float = 10.0
    grid_size: int = 8
    seed: int = 4321

    def flow(self, h: int, w: int, device=None, dtype=torch.float32) -> Tensor:
        """Displacement field (1, H, W, 2) in normalised [-1, 1] coordinates."""
        g = torch.Generator().manual_seed(int(self.seed))
        ctrl = torch.rand(1, 2, self.grid_size, self.grid_size, generator=g) * 2 - 1
        ctrl = ctrl / ctrl.abs().mean()
        field = F.interpolate(ctrl, size=(h, w), mode="bicubic", align_corners=True)
        field = field / field.abs().amax()  # largest displacement = strength pixels
        scale = torch.tensor([2.0 / w, 2.0 / h]).view(1, 2, 1, 1) * self.strength
        return (field * scale).permute(0, 2, 3, 1).to(device=device, dtype=dtype)

    def __call__(self, images: Tensor) -> Tensor:
        _check_images(images)
        b, _, h, w = images.shape
        ys = torch.linspace(-1, 1, h, device=images.device, dtype=images.dtype)
        xs = torch.linspace(-1, 1, w, device=images.device, dtype=images.dtype)
        gy, gx = torch.meshgrid(ys, xs, indexing="ij")
        grid = torch.stack((gx, gy), dim=-1).unsqueeze(0) + self.flow(h, w, images.device, images.dtype)
        grid = grid.clamp(-1, 1).expand(b, h, w, 2)
        return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=True)


@dataclass
class SampleNoise:
    """Sample-specific, low-amplitude additive noise (ISSBA-like, without an encoder).

    The perturbation is a fixed ±1 code modulated by each image's own content
    (``+ε`` on dark pixels, ``−ε`` on bright ones): every image gets a different residual
    of amplitude ``epsilon``, all sharing the code the model can learn.
    """

    epsilon: float = 0.08
    seed: int = 2718

    def code(self, c: int, h: int, w: int, device=None, dtype=torch.float32) -> Tensor:
        return torch.sign(_pattern(self.seed, (c, h, w), device, dtype) - 0.5)

    def __call__(self, images: Tensor) -> Tensor:
        _check_images(images)
        _, c, h, w = images.shape
        residual = self.epsilon * self.code(c, h, w, images.device, images.dtype) * (1 - 2 * images)
        return (images + residual).clamp(0.0, 1.0)


TRIGGERS: Dict[str, Callable[[], TriggerFn]] = {
    "badnets": lambda: BadNets(pattern="checkerboard"),
    "badnets_solid": lambda: BadNets(pattern="solid"),
    "blended": Blended,
    "sig": SIG,
    "wanet": WaNet,
    "noise": SampleNoise,
}
ATTACKS = tuple(TRIGGERS)


def get_trigger(attack: Union[str, TriggerFn]) -> TriggerFn:
    """A trigger by name (one of :data:`ATTACKS`) or the user's callable itself."""
    if callable(attack):
        return attack
    if attack not in TRIGGERS:
        raise ValueError(f"attack must be one of {ATTACKS} or a callable trigger(images) -> images, got {attack!r}")
    return TRIGGERS[attack]()


def attack_name(attack: Union[str, TriggerFn]) -> str:
    """A printable name for a trigger (the registry name, or the callable's name)."""
    if isinstance(attack, str):
        return attack
    return getattr(attack, "__name__", type(attack).__name__)


def apply_trigger(trigger: TriggerFn, images: Tensor) -> Tensor:
    """``trigger`` applied to a copy of ``images`` (B, C, H, W) in [0, 1], checked and clamped."""
    out = trigger(images.clone())
    if not isinstance(out, Tensor) or out.shape != images.shape:
        raise ValueError(f"the trigger must return a tensor of the input's shape {tuple(images.shape)}, got "
                         f"{tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__}")
    return out.clamp(0.0, 1.0).to(images.dtype)
