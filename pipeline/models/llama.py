"""Llama: the modern decoder, in Hugging Face `LlamaForCausalLM`'s conventions.

Pre-norm blocks with RMSNorm (computed in fp32, then scaled by its weight in the input's
dtype), rotary position embeddings (RoPE: `rotate_half` over the two halves of each head,
frequencies rope_theta^(-2i/head_dim)), grouped-query attention (`n_kv_head` key/value heads,
each shared by n_head / n_kv_head query heads), a SwiGLU MLP (down(silu(gate(x)) · up(x))), no
biases, input and output embeddings tied or not, and HF's initialisation (every matrix N(0, 0.02),
norms 1). Causal attention is torch's scaled_dot_product_attention: flash attention on GPUs.

Parameter names are HF's (`model.embed_tokens`, `model.layers.N.self_attn.q_proj`, …,
`model.norm`, `lm_head`) plus `start_vector`: position 0's input, a learned vector instead of a
BOS token, as in gpt.py. A Hugging Face checkpoint (`arpipe export-hf`, pipeline/hf.py) is these
weights with the start vector as the input embedding row of a BOS token at position 0: RoPE
positions then agree, since position p's input is x_{p-1} here and the token after BOS there.

Sampling keeps a KV cache of n_kv_head heads. RoPE has no table that ends, but a sample longer
than the training context slides a window (base.py's `sample`) so positions stay in the range
the model was trained on.
"""

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from pipeline import ArpipeError
from pipeline.models.base import ARModel
from pipeline.models.loss import VocabHead


class LlamaConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Literal["llama"] = "llama"
    n_layer: int = Field(6, ge=1)
    n_head: int = Field(6, ge=1)
    n_kv_head: int | None = Field(None, ge=1)  # key/value heads (grouped-query attention); None: n_head
    d_model: int = Field(384, ge=1)
    d_ff: int | None = Field(None, ge=1)  # the MLP's hidden width; None: 8/3·d_model rounded up to 64
    rope_theta: float = Field(10000.0, gt=0)
    norm_eps: float = Field(1e-5, gt=0)
    tie_embeddings: bool = True  # the output layer is the input embedding

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def ff_width(self) -> int:
        return self.d_ff or 64 * math.ceil(8 * self.d_model / 3 / 64)


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (T, head_dim) of the rotation at each position, in fp32 (computed, never stored
    as a buffer that bf16 training would round)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim)
    angles = positions.float()[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], -1)
    return angles.cos(), angles.sin()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, heads, T, head_dim) rotated by position: HF's apply_rotary_pos_emb with rotate_half."""
    x1, x2 = x.chunk(2, -1)
    return x * cos.to(x.dtype) + torch.cat([-x2, x1], -1) * sin.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.n_head, self.n_kv = cfg.n_head, cfg.kv_heads
        self.head_dim = cfg.d_model // cfg.n_head
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_head * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, self.n_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, self.n_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_head * self.head_dim, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: dict | None = None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        mask = None
        if cache is not None:
            start = cache["length"]
            cache["k"][:, :, start : start + T] = k
            cache["v"][:, :, start : start + T] = v
            k, v = cache["k"][:, :, : start + T], cache["v"][:, :, : start + T]
            # new position i may see cached positions 0..start+i
            mask = torch.arange(start + T, device=x.device)[None, :] <= start + torch.arange(T, device=x.device)[:, None]
        # query head h reads key/value head h // (n_head / n_kv), as HF's repeat_kv
        k, v = (t.repeat_interleave(self.n_head // self.n_kv, dim=1) for t in (k, v))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.ff_width, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.ff_width, bias=False)
        self.down_proj = nn.Linear(cfg.ff_width, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, h, cos, sin, cache=None):
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class Decoder(nn.Module):
    """HF's LlamaModel: the embedding, the layers and the final norm (named as there)."""

    def __init__(self, cfg: LlamaConfig, vocab_size: int):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)


class Llama(ARModel):
    Config = LlamaConfig
    long_samples = "window"
    checkpointable = True

    def __init__(self, cfg: LlamaConfig, vocab_size: int, shape: tuple[int, ...]):
        super().__init__(vocab_size, shape)
        if cfg.d_model % cfg.n_head or (cfg.d_model // cfg.n_head) % 2:
            raise ArpipeError(f"model.d_model ({cfg.d_model}) must be model.n_head ({cfg.n_head}) × an even "
                              f"head size (RoPE rotates pairs)")
        if cfg.n_head % cfg.kv_heads:
            raise ArpipeError(f"model.n_head ({cfg.n_head}) must be a multiple of model.n_kv_head ({cfg.n_kv_head})")
        self.cfg = cfg
        self.context = self.num_vars  # images reach a 1-D model already flattened in their ordering
        self.start_vector = nn.Parameter(torch.zeros(cfg.d_model))
        self.model = Decoder(cfg, vocab_size)
        self.lm_head = VocabHead(cfg.d_model, vocab_size)
        for module in self.modules():  # HF's _init_weights (initializer_range 0.02)
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, 0.0, 0.02)
        nn.init.normal_(self.start_vector, 0.0, 0.02)  # an embedding row, as the BOS row it exports as
        if cfg.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def train_flops_per_variable(self) -> float:
        """6·N for the matrices (an untied input embedding is a lookup, not a matmul) plus
        attention's QKᵀ and AV, 12·L·d·T (as gpt.py)."""
        n = sum(p.numel() for p in self.parameters())
        if not self.cfg.tie_embeddings:
            n -= self.model.embed_tokens.weight.numel()
        return 6.0 * n + 12.0 * self.cfg.n_layer * self.cfg.d_model * self.context

    def _run(self, h: torch.Tensor, positions: torch.Tensor, caches=None) -> torch.Tensor:
        """The final hidden states (after the last norm) of inputs h at `positions`."""
        cos, sin = rope(positions, self.cfg.d_model // self.cfg.n_head, self.cfg.rope_theta)
        for i, layer in enumerate(self.model.layers):
            h = self.run_block(layer, h, cos, sin) if caches is None else layer(h, cos, sin, caches[i])
        return self.model.norm(h)

    def _hidden(self, x: torch.Tensor) -> torch.Tensor:
        B, T = x.shape
        h = torch.cat([self.start_vector.expand(B, 1, -1), self.model.embed_tokens(x[:, :-1])], dim=1)
        return self._run(h, torch.arange(T, device=x.device))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.from_sequence(self.lm_head(self._hidden(self.to_sequence(x))))

    def mean_nll(self, x: torch.Tensor) -> torch.Tensor:
        x = self.to_sequence(x)
        return self.lm_head(self._hidden(x).flatten(0, 1), x.flatten())

    def start(self, n: int):
        p = self.model.embed_tokens.weight
        shape = (n, self.cfg.kv_heads, self.context, self.cfg.d_model // self.cfg.n_head)
        layers = [{"k": p.new_zeros(shape), "v": p.new_zeros(shape), "length": 0} for _ in self.model.layers]
        cache = {"layers": layers, "length": 0}
        return cache, self._advance(cache, self.start_vector.expand(n, 1, -1))

    def step(self, cache: dict, tokens: torch.Tensor) -> torch.Tensor:
        return self._advance(cache, self.model.embed_tokens(tokens))

    def _advance(self, cache: dict, h: torch.Tensor) -> torch.Tensor:
        start, T = cache["length"], h.shape[1]
        hidden = self._run(h, torch.arange(start, start + T, device=h.device), cache["layers"])
        cache["length"] += T
        for layer in cache["layers"]:
            layer["length"] = cache["length"]
        return self.lm_head(hidden[:, -1])
