"""Worker for test_hf_distributed.py, launched with ``torchrun --nproc_per_node 2``.

Checks, on CPU with the gloo backend:
1. compute_pcr_loss through ``DistributedDataParallel``: the global loss and the averaged
   gradients equal a single process on the same global batch.
2. FSDP2 ``fully_shard`` (decoder layers + root): same loss/gradients; the lm_head as its
   own FSDP unit gives a clear error.
3. ``PCRTrainer`` under torchrun (accelerate's DDP): one SGD step equals
   ``params - lr · grad`` of the single-process loss on the same global batch.
4. Scan-and-unlearn: ``BackdoorMemory.end_scan()`` merges the ranks' scans (union of flags,
   summed token counts) into what one process recording everything finds; ``PCRTrainer`` in
   scan mode scans each rank's shard and every rank ends with the whole set's flags.
5. Inline: ``compute_pcr_loss`` with an ``InlineMemory`` under DDP and under FSDP2, each rank
   on its share of the global batch, gives step by step the loss and the memory (tested rows,
   flags, token counts, targets) of one process on the whole batch; ``PCRTrainer`` in inline
   mode ends with the same memory on every rank.
Rank 0 writes a JSON verdict to ``argv[1]``.
"""
import json
import os
import sys
import tempfile

import torch
import torch.distributed as dist

torch.set_num_threads(1)

from pcr_fast import TwoViewLoss  # noqa: E402
from pcr_fast.hf import PCRTrainer, compute_pcr_loss  # noqa: E402
from pcr_fast.testing import build_tiny_model, collate, sample_batches  # noqa: E402

FAMILY = os.environ.get("PCR_DDP_FAMILY", "qwen2_vl")
LOSS = dict(backend="torch", entropy_weight=0.1, divergence_weight=0.5, gate_weight=0.0)
LR = 0.5


def flip(pixel_values, image_grid_thw=None, generator=None):
    return -0.8 * pixel_values.flip(-1)


def reference(samples):
    """Single process, whole global batch: loss and gradients."""
    model, _ = build_tiny_model(FAMILY)
    out = compute_pcr_loss(model, collate(samples), augment=flip, loss_fn=TwoViewLoss(**LOSS))
    out.loss.backward()
    return model, float(out.loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters()}


def check_ddp(rank, world, samples, ref_loss, ref_grads):
    model, _ = build_tiny_model(FAMILY)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    per_rank = len(samples) // world
    local = collate(samples[rank * per_rank:(rank + 1) * per_rank])
    # the Trainer convention: num_items_in_batch counts the labelled tokens of all processes
    n_items = (local["labels"][:, 1:] != -100).sum()
    dist.all_reduce(n_items)
    out = compute_pcr_loss(ddp, local, augment=flip, loss_fn=TwoViewLoss(**LOSS), num_items_in_batch=n_items)
    (out.loss * world).backward()   # DDP averages gradients over processes
    total = out.loss.detach().clone()
    dist.all_reduce(total)
    loss_err = abs(float(total) - ref_loss)
    grad_err = max(float((p.grad - ref_grads[n]).abs().max() / ref_grads[n].abs().max().clamp_min(1e-8))
                   for n, p in model.named_parameters())
    return {"ddp_loss": float(total), "ref_loss": ref_loss, "ddp_loss_err": loss_err,
            "ddp_grad_rel_err": grad_err, "one_forward": out.one_forward}


def check_trainer(rank, world, samples, ref_model_grads):
    from transformers import TrainingArguments

    model, _ = build_tiny_model(FAMILY)
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = TrainingArguments(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=len(samples) // world,
                             max_steps=1, optim="sgd", learning_rate=LR, lr_scheduler_type="constant",
                             max_grad_norm=0.0, remove_unused_columns=False, report_to=[], use_cpu=True,
                             save_strategy="no", disable_tqdm=True, logging_steps=1, seed=0,
                             ddp_backend="gloo")
    from pcr_fast import PCRConfig

    trainer = PCRTrainer(model=model, args=args, train_dataset=samples, data_collator=collate,
                         pcr=PCRConfig().override(**LOSS, mode="online"), pcr_augment=flip)
    trainer.train()
    err = max(float((p.detach() - (initial[n] - LR * ref_model_grads[n])).abs().max())
              for n, p in model.named_parameters())
    moved = max(float((p.detach() - initial[n]).abs().max()) for n, p in model.named_parameters())
    return {"trainer_param_err": err, "trainer_param_moved": moved,
            "trainer_world_size": trainer.args.world_size,
            "trainer_logged": [k for k in trainer.state.log_history[0] if k.startswith("pcr/")]}


