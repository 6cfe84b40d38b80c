"""PCRConfig and the defense's knobs: half-token units, the gate's cap, trainer warm-up."""
from __future__ import annotations

import pytest
import torch

from pcr_fast import PCRConfig, PatchAugment, TwoViewLoss
from pcr_fast.augment import model_unit
from pcr_fast.hf import PCRTrainer
from pcr_fast.hf import trainer as trainer_mod
from pcr_fast.testing import build_tiny_model, collate, sample_batches

transformers = pytest.importorskip("transformers")


def test_half_token_unit_per_family():
    from transformers import LlavaConfig, Qwen2VLConfig

    llava = LlavaConfig()  # CLIP patch 14, no merge -> 7-px units
    assert model_unit(llava, "half_token")["patch_size"] == 7
    assert model_unit(llava, "token")["patch_size"] == 14
    qwen = Qwen2VLConfig()  # patch 14, merge 2 -> one encoder patch (one row) per unit
    unit = model_unit(qwen, "half_token")
    assert (unit["patch_size"], unit["merge_size"]) == (14, 1)
    assert model_unit(qwen, "token")["merge_size"] == 2
    with pytest.raises(ValueError, match="unit"):
        model_unit(llava, "quarter")


def test_pcr_config_falls_back_to_token_unit_when_half_is_impossible(caplog):
    from transformers import LlavaConfig

    cfg = LlavaConfig()
    cfg.vision_config.patch_size = 15  # odd patch, no merge: half a token is not a whole pixel count
    aug = PCRConfig(unit="half_token").make_augment(cfg)
    assert isinstance(aug, PatchAugment) and aug.patch_size == 15
    assert "falling back" in caplog.text
    with pytest.raises(ValueError, match="unit"):
        PCRConfig(unit="pixel")
    with pytest.raises(ValueError, match="warmup_steps"):
        PCRConfig(warmup_steps=-1)


def test_gate_max_fraction_keeps_only_the_most_invariant_responses():
    b, t, d, v = 6, 5, 8, 40
    h_a = torch.randn(b * t, d)
    h_b = h_a.clone()
    h_b[: 2 * t] += 1e-3 * torch.randn(2 * t, d)  # rows 0, 1: tiny KL; rows 2..5: KL exactly 0
    w = torch.randn(v, d)
    labels = (h_a @ w.T).argmax(-1).view(b, t)
    kw = dict(backend="torch", divergence_weight=0.0, gate_weight=1.0, gate_threshold=1.0, gate_confidence=50.0)
    full = TwoViewLoss(**kw)(h_a.view(b, t, d), h_b.view(b, t, d), w, labels)
    assert torch.allclose(full.gated_fraction, torch.tensor(1.0))
    capped = TwoViewLoss(gate_max_fraction=0.5, **kw)(h_a.view(b, t, d), h_b.view(b, t, d), w, labels)
    assert torch.allclose(capped.gated_fraction, torch.tensor(0.5))
    with pytest.raises(ValueError, match="gate_max_fraction"):
        TwoViewLoss(gate_max_fraction=1.5)


def test_pcr_trainer_warmup_uses_the_plain_loss_first(tmp_path, monkeypatch):
    model, make_batch = build_tiny_model("llava")
    calls = []
    real = trainer_mod.compute_pcr_loss
    monkeypatch.setattr(trainer_mod, "compute_pcr_loss", lambda *a, **k: calls.append(1) or real(*a, **k))
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=5, learning_rate=1e-3,
        remove_unused_columns=False, report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True)
    trainer = PCRTrainer(model=model, args=args, train_dataset=sample_batches(make_batch, 8),
                         data_collator=collate, pcr=PCRConfig(mode="online", backend="torch", warmup_steps=3, patch_size=4))
    trainer.train()
    assert len(calls) == 2  # steps 3 and 4 (0-based) use PCR, steps 0-2 the model's own loss


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "idefics3", "gemma3", "mllama", "internvl"])
def test_default_defense_runs_on_every_layout(family):
    """PCRConfig()'s per-batch objective (mode="online": half-token mask-only view, cross-view
    gate) end to end; compute_pcr_loss without a memory always runs it."""
    from pcr_fast import compute_pcr_loss

    model, make_batch = build_tiny_model(family)
    batch = make_batch(2)
    out = compute_pcr_loss(model, batch, config=PCRConfig(backend="torch", seed=0))
    assert torch.isfinite(out.loss) and out.loss.requires_grad
    assert out.gated_fraction is not None and 0.0 <= float(out.gated_fraction) <= 1.0
    out.loss.backward()
    assert any(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_extra_views_flag_a_response_invariant_under_any_draw():
    """Row 0 differs from view b but equals the extra draw: flagged only with extra_views."""
    b, t, d, v = 3, 4, 8, 30
    h_a = torch.randn(b * t, d)
    h_b = h_a + 2.0 * torch.randn(b * t, d)       # first draw: every response changes
    h_extra = h_b.clone()
    h_extra[:t] = h_a[:t]                          # second draw: row 0 looks invariant
    w = torch.randn(v, d)
    labels = (h_a @ w.T).argmax(-1).view(b, t)
    loss_fn = TwoViewLoss(backend="torch", divergence_weight=0.0, gate_weight=2.0, gate_threshold=1e-3,
                          gate_confidence=50.0)
    shape = (b, t, d)
    one = loss_fn(h_a.view(shape), h_b.view(shape), w, labels)
    two = loss_fn(h_a.view(shape), h_b.view(shape), w, labels, extra_views=[h_extra.view(shape)])
    assert float(one.gated_fraction) == 0.0
    assert torch.allclose(two.gated_fraction, torch.tensor(1 / 3))
    assert two.loss > one.loss
    with pytest.raises(ValueError, match="extra_views"):
        loss_fn(h_a.view(shape), h_b.view(shape), w, labels, extra_views=[h_extra[:5]])
    with pytest.raises(ValueError, match="gate_weight"):
        TwoViewLoss(backend="torch")(h_a.view(shape), h_b.view(shape), w, labels, extra_views=[h_extra.view(shape)])


def test_gate_views_run_extra_no_grad_forwards():
    from pcr_fast import compute_pcr_loss

    model, make_batch = build_tiny_model("llava")
    batch = make_batch(2)
    calls = []

    def counting_augment(pixel_values, **kwargs):
        calls.append(1)
        return -pixel_values.flip(-1)

    cfg = PCRConfig(backend="torch", gate_views=3)
    out = compute_pcr_loss(model, batch, augment=counting_augment, config=cfg)
    assert len(calls) == 3 and torch.isfinite(out.loss)
    with pytest.raises(ValueError, match="gate_views"):
        PCRConfig(gate_views=0)
