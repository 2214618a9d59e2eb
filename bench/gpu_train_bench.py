#!/usr/bin/env python3
"""gpu_train_bench.py: PyTorch's GPU training throughput for keel's GPT-2 architecture (bench/torch_gpt.py), the
baseline of bench/gpu_train_bench.sh (keel issue 6).

    python3 bench/gpu_train_bench.py --layers 12 --heads 12 --dim 768 --ctx 1024 --vocab 50304 --batch 16 \
        --steps 10 [--dtype bf16|fp32] [--no-compile] [--attn manual|sdpa]

A step is what bench/train_bench.py times (forward + mean cross-entropy + backward + grad-norm clip 1.0 + AdamW
lr 3e-4, betas (0.9, 0.95), eps 1e-8, weight decay 0.1 on matrices and embeddings + zero_grad), on uniform random
tokens, on CUDA: the model is torch.compile'd (default), bf16 runs under torch.autocast (fp32 master weights, as
keel's bf16 mode), AdamW is fused. --attn manual is torch_gpt's attention as written (a materialised T x T matrix,
the same math as keel's); --attn sdpa swaps in F.scaled_dot_product_attention(is_causal=True) (flash attention).
Timing: CUDA events around each step after `--warmup` untimed steps (compilation happens there); the median step.

Prints one JSON line: tokens_per_s, step_ms, mfu (llm.c's estimate: flops/token = 6 N + 6 L C T, against
--peak-tflops, default 989 = H100 SXM bf16 dense), params, peak_mem_gb, first/last loss, torch version.
"""
import argparse
import json
import math
import os
import statistics
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch_gpt  # noqa: E402


def sdpa_attention(qkv, heads):
    B, T, C3 = qkv.shape
    C = C3 // 3
    hs = C // heads
    q, k, v = qkv.split(C, dim=-1)
    q = q.view(B, T, heads, hs).transpose(1, 2)
    k = k.view(B, T, heads, hs).transpose(1, 2)
    v = v.view(B, T, heads, hs).transpose(1, 2)
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return y.transpose(1, 2).contiguous().view(B, T, C)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name, default in (("layers", 12), ("heads", 12), ("dim", 768), ("ctx", 1024), ("vocab", 50304),
                          ("batch", 16), ("steps", 10), ("warmup", 3)):
        ap.add_argument(f"--{name}", type=int, default=default)
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    ap.add_argument("--attn", choices=("manual", "sdpa"), default="manual")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    ap.add_argument("--seed", type=int, default=1337)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_train_bench.py: no CUDA device visible to PyTorch")
    torch.manual_seed(a.seed)
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 (keel's default GEMMs are plain fp32)
    torch.backends.cudnn.allow_tf32 = False
    if a.attn == "sdpa":
        torch_gpt.causal_attention = sdpa_attention
    config = {"layers": a.layers, "heads": a.heads, "dim": a.dim, "ctx": a.ctx, "vocab": a.vocab}
    dev = torch.device("cuda")
    model = torch_gpt.build(config, seed=a.seed, device=dev)
    model.train()
    named = model.named_keel_params()
    params = [p for _, p in named]
    n_params = sum(p.numel() for p in params)
    groups = [{"params": [p for n, p in named if torch_gpt.is_decayed(n)], "weight_decay": 0.1},
              {"params": [p for n, p in named if not torch_gpt.is_decayed(n)], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=3e-4, betas=(0.9, 0.95), eps=1e-8, fused=True)
    fwd = model if a.no_compile else torch.compile(model)
    B, T = a.batch, a.ctx
    gen = torch.Generator(device=dev)
    gen.manual_seed(a.seed)

    def batch():
        win = torch.randint(0, a.vocab, (B, T + 1), device=dev, generator=gen)
        return win[:, :-1].contiguous(), win[:, 1:].contiguous()

    def step(x, y):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=a.dtype == "bf16"):
            _, loss = fwd(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    losses = []
    for _ in range(a.warmup):
        losses.append(step(*batch()).item())
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(a.steps):
        x, y = batch()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        loss = step(x, y)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
        losses.append(loss.item())
    step_ms = statistics.median(times)
    tok_s = B * T / (step_ms / 1000.0)
    flops_per_token = 6 * n_params + 6 * a.layers * a.dim * T
    mfu = flops_per_token * tok_s / (a.peak_tflops * 1e12)
    print(json.dumps({
        "impl": f"pytorch {'compile' if not a.no_compile else 'eager'} {a.dtype} attn={a.attn}",
        "tokens_per_s": round(tok_s, 1), "step_ms": round(step_ms, 3), "mfu": round(mfu, 4),
        "params": n_params, "batch": B, "seq": T, "steps": a.steps,
        "peak_mem_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "first_loss": round(losses[0], 4), "last_loss": round(losses[-1], 4),
        "loss_finite": all(math.isfinite(v) for v in losses),
        "torch": torch.__version__, "device": torch.cuda.get_device_name(),
    }), flush=True)


if __name__ == "__main__":
    main()