def check_fsdp2(rank, world, samples, ref_loss, ref_grads):
    """FSDP2 (fully_shard) on CPU: decoder layers sharded, lm_head with the root unit."""
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # older torch
        from torch.distributed._composable.fsdp import fully_shard
    from torch.distributed.device_mesh import init_device_mesh

    model, _ = build_tiny_model(FAMILY)
    mesh = init_device_mesh("cpu", (world,))
    for layer in model.model.language_model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    per_rank = len(samples) // world
    local = collate(samples[rank * per_rank:(rank + 1) * per_rank])
    n_items = (local["labels"][:, 1:] != -100).sum()
    dist.all_reduce(n_items)
    out = compute_pcr_loss(model, local, augment=flip, loss_fn=TwoViewLoss(**LOSS), num_items_in_batch=n_items)
    (out.loss * world).backward()
    total = out.loss.detach().clone()
    dist.all_reduce(total)
    grad_err = 0.0
    for n, p in model.named_parameters():
        g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        grad_err = max(grad_err, float((g - ref_grads[n]).abs().max() / ref_grads[n].abs().max().clamp_min(1e-8)))
    # the lm_head as an FSDP unit of its own is freed after its forward: a clear error
    model2, _ = build_tiny_model(FAMILY)
    fully_shard(model2.lm_head, mesh=mesh)
    fully_shard(model2, mesh=mesh)
    try:
        compute_pcr_loss(model2, local, augment=flip, loss_fn=TwoViewLoss(**LOSS))
        separate_head = "no error"
    except ValueError as err:
        separate_head = str(err)
    return {"fsdp_loss_err": abs(float(total) - ref_loss), "fsdp_grad_rel_err": grad_err,
            "fsdp_separate_head_error": separate_head}


def check_scan(rank, world, samples):
    from pcr_fast import BackdoorMemory, PCRConfig

    # 4a. the merge: rank r records samples r, r + world, ...; flags on even ids
    n, vocab = 12, 9
    gen = torch.Generator().manual_seed(3)
    labels = torch.randint(0, 7, (n, 4), generator=gen)
    labels[labels == 6] = -100
    labels[::3, 0] = 7                          # token 7: only in samples 0, 3, 6, 9
    flags = torch.zeros(n, dtype=torch.bool)
    flags[::3] = True                           # ... all flagged: 7 must be a target
    expected = torch.zeros(vocab, dtype=torch.bool)   # the rule, written out over all samples
    for v in range(vocab):
        has = [(labels[i] == v).any().item() for i in range(n)]
        occ = sum(has)
        hit = sum(h and bool(flags[i]) for i, h in enumerate(has))
        expected[v] = occ >= 2 and hit / occ >= 0.9
    mine = torch.arange(rank, n, world)
    merged = BackdoorMemory(n, vocab, min_support=2, target_share=0.9)
    merged.begin_scan()
    merged.record(mine, labels[mine], flags[mine])
    merged.end_scan()
    ok = bool(torch.equal(merged.flags, flags) and torch.equal(merged.targets, expected) and bool(expected[7]))
    # 4b. PCRTrainer in scan mode: each rank scans its shard; every rank ends with all flags
    from transformers import TrainingArguments

    model, _ = build_tiny_model(FAMILY)
    with_ids = [{**smp, "sample_ids": torch.tensor([i])} for i, smp in enumerate(samples)]
    args = TrainingArguments(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=1, max_steps=1,
                             remove_unused_columns=False, report_to=[], use_cpu=True, save_strategy="no",
                             disable_tqdm=True, ddp_backend="gloo", seed=0)
    cfg = PCRConfig(mode="scan").override(backend="torch", scan_at=(0.0,), invariance_threshold=1e-3, view_confidence=1e9,
                    original_confidence=1e9, views=1, min_support=1)
    trainer = PCRTrainer(model=model, args=args, train_dataset=with_ids, data_collator=collate, pcr=cfg,
                         pcr_augment=lambda pixel_values, **kw: pixel_values.clone())
    trainer.train()
    all_flagged = torch.tensor(int(bool(trainer.pcr_memory.flags.all())))
    dist.all_reduce(all_flagged, op=dist.ReduceOp.MIN)
    ok_t = torch.tensor(int(ok))
    dist.all_reduce(ok_t, op=dist.ReduceOp.MIN)
    return {"scan_merge_ok": bool(ok_t), "scan_trainer_all_flagged": bool(all_flagged),
            "scan_trainer_scans": trainer.pcr_memory.scans}


