"""torch_gpt.py: a small PyTorch GPT-2 with exactly keel's architecture and parameter layout.

It is the independent reference for keel's hand-written forward/backward (tests/fixtures/gen_gpt2_reference.py)
and the PyTorch side of the training benchmark (bench/train_bench.py). Written with plain functional ops (no
nn.MultiheadAttention or other modules; attention by hand with a causal mask, since torch 1.13 has no
F.scaled_dot_product_attention) so every step can be compared with keel's backend ops (src/model/gpt.cc,
src/backend/cpu/*.cc).

Architecture (keel's, i.e. GPT-2):
  x = wte[tokens] + wpe[positions]
  per layer l:  x = x + attn.proj(causal_attention(attn.qkv(ln1(x))))
                x = x + mlp.proj(gelu_tanh(mlp.fc(ln2(x))))
  logits = lnf(x) @ wte^T            (LM head tied to wte, no bias)
  loss = mean over B*T positions of cross-entropy(logits, targets)
LayerNorm eps 1e-5 (biased variance); GELU tanh form; attention scaled by 1/sqrt(head_size).

Parameters are a flat dict name -> tensor in keel's ParamLayout order (src/model/gpt_config.cc): wte [V,C],
wpe [ctx,C], then per layer h.<l>.{ln1.weight, ln1.bias, attn.qkv.weight [3C,C], attn.qkv.bias [3C],
attn.proj.weight [C,C], attn.proj.bias, ln2.weight, ln2.bias, mlp.fc.weight [4C,C], mlp.fc.bias [4C],
mlp.proj.weight [C,4C], mlp.proj.bias}, then lnf.weight, lnf.bias. Linear weights are [out, in] (nn.Linear);
qkv output rows are q | k | v, each with the heads contiguous (head h owns columns h*hs:(h+1)*hs).

Usage:
  from torch_gpt import GPT
  model = GPT({"layers": 2, "heads": 2, "dim": 16, "ctx": 8, "vocab": 37}, seed=0)
  logits, loss = model(tokens, targets)     # tokens/targets: int64 [B, T]
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

CONFIG_KEYS = ("layers", "heads", "dim", "ctx", "vocab")
LAYER_PARAMS = ("ln1.weight", "ln1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
                "attn.proj.bias", "ln2.weight", "ln2.bias", "mlp.fc.weight", "mlp.fc.bias", "mlp.proj.weight",
                "mlp.proj.bias")


def validate_config(config):
    for k in CONFIG_KEYS:
        if not isinstance(config.get(k), int) or config[k] <= 0:
            raise ValueError(f"config field '{k}' must be a positive integer (got {config.get(k)!r})")
    if config["dim"] % config["heads"] != 0:
        raise ValueError(f"dim {config['dim']} is not divisible by heads {config['heads']}")


def param_layout(config):
    """[(name, shape)] in keel's ParamLayout order (src/model/gpt_config.cc)."""
    L, C, V, T = config["layers"], config["dim"], config["vocab"], config["ctx"]
    layout = [("wte", (V, C)), ("wpe", (T, C))]
    shapes = {"ln1.weight": (C,), "ln1.bias": (C,), "attn.qkv.weight": (3 * C, C), "attn.qkv.bias": (3 * C,),
              "attn.proj.weight": (C, C), "attn.proj.bias": (C,), "ln2.weight": (C,), "ln2.bias": (C,),
              "mlp.fc.weight": (4 * C, C), "mlp.fc.bias": (4 * C,), "mlp.proj.weight": (C, 4 * C),
              "mlp.proj.bias": (C,)}
    for l in range(L):
        layout += [(f"h.{l}.{p}", shapes[p]) for p in LAYER_PARAMS]
    layout += [("lnf.weight", (C,)), ("lnf.bias", (C,))]
    return layout


def is_decayed(name):
    """keel's ParamTensor::decay: weight decay on matrices and embeddings, not on biases or LayerNorm params."""
    return name in ("wte", "wpe") or name.endswith(("attn.qkv.weight", "attn.proj.weight", "mlp.fc.weight",
                                                      "mlp.proj.weight"))


def gelu_tanh(x):
    """GELU, tanh form (GPT-2's; keel's GeluForward). Same math as gelu_tanh_formula, one fused kernel."""
    return F.gelu(x, approximate="tanh")


def layer_norm(x, w, b, eps=1e-5):
    """LayerNorm over the last dim, biased variance (keel's LayerNormForward). Same math as layer_norm_formula."""
    return F.layer_norm(x, (x.shape[-1],), w, b, eps)


# The same two ops spelled out, for cross-checking the fused ones (tests/fixtures/gen_gpt2_reference.py).
def gelu_tanh_formula(x):
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x)))


def layer_norm_formula(x, w, b, eps=1e-5):
    mean = x.mean(dim=-1, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)
    return (x - mean) * torch.rsqrt(var + eps) * w + b


def linear(x, w, b=None):
    """x @ w^T + b with w stored [out, in]."""
    y = x @ w.t()
    return y if b is None else y + b


