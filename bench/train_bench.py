#!/usr/bin/python3
"""train_bench.py: PyTorch training throughput for keel's GPT-2 architecture (bench/torch_gpt.py), the baseline
that keel's own training speed is compared with.

Run with Debian's python3-torch (the pyenv python3 first on PATH has no torch):
    /usr/bin/python3 bench/train_bench.py --layers 4 --heads 4 --dim 256 --ctx 256 --vocab 4096 \
        --batch 8 --steps 20 --threads 4 [--data train.bin]

What is measured: `--steps` full training steps on batches of B x T tokens (T = --seq, default --ctx), after 2
untimed warmup steps. A step is forward + mean cross-entropy + backward + global grad-norm clip (1.0) + AdamW
(lr 3e-4 constant, betas (0.9, 0.95), eps 1e-8, weight decay 0.1 on matrices and embeddings only, as keel) +
zero_grad. Drawing the batch (random windows of the token stream, inputs/targets shifted by one) happens
outside the timed region. Data: a keel token shard (--data, format in src/data/shards.h; checksums are not
verified here) or, by default, seeded uniform random tokens.

Prints one JSON line:
  {"impl":"pytorch","config":{...},"tokens_per_s":...,"step_ms":...,"peak_rss_mb":..., ...}
step_ms is the mean over timed steps; tokens_per_s = B*T / (step_ms/1000); peak_rss_mb is the process's peak
resident set (resource.getrusage ru_maxrss), which includes the torch runtime itself.
"""
import argparse
import json
import os
import resource
import struct
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch_gpt  # noqa: E402

WARMUP_STEPS = 2
SHARD_MAGIC = b"KEELTOKS"
SHARD_HEADER_BYTES = 64


def load_shard(path, vocab):
    """Token ids of a keel shard (src/data/shards.h) as a read-only numpy array (memory-mapped)."""
    with open(path, "rb") as f:
        head = f.read(SHARD_HEADER_BYTES)
    if len(head) < SHARD_HEADER_BYTES or head[:8] != SHARD_MAGIC:
        raise SystemExit(f"{path}: not a keel token shard (bad magic)")
    version, dtype_bytes, count = struct.unpack_from("<IIQ", head, 8)
    if version != 1 or dtype_bytes not in (2, 4):
        raise SystemExit(f"{path}: unsupported shard version {version} / dtype_bytes {dtype_bytes}")
    if os.path.getsize(path) != SHARD_HEADER_BYTES + count * dtype_bytes:
        raise SystemExit(f"{path}: file size does not match its token count {count}")
    tokens = np.memmap(path, dtype="<u2" if dtype_bytes == 2 else "<u4", mode="r", offset=SHARD_HEADER_BYTES,
                       shape=(count,))
    if count and int(tokens.max()) >= vocab:
        raise SystemExit(f"{path}: token {int(tokens.max())} is outside --vocab {vocab}")
    return tokens


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name, default in (("layers", 4), ("heads", 4), ("dim", 256), ("ctx", 256), ("vocab", 4096), ("batch", 8),
                          ("steps", 10), ("threads", 1)):
        ap.add_argument(f"--{name}", type=int, default=default)
    ap.add_argument("--seq", type=int, default=None, help="sequence length T (default: --ctx)")
    ap.add_argument("--data", default=None, help="keel token shard to train on (default: random tokens)")
    ap.add_argument("--seed", type=int, default=1337)
    a = ap.parse_args(argv)
    a.seq = a.ctx if a.seq is None else a.seq
    for name in ("batch", "steps", "threads", "seq"):
        if getattr(a, name) <= 0:
            ap.error(f"--{name} must be positive")
    if a.seq > a.ctx:
        ap.error(f"--seq {a.seq} exceeds --ctx {a.ctx}")
    return a


def main(argv=None):
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    config = {"layers": a.layers, "heads": a.heads, "dim": a.dim, "ctx": a.ctx, "vocab": a.vocab}
    try:
        model = torch_gpt.build(config, seed=a.seed)
    except ValueError as e:
        raise SystemExit(f"bad config: {e}")
    model.train()

    B, T = a.batch, a.seq
    rng = np.random.default_rng(a.seed)
    if a.data:
        data = load_shard(a.data, a.vocab)
    else:
        data = rng.integers(0, a.vocab, size=max(1 << 20, 4 * B * (T + 1)), dtype=np.int32)
    if len(data) < T + 1:
        raise SystemExit(f"{a.data}: {len(data)} tokens is fewer than one sequence of {T + 1}")

    def next_batch():
        starts = rng.integers(0, len(data) - T, size=B)
        win = np.stack([np.asarray(data[s:s + T + 1], dtype=np.int64) for s in starts])
        win = torch.from_numpy(win)
        return win[:, :-1].contiguous(), win[:, 1:].contiguous()

    named = model.named_keel_params()
    groups = [{"params": [p for n, p in named if torch_gpt.is_decayed(n)], "weight_decay": 0.1},
              {"params": [p for n, p in named if not torch_gpt.is_decayed(n)], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=3e-4, betas=(0.9, 0.95), eps=1e-8)
    params = [p for _, p in named]

    def step(x, y):
        _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()  # forces the step to finish (and is what a training loop would log)

    losses = []
    for _ in range(WARMUP_STEPS):
        losses.append(step(*next_batch()))
    timed = 0.0
    for _ in range(a.steps):
        x, y = next_batch()
        t0 = time.perf_counter()
        losses.append(step(x, y))
        timed += time.perf_counter() - t0

    step_ms = 1000.0 * timed / a.steps
    result = {
        "impl": "pytorch",
        "config": config,
        "tokens_per_s": round(B * T * a.steps / timed, 1),
        "step_ms": round(step_ms, 3),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1),  # Linux: KiB
        "batch": B, "seq": T, "steps": a.steps, "warmup_steps": WARMUP_STEPS, "threads": a.threads,
        "data": a.data or "random", "params": sum(p.numel() for p in params),
        "first_loss": round(losses[0], 4), "last_loss": round(losses[-1], 4), "torch": torch.__version__,
    }
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
