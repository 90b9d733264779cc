"""Built-in decoder-only language models: a Llama-style and a GPT-2-style Transformer.

Both carry their head counts on the attention module (``num_heads``,
``num_kv_heads``, ``head_dim``), which is all the partition engine needs, and
use the parameter names of common codebases (``embed``, ``attn.q_proj``,
``mlp.fc``, ``lm_head``) so that the official ``adam-mini`` package, which
matches names, recognises them too.

Public API: ``blockopt.models`` (``blockopt.bench.models`` re-exports it for old imports).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MODEL_PRESETS", "ModelConfig", "TransformerLM", "build_model"]


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a built-in model. ``style`` is ``"llama"`` (RMSNorm, RoPE, SwiGLU,
    no biases, optional GQA) or ``"gpt2"`` (LayerNorm, learned positions, GELU MLP, biases)."""

    style: str = "llama"
    vocab_size: int = 256
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None
    head_dim: int | None = None
    d_ff: int | None = None
    max_seq_len: int = 256
    tie_embeddings: bool = True

    def __post_init__(self) -> None:
        if self.style not in ("llama", "gpt2"):
            raise ValueError(f"Invalid style: {self.style!r}; allowed: 'llama', 'gpt2'")
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"Invalid {name}: {v!r}; expected a positive int")
        if self.kv_heads <= 0 or self.n_heads % self.kv_heads:
            raise ValueError(f"Invalid n_kv_heads: {self.n_kv_heads}; it must divide n_heads={self.n_heads}")
        if self.head_dim is None and self.d_model % self.n_heads:
            raise ValueError(f"Invalid n_heads: {self.n_heads}; it must divide d_model={self.d_model} (or set head_dim)")
        if self.style == "llama" and self.dh % 2:
            raise ValueError(f"Invalid head_dim: {self.dh}; RoPE needs an even head_dim")

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def dh(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    @property
    def ff(self) -> int:
        if self.d_ff:
            return self.d_ff
        if self.style == "gpt2":
            return 4 * self.d_model
        return 64 * math.ceil(8 * self.d_model / 3 / 64)  # SwiGLU: ~8/3 d, multiple of 64

    def to_dict(self) -> dict:
        return asdict(self)


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_seq_len: int, base: float = 10000.0) -> None:
        super().__init__()
        inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        t = torch.arange(max_seq_len, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)  # [T, dh/2]
        self.register_buffer("cos", freqs.cos(), persistent=False)
        self.register_buffer("sin", freqs.sin(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, H, T, dh]
        T = x.shape[-2]
        cos, sin = self.cos[:T].to(x.dtype), self.sin[:T].to(x.dtype)
        x1, x2 = x[..., 0::2], x[..., 1::2]
        out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)  # [B, H, T, dh/2, 2]
        return out.flatten(-2)


class Attention(nn.Module):
    """Causal self-attention with separate q/k/v/o projections and optional GQA."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.dh
        bias = cfg.style == "gpt2"
        self.q_proj = nn.Linear(cfg.d_model, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(cfg.d_model, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(cfg.d_model, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, cfg.d_model, bias=bias)
        self.rope = RotaryEmbedding(self.head_dim, cfg.max_seq_len) if cfg.style == "llama" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        # heads from the projections' widths (-1): under tensor parallelism a rank holds some of them
        q = self.q_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # [B, H, T, dh]
        k = self.k_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # [B, Hkv, T, dh]
        v = self.v_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        if self.rope is not None:
            q, k = self.rope(q), self.rope(k)
        if k.shape[1] != q.shape[1]:
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # [B, H, T, dh]
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, H, T, dh]
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.swiglu = cfg.style == "llama"
        bias = not self.swiglu
        if self.swiglu:
            self.gate_proj = nn.Linear(cfg.d_model, cfg.ff, bias=False)
        self.fc = nn.Linear(cfg.d_model, cfg.ff, bias=bias)
        self.proj = nn.Linear(cfg.ff, cfg.d_model, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.gate_proj(x)) * self.fc(x) if self.swiglu else F.gelu(self.fc(x), approximate="tanh")
        return self.proj(h)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        norm = (lambda: nn.RMSNorm(cfg.d_model)) if cfg.style == "llama" else (lambda: nn.LayerNorm(cfg.d_model))
        self.ln_1, self.attn, self.ln_2, self.mlp = norm(), Attention(cfg), norm(), MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class TransformerLM(nn.Module):
    """Decoder-only language model; ``forward(idx, targets=None)`` returns logits or the mean loss."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.wpe = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.style == "gpt2" else None
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.d_model) if cfg.style == "llama" else nn.LayerNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """GPT-2 initialisation: N(0, 0.02), residual projections scaled by 1/sqrt(2 * layers)."""
        resid_std = 0.02 / math.sqrt(2 * self.config.n_layers)
        for name, p in self.named_parameters():
            if p.is_meta:
                continue
            if p.dim() >= 2:
                std = resid_std if name.endswith(("o_proj.weight", "mlp.proj.weight")) else 0.02
                p.normal_(0.0, std, generator=generator)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.fill_(1.0)

    def get_input_embeddings(self) -> nn.Module:
        return self.embed

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        _B, T = idx.shape
        if T > self.config.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds max_seq_len={self.config.max_seq_len}")
        x = self.embed(idx)  # [B, T, d]
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(T, device=idx.device))
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.norm(x))  # [B, T, V]
        if targets is None:
            return logits
        return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1))


