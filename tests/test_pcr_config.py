"""PCRConfig and the defense's knobs: half-token units, the gate's cap, trainer warm-up."""
from __future__ import annotations

import pytest
import torch

from pcr_fast import (AugmentConfig, DetectorConfig, ObjectiveConfig, PCRConfig, PatchAugment, ScanSchedule,
                      TwoViewLoss, two_view_stats)
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
    aug = PatchAugment.from_config(AugmentConfig(unit="half_token"), cfg)
    assert isinstance(aug, PatchAugment) and aug.patch_size == 15
    assert "falling back" in caplog.text
    with pytest.raises(ValueError, match="unit"):
        PCRConfig().override(unit="pixel")
    with pytest.raises(ValueError, match="warmup"):
        PCRConfig().override(warmup=-0.1)


def test_gate_max_fraction_keeps_only_the_most_invariant_responses():
    b, t, d, v = 6, 5, 8, 40
    h_a = torch.randn(b * t, d)
    h_b = h_a.clone()
    h_b[: 2 * t] += 1e-3 * torch.randn(2 * t, d)  # rows 0, 1: tiny KL; rows 2..5: KL exactly 0
    w = torch.randn(v, d)
    labels = (h_a @ w.T).argmax(-1).view(b, t)
    kw = dict(backend="torch", divergence_weight=0.0, gate_weight=1.0, invariance_threshold=1.0, view_confidence=50.0)
    full = TwoViewLoss(**kw)(h_a.view(b, t, d), h_b.view(b, t, d), w, labels)
    assert torch.allclose(full.gated_fraction, torch.tensor(1.0))
    capped = TwoViewLoss(gate_max_fraction=0.5, **kw)(h_a.view(b, t, d), h_b.view(b, t, d), w, labels)
    assert torch.allclose(capped.gated_fraction, torch.tensor(0.5))
    # which rows: the three most invariant (KL exactly 0: rows 2..5), never the two with a tiny KL
    loss_fn = TwoViewLoss(gate_max_fraction=0.5, **kw)
    labelled = (labels != -100).reshape(-1)
    stats = two_view_stats(h_a, h_b, w, labels.reshape(-1), backend="torch")
    flag, _ = loss_fn.gate(stats, labelled, b)
    assert int(flag.sum()) == 3 and not flag[:2].any()
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
                         data_collator=collate, pcr=PCRConfig().override(mode="online", backend="torch", warmup=0.6, patch_size=4))
    trainer.train()
    assert len(calls) == 2  # steps 3 and 4 (0-based) use PCR, steps 0-2 the model's own loss


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "idefics3", "gemma3", "mllama", "internvl"])
def test_default_defense_runs_on_every_layout(family):
    """The per-batch cross-view gate (mode="online": half-token mask-only view) end to end."""
    from pcr_fast import compute_pcr_loss

    model, make_batch = build_tiny_model(family)
    batch = make_batch(2)
    config = PCRConfig(mode="online", objective=ObjectiveConfig.cross_view_gate()).override(backend="torch",
                                                                                             augment_seed=0)
    out = compute_pcr_loss(model, batch, config=config)
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
    loss_fn = TwoViewLoss(backend="torch", divergence_weight=0.0, gate_weight=2.0, invariance_threshold=1e-3,
                          view_confidence=50.0)
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

    cfg = PCRConfig(mode="online", objective=ObjectiveConfig.cross_view_gate()).override(backend="torch", views=3)
    out = compute_pcr_loss(model, batch, augment=counting_augment, config=cfg)
    assert len(calls) == 3 and torch.isfinite(out.loss)
    with pytest.raises(ValueError, match="views"):
        PCRConfig().override(views=0)


