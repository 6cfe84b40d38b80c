"""The defense: PCR's cross-view invariance used as a backdoor detector.

Two ways to run the same test (DESIGN §4): :class:`InlineMemory` (mode "inline", the
default) tests a few rows inside each training step, at about 1.03× the cost of plain SFT,
for a pretrained model fine-tuned on untrusted data (EVAL_NOTES §9); scan-and-unlearn
(below; mode "scan") scans the whole training set a few times, for training from scratch.

Why scan-and-unlearn (evidence in benchmarks/EVAL_NOTES.md §8): a backdoor response is *invariant* to
destroying the image content — mask half of the image in small units and the trigger
still fires — while the model is abnormally sure of it. Judged one batch at a time during
training, that test can be dodged (the model learns a trigger feature one random mask
breaks) and it hits clean answers that a half image still supports. So the defense looks
at the whole training set at a few points of training instead:

1. **Scan** (:func:`cross_view_flags`): for every training response, the original view
   and ``K`` masked views through the fused two-view statistics; a response is *flagged*
   if, in some draw, the model predicts it confidently from the original view
   (max-token CE < ``original_confidence``), the masked view still predicts it
   (max-token CE < ``view_confidence``) and the two output distributions agree on every
   response token (max symmetric KL < ``invariance_threshold``).
2. **Remember** (:class:`BackdoorMemory`): flagged samples stay flagged. Per vocabulary
   token, the share of the training samples containing it that are flagged: a token most
   of whose occurrences are flagged (``target_share``) is the attacker's target. A clean
   answer the test wrongly flags (a digit recognisable from half the image) stays a
   minority of its token's occurrences.
3. **Unlearn** (:func:`unlearning_loss`): flagged samples and every sample whose response
   contains a target token are dropped from the cross-entropy, and the target tokens get
   unlikelihood ``−log(1 − p)``. Dropping a clean false positive costs one sample; only
   target tokens are pushed down.

Everything here works on hidden states + the lm_head weight (no N×V logits); the HF
integration (:mod:`pcr_fast.hf.scan`) runs the model forwards. :class:`ScanSchedule` says
when each part acts in a run.
"""
from .detector import CrossViewScores, cross_view_flags, cross_view_scores
from .inline import InlineMemory
from .memory import BackdoorMemory
from .schedule import ScanSchedule
from .unlearning import UnlearningLossOutput, unlearning_loss

__all__ = ["BackdoorMemory", "CrossViewScores", "InlineMemory", "ScanSchedule", "UnlearningLossOutput",
           "cross_view_flags", "cross_view_scores", "unlearning_loss"]
