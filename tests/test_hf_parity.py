"""compute_pcr_loss on every HF family == a naive two-forward float64 implementation.

The reference is independent of pcr_fast.hf: it runs the backbone (``model.model``) once
per view, materialises the full logits in float64 (checked against the model's own
logits), and composes the same objective with ``log_softmax``.
"""
import importlib.util

import pytest
import torch

from pcr_fast import PCRConfig, TwoViewLoss
from pcr_fast.hf import compute_pcr_loss
from pcr_fast.testing import TINY_FAMILIES as FAMILIES, build_tiny_model

HAS_AUGMENT = importlib.util.find_spec("pcr_fast.augment") is not None
LOSS_OPTIONS = dict(divergence="kl", divergence_weight=0.7, margin=3.0, entropy_weight=0.1,
                    entropy_view="a", backend="torch")


def stand_in_augment(pixel_values, image_grid_thw=None, generator=None):
    """Deterministic stand-in for PatchAugment: reverse the last axis, rescale, shift."""
    return -0.8 * pixel_values.flip(-1) + 0.05


def naive_objective(model, batch, pixels_b, *, ce_weight=1.0, divergence_weight=0.7, margin=3.0,
                    entropy_weight=0.1, divergence="kl", softcap=None, detach_b=False,
                    num_items_in_batch=None):
    """Two forwards, full float64 logits, the TwoViewLoss objective written out."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = lm.get_output_embeddings()
    weight = head.weight.double()

    def logits(inputs, anchor):
        inputs = {k: v for k, v in inputs.items() if k != "labels"}
        hidden = lm.model(**inputs, use_cache=False).last_hidden_state
        z = hidden.double() @ weight.T
        if head.bias is not None:
            z = z + head.bias.double()
        if softcap is not None:
            z = softcap * torch.tanh(z / softcap)
        if anchor:  # the reference really is the model's own output distribution
            with torch.no_grad():
                own = lm(**inputs, use_cache=False).logits.double()
            torch.testing.assert_close(z.detach(), own, atol=2e-4, rtol=2e-4)
        return z[:, :-1]

    z_a = logits(batch, anchor=True)
    view_b = {**batch, "pixel_values": pixels_b}
    if detach_b:
        with torch.no_grad():
            z_b = logits(view_b, anchor=False)
    else:
        z_b = logits(view_b, anchor=False)
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    logp, logq = torch.log_softmax(z_a, -1), torch.log_softmax(z_b, -1)
    ce = -logp.gather(-1, labels.clamp_min(0)[..., None])[..., 0]
    kl_ab = (logp.exp() * (logp - logq)).sum(-1)
    kl_ba = (logq.exp() * (logq - logp)).sum(-1)
    d = {"kl": kl_ab, "reverse_kl": kl_ba, "symmetric_kl": kl_ab + kl_ba}[divergence]
    entropy = -(logp.exp() * logp).sum(-1)
    per_token = ce_weight * ce + divergence_weight * torch.relu(margin - d) + entropy_weight * entropy
    denominator = mask.sum() if num_items_in_batch is None else num_items_in_batch
    return (per_token * mask).sum() / denominator, (ce * mask).sum() / mask.sum()


def probe_parameters(model):
    """A vision-tower, an LM-layer and the lm_head parameter (those that require grad)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    vision = [p for n, p in named if any(k in n for k in ("vision", "visual"))]
    text = [p for n, p in named if "layers" in n and not any(k in n for k in ("vision", "visual"))]
    picks = [vision[0], vision[-1], text[len(text) // 2], named[-1][1]]
    head = model.get_output_embeddings()
    if head is not None and head.weight.requires_grad:
        picks.append(head.weight)
    return picks


def assert_grads_close(loss, ref, params, rtol=2e-4):
    got = torch.autograd.grad(loss, params, allow_unused=True)
    want = torch.autograd.grad(ref, params, allow_unused=True)
    nonzero = 0
    for g, w in zip(got, want):
        assert (g is None) == (w is None)
        if g is None:
            continue
        scale = w.abs().max().clamp_min(1e-8)
        assert float((g - w.to(g.dtype)).abs().max() / scale) < rtol
        nonzero += int(bool(w.abs().max() > 0))
    assert nonzero >= 2, "the probed parameters got no gradient: the test would be vacuous"


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("detach", [False, True], ids=["both_views", "detach_b"])
def test_family_parity(family, detach):
    model, make_batch = build_tiny_model(family)
    batch = make_batch(3)
    pixels_b = stand_in_augment(batch["pixel_values"])
    if batch["pixel_values"].dim() >= 5:   # padding images/tiles stay all-zero (see keep_padding_images)
        pad = (batch["pixel_values"].flatten(-3) == 0).all(-1)[..., None, None, None]
        pixels_b = torch.where(pad, torch.zeros(()), pixels_b)
    out = compute_pcr_loss(model, batch, augment=stand_in_augment, loss_fn=TwoViewLoss(**LOSS_OPTIONS),
                           config=PCRConfig(mode="online").override(detach_b=detach))
    ref, ref_ce = naive_objective(model, batch, pixels_b, detach_b=detach)
    assert out.one_forward == (not detach)
    torch.testing.assert_close(out.loss.double(), ref, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(out.ce.double(), ref_ce, atol=2e-5, rtol=2e-5)
    assert_grads_close(out.loss, ref, probe_parameters(model))


def test_detach_changes_gradients_only_through_view_b():
    """detach_b must differ from the default (else the parity test above proves nothing)."""
    model, make_batch = build_tiny_model("qwen2_vl")
    batch = make_batch(2)
    params = probe_parameters(model)
    grads = []
    for detach in (False, True):
        out = compute_pcr_loss(model, batch, augment=stand_in_augment, loss_fn=TwoViewLoss(**LOSS_OPTIONS),
                               config=PCRConfig(mode="online").override(detach_b=detach))
        grads.append(torch.autograd.grad(out.loss, params))
    assert any(not torch.allclose(a, b) for a, b in zip(*grads))


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "idefics3", "mllama"])
def test_one_forward_equals_two_forwards(family):
    model, make_batch = build_tiny_model(family)
    batch = make_batch(2)
    loss_fn = TwoViewLoss(**LOSS_OPTIONS)
    one = compute_pcr_loss(model, batch, augment=stand_in_augment, loss_fn=loss_fn, one_forward=True)
    two = compute_pcr_loss(model, batch, augment=stand_in_augment, loss_fn=loss_fn, one_forward=False)
    assert one.one_forward and not two.one_forward
    torch.testing.assert_close(one.loss, two.loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(one.divergence, two.divergence, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_parity_and_only_adapters_train(family):
    peft = pytest.importorskip("peft")
    model, make_batch = build_tiny_model(family)
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
                             target_modules=r".*(language_model|text_model).*\.(q_proj|v_proj)")
    model = peft.get_peft_model(model, config)
    batch = make_batch(2)
    out = compute_pcr_loss(model, batch, augment=stand_in_augment, loss_fn=TwoViewLoss(**LOSS_OPTIONS))
    pixels_b = stand_in_augment(batch["pixel_values"])
    if batch["pixel_values"].dim() >= 5:
        pad = (batch["pixel_values"].flatten(-3) == 0).all(-1)[..., None, None, None]
        pixels_b = torch.where(pad, torch.zeros(()), pixels_b)
    ref, _ = naive_objective(model, batch, pixels_b)
    torch.testing.assert_close(out.loss.double(), ref, atol=2e-5, rtol=2e-5)
    out.loss.backward()
    trained = {n for n, p in model.named_parameters() if p.grad is not None}
    assert trained and all("lora_" in n for n in trained)
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)
    assert any(float(p.grad.abs().max()) > 0 for n, p in model.named_parameters() if "lora_B" in n)


@pytest.mark.parametrize("family", ["paligemma", "gemma3"])
def test_softcap_follows_what_the_model_does(family):
    """Whether a wrapper applies the text config's final_logit_softcapping depends on the family
    and the transformers version (PaliGemma does in 5.24, not in 5.17; Gemma 3's does not):
    the loss must follow the model's actual logits either way."""
    model, make_batch = build_tiny_model(family, text={"final_logit_softcapping": 2.0})
    batch = make_batch(2)
    with torch.no_grad():
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        z = model.model(**inputs).last_hidden_state @ model.get_output_embeddings().weight.T
        own = model(**inputs).logits
    applied = torch.allclose(own, 2.0 * torch.tanh(z / 2.0), atol=1e-5)
    assert applied or torch.allclose(own, z, atol=1e-5)
    config = PCRConfig().override(mode="online", divergence_weight=0.7, entropy_weight=0.1, gate_weight=0.0,
                                  backend="torch")
    out = compute_pcr_loss(model, batch, augment=stand_in_augment, config=config)
    ref, _ = naive_objective(model, batch, stand_in_augment(batch["pixel_values"]),
                             softcap=2.0 if applied else None)
    torch.testing.assert_close(out.loss.double(), ref, atol=2e-5, rtol=2e-5)
    wrong = TwoViewLoss(backend="torch", softcap=None if applied else 2.0)
    with pytest.raises(ValueError, match="softcap"):
        compute_pcr_loss(model, batch, augment=stand_in_augment, loss_fn=wrong)


def test_num_items_in_batch_and_shift_labels_and_precomputed_view():
    model, make_batch = build_tiny_model("llava_next")
    batch = make_batch(2)
    loss_fn = TwoViewLoss(**LOSS_OPTIONS)
    base = compute_pcr_loss(model, batch, augment=stand_in_augment, loss_fn=loss_fn)
    n = int((batch["labels"][:, 1:] != -100).sum())
    scaled = compute_pcr_loss(model, batch, augment=stand_in_augment, loss_fn=loss_fn,
                              num_items_in_batch=torch.tensor(3 * n))
    torch.testing.assert_close(scaled.loss * 3, base.loss)
    # collator-provided shift_labels (padding-free style) and a precomputed augmented view
    shifted = dict(batch)
    labels = shifted.pop("labels")
    shifted["shift_labels"] = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], 1)
    shifted["augmented_pixel_values"] = stand_in_augment(batch["pixel_values"])
    other = compute_pcr_loss(model, shifted, loss_fn=loss_fn)
    torch.testing.assert_close(other.loss, base.loss, atol=1e-6, rtol=1e-6)