def test_extra_views_take_the_decisive_token_of_the_first_flagging_draw():
    """Two draws flag the same response with different decisive tokens: the unlikelihood
    lands on the first draw's decisive token (as if the draws were tried in order)."""
    b, t, d, v = 1, 3, 8, 20
    w = torch.randn(v, d)
    h_a = torch.randn(b * t, d) * 4
    labels = (h_a @ w.T).argmax(-1).view(b, t)

    def draw_worst_at(tok):
        """View b equal to view a except at token ``tok``, where it predicts badly (its worst CE)."""
        h = h_a.clone()
        h[tok] = -h_a[tok]
        return h

    # thresholds so loose that every draw flags the response: only the decisive token differs
    loss_fn = TwoViewLoss(backend="torch", divergence_weight=0.0, ce_weight=0.0, gate_weight=1.0,
                          invariance_threshold=1e9, view_confidence=1e9)
    shape = (b, t, d)
    first, second = draw_worst_at(0), draw_worst_at(2)
    st_first = two_view_stats(h_a, first, w, labels.reshape(-1), backend="torch")
    st_second = two_view_stats(h_a, second, w, labels.reshape(-1), backend="torch")
    assert int(st_first.ce_b.argmax()) == 0 and int(st_second.ce_b.argmax()) == 2
    out = loss_fn(h_a.view(shape), first.view(shape), w, labels, extra_views=[second.view(shape)])
    ce_a = st_first.ce_a
    ul = -torch.log(-torch.expm1(-ce_a.clamp_min(1e-6)))
    torch.testing.assert_close(out.loss, ul[0] / t)
    swapped = loss_fn(h_a.view(shape), second.view(shape), w, labels, extra_views=[first.view(shape)])
    torch.testing.assert_close(swapped.loss, ul[2] / t)


# ----------------------------------------------------------------------------- the config itself
def test_every_leaf_has_one_unique_name_and_can_be_overridden():
    leaves = PCRConfig().leaves()
    sections = PCRConfig.leaf_sections()
    assert set(leaves) == set(sections) and len(leaves) == len(sections)
    changed = PCRConfig().override(mode="online", mask_ratio=0.25, invariance_threshold=0.2, min_support=3,
                                   gate_weight=2.0, warmup=0.1, detach_b=True)
    assert changed.mode == "online" and changed.augment.mask_ratio == 0.25
    assert changed.detector.invariance_threshold == 0.2 and changed.unlearn.min_support == 3
    assert changed.objective.gate_weight == 2.0 and changed.schedule.warmup == 0.1 and changed.execution.detach_b
    assert PCRConfig().augment.mask_ratio == 0.5  # override returns a copy
    with pytest.raises(ValueError, match="unknown PCRConfig field"):
        PCRConfig().override(gate_threshold=0.1)   # the old name of invariance_threshold
    assert PCRConfig.from_dict(changed.to_dict()) == changed


@pytest.mark.parametrize("field,value", [
    ("mode", "offline"), ("mask_ratio", 1.0), ("mask_ratio", -0.1), ("unit", "pixel"), ("fill", "blue"),
    ("views", 0), ("patch_size", 0), ("augment_seed", -1), ("invariance_threshold", 0.0), ("view_confidence", -1.0),
    ("original_confidence", float("nan")), ("target_share", 0.0), ("target_share", 1.5), ("min_support", 0),
    ("unlearn_weight", -1.0), ("divergence", "js"), ("margin", 0.0), ("entropy_form", "cubic"),
    ("gate_weight", -1.0), ("gate_max_fraction", 0.0), ("warmup", 1.0), ("scan_at", (0.5, 1.2)),
    ("backend", "cuda"), ("detach_b", "yes"), ("shuffle", 1)])
def test_bad_values_raise_at_construction_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        PCRConfig().override(**{field: value})


def test_scan_mode_needs_scan_points_and_sections_are_typed():
    with pytest.raises(ValueError, match="scan_at"):
        PCRConfig(mode="scan").override(scan_at=())
    PCRConfig().override(mode="online", scan_at=())  # fine where no scan runs
    with pytest.raises(ValueError, match="detector must be a DetectorConfig"):
        PCRConfig(detector={"invariance_threshold": 0.1})
    with pytest.raises(ValueError, match="entropy_target is required"):
        ObjectiveConfig(entropy_form="below")


