#!/usr/bin/env python
"""One training step of a model-shaped config: plain SFT, SFT with the fused CE, the shipped
defense and the literal two-view objective — samples/s, tokens/s and peak memory side by side.

Configs (``--config``): ``qwen2_vl_2b`` — a Qwen2-VL-2B-shaped model built from its
configuration with random weights (1536 hidden, 28 layers, vocabulary 151936, a 32-layer
1280-wide vision tower; bf16 on CUDA), 392×392 images (196 visual tokens) and 96 text tokens
per sample; ``tiny`` — the tiny Qwen2-VL of :mod:`pcr_fast.testing` (the CPU default).

Methods (each one step = forward, backward, SGD update of every parameter):
    sft              the model's own loss (``model(**batch).loss``: (B, T, V) logits)
    sft_fused_ce     the same loss through ``pcr_fast.hf.use_fused_cross_entropy`` (no logits)
    defense_default  ``compute_pcr_loss(model, batch, config=PCRConfig(), memory=...)``: what
                     the default configuration does in a training step (mode "inline": one
                     training forward, the single-view CE, and on average test_budget × B / views
                     rows' masked no-grad views; the step's share of the test is included)
    pcr_online       ``compute_pcr_loss(model, batch, config=PCRConfig(mode="online"))``: the
                     literal two-view objective, every step

Run ``python benchmarks/bench_step.py --help``. Writes ``train_step_<device>_<date>.json/.png``.
"""
from __future__ import annotations

import argparse
import gc
import logging
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the harness lives next to this file

import torch  # noqa: E402

import harness  # noqa: E402

logger = logging.getLogger("bench_step")

METHODS = ("sft", "sft_fused_ce", "defense_default", "pcr_online")
CONFIGS = ("tiny", "qwen2_vl_2b")


# --------------------------------------------------------------------------- models
def qwen2_vl_2b(device: torch.device, dtype: torch.dtype, seed: int = 0):
    """A Qwen2-VL-2B-shaped model (random weights) and a batch maker in its processor's layout."""
    import transformers as tr

    text = dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
                tie_word_embeddings=True)
    vision = dict(depth=32, embed_dim=1280, hidden_size=1536, num_heads=16, mlp_ratio=4, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, in_chans=3)
    ids = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
               vision_end_token_id=151653)
    cfg = tr.Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True, **ids)
    torch.manual_seed(seed)
    with torch.device(device):
        model = tr.Qwen2VLForConditionalGeneration(cfg).to(dtype)
    grid, prompt, response = (1, 28, 28), 32, 64
    row_dim = 3 * 2 * 14 * 14

    def make_batch(batch_size: int, generator: torch.Generator) -> Dict[str, torch.Tensor]:
        n_img = grid[0] * grid[1] * grid[2] // 4
        seq = []
        for _ in range(batch_size):
            text_ids = torch.randint(0, 151000, (prompt + response,), generator=generator).tolist()
            seq.append([ids["vision_start_token_id"]] + [ids["image_token_id"]] * n_img
                       + [ids["vision_end_token_id"]] + text_ids)
        input_ids = torch.tensor(seq)
        labels = input_ids.clone()
        labels[:, : input_ids.shape[1] - response] = -100
        rows = batch_size * grid[0] * grid[1] * grid[2]
        batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels,
                 "pixel_values": torch.randn(rows, row_dim, generator=generator).to(dtype),
                 "image_grid_thw": torch.tensor([grid] * batch_size),
                 "mm_token_type_ids": (input_ids == ids["image_token_id"]).int()}
        return {k: v.to(device) for k, v in batch.items()}

    return model, make_batch


def tiny(device: torch.device, dtype: torch.dtype, seed: int = 0):
    from pcr_fast.testing import build_tiny_model

    model, maker = build_tiny_model("qwen2_vl", seed=seed)
    model = model.to(device=device, dtype=dtype)

    def make_batch(batch_size: int, generator: torch.Generator) -> Dict[str, torch.Tensor]:
        batch = maker(batch_size, generator=generator)
        return {k: (v.to(device, dtype) if k == "pixel_values" else v.to(device)) for k, v in batch.items()}

    return model, make_batch