def test_default_parts_come_from_the_config():
    """augment=None / loss_fn=None: built from PCRConfig (real PatchAugment when it exists)."""
    if not HAS_AUGMENT:
        pytest.skip("pcr_fast.augment not available yet")
    model, make_batch = build_tiny_model("llava")
    batch = make_batch(2)
    config = PCRConfig().override(mode="online", patch_size=4, backend="torch", augment_seed=0, divergence_weight=1.0)
    first = compute_pcr_loss(model, batch, config=config)
    second = compute_pcr_loss(model, batch, config=config)
    assert torch.isfinite(first.loss) and first.loss.requires_grad
    # the seeded augmentation is built once per model and advances: fresh views each call
    assert not torch.equal(first.divergence, second.divergence)


@pytest.mark.skipif(not HAS_AUGMENT, reason="pcr_fast.augment not available yet")
@pytest.mark.parametrize("family", FAMILIES)
def test_parity_with_real_patch_augment(family):
    """Every family (so every pixel layout: (B,C,H,W), tiles, Qwen rows + grid_thw, (B,n,C,H,W))
    with the real PatchAugment, its unit read from the model by PatchAugment.for_model."""
    from pcr_fast.augment import PatchAugment

    model, make_batch = build_tiny_model(family)
    batch = make_batch(2)
    aug = PatchAugment.for_model(model, shuffle=True, mask_ratio=0.25, fill="mean")

    def seeded(pixels, **kwargs):
        kwargs["generator"] = torch.Generator().manual_seed(1234)
        return aug(pixels, **kwargs)

    out = compute_pcr_loss(model, batch, augment=seeded, loss_fn=TwoViewLoss(**LOSS_OPTIONS))
    kwargs = {"image_grid_thw": batch["image_grid_thw"]} if "image_grid_thw" in batch else {}
    pixels_b = seeded(batch["pixel_values"], **kwargs)
    pixels_b = pixels_b if torch.is_tensor(pixels_b) else pixels_b.pixel_values
    assert not torch.equal(pixels_b, batch["pixel_values"])
    if batch["pixel_values"].dim() >= 5:
        pad = (batch["pixel_values"].flatten(-3) == 0).all(-1)[..., None, None, None]
        pixels_b = torch.where(pad, torch.zeros(()), pixels_b)
    ref, _ = naive_objective(model, batch, pixels_b)
    torch.testing.assert_close(out.loss.double(), ref, atol=2e-5, rtol=2e-5)


