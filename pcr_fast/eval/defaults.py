"""The PCR configuration the demo uses, chosen by the experiments in benchmarks/EVAL_NOTES.md.

Scan-and-unlearn (``mode="scan"``, :mod:`pcr_fast.scan`), the library's default:

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
- The earlier per-batch gate (``mode="online"``) remains available; it is what the first
  table of the notes measured.
"""
from __future__ import annotations

from pcr_fast.config import PCRConfig

DEMO_PCR_CONFIG = PCRConfig(
    mode="scan", patch_size=4, shuffle=False, mask_ratio=0.5, fill="mean",
    gate_threshold=0.1, gate_confidence=3.0, gate_views=3,
    scan_at=(0.4, 0.5, 0.6, 0.7), scan_original_confidence=0.3,
    target_share=0.6, min_support=8, unlearn_weight=1.0,
    divergence_weight=0.0, entropy_weight=0.0,
    gate_weight=19.0, gate_max_fraction=0.15, detach_augmented=True,
)

# mode="online" only: fraction of the steps trained with plain CE before the per-batch
# objective switches on (see run_experiment). Scan mode trains plain SFT until its first scan.
DEMO_PCR_WARMUP = 0.4
