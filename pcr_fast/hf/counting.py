"""Counting the work a training run does: samples forward and samples back-propagated.

Why count instead of estimate: a defense's cost is the passes it really runs (extra views,
scans, no-grad tests), and only hooks on the model see every one of them, whoever calls
the model (the Trainer, ``compute_pcr_loss``, a scan, a research loop).

    with count_compute(model) as counter:
        ...train...
    counter.as_dict()   # {"forward_samples": ..., "backward_samples": ...}

- forward: a forward hook on the (unwrapped) model adds the batch's rows (``input_ids``
  or ``inputs_embeds``) for every call, with or without grad.
- backward: a forward pre-hook on the lm_head registers, when its input (the last hidden
  states) requires grad, a tensor hook that adds those rows when a gradient really flows
  back through them; a no-grad or never-back-propagated forward adds nothing.

The cost of a run in forward-sample units is ``forward + 2 × backward`` (a backward pass
costs about two forwards). Counters are Python ints taken from shapes: no host sync.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Dict, Iterator, Mapping, Tuple

from torch import Tensor, nn

from . import adapters

__all__ = ["ComputeCounter", "count_compute", "compute_cost"]


def compute_cost(compute: Mapping[str, int]) -> int:
    """``forward_samples + 2 × backward_samples`` of a ``compute`` record."""
    return int(compute["forward_samples"]) + 2 * int(compute["backward_samples"])


@dataclass
class ComputeCounter:
    """Running totals of samples passed forward and backward through a model."""

    forward_samples: int = 0
    backward_samples: int = 0

    def as_dict(self) -> Dict[str, int]:
        return {"forward_samples": self.forward_samples, "backward_samples": self.backward_samples}

    @property
    def cost(self) -> int:
        """Forward + 2 × backward samples."""
        return compute_cost(self.as_dict())

    # ---- hooks -----------------------------------------------------------------------------
    def _on_forward(self, module: nn.Module, args: Tuple, kwargs: Dict[str, Any], output: Any) -> None:
        rows = _rows(args, kwargs)
        if rows:
            self.forward_samples += rows

    def _on_head(self, module: nn.Module, args: Tuple, kwargs: Dict[str, Any]) -> None:
        hidden = args[0] if args else kwargs.get("input")
        if isinstance(hidden, Tensor) and hidden.requires_grad and hidden.dim() >= 2:
            rows = int(hidden.shape[0])

            def count(grad: Tensor) -> None:
                self.backward_samples += rows

            hidden.register_hook(count)


def _rows(args: Tuple, kwargs: Mapping[str, Any]) -> int:
    for key in ("input_ids", "inputs_embeds"):
        value = kwargs.get(key)
        if isinstance(value, Tensor) and value.dim() >= 2:
            return int(value.shape[0])
    if args and isinstance(args[0], Tensor) and args[0].dim() >= 2:
        return int(args[0].shape[0])
    return 0


@contextmanager
def count_compute(model: nn.Module, counter: ComputeCounter = None) -> Iterator[ComputeCounter]:
    """Count every forward and backward of ``model`` (any wrapper: DDP, FSDP2, peft …) while
    the block runs; yields the :class:`ComputeCounter` (pass one to keep adding to it)."""
    counter = counter if counter is not None else ComputeCounter()
    inner = adapters.unwrap_model(model)
    head = adapters.find_lm_head(inner)
    handles = [inner.register_forward_hook(counter._on_forward, with_kwargs=True),
               head.register_forward_pre_hook(counter._on_head, with_kwargs=True, prepend=True)]
    try:
        yield counter
    finally:
        for h in handles:
            h.remove()