def test_scan_schedule_is_the_one_answer_for_trainer_and_harness():
    scan = ScanSchedule.for_run(PCRConfig(mode="scan"), 100)
    assert scan.scan_steps == (40, 50, 60, 70) and scan.warmup_steps == 0
    assert scan.scans_before(40) and not scan.scans_before(41)
    assert scan.trains_plain(80, memory_active=False) and not scan.trains_plain(0, memory_active=True)
    online = ScanSchedule.for_run(PCRConfig().override(mode="online", warmup=0.25), 100)
    assert online.scan_steps == () and online.warmup_steps == 25
    assert online.trains_plain(24, memory_active=False) and not online.trains_plain(25, memory_active=False)
    assert ScanSchedule.for_run(PCRConfig(mode="scan").override(scan_at=(0.999,)), 10).scan_steps == (9,)
    with pytest.raises(ValueError, match="total_steps"):
        ScanSchedule.for_run(PCRConfig(), 0)


def test_loss_and_detector_read_the_config_names():
    cfg = PCRConfig().override(mode="online", divergence_weight=0.3, invariance_threshold=0.05,
                               view_confidence=2.0, detach_b=True, backend="torch")
    loss_fn = TwoViewLoss.from_config(cfg)
    assert loss_fn.objective == cfg.objective and loss_fn.detector == cfg.detector
    assert loss_fn.detach_b and loss_fn.backend == "torch"
    assert TwoViewLoss(view_confidence=2.0).detector == DetectorConfig(view_confidence=2.0)
    with pytest.raises(TypeError, match="gate_threshold"):
        TwoViewLoss(gate_threshold=0.1)


def test_compute_pcr_loss_refuses_a_scan_config_without_memory():
    from pcr_fast import compute_pcr_loss

    model, make_batch = build_tiny_model("llava")
    with pytest.raises(ValueError, match="needs memory="):
        compute_pcr_loss(model, make_batch(2), config=PCRConfig(mode="scan"))
    with pytest.raises(ValueError, match="needs memory= an InlineMemory"):
        compute_pcr_loss(model, make_batch(2), config=PCRConfig())   # the default mode, inline


def test_each_mode_reads_its_own_leaves():
    read = {m: set(PCRConfig.leaves_read(m)) for m in ("inline", "scan", "online")}
    assert PCRConfig().mode == "inline"
    assert {"test_budget", "novelty_window", "min_support", "unlearn_weight", "mask_ratio"} <= read["inline"]
    assert not {"scan_at", "target_share", "warmup", "divergence_weight"} & read["inline"]
    assert {"scan_at", "target_share", "min_support"} <= read["scan"] and "test_budget" not in read["scan"]
    assert {"warmup", "divergence_weight", "invariance_threshold"} <= read["online"]
    assert not {"scan_at", "min_support", "test_budget"} & read["online"]
    assert all("mode" in r and "backend" in r for r in read.values())
    with pytest.raises(ValueError, match="mode"):
        PCRConfig.leaves_read("offline")


def test_cached_augmentation_is_keyed_by_the_whole_augment_config():
    """A setting left out of the cache key (the unit once was) would reuse a stale augmentation."""
    from pcr_fast.hf.batch import cached_augment

    model, _ = build_tiny_model("llava")   # patch 4: half-token unit 2 px, token unit 4 px
    half = cached_augment(model, AugmentConfig(unit="half_token"))
    token = cached_augment(model, AugmentConfig(unit="token"))
    assert (half.patch_size, token.patch_size) == (2, 4)
    assert cached_augment(model, AugmentConfig(unit="token")) is token  # built once per config
    assert cached_augment(model, AugmentConfig(unit="token", mask_ratio=0.3)) is not token


def test_cli_flags_are_generated_from_every_config_field(capsys):
    from pcr_fast.cli import main

    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    text = capsys.readouterr().out
    for name in PCRConfig().leaves():
        assert "--" + name.replace("_", "-") in text, name
    with pytest.raises(SystemExit) as err:
        main(["demo", "--mask-ratio", "1.5", "--steps", "1"])
    assert err.value.code == 2 and "--mask-ratio must be in" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["demo", "--scan-at", "0.5,x"])
    assert "--scan-at" in capsys.readouterr().err


def test_version_flag(capsys):
    import pcr_fast
    from pcr_fast.cli import main

    with pytest.raises(SystemExit) as err:
        main(["--version"])
    assert err.value.code == 0 and pcr_fast.__version__ in capsys.readouterr().out
