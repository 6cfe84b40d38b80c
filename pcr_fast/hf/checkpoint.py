"""The defense's state in every Trainer checkpoint, and back on resume.

``PCRTrainer`` adds :class:`DefenseCheckpointCallback`: each ``checkpoint-N`` folder gets a
``pcr_defense.pt`` with the memory of flags and target tokens (``BackdoorMemory.state_dict()``)
and the settings; ``trainer.train(resume_from_checkpoint=...)`` reads it back
(:func:`load_defense_state`), so a resumed run continues with what its scans found and does
not scan again what it already scanned (scans are tied to steps, and a resumed run starts
after the checkpoint's step).
"""
from __future__ import annotations

import logging
import os
from typing import Any, Dict, Optional

import torch

from ..config import PCRConfig
from ..defense import BackdoorMemory

logger = logging.getLogger(__name__)

DEFENSE_FILE = "pcr_defense.pt"
STATE_FORMAT = 1


def defense_state(memory: Optional[BackdoorMemory], config: PCRConfig) -> Dict[str, Any]:
    """What a checkpoint keeps of the defense (CPU tensors; ``memory`` None before the first scan)."""
    state: Dict[str, Any] = {"format": STATE_FORMAT, "config": config.to_dict(), "memory": None}
    if memory is not None:
        state["memory"] = {k: (v.detach().cpu() if isinstance(v, torch.Tensor) else v)
                           for k, v in memory.state_dict().items()}
        state["num_samples"] = int(memory.flags.numel())
        state["vocab_size"] = int(memory.targets.numel())
    return state


def save_defense_state(memory: Optional[BackdoorMemory], config: PCRConfig, folder: str) -> str:
    """Write :func:`defense_state` to ``folder/pcr_defense.pt`` (atomically); returns the path."""
    path = os.path.join(folder, DEFENSE_FILE)
    tmp = path + ".tmp"
    torch.save(defense_state(memory, config), tmp)
    os.replace(tmp, path)
    return path


def restore_memory(state: Dict[str, Any], config: PCRConfig, num_samples: int,
                   device: Any = None) -> Optional[BackdoorMemory]:
    """The memory a :func:`defense_state` holds, checked against this run's training set
    (``None`` when the checkpoint was taken before the first scan)."""
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise ValueError(f"not a pcr_fast defense state (format {state.get('format') if isinstance(state, dict) else '?'})")
    if state["memory"] is None:
        return None
    if state["num_samples"] != num_samples:
        raise ValueError(f"the checkpoint's defense state covers {state['num_samples']} training samples, this "
                         f"training set has {num_samples}: resume with the same data file and rows")
    memory = BackdoorMemory.from_config(config.unlearn, state["num_samples"], state["vocab_size"], device=device)
    memory.load_state_dict(state["memory"])
    return memory


def load_defense_state(folder: str) -> Optional[Dict[str, Any]]:
    """The state saved in a checkpoint folder (``None`` if it has none)."""
    path = os.path.join(folder, DEFENSE_FILE)
    if not os.path.isfile(path):
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


def resolve_checkpoint(resume_from_checkpoint: Any, output_dir: str) -> Optional[str]:
    """The folder ``Trainer.train(resume_from_checkpoint=...)`` resumes from (``True``: the last
    checkpoint in ``output_dir``)."""
    if not resume_from_checkpoint:
        return None
    if isinstance(resume_from_checkpoint, bool):
        from transformers.trainer_utils import get_last_checkpoint

        return get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None
    return os.fspath(resume_from_checkpoint)


def _callback_base():
    from transformers import TrainerCallback

    return TrainerCallback


class DefenseCheckpointCallback(_callback_base()):
    """Saves the trainer's defense state into each checkpoint folder the Trainer writes."""

    def __init__(self, trainer: Any):
        self.trainer = trainer

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return control
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if os.path.isdir(folder):
            save_defense_state(self.trainer.pcr_memory, self.trainer.pcr_config, folder)
        else:
            logger.warning("checkpoint folder %s not found: the defense state was not saved with it", folder)
        return control
