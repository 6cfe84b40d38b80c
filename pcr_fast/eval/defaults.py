"""The PCR configuration the demo uses, chosen by the experiments in benchmarks/EVAL_NOTES.md.

- Augmentation: mask half of the image in units of half a visual token (4 px for the demo's
  8-px patches), no shuffling. Shuffling moves position-bound triggers (a BadNets corner
  patch) so the trigger stops firing in the augmented view; whole-token units leave
  too much of the digit visible (clean responses then look invariant too).
- Objective: CE + the cross-view gate (a response whose output distribution does not depend
  on the image content, yet is fully predicted from the augmented view, gets unlikelihood
  on its decisive token). No pull-apart term: it hurts clean tokens and is satisfiable by a
  shortcut (measured).
- The gate looks at 3 augmented draws (flagged if invariant under any: a trigger one random
  mask breaks survives another) and flags at most 15 % of a batch's responses (poisoned
  responses are a minority; the cap stops runaway flagging of clean ones). Measured in
  benchmarks/EVAL_NOTES.md §6.
- The augmented view is only a detector: forward only, no gradient (``detach_augmented``).
"""
from __future__ import annotations

from pcr_fast.config import PCRConfig

DEMO_PCR_CONFIG = PCRConfig(
    patch_size=4, shuffle=False, mask_ratio=0.5, fill="mean",
    divergence_weight=0.0, entropy_weight=0.0,
    gate_weight=19.0, gate_threshold=0.1, gate_confidence=3.0,
    gate_views=3, gate_max_fraction=0.15,
    detach_augmented=True,
)

# Fraction of the steps trained with plain CE before PCR switches on (see run_experiment).
DEMO_PCR_WARMUP = 0.4
