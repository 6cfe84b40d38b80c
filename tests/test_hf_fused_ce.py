"""use_fused_cross_entropy(model): a tiny LLaVA and Qwen2-VL (built from configs) compute the
same training loss and gradients as the model's own forward, without building logits."""
from __future__ import annotations

import pytest
import torch

from pcr_fast.hf import remove_fused_cross_entropy, use_fused_cross_entropy
from pcr_fast.testing.tiny import build_tiny_model

FAMILIES = ["llava", "qwen2_vl"]


def _assert_grads_close(grads, ref_grads):
    """Relative to the largest gradient of the model (some gradients are 0 in exact
    arithmetic, e.g. attention key biases, and only rounding noise in both)."""
    assert set(grads) == set(ref_grads)
    scale = max(float(g.abs().max()) for g in ref_grads.values())
    for name, g in grads.items():
        torch.testing.assert_close(g / scale, ref_grads[name] / scale, rtol=1e-4, atol=1e-6, msg=name)


def _own_loss_and_grads(model, batch, **extra):
    model.zero_grad(set_to_none=True)
    out = model(**batch, **extra)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_patched_model_matches_its_own_loss_and_gradients(family, backend):
    model, make_batch = build_tiny_model(family, seed=0)
    batch = make_batch(2, generator=torch.Generator().manual_seed(1))
    assert (batch["labels"] == -100).any() and (batch["labels"] != -100).any()
    ref, ref_grads = _own_loss_and_grads(model, batch)
    assert ref.logits.shape[-1] == model.get_output_embeddings().weight.shape[0]
    use_fused_cross_entropy(model, backend=backend)
    out, grads = _own_loss_and_grads(model, batch)
    assert out.logits is None   # never built
    torch.testing.assert_close(out.loss, ref.loss, rtol=2e-5, atol=1e-6)
    _assert_grads_close(grads, ref_grads)
    remove_fused_cross_entropy(model)
    again, _ = _own_loss_and_grads(model, batch)
    assert again.logits is not None


@pytest.mark.parametrize("family", FAMILIES)
def test_num_items_in_batch_and_evaluation(family):
    model, make_batch = build_tiny_model(family, seed=0)
    batch = make_batch(3, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        own_eval = model(**batch)
    ref, ref_grads = _own_loss_and_grads(model, batch, num_items_in_batch=40)
    use_fused_cross_entropy(model, backend="torch")
    use_fused_cross_entropy(model, backend="torch")   # idempotent
    out, grads = _own_loss_and_grads(model, batch, num_items_in_batch=40)
    torch.testing.assert_close(out.loss, ref.loss, rtol=2e-5, atol=1e-6)
    _assert_grads_close(grads, ref_grads)
    with torch.no_grad():   # evaluation keeps the model's own forward (logits for metrics)
        ev = model(**batch)
    assert ev.logits is not None
    torch.testing.assert_close(ev.loss, own_eval.loss)


def test_bad_options_and_models_are_refused():
    model, _ = build_tiny_model("llava", seed=0)
    with pytest.raises(ValueError, match="label_smoothing"):
        use_fused_cross_entropy(model, label_smoothing=2.0)
    with pytest.raises(ValueError, match="output embeddings"):
        use_fused_cross_entropy(model.model)   # the bare backbone has no lm_head