def check_inline(rank, world, make_batch):
    from pcr_fast import InlineMemory, PCRConfig

    per_rank, steps = 2, 3
    samples = sample_batches(make_batch, per_rank * world * steps, seed=11)
    samples = [{**s, "sample_ids": torch.tensor([i])} for i, s in enumerate(samples)]
    # every row tested (budget = rows × views), everything novel after its first step, the
    # identity view invariant: rows are flagged at their test, tokens named the step after
    cfg = PCRConfig(mode="inline").override(backend="torch", test_budget=1.0, views=1, novelty_window=1,
                                            novelty_confidence=1e-6, original_confidence=1e9, view_confidence=1e9,
                                            min_support=1, flagged_share=0.5)
    ident = lambda pixel_values, **kw: pixel_values.clone()  # noqa: E731
    vocab = build_tiny_model(FAMILY)[0].get_output_embeddings().weight.shape[0]
    solo = [dist.new_group([r]) for r in range(world)]       # every rank takes part in every new_group
    ref_model, _ = build_tiny_model(FAMILY)
    out = {}
    for kind in ("ddp", "fsdp"):
        model, _ = build_tiny_model(FAMILY)
        if kind == "ddp":
            wrapped = torch.nn.parallel.DistributedDataParallel(model)
        else:
            try:
                from torch.distributed.fsdp import fully_shard
            except ImportError:  # older torch
                from torch.distributed._composable.fsdp import fully_shard
            from torch.distributed.device_mesh import init_device_mesh

            mesh = init_device_mesh("cpu", (world,))
            for layer in model.model.language_model.layers:
                fully_shard(layer, mesh=mesh)
            wrapped = fully_shard(model, mesh=mesh)
        mem = InlineMemory.from_config(cfg, len(samples), vocab)
        ok, loss_err = True, 0.0
        ref_mem = InlineMemory.from_config(cfg, len(samples), vocab, group=solo[rank])
        for step in range(steps):
            start = step * per_rank * world
            glob = collate(samples[start:start + per_rank * world])
            ref = compute_pcr_loss(ref_model, glob, config=cfg, memory=ref_mem, augment=ident)
            local = collate(samples[start + rank * per_rank:start + (rank + 1) * per_rank])
            n_items = (local["labels"][:, 1:] != -100).sum()
            dist.all_reduce(n_items)
            got = compute_pcr_loss(wrapped, local, config=cfg, memory=mem, augment=ident, num_items_in_batch=n_items)
            total = got.loss.detach().clone()
            dist.all_reduce(total)
            loss_err = max(loss_err, abs(float(total) - float(ref.loss)))
            for key in ("tested", "flags", "counts", "targets"):
                ok &= bool(torch.equal(getattr(mem, key), getattr(ref_mem, key)))
        ok &= bool(mem.targets.any()) and bool(mem.tested[per_rank * world:].all())   # step 0: nothing novel yet
        ok_t = torch.tensor(int(ok))
        dist.all_reduce(ok_t, op=dist.ReduceOp.MIN)
        out[f"inline_{kind}_memory_ok"] = bool(ok_t)
        out[f"inline_{kind}_loss_err"] = loss_err
    # PCRTrainer (accelerate's DDP) in inline mode: the same memory on every rank
    from transformers import TrainingArguments

    model, _ = build_tiny_model(FAMILY)
    args = TrainingArguments(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=per_rank, max_steps=steps,
                             remove_unused_columns=False, report_to=[], use_cpu=True, save_strategy="no",
                             disable_tqdm=True, ddp_backend="gloo", seed=0)
    trainer = PCRTrainer(model=model, args=args, train_dataset=samples, data_collator=collate, pcr=cfg,
                         pcr_augment=ident)
    trainer.train()
    mem = trainer.pcr_memory
    digest = torch.stack([mem.tested.sum(), mem.flags.sum(), mem.counts.sum(), mem.targets.sum(),
                          (mem.tested.nonzero().flatten() + 1).sum()]).double()
    lo, hi = digest.clone(), digest.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    out["inline_trainer_same_memory"] = bool(torch.equal(lo, hi))
    out["inline_trainer_tested"] = int(mem.tested.sum())
    return out


def main():
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    _, make_batch = build_tiny_model(FAMILY)
    samples = sample_batches(make_batch, 2 * world, seed=7)
    for i, s in enumerate(samples):   # ragged answers: ranks hold different token counts
        s["labels"][0, -(2 + 2 * i):] = s["input_ids"][0, -(2 + 2 * i):]
    _, ref_loss, ref_grads = reference(samples)
    verdict = check_ddp(rank, world, samples, ref_loss, ref_grads)
    dist.barrier()
    verdict.update(check_fsdp2(rank, world, samples, ref_loss, ref_grads))
    dist.barrier()
    verdict.update(check_trainer(rank, world, samples, ref_grads))
    dist.barrier()
    verdict.update(check_scan(rank, world, samples))
    dist.barrier()
    verdict.update(check_inline(rank, world, make_batch))
    if rank == 0:
        with open(sys.argv[1], "w") as fh:
            json.dump(verdict, fh)
    dist.barrier()
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
