"""PatchAugment / patch_augment: properties on random data for every layout, Triton == torch.

The expected units are cut out here with ``Tensor.unfold`` (pixel layouts) or a plain
row split (Qwen-style rows), independently of how :mod:`pcr_fast.augment` reshapes.
Triton runs compiled on a GPU and under ``TRITON_INTERPRET=1`` on a CPU (conftest).
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from pcr_fast import AugmentResult, PatchAugment, patch_augment
from pcr_fast.augment import model_unit

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["torch", "triton"]

# name -> (shape or grid, patch_size, merge_size)
LAYOUTS = {
    "bchw": dict(shape=(3, 3, 30, 42), patch_size=6),                  # odd, non-square
    "bchw_merge": dict(shape=(2, 3, 16, 24), patch_size=4, merge_size=2),
    "tiles": dict(shape=(2, 3, 3, 12, 16), patch_size=4),               # (B, T, C, H, W)
    "tiles6": dict(shape=(2, 2, 2, 3, 12, 16), patch_size=4),           # (B, N, T, C, H, W)
    "rows": dict(grid=[[1, 8, 6], [2, 4, 4], [1, 2, 2]], patch_size=2, merge_size=2),
}


def make_input(name: str, dtype=torch.float32, device=DEVICE):
    spec = LAYOUTS[name]
    kw = dict(patch_size=spec["patch_size"], merge_size=spec.get("merge_size", 1))
    if "grid" in spec:
        grid = torch.tensor(spec["grid"])
        p, t = spec["patch_size"], 2
        x = torch.randn(int((grid.prod(1)).sum()), 3 * t * p * p, device=device).to(dtype)
        kw["image_grid_thw"] = grid
    else:
        x = torch.randn(spec["shape"], device=device).to(dtype)
    return x, kw


def unit_views(x: torch.Tensor, kw: dict):
    """Per augmentation image: (units, elements) of x, and the per-channel column map."""
    m = kw.get("merge_size", 1)
    if x.dim() == 2:
        rows = x.reshape(-1, m * m * x.shape[1])
        counts = [t * h * w // (m * m) for t, h, w in kw["image_grid_thw"].tolist()]
        return list(rows.split(counts))
    u = kw["patch_size"] * m
    C, H, W = x.shape[-3:]
    xi = x.reshape(-1, C, H, W)
    units = xi.unfold(2, u, u).unfold(3, u, u)              # (n, C, gh, gw, u, u)
    n, _, gh, gw = units.shape[:4]
    return list(units.permute(0, 2, 3, 1, 4, 5).reshape(n, gh * gw, C * u * u))


def per_image(res: AugmentResult, views):
    """Split permutation/mask per augmentation image (matching unit_views)."""
    counts = [v.shape[0] for v in views]
    return list(res.permutation.reshape(-1).split(counts)), list(res.mask.reshape(-1).split(counts))


def fill_unit(fill_row: torch.Tensor, x: torch.Tensor, kw: dict, elems: int) -> torch.Tensor:
    """A unit made entirely of one image's per-channel fill values, flattened like unit_views."""
    if x.dim() == 2:
        per_channel = x.shape[1] // fill_row.numel()
        return fill_row.repeat_interleave(per_channel).repeat(elems // x.shape[1])
    return fill_row.repeat_interleave(elems // fill_row.numel())


def same_multiset(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Rows of a and b are the same multiset (exact, via sorted unique rows and their counts)."""
    ua, ca = torch.unique(a, dim=0, return_counts=True)
    ub, cb = torch.unique(b, dim=0, return_counts=True)
    return ua.shape == ub.shape and torch.equal(ua, ub) and torch.equal(ca, cb)


# ------------------------------------------------------------------------------ properties

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_shuffle_only_is_a_permutation_within_each_image(layout, backend):
    x, kw = make_input(layout)
    before = x.clone()
    res = patch_augment(x, shuffle=True, mask_ratio=0.0, backend=backend, **kw)
    assert torch.equal(x, before), "input must be untouched"
    assert res.pixel_values.shape == x.shape and res.pixel_values.dtype == x.dtype
    src, dst = unit_views(x, kw), unit_views(res.pixel_values, kw)
    perms, masks = per_image(res, src)
    for s, d, perm, mask in zip(src, dst, perms, masks):
        assert same_multiset(s, d)
        assert torch.equal(torch.sort(perm).values, torch.arange(len(perm), device=perm.device))
        assert torch.equal(d, s[perm])
        assert not mask.any() and res.fill is None
        if s.shape[0] >= 12:  # identity with probability 1/12! < 3e-9
            assert not torch.equal(perm, torch.arange(len(perm), device=perm.device))
            assert not torch.equal(d, s)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("fill", ["zero", "mean", 0.75, "channels"])
def test_mask_only_fills_exactly_k_units(layout, backend, fill):
    ratio = 0.3
    x, kw = make_input(layout)
    fill_arg = torch.tensor([0.5, -1.0, 2.0], device=x.device) if fill == "channels" else fill
    res = patch_augment(x, shuffle=False, mask_ratio=ratio, fill=fill_arg, backend=backend, **kw)
    src, dst = unit_views(x, kw), unit_views(res.pixel_values, kw)
    perms, masks = per_image(res, src)
    for i, (s, d, perm, mask) in enumerate(zip(src, dst, perms, masks)):
        n = s.shape[0]
        k = math.floor(ratio * n + 0.5)
        assert int(mask.sum()) == k
        assert torch.equal(perm, torch.arange(n, device=perm.device))
        assert torch.equal(d[~mask], s[~mask])
        expected = fill_unit(res.fill[i], x, kw, s.shape[1])
        assert torch.equal(d[mask], expected.expand(k, -1))
        # And the output is exactly the input apart from those k units.
        assert int((d != s).any(dim=1).sum()) == k
    # The reported fill table is what the user asked for.
    C = res.fill.shape[1]
    if fill == "zero":
        assert (res.fill == torch.finfo(x.dtype).tiny).all()
    elif fill == 0.75:
        assert (res.fill == 0.75).all()
    elif fill == "channels":
        assert torch.equal(res.fill, torch.tensor([[0.5, -1.0, 2.0]], device=x.device).expand_as(res.fill))
    else:  # per-image, per-channel mean
        for i, s in enumerate(src):
            if x.dim() == 2:
                expected = s.double().reshape(-1, C, x.shape[1] // C).transpose(0, 1).reshape(C, -1).mean(1)
            else:
                expected = s.double().reshape(s.shape[0], C, -1).transpose(0, 1).reshape(C, -1).mean(1)
            torch.testing.assert_close(res.fill[i].double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_shuffle_and_mask(layout, backend, dtype):
    ratio = 0.4
    x, kw = make_input(layout, dtype)
    res = patch_augment(x, shuffle=True, mask_ratio=ratio, fill="mean", backend=backend, **kw)
    src, dst = unit_views(x, kw), unit_views(res.pixel_values, kw)
    perms, masks = per_image(res, src)
    for i, (s, d, perm, mask) in enumerate(zip(src, dst, perms, masks)):
        n = s.shape[0]
        assert int(mask.sum()) == math.floor(ratio * n + 0.5)
        assert torch.equal(d[~mask], s[perm[~mask]])
        kept = d[~mask]
        assert (kept[:, None, :] == s[None]).all(-1).any(-1).all()   # a subset of the input's units
        assert torch.equal(d[mask], fill_unit(res.fill[i], x, kw, s.shape[1]).expand(int(mask.sum()), -1))


def test_mask_and_permutation_are_independent_and_uniform():
    """Each source unit survives a shuffle+mask with probability 1 - k/n (no unit favoured)."""
    n_images, k_expected = 6000, 1
    x = torch.randn(n_images, 1, 2, 2, device=DEVICE)  # 4 units of 1 px per image, k = 1
    res = patch_augment(x, shuffle=True, patch_size=1, mask_ratio=0.25, fill="zero", seed=11, backend="torch")
    perm, mask = res.permutation, res.mask
    assert (mask.sum(1) == k_expected).all()
    survived = torch.zeros(4, device=perm.device)
    survived.index_add_(0, perm[~mask], torch.ones(int((~mask).sum()), device=perm.device))
    freq = survived / n_images
    torch.testing.assert_close(freq, torch.full_like(freq, 0.75), atol=0.03, rtol=0)
    masked_pos = mask.float().mean(0)
    torch.testing.assert_close(masked_pos, torch.full_like(masked_pos, 0.25), atol=0.03, rtol=0)


# ------------------------------------------------------------------- randomness & backends

@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_triton_equals_torch_bit_for_bit(layout, dtype):
    x, kw = make_input(layout, dtype)
    for fill in ("mean", "zero", "noise"):
        ref = patch_augment(x, shuffle=True, mask_ratio=0.3, fill=fill, seed=5, backend="torch", **kw)
        got = patch_augment(x, shuffle=True, mask_ratio=0.3, fill=fill, seed=5, backend="triton", **kw)
        assert torch.equal(ref.pixel_values, got.pixel_values), fill
        assert torch.equal(ref.permutation, got.permutation) and torch.equal(ref.mask, got.mask)


@pytest.mark.parametrize("backend", BACKENDS)
def test_seed_reproducible_and_images_differ(backend):
    x, kw = make_input("bchw")
    a = patch_augment(x, shuffle=True, mask_ratio=0.25, seed=123, backend=backend, **kw)
    b = patch_augment(x, shuffle=True, mask_ratio=0.25, seed=123, backend=backend, **kw)
    c = patch_augment(x, shuffle=True, mask_ratio=0.25, seed=124, backend=backend, **kw)
    assert torch.equal(a.pixel_values, b.pixel_values)
    assert not torch.equal(a.permutation, c.permutation)
    perms = a.permutation
    for i in range(perms.shape[0]):
        for j in range(i + 1, perms.shape[0]):
            assert not torch.equal(perms[i], perms[j])
    gen = torch.Generator(device=DEVICE).manual_seed(123)
    again = patch_augment(x, shuffle=True, mask_ratio=0.25, generator=gen, backend=backend, **kw)
    assert torch.equal(again.pixel_values, a.pixel_values)


def test_defaults_are_the_measured_view_of_the_defense():
    """PatchAugment() makes the defense's view (AugmentConfig): no shuffle, half masked, mean fill."""
    from pcr_fast import AugmentConfig

    aug, cfg = PatchAugment(4), AugmentConfig()
    assert (aug.shuffle, aug.mask_ratio, aug.fill) == (cfg.shuffle, cfg.mask_ratio, cfg.fill) == (False, 0.5, "mean")
    x, kw = make_input("bchw")
    res = patch_augment(x, seed=0, **kw)
    assert torch.equal(res.permutation, torch.arange(res.permutation.shape[-1]).expand_as(res.permutation))
    assert torch.allclose(res.mask.float().mean(-1), torch.tensor(0.5), atol=0.05)


def test_module_seed_gives_a_reproducible_stream():
    x, kw = make_input("bchw")
    aug1 = PatchAugment(kw["patch_size"], shuffle=True, mask_ratio=0.25, seed=7)
    aug2 = PatchAugment(kw["patch_size"], shuffle=True, mask_ratio=0.25, seed=7)
    first, second = aug1(x), aug1(x)
    assert not torch.equal(first, second), "successive calls must draw afresh"
    assert torch.equal(aug2(x), first) and torch.equal(aug2(x), second)
    res = aug1.apply(x, generator=torch.Generator(device=DEVICE).manual_seed(0))
    assert isinstance(res, AugmentResult) and res.unit_grid == (5, 7)
    # mask draws do not depend on shuffle
    on = patch_augment(x, seed=3, shuffle=True, mask_ratio=0.5, **kw)
    off = patch_augment(x, seed=3, shuffle=False, mask_ratio=0.5, **kw)
    assert torch.equal(on.mask, off.mask)


def test_one_triton_launch_per_call(monkeypatch):
    from pcr_fast.kernels import patch_gather as pg

    launches = []
    original = pg._patch_gather_kernel

    class Counting:
        def __getitem__(self, grid):
            launches.append(grid)
            return original[grid]

    monkeypatch.setattr(pg, "_patch_gather_kernel", Counting())
    for layout in LAYOUTS:
        x, kw = make_input(layout)
        launches.clear()
        patch_augment(x, shuffle=True, mask_ratio=0.25, fill="noise", backend="triton", **kw)
        assert len(launches) == 1, layout


@pytest.mark.parametrize("backend", BACKENDS)
def test_exact_copy_non_contiguous_batch_of_one(backend):
    base = torch.randn(1, 42, 3, 30, device=DEVICE)
    x = base.permute(0, 2, 3, 1)                      # (1, 3, 30, 42), non-contiguous
    assert not x.is_contiguous()
    same = patch_augment(x, patch_size=6, shuffle=False, mask_ratio=0.0, backend=backend)
    assert torch.equal(same.pixel_values, x)
    # A reduction's order depends on the memory layout, so "mean" is compared on the same
    # input across backends and the layout-independence on a fixed fill.
    old = dict(shuffle=True, mask_ratio=0.25)  # shuffle and mask: both paths of the gather
    ref = patch_augment(x.contiguous(), patch_size=6, seed=2, fill="zero", backend="torch", **old)
    got = patch_augment(x, patch_size=6, seed=2, fill="zero", backend=backend, **old)
    assert torch.equal(got.pixel_values, ref.pixel_values)
    assert torch.equal(patch_augment(x, patch_size=6, seed=2, backend=backend, **old).pixel_values,
                       patch_augment(x, patch_size=6, seed=2, backend="torch", **old).pixel_values)
    # Non-contiguous tiles (a strided slice of a larger batch) and rows.
    tiles = torch.randn(2, 6, 3, 12, 16, device=DEVICE)[:, ::2]
    assert torch.equal(patch_augment(tiles, patch_size=4, seed=1, fill=0.5, backend=backend, **old).pixel_values,
                       patch_augment(tiles.contiguous(), patch_size=4, seed=1, fill=0.5, backend="torch",
                                     **old).pixel_values)
    rows_x, kw = make_input("rows")
    wide = torch.randn(rows_x.shape[0], rows_x.shape[1] * 2, device=DEVICE)[:, ::2]
    assert torch.equal(patch_augment(wide, seed=4, fill="zero", backend=backend, **old, **kw).pixel_values,
                       patch_augment(wide.contiguous(), seed=4, fill="zero", backend="torch", **old, **kw).pixel_values)


def test_random_shapes_triton_equals_torch_and_permutes():
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    for _ in range(6):
        b, c, unit, gh, gw, rh, rw = (int(v) for v in torch.randint(1, 5, (7,), generator=gen))
        remainder = bool(torch.randint(0, 2, (), generator=gen))
        H, W = gh * unit + (rh % unit if remainder else 0), gw * unit + (rw % unit if remainder else 0)
        x = torch.randn(b, c, H, W, device=DEVICE)
        kw = dict(patch_size=unit, shuffle=True, mask_ratio=float(torch.rand((), generator=gen)) * 0.9,
                  fill="mean", allow_remainder=remainder, seed=int(torch.randint(0, 99, (), generator=gen)))
        ref, got = patch_augment(x, backend="torch", **kw), patch_augment(x, backend="triton", **kw)
        assert torch.equal(ref.pixel_values, got.pixel_values), (x.shape, kw)
        core = dict(patch_size=unit)
        src = unit_views(x[..., :gh * unit, :gw * unit], core)
        dst = unit_views(got.pixel_values[..., :gh * unit, :gw * unit], core)
        for s_, d_, perm, mask in zip(src, dst, *per_image(got, src)):
            assert torch.equal(d_[~mask], s_[perm[~mask]])
            assert int(mask.sum()) == math.floor(kw["mask_ratio"] * gh * gw + 0.5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_model_sized_inputs(dtype):
    """Realistic sizes compiled on the GPU: LLaVA 336 px, LLaVA-NeXT tiles, Qwen2-VL rows."""
    cases = [(torch.randn(8, 3, 336, 336, device="cuda", dtype=dtype), dict(patch_size=14)),
             (torch.randn(2, 5, 3, 336, 336, device="cuda", dtype=dtype), dict(patch_size=14)),
             (torch.randn(2 * 24 * 34 + 16 * 16, 1176, device="cuda", dtype=dtype),
              dict(patch_size=14, merge_size=2, image_grid_thw=torch.tensor([[2, 24, 34], [1, 16, 16]])))]
    for x, kw in cases:
        for fill in ("mean", "zero", "noise"):
            ref = patch_augment(x, shuffle=True, mask_ratio=0.25, fill=fill, seed=0, backend="torch", **kw)
            got = patch_augment(x, shuffle=True, mask_ratio=0.25, fill=fill, seed=0, backend="triton", **kw)
            assert torch.equal(ref.pixel_values, got.pixel_values)


@pytest.mark.parametrize("backend", BACKENDS)
def test_allow_remainder_keeps_the_border(backend):
    x = torch.randn(2, 3, 13, 17, device=DEVICE)
    with pytest.raises(ValueError, match="patch_size"):
        patch_augment(x, patch_size=4, backend=backend)
    res = patch_augment(x, shuffle=True, patch_size=4, mask_ratio=0.3, allow_remainder=True, seed=0, backend=backend)
    out = res.pixel_values
    assert torch.equal(out[..., 12:, :], x[..., 12:, :]) and torch.equal(out[..., :, 16:], x[..., :, 16:])
    assert res.unit_grid == (3, 4)
    core = {"patch_size": 4}
    src, dst = unit_views(x[..., :12, :16], core), unit_views(out[..., :12, :16], core)
    perms, masks = per_image(res, src)
    for s, d, perm, mask in zip(src, dst, perms, masks):
        assert torch.equal(d[~mask], s[perm[~mask]])


def test_noise_fill_statistics():
    x = torch.randn(2, 3, 64, 64, device=DEVICE) * torch.tensor([1.0, 2.0, 0.5], device=DEVICE)[:, None, None] \
        + torch.tensor([0.0, 3.0, -1.0], device=DEVICE)[:, None, None]
    res = patch_augment(x, patch_size=4, shuffle=False, mask_ratio=0.5, fill="noise", seed=0)
    src, dst = unit_views(x, {"patch_size": 4}), unit_views(res.pixel_values, {"patch_size": 4})
    for i, (s, d, mask) in enumerate(zip(src, dst, res.mask)):
        noise = d[mask].reshape(-1, 3, 16).transpose(0, 1).reshape(3, -1)
        image = s.reshape(-1, 3, 16).transpose(0, 1).reshape(3, -1)
        torch.testing.assert_close(noise.mean(1), image.mean(1), atol=0.1, rtol=0)
        torch.testing.assert_close(noise.std(1), image.std(1), atol=0.1, rtol=0.05)
        assert torch.equal(d[~mask], s[~mask])


# --------------------------------------------------------------------------- padding tiles

@pytest.mark.parametrize("backend", BACKENDS)
def test_padding_tiles_copied_unchanged(backend):
    x = torch.randn(2, 3, 3, 8, 8, device=DEVICE)
    x[1, 2] = 0                                        # LLaVA-NeXT / Idefics3 padding tile
    res = patch_augment(x, shuffle=True, patch_size=2, mask_ratio=0.5, fill="zero", seed=0, backend=backend)
    out = res.pixel_values
    assert (out[1, 2] == 0).all() and not res.mask[1, 2].any()
    assert torch.equal(res.permutation[1, 2], torch.arange(16, device=x.device))
    assert (res.mask[0, 0].sum() == 8) and not torch.equal(out[0, 0], x[0, 0])
    # Mllama: aspect_ratio_mask == 0 marks padding tiles (their content is irrelevant).
    y = torch.randn(1, 2, 2, 3, 8, 8, device=DEVICE)
    tile_mask = torch.tensor([[[1, 1], [1, 0]]])
    res = patch_augment(y, shuffle=True, patch_size=2, mask_ratio=0.5, seed=0, tile_mask=tile_mask, backend=backend)
    assert torch.equal(res.pixel_values[0, 1, 1], y[0, 1, 1])
    assert not torch.equal(res.pixel_values[0, 1, 0], y[0, 1, 0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_never_an_all_zero_tile(backend):
    """Zero fill over the only non-zero unit of a tile must not turn it into padding."""
    x = torch.zeros(1, 64, 1, 4, 4, device=DEVICE)
    x[0, :, :, :2, :2] = torch.rand(64, 1, 2, 2, device=DEVICE) + 0.5   # unit 0 only
    res = patch_augment(x, shuffle=True, patch_size=2, mask_ratio=0.75, fill="zero", seed=3, backend=backend)
    assert res.mask[0, :, 0].any(), "some tile must have its only non-zero unit masked"
    peak = res.pixel_values.abs().amax(dim=(-3, -2, -1))
    assert (peak > 0).all()


# ------------------------------------------------------------------------------ bad input

def test_bad_input_names_the_argument():
    x = torch.randn(2, 3, 12, 12)
    cases = [
        (dict(mask_ratio=1.0), "mask_ratio"), (dict(mask_ratio=-0.1), "mask_ratio"),
        (dict(patch_size=5), "patch_size"), (dict(patch_size=0), "patch_size"),
        (dict(fill="blue"), "fill"), (dict(fill=[1.0, 2.0]), "fill"), (dict(backend="cuda"), "backend"),
        (dict(merge_size=0), "merge_size"),
    ]
    for kwargs, name in cases:
        kw = dict(patch_size=4)
        kw.update(kwargs)
        with pytest.raises(ValueError, match=name):
            patch_augment(x, **kw)
    with pytest.raises(ValueError, match="rank"):
        patch_augment(torch.randn(3, 12, 12), patch_size=4)
    with pytest.raises(ValueError, match="pixel_values"):
        patch_augment(torch.randint(0, 255, (2, 3, 12, 12)), patch_size=4)
    rows = torch.randn(24, 3 * 2 * 4 * 4)
    with pytest.raises(ValueError, match="image_grid_thw"):
        patch_augment(rows, patch_size=4)
    with pytest.raises(ValueError, match="image_grid_thw"):
        patch_augment(rows, patch_size=4, image_grid_thw=torch.tensor([[1, 4, 4]]))       # 16 != 24
    with pytest.raises(ValueError, match="image_grid_thw"):
        patch_augment(rows, patch_size=4, merge_size=2, image_grid_thw=torch.tensor([[1, 3, 8]]))
    with pytest.raises(ValueError, match="image_grid_thw"):
        patch_augment(x, patch_size=4, image_grid_thw=torch.tensor([[1, 3, 3]]))
    with pytest.raises(ValueError, match="tile_mask"):
        patch_augment(torch.randn(1, 2, 3, 8, 8), patch_size=4, tile_mask=torch.ones(1, 3))
    with pytest.raises(ValueError, match="mask_ratio"):
        PatchAugment(4, mask_ratio=1.5)


# ------------------------------------------------------------------- model families (HF)

def _configs():
    import transformers as T

    qwen_text = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=1,
                     intermediate_size=128, vocab_size=256)
    return {
        "llava": (T.LlavaConfig(), 14, 1),
        "llava_next": (T.LlavaNextConfig(), 14, 1),
        "llava_onevision": (T.LlavaOnevisionConfig(), 14, 1),
        "paligemma": (T.PaliGemmaConfig(), 14, 1),
        "mllama": (T.MllamaConfig(), 14, 1),
        "qwen2_vl": (T.Qwen2VLConfig(text_config=qwen_text), 14, 2),
        "qwen2_5_vl": (T.Qwen2_5_VLConfig(text_config=qwen_text), 14, 2),
        "qwen3_vl": (T.Qwen3VLConfig(), 16, 2),
        "idefics3": (T.Idefics3Config(vision_config={"patch_size": 14}, scale_factor=3), 14, 3),
        "smolvlm": (T.SmolVLMConfig(vision_config={"patch_size": 16}, scale_factor=4), 16, 4),
        "internvl": (T.InternVLConfig(), 14, 2),
        "gemma3": (T.Gemma3Config(vision_config={"patch_size": 14, "image_size": 896},
                                  mm_tokens_per_image=256), 14, 4),
    }


def test_for_model_reads_unit_from_each_config():
    for name, (config, patch, merge) in _configs().items():
        assert config.model_type == name
        aug = PatchAugment.for_model(config, mask_ratio=0.5)
        assert (aug.patch_size, aug.merge_size, aug.channels) == (patch, merge, 3), name
        assert aug.mask_ratio == 0.5
        assert model_unit(SimpleNamespace(config=config), unit="patch")["merge_size"] == 1
    with pytest.raises(ValueError, match="model_type"):
        PatchAugment.for_model(SimpleNamespace(model_type="bert", vision_config=None))
    import transformers as T
    with pytest.raises(ValueError, match="mm_tokens_per_image"):
        PatchAugment.for_model(T.Gemma3Config(vision_config={"patch_size": 14, "image_size": 896},
                                              mm_tokens_per_image=250))


def _image(h, w, seed):
    rng = np.random.default_rng(seed)
    return (rng.random((h, w, 3)) * 255).astype("uint8")


def test_qwen2_vl_processor_rows_merge_groups_are_spatial_blocks():
    """With merge 2 a unit (4 consecutive rows) is one 28×28 block: its columns hold (C, t, p, p)."""
    from transformers import Qwen2VLImageProcessorPil

    H, W = 56, 84
    yy, xx = np.meshgrid(np.arange(H), np.arange(W), indexing="ij")
    coords = np.stack([yy, xx, np.zeros_like(yy)], -1).astype("uint8")
    proc = Qwen2VLImageProcessorPil(do_resize=False, do_rescale=False, do_normalize=False)
    batch = proc(images=[coords, _image(28, 56, 0)], return_tensors="pt")
    x, grid = batch["pixel_values"], batch["image_grid_thw"]
    aug = PatchAugment(patch_size=14, shuffle=True, merge_size=2, mask_ratio=0.25, fill=[1.0, 2.0, 3.0], seed=0)
    for backend in BACKENDS:
        aug.backend = backend
        res = aug.apply(x, image_grid_thw=grid)
        out = res.pixel_values.reshape(-1, 4, 3, 2, 14, 14)           # (units, m², C, t, p, p)
        src = x.reshape(-1, 4, 3, 2, 14, 14)
        n0 = 6                                                         # units of image 0 (2 × 3)
        for u in range(n0):
            if res.mask[u]:
                assert torch.equal(out[u, :, 1], torch.full_like(out[u, :, 1], 2.0))
                continue
            ys, xs = out[u, :, 0], out[u, :, 1]
            # One 28-px-aligned 28×28 block: the source unit's, moved as a whole.
            assert int(ys.max() - ys.min()) == 27 and int(xs.max() - xs.min()) == 27
            assert int(ys.min()) % 28 == 0 and int(xs.min()) % 28 == 0
            assert torch.equal(out[u], src[res.permutation[u]])
        assert int(res.mask[:n0].sum()) == 2 and int(res.mask[n0:].sum()) == 1


def test_processor_layouts_llava_next_idefics3_mllama_siglip():
    from transformers import (Idefics3ImageProcessorPil, LlavaNextImageProcessorPil, MllamaImageProcessorPil,
                              SiglipImageProcessorPil)

    imgs = [_image(60, 90, 1), _image(30, 40, 2)]
    # LLaVA-NeXT anyres tiles (B, n_patches, C, H, W); the smaller image's extra tiles are zero.
    nxt = LlavaNextImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28},
                                     image_grid_pinpoints=[[28, 56], [56, 28], [56, 56]])(images=imgs, return_tensors="pt")
    # Idefics3 (B, n_images, C, H, W): the second sample has one image, padded with a zero image.
    ide = Idefics3ImageProcessorPil(size={"longest_edge": 56}, max_image_size={"longest_edge": 28})(
        images=[[imgs[0], imgs[1]], [imgs[1]]], return_tensors="pt")
    # Mllama (B, n_images, tiles, C, H, W) with aspect_ratio_mask (B, n_images, tiles).
    mll = MllamaImageProcessorPil(size={"height": 28, "width": 28}, max_image_tiles=4)(
        images=[[_image(28, 90, 3), imgs[1]], [imgs[1]]], return_tensors="pt")
    sig = SiglipImageProcessorPil(size={"height": 28, "width": 42})(images=imgs, return_tensors="pt")
    cases = [(nxt["pixel_values"], None), (ide["pixel_values"], None),
             (mll["pixel_values"], mll["aspect_ratio_mask"]), (sig["pixel_values"], None)]
    for pixel_values, tile_mask in cases:
        padding = (pixel_values == 0).flatten(-3).all(-1) if tile_mask is None and pixel_values.dim() > 4 else None
        ref = patch_augment(pixel_values, shuffle=True, patch_size=14, mask_ratio=0.5, fill="zero", seed=1,
                            tile_mask=tile_mask, backend="torch")
        got = patch_augment(pixel_values, shuffle=True, patch_size=14, mask_ratio=0.5, fill="zero", seed=1,
                            tile_mask=tile_mask, backend="triton")
        assert torch.equal(ref.pixel_values, got.pixel_values)
        out = got.pixel_values
        if padding is not None and padding.any():
            assert torch.equal(out[padding], pixel_values[padding])   # padding stays padding
            assert not (out[~padding] == 0).flatten(-3).all(-1).any()  # real tiles never become padding
        if tile_mask is not None:
            invalid = tile_mask == 0
            assert invalid.any() and torch.equal(out[invalid], pixel_values[invalid])
        assert not torch.equal(out, pixel_values)
    assert (ide["pixel_values"][1] == 0).flatten(-3).all(-1).any(), "expected an Idefics3 padding image"
