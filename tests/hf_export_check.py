#!/usr/bin/python3
"""hf_export_check.py: checks a `keel export --format safetensors` directory the way Hugging Face transformers
would read it, without using any Hugging Face library.

It parses model.safetensors by hand (u64 header length, JSON header, raw little-endian data), checks config.json
and the tensor names/shapes of GPT2LMHeadModel's state dict (Conv1D weights stored [in, out]), runs a GPT-2
forward pass written here in PyTorch (float64, HF GPT-2 semantics: Conv1D y = x @ W + b, GELU "gelu_new",
LayerNorm with config.layer_norm_epsilon, causal attention scaled by 1/sqrt(head_dim), LM head tied to wte), and
compares the logits with the ones keel computed for the same tokens.

Usage: /usr/bin/python3 tests/hf_export_check.py EXPORT_DIR TOKENS.i32 LOGITS.f32
  TOKENS.i32: int32 token ids (one sequence); LOGITS.f32: float32 [T, vocab_size], keel's logits.
Exit status 0 if rel = max|keel - ref| / max|ref| < 1e-4 and every structural check passes; 1 otherwise.
Used by tests/export_hf_test.cc (run with Debian's /usr/bin/python3, which has torch).
"""
import json
import math
import os
import struct
import sys

import numpy as np
import torch

TOLERANCE = 1e-4
DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": None}


def fail(msg):
    print("hf_export_check: FAIL: " + msg)
    sys.exit(1)


def read_safetensors(path):
    with open(path, "rb") as f:
        raw = f.read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n].decode("utf-8"))
    data = raw[8 + n:]
    meta = header.pop("__metadata__", {})
    tensors = {}
    for name, e in header.items():
        dt = e["dtype"]
        if dt not in ("F32", "F16"):
            fail(f"{name}: unexpected dtype {dt}")
        b0, b1 = e["data_offsets"]
        arr = np.frombuffer(data[b0:b1], dtype=np.dtype(DTYPES[dt]).newbyteorder("<")).reshape(e["shape"])
        tensors[name] = torch.from_numpy(arr.astype(np.float64))
    return meta, tensors


def gelu_new(x):
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def main():
    if len(sys.argv) != 4:
        fail("usage: hf_export_check.py EXPORT_DIR TOKENS.i32 LOGITS.f32")
    d, tok_path, logits_path = sys.argv[1:]
    with open(os.path.join(d, "config.json")) as f:
        cfg = json.load(f)
    for k, v in (("model_type", "gpt2"), ("architectures", ["GPT2LMHeadModel"]),
                 ("activation_function", "gelu_new"), ("tie_word_embeddings", True), ("n_inner", None)):
        if cfg.get(k, "<missing>") != v:
            fail(f"config.json: {k} = {cfg.get(k, '<missing>')!r}, expected {v!r}")
    L, H, C, V, T_max = cfg["n_layer"], cfg["n_head"], cfg["n_embd"], cfg["vocab_size"], cfg["n_positions"]
    if cfg["n_ctx"] != T_max:
        fail("config.json: n_ctx != n_positions")
    eps = cfg["layer_norm_epsilon"]
    for name in ("tokenizer.model", "tokenizer_config.json"):
        if not os.path.exists(os.path.join(d, name)):
            fail(f"missing {name}")

    meta, w = read_safetensors(os.path.join(d, "model.safetensors"))
    if meta.get("format") != "pt":
        fail(f"safetensors metadata format = {meta.get('format')!r}, transformers requires 'pt'")
    shapes = {"transformer.wte.weight": [V, C], "transformer.wpe.weight": [T_max, C],
              "transformer.ln_f.weight": [C], "transformer.ln_f.bias": [C]}
    for l in range(L):
        p = f"transformer.h.{l}."
        shapes.update({p + "ln_1.weight": [C], p + "ln_1.bias": [C], p + "ln_2.weight": [C], p + "ln_2.bias": [C],
                       p + "attn.c_attn.weight": [C, 3 * C], p + "attn.c_attn.bias": [3 * C],
                       p + "attn.c_proj.weight": [C, C], p + "attn.c_proj.bias": [C],
                       p + "mlp.c_fc.weight": [C, 4 * C], p + "mlp.c_fc.bias": [4 * C],
                       p + "mlp.c_proj.weight": [4 * C, C], p + "mlp.c_proj.bias": [C]})
    if set(w) != set(shapes):
        fail(f"tensor names differ: extra {sorted(set(w) - set(shapes))}, missing {sorted(set(shapes) - set(w))}")
    for name, shape in shapes.items():
        if list(w[name].shape) != shape:
            fail(f"{name}: shape {list(w[name].shape)}, expected {shape}")

    tokens = torch.from_numpy(np.fromfile(tok_path, dtype="<i4").astype(np.int64))
    T = tokens.numel()
    keel = np.fromfile(logits_path, dtype="<f4").astype(np.float64)
    if keel.size != T * V:
        fail(f"keel logits have {keel.size} values, expected {T} x {V}")
    keel = torch.from_numpy(keel.reshape(T, V))

    def ln(x, pre):
        return torch.nn.functional.layer_norm(x, (C,), w[pre + ".weight"], w[pre + ".bias"], eps)

    def conv1d(x, pre):  # transformers' Conv1D: weight [in, out]
        return x @ w[pre + ".weight"] + w[pre + ".bias"]

    hs = C // H
    x = w["transformer.wte.weight"][tokens] + w["transformer.wpe.weight"][torch.arange(T)]
    mask = torch.tril(torch.ones(T, T, dtype=torch.bool))
    for l in range(L):
        p = f"transformer.h.{l}."
        qkv = conv1d(ln(x, p + "ln_1"), p + "attn.c_attn")
        q, k, v = qkv.split(C, dim=1)
        q, k, v = (t.view(T, H, hs).transpose(0, 1) for t in (q, k, v))
        att = (q @ k.transpose(1, 2)) / math.sqrt(hs)
        att = att.masked_fill(~mask, float("-inf")).softmax(dim=-1)
        y = (att @ v).transpose(0, 1).reshape(T, C)
        x = x + conv1d(y, p + "attn.c_proj")
        x = x + conv1d(gelu_new(conv1d(ln(x, p + "ln_2"), p + "mlp.c_fc")), p + "mlp.c_proj")
    ref = ln(x, "transformer.ln_f") @ w["transformer.wte.weight"].T  # tied LM head

    rel = ((keel - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()
    print(f"hf_export_check: {L} layers, {H} heads, dim {C}, vocab {V}, {T} tokens: logits rel error {rel:.3g}")
    if not rel < TOLERANCE:
        fail(f"logits rel error {rel:.3g} >= {TOLERANCE}")
    print("hf_export_check: OK")


if __name__ == "__main__":
    main()
