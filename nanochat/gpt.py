"""The nanochat GPT: rotary embeddings, QK-norm, parameter-free RMSNorm, ReLU^2 MLP, untied embedding and
head, logit soft-capping, grouped-query attention through SDPA (flash kernels where CUDA has them).

The family is derived from one number, the depth: width = aspect_ratio x depth, heads of head_dim each.
d20 = 20 layers, width 1280, 10 heads (560,988,160 parameters at vocab 65,536); d32 = 32 layers, width 2048,
16 heads. Tiny configs (depth 2-4, a small vocabulary) run the same code on CPU.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------- family defaults
ASPECT_RATIO = 64        # width per layer of depth (nanochat)
HEAD_DIM = 128           # target attention head dimension
VOCAB_SIZE = 65536
SEQUENCE_LEN = 2048
LOGIT_SOFTCAP = 15.0     # logits = cap * tanh(logits / cap)
ROTARY_BASE = 10000.0
MAX_DEPTH = 64           # beyond d32 by far: a typo guard, not a physical limit


@dataclass(frozen=True)
class GPTConfig:
    sequence_len: int = SEQUENCE_LEN
    vocab_size: int = VOCAB_SIZE
    n_layer: int = 20
    n_head: int = 10
    n_kv_head: int = 10
    n_embd: int = 1280
    logit_softcap: float = LOGIT_SOFTCAP

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> GPTConfig:
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown GPTConfig keys {sorted(unknown)}; expected a subset of {sorted(known)}")
        return cls(**d)


def config_from_depth(depth: int, vocab_size: int = VOCAB_SIZE, sequence_len: int = SEQUENCE_LEN,
                      aspect_ratio: int = ASPECT_RATIO, head_dim: int = HEAD_DIM,
                      n_kv_head: int | None = None) -> GPTConfig:
    """The nanochat family member of this depth; raises ValueError (saying what would work) otherwise."""
    if not isinstance(depth, int) or isinstance(depth, bool) or not 1 <= depth <= MAX_DEPTH:
        raise ValueError(f"unknown depth {depth!r}: expected an integer in 1..{MAX_DEPTH} (d20 and d32 are the "
                         f"classic sizes, 2-4 the CPU sizes)")
    if aspect_ratio < 1 or head_dim < 2 or head_dim % 2:
        raise ValueError(f"aspect_ratio {aspect_ratio} must be >= 1 and head_dim {head_dim} a positive even number "
                         f"(rotary embeddings rotate pairs of channels)")
    width = aspect_ratio * depth
    if width % head_dim:
        ok = [d for d in range(1, MAX_DEPTH + 1) if (aspect_ratio * d) % head_dim == 0][:8]
        raise ValueError(f"unknown depth {depth}: width {aspect_ratio} x {depth} = {width} is not a multiple of "
                         f"head_dim {head_dim}; depths that work: {ok} ..., or pass a head_dim that divides {width}")
    n_head = width // head_dim
    n_kv_head = n_head if n_kv_head is None else n_kv_head
    if n_kv_head < 1 or n_head % n_kv_head:
        raise ValueError(f"n_kv_head {n_kv_head} must divide the {n_head} query heads of depth {depth}")
    if vocab_size < 2 or sequence_len < 1:
        raise ValueError(f"vocab_size {vocab_size} must be >= 2 and sequence_len {sequence_len} >= 1")
    return GPTConfig(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=depth, n_head=n_head,
                     n_kv_head=n_kv_head, n_embd=width)


def norm(x: torch.Tensor) -> torch.Tensor:
    """Parameter-free RMSNorm."""
    return F.rms_norm(x, (x.size(-1),))


def apply_rotary_emb(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (first half, second half) of x [B, T, H, D] by position-dependent angles."""
    d = x.shape[3] // 2
    x1, x2 = x[..., :d], x[..., d:]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=3)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        self.c_q = nn.Linear(config.n_embd, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        q, k = apply_rotary_emb(q, cos, sin), apply_rotary_emb(k, cos, sin)
        q, k = norm(q), norm(k)  # QK-norm keeps attention logits bounded without a learned scale
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, T, D]
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.n_head != self.n_kv_head)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.attn = CausalSelfAttention(config)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(norm(x), cos, sin)
        return x + self.mlp(norm(x))