#: named sizes; ``vocab_size`` is set from the tokenizer when it is not given here
MODEL_PRESETS: dict[str, ModelConfig] = {
    "llama-tiny": ModelConfig("llama", d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=256),
    # the token-budget study (benchmarks/token_budget.py): 164k parameters, so 12 tokens per parameter fit
    "llama-micro": ModelConfig("llama", d_model=64, n_layers=3, n_heads=4, n_kv_heads=2, max_seq_len=256),
    "llama-small": ModelConfig("llama", d_model=256, n_layers=6, n_heads=8, n_kv_heads=4, max_seq_len=256),
    "llama-medium": ModelConfig("llama", d_model=384, n_layers=8, n_heads=6, n_kv_heads=2, max_seq_len=512),
    "gpt2-tiny": ModelConfig("gpt2", d_model=128, n_layers=4, n_heads=4, max_seq_len=256),
    "gpt2-small-byte": ModelConfig("gpt2", d_model=384, n_layers=6, n_heads=6, max_seq_len=256),
    # step-time models (benchmarks/step_time.py)
    "gpt2-20m": ModelConfig("gpt2", vocab_size=8192, d_model=384, n_layers=8, n_heads=6,
                            max_seq_len=256, tie_embeddings=False),
    "gpt2-160m": ModelConfig("gpt2", vocab_size=50257, d_model=768, n_layers=12, n_heads=12,
                             max_seq_len=1024, tie_embeddings=False),
    # `blockopt memory`'s default: a ~300M Llama (299M parameters, tied embeddings, GQA 16/4)
    "llama-300m": ModelConfig("llama", vocab_size=32000, d_model=1024, n_layers=24, n_heads=16, n_kv_heads=4,
                              max_seq_len=512),
    # the GPU point of the speed work: a 1.1B Llama (TinyLlama's shape: GQA 32/4, SwiGLU 5632)
    "llama-1b": ModelConfig("llama", vocab_size=32000, d_model=2048, n_layers=22, n_heads=32, n_kv_heads=4,
                            d_ff=5632, max_seq_len=2048, tie_embeddings=False),
}


def build_model(name: str, *, vocab_size: int | None = None, device: str | torch.device | None = None,
                seed: int | None = 0, **overrides) -> TransformerLM:
    """Build a preset (see :data:`MODEL_PRESETS`) with optional field overrides."""
    if name not in MODEL_PRESETS:
        raise ValueError(f"Invalid model: {name!r}; available: {', '.join(MODEL_PRESETS)}")
    cfg = MODEL_PRESETS[name]
    if vocab_size is not None:
        overrides["vocab_size"] = vocab_size
    cfg = replace(cfg, **overrides)
    gen = None
    if seed is not None:
        gen = torch.Generator().manual_seed(seed)
    with torch.device(device or "cpu"):
        model = TransformerLM(cfg)
    if gen is not None and str(device or "cpu") != "meta":
        if torch.device(device or "cpu").type == "cpu":
            model.reset_parameters(generator=gen)
        else:  # draw on CPU, so every device starts from the same weights
            _init_on_cpu(model, gen)
    return model


def _init_on_cpu(model: TransformerLM, gen: torch.Generator) -> None:
    cpu_model = TransformerLM(model.config)
    cpu_model.reset_parameters(generator=gen)
    model.load_state_dict(cpu_model.state_dict())
