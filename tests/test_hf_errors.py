"""What compute_pcr_loss refuses, and how: clear ValueErrors instead of a wrong loss."""
import pytest
import torch

from pcr_fast import TwoViewLoss
from pcr_fast.hf import compute_pcr_loss
from pcr_fast.testing import build_tiny_model


def flip(pixel_values, image_grid_thw=None, generator=None):
    return pixel_values.flip(-1)


LOSS = dict(loss_fn=TwoViewLoss(backend="torch"))


@pytest.fixture
def llava():
    return build_tiny_model("llava")


def test_bare_backbone_has_no_lm_head(llava):
    model, make_batch = llava
    with pytest.raises(ValueError, match="output embeddings"):
        compute_pcr_loss(model.model, make_batch(2), augment=flip, **LOSS)


@pytest.mark.parametrize("missing,match", [("pixel_values", "pixel_values"), ("labels", "labels"),
                                           ("input_ids", "input_ids")])
def test_missing_inputs(llava, missing, match):
    model, make_batch = llava
    batch = make_batch(2)
    del batch[missing]
    with pytest.raises(ValueError, match=match):
        compute_pcr_loss(model, batch, augment=flip, **LOSS)


def test_augment_must_keep_the_shape(llava):
    model, make_batch = llava
    with pytest.raises(ValueError, match="augment must return"):
        compute_pcr_loss(model, make_batch(2), augment=lambda p, **k: p[:, :, :8], **LOSS)


def test_bad_config_and_loss_types(llava):
    model, make_batch = llava
    with pytest.raises(ValueError, match="config must be a PCRConfig"):
        compute_pcr_loss(model, make_batch(2), augment=flip, config={"margin": 1.0})
    with pytest.raises(ValueError, match="loss_fn must be callable"):
        compute_pcr_loss(model, make_batch(2), augment=flip, loss_fn=3)


def test_reentrant_checkpointing_is_refused_non_reentrant_works(llava):
    model, make_batch = llava
    batch = make_batch(2)
    model.train()
    plain = compute_pcr_loss(model, batch, augment=flip, **LOSS)
    grads_plain = torch.autograd.grad(plain.loss, [model.lm_head.weight])
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    with pytest.raises(ValueError, match="use_reentrant"):
        compute_pcr_loss(model, batch, augment=flip, **LOSS)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ckpt = compute_pcr_loss(model, batch, augment=flip, **LOSS)
    torch.testing.assert_close(ckpt.loss, plain.loss)
    grads_ckpt = torch.autograd.grad(ckpt.loss, [model.lm_head.weight])
    torch.testing.assert_close(grads_ckpt[0], grads_plain[0])


def test_lora_on_the_lm_head_is_refused(llava):
    peft = pytest.importorskip("peft")
    model, make_batch = llava
    model = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["lm_head", "q_proj"]))
    with pytest.raises(ValueError, match="lm_head carries peft adapters"):
        compute_pcr_loss(model, make_batch(2), augment=flip, **LOSS)


def test_post_processed_logits_are_detected():
    from transformers import LlavaForConditionalGeneration

    class ScaledLogits(LlavaForConditionalGeneration):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 2.0
            return out

    model, make_batch = build_tiny_model("llava")
    scaled = ScaledLogits(model.config)
    with pytest.raises(ValueError, match="transforms its logits"):
        compute_pcr_loss(scaled, make_batch(2), augment=flip, **LOSS)


def test_logit_scale_in_config_is_refused(llava):
    model, make_batch = llava
    model.config.text_config.logit_scale = 0.5
    with pytest.raises(ValueError, match="logit_scale"):
        compute_pcr_loss(model, make_batch(2), augment=flip, **LOSS)


def test_lm_head_never_called():
    from transformers import LlavaForConditionalGeneration

    class NoHead(LlavaForConditionalGeneration):
        def forward(self, **kwargs):
            return self.model(**kwargs)

    model, make_batch = build_tiny_model("llava")
    with pytest.raises(ValueError, match="called its lm_head 0 times"):
        compute_pcr_loss(NoHead(model.config), make_batch(2), augment=flip, **LOSS)


def test_non_tensor_inputs_fall_back_to_two_forwards():
    model, make_batch = build_tiny_model("llava_next")
    batch = make_batch(2)
    as_list = dict(batch, image_sizes=batch["image_sizes"].tolist())
    ref = compute_pcr_loss(model, batch, augment=flip, **LOSS)
    out = compute_pcr_loss(model, as_list, augment=flip, **LOSS)
    assert ref.one_forward and not out.one_forward
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="cannot share a forward"):
        compute_pcr_loss(model, as_list, augment=flip, one_forward=True, **LOSS)


def test_zero3_partitioned_lm_head_is_refused_for_training():
    """A ZeRO-3 partitioned weight (ds_id set, data partitioned away) never silently trains."""
    from pcr_fast.hf.adapters import gathered_weight

    weight = torch.nn.Parameter(torch.empty(0))
    weight.ds_id, weight.ds_numel = 7, 128 * 32
    with pytest.raises(ValueError, match="stage3_param_persistence_threshold"):
        with gathered_weight(weight):
            pass
    whole = torch.nn.Parameter(torch.randn(4, 3))
    whole.ds_id = 8   # persistent (unpartitioned) ZeRO-3 parameter: used as is
    with gathered_weight(whole):
        pass