class GPT(nn.Module):
    """Build on the meta device to count parameters for free; then `to_empty(device=...)` and `init_weights()`."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(config.vocab_size, config.n_embd),
            "h": nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
        })
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Rotary tables cover 10x the training context so longer generation needs no recomputation.
        self.rotary_seq_len = config.sequence_len * 10
        head_dim = config.n_embd // config.n_head
        cos, sin = self._rotary_tables(self.rotary_seq_len, head_dim)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    @staticmethod
    def _rotary_tables(seq_len: int, head_dim: int, device: torch.device | str | None = None):
        channel = torch.arange(0, head_dim, 2, dtype=torch.float32, device=device)
        inv_freq = 1.0 / (ROTARY_BASE ** (channel / head_dim))
        t = torch.arange(seq_len, dtype=torch.float32, device=device)
        freqs = torch.outer(t, inv_freq)
        return freqs.cos()[None, :, None, :], freqs.sin()[None, :, None, :]  # [1, T, 1, D/2]

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """nanochat's init: embeddings N(0, 1), matrices N(0, 1/fan_in scaled), output projections and the
        head zero (so the initial loss is exactly ln(vocab)). Also (re)computes the rotary tables."""
        gen = None
        if seed is not None:
            gen = torch.Generator(device=self.lm_head.weight.device).manual_seed(seed)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                fan_out, fan_in = module.weight.shape
                std = 1.0 / math.sqrt(fan_in) * min(1.0, math.sqrt(fan_out / fan_in))
                module.weight.normal_(0.0, std, generator=gen)
            elif isinstance(module, nn.Embedding):
                module.weight.normal_(0.0, 1.0, generator=gen)
        self.lm_head.weight.zero_()
        for block in self.transformer.h:
            block.attn.c_proj.weight.zero_()
            block.mlp.c_proj.weight.zero_()
        head_dim = self.config.n_embd // self.config.n_head
        cos, sin = self._rotary_tables(self.rotary_seq_len, head_dim, device=self.cos.device)
        self.cos.copy_(cos)
        self.sin.copy_(sin)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def estimate_flops(self) -> float:
        """Training FLOPs per token (forward + backward): 6 x non-embedding params plus attention."""
        nparams = self.num_params() - self.transformer.wte.weight.numel()
        c = self.config
        return 6 * nparams + 12 * c.n_layer * c.n_head * (c.n_embd // c.n_head) * c.sequence_len

    def param_groups(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        """Which optimizer owns which parameter: Muon the 2-D block matrices, AdamW the embedding and head."""
        named = dict(self.named_parameters())
        groups = {
            "matrix": [(n, p) for n, p in named.items() if n.startswith("transformer.h.")],
            "embedding": [("transformer.wte.weight", named["transformer.wte.weight"])],
            "unembedding": [("lm_head.weight", named["lm_head.weight"])],
        }
        assert sum(len(g) for g in groups.values()) == len(named), "a parameter has no optimizer"
        assert all(p.ndim == 2 for _, p in groups["matrix"]), "Muon takes matrices only"
        return groups

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                loss_reduction: str = "mean") -> torch.Tensor:
        """Logits [B, T, V] (fp32) when targets is None, else the cross-entropy loss (targets == -1 ignored;
        loss_reduction "none" gives per-token losses flattened to [B*T])."""
        B, T = idx.shape
        if T > self.rotary_seq_len:
            raise ValueError(f"sequence of {T} tokens is longer than the rotary tables ({self.rotary_seq_len})")
        cos, sin = self.cos[:, :T], self.sin[:, :T]
        x = norm(self.transformer.wte(idx))
        for block in self.transformer.h:
            x = block(x, cos, sin)
        logits = self.lm_head(norm(x)).float()
        cap = self.config.logit_softcap
        logits = cap * torch.tanh(logits / cap)
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1,
                               reduction=loss_reduction)

    @torch.no_grad()
    def generate(self, tokens: list[int], max_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 seed: int = 42):
        """Sample continuation tokens one at a time (no KV cache: a sanity tool, not a server)."""
        device = self.lm_head.weight.device
        gen = torch.Generator(device=device).manual_seed(seed)
        ids = torch.tensor([tokens], dtype=torch.long, device=device)
        for _ in range(max_tokens):
            logits = self.forward(ids[:, -self.config.sequence_len:])[:, -1, :]
            if top_k is not None:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float("inf")
            if temperature > 0:
                probs = F.softmax(logits / temperature, dim=-1)
                next_id = torch.multinomial(probs, num_samples=1, generator=gen)
            else:
                next_id = torch.argmax(logits, dim=-1, keepdim=True)
            ids = torch.cat([ids, next_id], dim=1)
            yield int(next_id.item())


def build_model(config: GPTConfig, device: torch.device | str = "cpu", seed: int | None = None) -> GPT:
    """A freshly initialised model on `device` (built on meta first, so no memory is spent twice)."""
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights(seed=seed)
    return model


def model_of(config: GPTConfig, weights: dict[str, torch.Tensor]) -> GPT:
    """A model whose parameters are `weights` themselves, not a copy (evaluating weights held elsewhere: the
    server's global model costs no second copy); only the rotary tables are allocated."""
    with torch.device("meta"):
        model = GPT(config)
    head_dim = config.n_embd // config.n_head
    model.cos, model.sin = GPT._rotary_tables(model.rotary_seq_len, head_dim,
                                              device=next(iter(weights.values())).device)
    model.load_state_dict(weights, assign=True)
    return model


def count_params(config: GPTConfig) -> int:
    """Parameter count of a config, computed on the meta device (no memory)."""
    with torch.device("meta"):
        return GPT(config).num_params()


if __name__ == "__main__":
    for depth in (20, 32):
        cfg = config_from_depth(depth)
        print(f"d{depth}: {count_params(cfg):,} parameters ({cfg})")