def causal_attention(qkv, heads):
    """qkv [B,T,3C] (q|k|v, heads contiguous) -> [B,T,C]."""
    B, T, C3 = qkv.shape
    C = C3 // 3
    hs = C // heads
    q, k, v = qkv.split(C, dim=-1)
    q = q.view(B, T, heads, hs).transpose(1, 2)  # [B,NH,T,hs]
    k = k.view(B, T, heads, hs).transpose(1, 2)
    v = v.view(B, T, heads, hs).transpose(1, 2)
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hs))  # [B,NH,T,T]
    mask = torch.ones(T, T, dtype=torch.bool, device=qkv.device).tril()
    scores = scores.masked_fill(~mask, float("-inf"))
    att = torch.softmax(scores, dim=-1)
    y = att @ v  # [B,NH,T,hs]
    return y.transpose(1, 2).contiguous().view(B, T, C)


class GPT(nn.Module):
    """GPT-2 whose parameters are a flat name -> tensor mapping identical to keel's ParamLayout."""

    def __init__(self, config, seed=None, dtype=torch.float32, device="cpu"):
        super().__init__()
        validate_config(config)
        self.config = {k: config[k] for k in CONFIG_KEYS}
        self.names = [n for n, _ in param_layout(self.config)]
        # nn.ParameterDict forbids '.' in keys, so parameters live in a list and are addressed by keel name.
        self.plist = nn.ParameterList(
            [nn.Parameter(torch.zeros(s, dtype=dtype, device=device)) for _, s in param_layout(self.config)])
        self._index = {n: i for i, n in enumerate(self.names)}
        self.init_weights(seed)

    def p(self, name):
        return self.plist[self._index[name]]

    def named_keel_params(self):
        """[(keel name, parameter)] in ParamLayout order."""
        return [(n, self.plist[i]) for i, n in enumerate(self.names)]

    @torch.no_grad()
    def init_weights(self, seed=None):
        """GPT-2 init (as keel's GptModel::InitWeights, not bit-identical: different RNG): N(0, 0.02) for
        matrices and embeddings, N(0, 0.02/sqrt(2L)) for attn.proj/mlp.proj weights, zero biases, unit LN gains."""
        gen = torch.Generator(device="cpu")
        if seed is not None:
            gen.manual_seed(seed)
        residual_std = 0.02 / math.sqrt(2 * self.config["layers"])
        for name, p in self.named_keel_params():
            if ".ln" in "." + name and name.endswith(".weight"):  # ln1/ln2/lnf gains
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                std = residual_std if name.endswith(("attn.proj.weight", "mlp.proj.weight")) else 0.02
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64).mul_(std).to(p.dtype))

    def state_keel(self):
        """name -> detached tensor, in ParamLayout order."""
        return {n: p.detach() for n, p in self.named_keel_params()}

    @torch.no_grad()
    def load_keel(self, tensors):
        """Loads name -> tensor (e.g. from a keel checkpoint); every name and shape must match."""
        missing = [n for n in self.names if n not in tensors]
        extra = [n for n in tensors if n not in self._index]
        if missing or extra:
            raise ValueError(f"parameter names differ from keel's layout: missing {missing}, unexpected {extra}")
        for n, p in self.named_keel_params():
            t = torch.as_tensor(tensors[n])
            if tuple(t.shape) != tuple(p.shape):
                raise ValueError(f"{n}: shape {tuple(t.shape)} != {tuple(p.shape)}")
            p.copy_(t)

    def forward(self, tokens, targets=None):
        """tokens (and targets) int64 [B,T], T <= ctx. Returns (logits [B,T,V], mean loss or None)."""
        B, T = tokens.shape
        if T > self.config["ctx"]:
            raise ValueError(f"sequence length {T} exceeds the model context {self.config['ctx']}")
        p = self.p
        pos = torch.arange(T, device=tokens.device)
        x = p("wte")[tokens] + p("wpe")[pos]
        for l in range(self.config["layers"]):
            h = f"h.{l}."
            a = layer_norm(x, p(h + "ln1.weight"), p(h + "ln1.bias"))
            a = linear(a, p(h + "attn.qkv.weight"), p(h + "attn.qkv.bias"))
            a = causal_attention(a, self.config["heads"])
            x = x + linear(a, p(h + "attn.proj.weight"), p(h + "attn.proj.bias"))
            m = layer_norm(x, p(h + "ln2.weight"), p(h + "ln2.bias"))
            m = gelu_tanh(linear(m, p(h + "mlp.fc.weight"), p(h + "mlp.fc.bias")))
            x = x + linear(m, p(h + "mlp.proj.weight"), p(h + "mlp.proj.bias"))
        x = layer_norm(x, p("lnf.weight"), p("lnf.bias"))
        logits = linear(x, p("wte"))  # tied LM head
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss


def keel_lr(step, lr, warmup, total_steps, min_lr_frac=0.1):
    """keel's LR at a 0-based step (src/optim/adamw_optimizer.cc): linear warmup to lr over `warmup` steps, then
    cosine to lr * min_lr_frac at total_steps."""
    if warmup > 0 and step < warmup:
        return lr * (step + 1) / warmup
    decay = total_steps - warmup
    if decay <= 0:
        return lr
    progress = min(1.0, (step - warmup) / decay)
    lo = lr * min_lr_frac
    return lo + 0.5 * (1 + math.cos(math.pi * progress)) * (lr - lo)


def build(config, seed=None, dtype=torch.float32, device="cpu"):
    """Builds the model from a config dict {layers, heads, dim, ctx, vocab} with GPT-2 init."""
    return GPT(config, seed=seed, dtype=dtype, device=device)