# --------------------------------------------------------------------------- steps
def step_functions(model, batch: Dict[str, torch.Tensor], names: Sequence[str]):
    """(name -> (available, reason, computes, step callable))."""
    from pcr_fast import PCRConfig
    from pcr_fast.defense import BackdoorMemory, InlineMemory
    from pcr_fast.hf import compute_pcr_loss, remove_fused_cross_entropy, use_fused_cross_entropy

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-6)
    rows = batch["input_ids"].shape[0]

    def run(loss_of: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def step() -> None:
            loss = loss_of()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    def sft() -> torch.Tensor:
        remove_fused_cross_entropy(model)
        return model(**batch).loss

    def sft_fused() -> torch.Tensor:
        use_fused_cross_entropy(model)
        return model(**batch).loss

    default = PCRConfig()
    memory = None
    default_batch = batch
    device = batch["input_ids"].device
    generator = torch.Generator(device=device).manual_seed(0)
    if default.mode in ("scan", "inline"):
        vocab = model.get_output_embeddings().weight.shape[0]
        memory = (InlineMemory.from_config(default, rows, vocab, device=device) if default.mode == "inline"
                  else BackdoorMemory.from_config(default.unlearn, rows, vocab, device=device))
        default_batch = {**batch, "sample_ids": torch.arange(rows, device=device)}

    def defense() -> torch.Tensor:
        remove_fused_cross_entropy(model)
        return compute_pcr_loss(model, default_batch, config=default, memory=memory, generator=generator).loss

    online = PCRConfig(mode="online")

    def pcr_online() -> torch.Tensor:
        remove_fused_cross_entropy(model)
        return compute_pcr_loss(model, batch, config=online).loss

    table = {
        "sft": ("model(**batch).loss: the model's own loss over (B, T, V) logits", sft),
        "sft_fused_ce": ("the same loss via pcr_fast.hf.use_fused_cross_entropy (no logits)", sft_fused),
        "defense_default": (f"compute_pcr_loss with PCRConfig() (mode {default.mode!r})", defense),
        "pcr_online": ("compute_pcr_loss with PCRConfig(mode='online'): the literal two-view objective", pcr_online),
    }
    return {name: (table[name][0], run(table[name][1])) for name in names}


# --------------------------------------------------------------------------- run
def run_benchmark(config: str, device: torch.device, *, batch_size: int, method_names: Sequence[str] = METHODS,
                  quick: bool = False, seed: int = 0, note: str = "") -> Dict[str, Any]:
    device = torch.device(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    builder = {"tiny": tiny, "qwen2_vl_2b": qwen2_vl_2b}[config]
    model, make_batch = builder(device, dtype, seed)
    model.train()
    batch = make_batch(batch_size, torch.Generator().manual_seed(seed))
    tokens = int(batch["input_ids"].numel())
    labelled = int((batch["labels"] != -100).sum())
    env = harness.environment_record(device)
    steps = step_functions(model, batch, method_names)
    methods, results = {}, []
    for name, (computes, step) in steps.items():
        methods[name] = {"available": True, "computes": computes}
        row: Dict[str, Any] = {"method": name, "config": config, "batch_size": batch_size, "tokens": tokens,
                               "labelled_tokens": labelled, "dtype": str(dtype).replace("torch.", "")}
        t0 = time.perf_counter()
        try:
            step()                      # warm-up: compilation, lazy buffers, the verified softcap
            timing = harness.time_fn(step, device, quick=quick, warmed_up=True)
            row["timings"] = {"step": timing.to_dict()}
            seconds = timing.median_ms * 1e-3
            row["samples_per_s"] = batch_size / seconds
            row["tokens_per_s"] = tokens / seconds
            row["memory"] = harness.peak_memory(step, device)
            row["status"] = "ok"
        except Exception as exc:   # one failing method must not end the run: record it
            oom = "out of memory" in str(exc).lower()
            logger.warning("%s: %r", name, exc)
            row.update(status="oom" if oom else "error", reason=f"{type(exc).__name__}: {str(exc)[:300]}")
        row["wall_s"] = round(time.perf_counter() - t0, 2)
        results.append(row)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    record = {
        "benchmark": "train_step",
        "schema_version": harness.SCHEMA_VERSION,
        "environment": env,
        "settings": {"config": config, "batch_size": batch_size, "tokens_per_batch": tokens,
                     "labelled_tokens_per_batch": labelled, "dtype": str(dtype).replace("torch.", ""),
                     "optimizer": "SGD(lr=1e-6) over every parameter", "quick": quick, "seed": seed,
                     "memory": "peak during one step beyond what existed before it (weights included before)",
                     "note": note},
        "methods": methods,
        "results": results,
    }
    return harness.finish_record(record)


def table_rows(record: Dict[str, Any]) -> List[List[str]]:
    rows = []
    for r in record["results"]:
        if r["status"] != "ok":
            rows.append([r["method"], r["status"], "", "", "", r.get("reason", "")[:50]])
            continue
        t = r["timings"]["step"]
        rows.append([r["method"], f"{t['median_ms']:.1f}", f"{t['p20_ms']:.1f}-{t['p80_ms']:.1f}",
                     f"{r['samples_per_s']:.2f}", f"{r['tokens_per_s']:.0f}",
                     harness.fmt_bytes(r["memory"]["peak_bytes"])])
    return rows


TABLE_COLUMNS = ["method", "step ms", "p20-p80", "samples/s", "tokens/s", "peak mem"]


def plot_record(record: Dict[str, Any], path: Path) -> Path:
    ok = [r for r in record["results"] if r["status"] == "ok"]
    names = [r["method"] for r in ok]
    big = max((r["memory"]["peak_bytes"] for r in ok), default=0) >= 2 ** 30
    unit, scale = ("GiB", 2 ** 30) if big else ("MiB", 2 ** 20)
    env = record["environment"]
    title = (f"one training step, {record['settings']['config']} (batch {record['settings']['batch_size']}) on "
             f"{env['device']['name']}, commit {harness.commit_label(env)}")
    return harness.plot_bar_panels(path, [
        {"title": "samples/s (median; p20-p80 bars)", "ylabel": "samples/s", "groups": names,
         "values": [r["samples_per_s"] for r in ok],
         "errors": [(r["batch_size"] / (r["timings"]["step"]["p80_ms"] * 1e-3),
                     r["batch_size"] / (r["timings"]["step"]["p20_ms"] * 1e-3)) for r in ok]},
        {"title": "peak memory of a step", "ylabel": unit, "groups": names,
         "values": [r["memory"]["peak_bytes"] / scale for r in ok]},
    ], suptitle=title)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", choices=CONFIGS, default=None,
                        help="model shape (default: qwen2_vl_2b on CUDA, tiny on CPU)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--batch-size", type=int, default=None, help="samples per step (default 8 on CUDA, 4 on CPU)")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    parser.add_argument("--quick", action="store_true", help="shorter timing loops")
    parser.add_argument("--out-dir", type=Path, default=harness.RESULTS_DIR)
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--note", default="")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    config = args.config or ("qwen2_vl_2b" if device.type == "cuda" else "tiny")
    batch_size = args.batch_size or (8 if device.type == "cuda" else 4)
    if batch_size < 1:
        parser.error("--batch-size must be >= 1")
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(names) - set(METHODS))
    if unknown:
        parser.error(f"--methods must be drawn from {METHODS}, got {unknown}")
    record = run_benchmark(config, device, batch_size=batch_size, method_names=names, quick=args.quick,
                           seed=args.seed, note=args.note)
    harness.print_table(f"one training step ({config}, batch {batch_size})", TABLE_COLUMNS, table_rows(record))
    json_path = harness.write_json(record, harness.result_path("train_step", device, args.out_dir))
    print(f"wrote {json_path}")
    if not args.no_plot:
        print(f"wrote {plot_record(record, json_path.with_suffix('.png'))}")
    return 1 if any(r["status"] == "error" for r in record["results"]) else 0


if __name__ == "__main__":
    sys.exit(main())
