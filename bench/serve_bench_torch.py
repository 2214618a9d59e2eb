"""serve_bench_torch.py: single-stream KV-cached decoding of a keel checkpoint in PyTorch (the baseline of
bench/serve_bench.sh).

Loads model.safetensors of a keel checkpoint directory into bench/torch_gpt.py's GPT (keel's exact layout), then
decodes greedily with a preallocated KV cache: the prompt is fed in one batched forward (prefill), then one
position per step, each step attending to the cache (the same work keel's DecodeState does). Prints one JSON line:
{"decode_tok_s", "prefill_ms", "tokens", "threads", "torch"}. Timing covers decode steps only (after one warm-up
run), the token argmax included.

  /usr/bin/python3 bench/serve_bench_torch.py CKPT_DIR --prompt-ids 1,2,3 --tokens 128 --threads 2
"""
import argparse
import json
import math
import os
import struct
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch_gpt import GPT, gelu_tanh, layer_norm  # noqa: E402


def read_safetensors(path):
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    meta = header.pop("__metadata__", {})
    base = 8 + n
    out = {}
    for name, info in header.items():
        if info["dtype"] != "F32":
            raise ValueError(f"{name}: dtype {info['dtype']} (expected F32)")
        a, b = info["data_offsets"]
        out[name] = torch.from_numpy(np.frombuffer(data, dtype=np.float32, count=(b - a) // 4,
                                                   offset=base + a).reshape(info["shape"]).copy())
    return out, meta


def linear(x, w, b=None):
    """x [T, in] @ w^T + b. One row goes through torch.mv/addmv: Debian's torch runs F.linear on OpenBLAS sgemm,
    which packs the whole weight matrix even for a single row, a 3x slowdown at batch 1 that would flatter keel."""
    if x.shape[0] == 1:
        y = torch.mv(w, x[0]) if b is None else torch.addmv(b, w, x[0])
        return y.unsqueeze(0)
    return F.linear(x, w, b)


class KvDecoder:
    def __init__(self, model, max_t):
        c = model.config
        self.m, self.L, self.C, self.H = model, c["layers"], c["dim"], c["heads"]
        self.hs = self.C // self.H
        self.k = [torch.zeros(self.H, max_t, self.hs) for _ in range(self.L)]
        self.v = [torch.zeros(self.H, max_t, self.hs) for _ in range(self.L)]
        p = model.p
        self.w = [{k: p(f"h.{l}.{k}") for k in ("ln1.weight", "ln1.bias", "attn.qkv.weight", "attn.qkv.bias",
                                                 "attn.proj.weight", "attn.proj.bias", "ln2.weight", "ln2.bias",
                                                 "mlp.fc.weight", "mlp.fc.bias", "mlp.proj.weight",
                                                 "mlp.proj.bias")} for l in range(self.L)]
        self.wte, self.wpe = p("wte"), p("wpe")
        self.lnf_w, self.lnf_b = p("lnf.weight"), p("lnf.bias")
        self.scale = 1.0 / math.sqrt(self.hs)

    def forward(self, tokens, start):
        """tokens: int64 [T] at positions start..start+T-1; returns the logits of the last one [V]."""
        T = tokens.shape[0]
        x = self.wte[tokens] + self.wpe[start:start + T]
        for l in range(self.L):
            w = self.w[l]
            a = layer_norm(x, w["ln1.weight"], w["ln1.bias"])
            qkv = linear(a, w["attn.qkv.weight"], w["attn.qkv.bias"])
            q, k, v = qkv.split(self.C, dim=-1)
            q = q.view(T, self.H, self.hs).transpose(0, 1)  # [H,T,hs]
            self.k[l][:, start:start + T] = k.view(T, self.H, self.hs).transpose(0, 1)
            self.v[l][:, start:start + T] = v.view(T, self.H, self.hs).transpose(0, 1)
            kc, vc = self.k[l][:, :start + T], self.v[l][:, :start + T]
            s = (q @ kc.transpose(1, 2)) * self.scale  # [H,T,start+T]
            if T > 1:
                mask = torch.ones(T, start + T, dtype=torch.bool).tril(diagonal=start)
                s = s.masked_fill(~mask, float("-inf"))
            y = (torch.softmax(s, dim=-1) @ vc).transpose(0, 1).reshape(T, self.C)
            x = x + linear(y, w["attn.proj.weight"], w["attn.proj.bias"])
            m = layer_norm(x, w["ln2.weight"], w["ln2.bias"])
            x = x + linear(gelu_tanh(linear(m, w["mlp.fc.weight"], w["mlp.fc.bias"])), w["mlp.proj.weight"],
                           w["mlp.proj.bias"])
        h = layer_norm(x[-1], self.lnf_w, self.lnf_b)
        return torch.mv(self.wte, h)  # tied LM head: one matrix-vector product


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("ckpt", help="keel checkpoint directory (holding model.safetensors)")
    ap.add_argument("--prompt-ids", required=True, help="comma-separated prompt token ids")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--vocab-limit", type=int, default=0, help="argmax over the first N ids (the tokenizer's)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    tensors, meta = read_safetensors(os.path.join(a.ckpt, "model.safetensors"))
    config = json.loads(meta["config"])
    model = GPT(config)
    model.load_keel(tensors)
    model.eval()
    prompt = torch.tensor([int(t) for t in a.prompt_ids.split(",")], dtype=torch.int64)
    V = a.vocab_limit or config["vocab"]
    if len(prompt) + a.tokens > config["ctx"]:
        raise SystemExit("prompt + tokens exceed the model context")
    with torch.inference_mode():
        for run in range(2):  # run 0 warms up
            dec = KvDecoder(model, config["ctx"])
            t0 = time.perf_counter()
            logits = dec.forward(prompt, 0)
            prefill_ms = (time.perf_counter() - t0) * 1000
            nxt = int(torch.argmax(logits[:V]))
            out = [nxt]
            t1 = time.perf_counter()
            pos = len(prompt)
            for _ in range(a.tokens - 1):
                logits = dec.forward(torch.tensor([nxt]), pos)
                pos += 1
                nxt = int(torch.argmax(logits[:V]))
                out.append(nxt)
            dt = time.perf_counter() - t1
    print(json.dumps({"decode_tok_s": (a.tokens - 1) / dt, "prefill_ms": prefill_ms, "tokens": out,
                      "threads": a.threads, "torch": torch.__version__}))


if __name__ == "__main__":
    main()
