"""Cutting a few samples out of a model batch (the rows the inline test looks at).

Why: the inline defense runs its masked views on the handful of rows it tests, not on the
whole batch, so its cost stays a small fraction of a training step. Every tensor whose
leading dimension is the batch is indexed by the rows; flattened-patch layouts (Qwen2-VL,
Qwen2.5-VL: ``pixel_values`` as (Σ t·h·w, C·T·P·P) rows with ``image_grid_thw``, one image
per sample) gather each chosen image's patch rows. Anything else cannot be cut: the caller
then tests the whole batch.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

import torch
from torch import Tensor

from . import adapters

GRID_KEY = "image_grid_thw"


def select_rows(model_inputs: Mapping[str, Any], rows: Tensor) -> Optional[Dict[str, Any]]:
    """The batch restricted to ``rows`` (a 1-D index tensor on the batch's device), or
    ``None`` when some input cannot be cut per sample.

    The flattened-patch layout needs the chosen images' row offsets on the host (one
    device→host copy of ``image_grid_thw``); every other layout stays on the device.
    """
    input_ids = model_inputs.get("input_ids")
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2:
        return None
    batch = input_ids.shape[0]
    rows = rows.to(input_ids.device)
    grid = model_inputs.get(GRID_KEY)
    out: Dict[str, Any] = {}
    for key, value in model_inputs.items():
        if key in adapters.SHARED_KEYS or not isinstance(value, Tensor):
            out[key] = value
        elif key == adapters.PIXEL_KEY and isinstance(grid, Tensor) and value.dim() == 2:
            if grid.dim() != 2 or grid.shape[0] != batch:
                return None   # not one image per sample
            sizes = grid.prod(dim=1)
            starts = torch.cumsum(sizes, 0) - sizes
            spans = [torch.arange(int(s), int(s) + int(n), device=value.device)
                     for s, n in zip(starts[rows].tolist(), sizes[rows].tolist())]
            out[key] = value.index_select(0, torch.cat(spans)) if spans else value[:0]
        elif key == "position_ids" and value.dim() == 3 and value.shape[1] == batch:   # M-RoPE (3, B, T)
            out[key] = value.index_select(1, rows)
        elif value.dim() >= 1 and value.shape[0] == batch:
            out[key] = value.index_select(0, rows.to(value.device))
        else:
            return None
    return out
