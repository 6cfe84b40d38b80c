"""Shared helpers of the research scripts (not part of the product): a training loop over
``prepare_experiment`` that a prototype can plug a training step into, and probes."""
from __future__ import annotations

import json
import math
import time

import torch

from pcr_fast.eval.data import QUESTION_PROMPT
from pcr_fast.eval.pretrain import lr_lambda
from pcr_fast.eval.runner import prepare_experiment
from pcr_fast.hf.counting import count_compute


@torch.no_grad()
def target_prob(net, exp, n=100, prompt=QUESTION_PROMPT):
    """Mean teacher-forced p(first target word | triggered test image, prompt)."""
    was = net.training
    net.eval()
    imgs = exp.test.images[:n]
    from pcr_fast.eval.triggers import apply_trigger
    trig = apply_trigger(exp.trigger, imgs)
    b = exp.builder
    ids = torch.tensor(b.prefix(prompt)).expand(n, -1).clone()
    first = b.ids(exp.target)[0]
    out = []
    for pix in (trig, imgs):
        logits = net(input_ids=ids, **b.image_inputs(pix, ids), logits_to_keep=1).logits[:, -1]
        out.append(float(logits.softmax(-1)[:, first].mean()))
    net.train(was)
    return out


def train(exp, step_fn=None, *, epochs=1.0, lr=1e-3, batch_size=32, seed=0, probe_every=0, log=print,
          net=None, on_step=None):
    """Plain SFT (or ``step_fn(net, inputs, idx, step) -> loss``) over ``exp``; returns (net, info)."""
    net = net if net is not None else exp.initial_model()
    n = exp.num_samples
    steps = max(1, math.ceil(epochs * n / batch_size))
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(steps))
    gen = torch.Generator().manual_seed(int(seed) + 1)
    order, cursor = torch.randperm(n, generator=gen), 0
    probes = []
    t0 = time.perf_counter()
    with count_compute(net) as counter:
        for step in range(steps):
            if cursor + batch_size > n:
                order, cursor = torch.randperm(n, generator=gen), 0
            idx = order[cursor:cursor + batch_size].tolist()
            cursor += batch_size
            inputs = exp.batch(idx)
            if step_fn is None:
                loss = net(**inputs).loss
            else:
                loss = step_fn(net, inputs, idx, step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            opt.step()
            sched.step()
            if on_step is not None:
                on_step(step)
            if probe_every and (step % probe_every == 0 or step == steps - 1):
                p = target_prob(net, exp)
                probes.append((step, round(p[0], 4), round(p[1], 4)))
                log(f"step {step}: p_target(trig) {p[0]:.3f} (clean {p[1]:.3f}) loss {float(loss):.3f}")
    return net, {"steps": steps, "seconds": round(time.perf_counter() - t0, 1), "probes": probes,
                 "compute": counter.as_dict()}


def write(path, record):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
