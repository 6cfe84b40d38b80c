"""The PCR configuration the demo uses (the library default), chosen by the experiments in
benchmarks/EVAL_NOTES.md.

Scan-and-unlearn (``mode="scan"``, :mod:`pcr_fast.defense`), the mode of the from-scratch
setting (``pcr-fast demo --init scratch``); the default, ``mode="inline"``, is documented in
:class:`pcr_fast.defense.InlineMemory` and EVAL_NOTES §9. Scan mode's settings:

- Plain SFT until the first scan; scans of the whole training set at 40, 50, 60 and 70 %
  of the steps (the backdoor must be learned before it can be seen; a trigger learned
  late, such as WaNet's warp, is caught by a later scan).
- The scan's view: half of the image masked in units of half a visual token (4 px for the
  demo's 8-px patches), mean fill, no shuffle, 3 draws. Shuffling moves position-bound
  triggers (a BadNets corner patch); whole-token units leave too much of the digit visible.
- A response is flagged when the model predicts it surely (every token's CE < 0.3 nats),
  a masked draw still predicts it (CE < 3 nats) and the two views agree (symmetric KL <
  0.1 nats on every token). Flagged samples leave the CE; a token whose training samples
  are ≥ 60 % flagged is the target and gets unlikelihood (λ = 1).
- The per-batch objectives (``mode="online"``: the literal pull-apart, or the cross-view
  gate ``ObjectiveConfig.cross_view_gate()``) remain available; the gate is what the first
  tables of the notes measured (with ``detach_b=True`` and ``warmup=0.4`` from scratch).
"""
from __future__ import annotations

from ..config import PCRConfig

#: the library's defaults (``PCRConfig()``), named for the demo
DEMO_PCR_CONFIG = PCRConfig()
