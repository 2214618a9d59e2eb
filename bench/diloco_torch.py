#!/usr/bin/python3
"""diloco_torch.py: an independent PyTorch check of keel's DiLoCo loss gap (docs/diloco.md), not a test.

keel's benchmark (bench/diloco_bench.sh) finds diloco (H = 50, 4 workers) ending with a higher validation loss
than ddp at the same small token budget. This script answers one question: is that gap keel's (a bug in its
inner/outer steps) or the algorithm's? It trains keel's architecture (bench/torch_gpt.py) on the same keel data
directory with the same recipe, in one process, written independently of keel's C++:

  ddp:    every step, the mean gradient of the global batch (--workers micro-batches of --micro sequences), one
          AdamW step (betas 0.9/0.95, eps 1e-8, weight decay 0.1 on matrices and embeddings, clip 1.0), LR
          linear warmup then cosine to --steps (floor 0.1 x lr), as keel.
  diloco: --workers model copies, each with its own AdamW, take H inner steps on their own micro-batch of each
          global step; then Δ_k = θ − θ_k is averaged, m = μ m + Δ, θ −= lr_out (Δ + μ m) (Nesterov), and every
          copy restarts from θ (AdamW moments kept, as in the DiLoCo paper and keel).
  single: one copy alone on one micro-batch per step (the data diloco's worker 0 sees), for reference.

Both see the same micro-batches (random windows of train.bin, seeded); validation is the mean loss over the
first --eval-batches batches of --micro consecutive windows of val.bin (keel's evaluation). Prints one JSON line per run, then the gap.

  /usr/bin/python3 bench/diloco_torch.py DATA_DIR [--steps 100] [--inner-steps 50] [--threads 1]
"""
import argparse
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch_gpt  # noqa: E402
from train_bench import load_shard  # noqa: E402


def lr_at(step, a):
    return torch_gpt.keel_lr(step, a.lr, a.warmup, a.steps)


def make_copy(a, seed):
    m = torch_gpt.build({"layers": a.layers, "heads": a.heads, "dim": a.dim, "ctx": a.ctx, "vocab": a.vocab}, seed)
    named = m.named_keel_params()
    groups = [{"params": [p for n, p in named if torch_gpt.is_decayed(n)], "weight_decay": 0.1},
              {"params": [p for n, p in named if not torch_gpt.is_decayed(n)], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=a.lr, betas=(0.9, 0.95), eps=1e-8)
    return m, opt, [p for _, p in named]


def micro_batch(train, a, step, k):
    rng = np.random.default_rng([a.seed, step, k])
    starts = rng.integers(0, len(train) - a.ctx - 1, size=a.micro)
    win = torch.from_numpy(np.stack([np.asarray(train[s:s + a.ctx + 1], dtype=np.int64) for s in starts]))
    return win[:, :-1].contiguous(), win[:, 1:].contiguous()


@torch.no_grad()
def val_loss(model, val, a):
    W = (len(val) - 1) // a.ctx
    total, n = 0.0, 0
    for i in range(a.eval_batches):
        rows = [((i * a.micro + b) % W) * a.ctx for b in range(a.micro)]  # keel's ValBatch(i, B = micro)
        win = torch.from_numpy(np.stack([np.asarray(val[s:s + a.ctx + 1], dtype=np.int64) for s in rows]))
        _, loss = model(win[:, :-1], win[:, 1:])
        total += loss.item()
        n += 1
    return total / n


def inner_step(model, opt, params, x, y, lr):
    for g in opt.param_groups:
        g["lr"] = lr
    _, loss = model(x, y)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def run_ddp(train, val, a):
    model, opt, params = make_copy(a, a.seed)
    for s in range(a.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(s, a)
        for k in range(a.workers):
            x, y = micro_batch(train, a, s, k)
            _, loss = model(x, y)
            (loss / a.workers).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return val_loss(model, val, a)


def run_single(train, val, a):
    model, opt, params = make_copy(a, a.seed)
    for s in range(a.steps):
        x, y = micro_batch(train, a, s, 0)
        inner_step(model, opt, params, x, y, lr_at(s, a))
    return val_loss(model, val, a)


def run_diloco(train, val, a):
    copies = [make_copy(a, a.seed) for _ in range(a.workers)]  # same seed: identical start
    outer = [p.detach().clone().double() for p in copies[0][2]]
    mom = [torch.zeros_like(p) for p in outer]
    s = 0
    while s < a.steps:
        h = min(a.inner_steps, a.steps - s)
        for k, (m, opt, params) in enumerate(copies):
            for i in range(h):
                x, y = micro_batch(train, a, s + i, k)
                inner_step(m, opt, params, x, y, lr_at(s + i, a))
        with torch.no_grad():
            for j, th in enumerate(outer):
                delta = sum(th - c[2][j].detach().double() for c in copies) / a.workers
                mom[j].mul_(a.outer_momentum).add_(delta)
                th.sub_(a.outer_lr * (delta + a.outer_momentum * mom[j]) if a.outer_momentum else a.outer_lr * delta)
                for c in copies:
                    c[2][j].copy_(th.float())
        s += h
    return val_loss(copies[0][0], val, a)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("data")
    for name, default in (("layers", 4), ("heads", 4), ("dim", 256), ("ctx", 256), ("vocab", 8192), ("steps", 100),
                          ("inner_steps", 50), ("workers", 4), ("micro", 2), ("warmup", 10), ("seed", 1),
                          ("eval_batches", 8), ("threads", 1)):
        ap.add_argument("--" + name.replace("_", "-"), type=int, default=default)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--outer-lr", type=float, default=0.7)
    ap.add_argument("--outer-momentum", type=float, default=0.9)
    ap.add_argument("--runs", default="ddp,diloco,single")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    train = load_shard(os.path.join(a.data, "train.bin"), a.vocab)
    val = load_shard(os.path.join(a.data, "val.bin"), a.vocab)
    results = {}
    for run in a.runs.split(","):
        t0 = time.time()
        results[run] = {"ddp": run_ddp, "diloco": run_diloco, "single": run_single}[run](train, val, a)
        print(json.dumps({"run": run, "steps": a.steps, "H": a.inner_steps, "val_loss": round(results[run], 4),
                          "seconds": round(time.time() - t0, 1)}), flush=True)
    if "ddp" in results and "diloco" in results:
        print(f"diloco vs ddp: {100 * (results['diloco'] / results['ddp'] - 1):+.1f} %")


if __name__ == "__main__":
    main()