def test_regularize_all_uses_the_shifted_attention_mask_on_a_padded_batch():
    """regularize="all": the pull-apart covers every real (non-padding) position of the shifted
    sequence — attention_mask[:, 1:], not [:, :-1] (the two differ on a right-padded batch)."""
    model, make_batch = build_tiny_model("llava")
    for seed in range(50):  # the first deterministic batch whose rows have different lengths
        batch = make_batch(4, generator=torch.Generator().manual_seed(seed))
        if not torch.equal(batch["attention_mask"][:, 1:], batch["attention_mask"][:, :-1]):
            break
    mask = batch["attention_mask"]
    assert not torch.equal(mask[:, 1:], mask[:, :-1]), "the batch must be ragged for this test to mean anything"
    loss_fn = TwoViewLoss(divergence_weight=0.7, margin=None, regularize="all", backend="torch")
    out = compute_pcr_loss(model, batch, augment=stand_in_augment, loss_fn=loss_fn,
                           config=PCRConfig(mode="online"))
    head = model.get_output_embeddings()
    with torch.no_grad():
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        z_a = (model.model(**inputs).last_hidden_state.double() @ head.weight.double().T)[:, :-1]
        inputs["pixel_values"] = stand_in_augment(batch["pixel_values"])
        z_b = (model.model(**inputs).last_hidden_state.double() @ head.weight.double().T)[:, :-1]
    labels = batch["labels"][:, 1:]
    lab = labels != -100
    tok = mask[:, 1:].bool()
    logp, logq = torch.log_softmax(z_a, -1), torch.log_softmax(z_b, -1)
    ce = -logp.gather(-1, labels.clamp_min(0)[..., None])[..., 0]
    kl = (logp.exp() * (logp - logq)).sum(-1)
    want = (ce * lab).sum() / lab.sum() - 0.7 * (kl * tok).sum() / tok.sum()  # margin=None: φ(D) = −D
    torch.testing.assert_close(out.loss.detach().double(), want, atol=2e-5, rtol=2e-5)
