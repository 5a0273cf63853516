"""GPT: a decoder-only transformer with causal SDPA attention and a KV cache for sampling.

Pre-LayerNorm blocks, learned positions, GELU MLP, tied input/output embeddings, GPT-2's
initialisation (residual projections scaled by 1/sqrt(2·layers)). Position p's input is the
embedding of x_{p-1} and position 0's is a learned start vector, so logits at p give
p(x_p | x_<p) for every p. The learned positions end at the training context: samples longer
than that slide a window (base.py's `sample`).
"""

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict
from torch import nn

from pipeline.models.base import ARModel
from pipeline.models.loss import VocabHead


class GPTConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Literal["gpt"] = "gpt"
    n_layer: int = 6
    n_head: int = 6
    d_model: int = 384
    dropout: float = 0.0


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor, cache: dict | None = None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.n_head, -1).transpose(1, 2) for t in self.qkv(x).split(C, dim=-1))
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        else:
            start = cache["length"]
            cache["k"][:, :, start : start + T] = k
            cache["v"][:, :, start : start + T] = v
            k, v = cache["k"][:, :, : start + T], cache["v"][:, :, : start + T]
            # new position i may see cached positions 0..start+i
            mask = torch.arange(start + T, device=x.device)[None, :] <= start + torch.arange(T, device=x.device)[:, None]
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(cfg.d_model), nn.LayerNorm(cfg.d_model)
        self.attn = Attention(cfg)
        self.mlp = nn.Sequential(nn.Linear(cfg.d_model, 4 * cfg.d_model), nn.GELU(),
                                 nn.Linear(4 * cfg.d_model, cfg.d_model), nn.Dropout(cfg.dropout))

    def forward(self, x, cache=None):
        x = x + self.attn(self.ln1(x), cache)
        return x + self.mlp(self.ln2(x))


class GPT(ARModel):
    Config = GPTConfig
    long_samples = "window"
    checkpointable = True

    def __init__(self, cfg: GPTConfig, vocab_size: int, shape: tuple[int, ...]):
        super().__init__(vocab_size, shape)
        if cfg.d_model % cfg.n_head:
            raise ValueError(f"d_model {cfg.d_model} is not divisible by n_head {cfg.n_head}")
        self.cfg = cfg
        self.context = self.num_vars  # images reach a 1-D model already flattened in their ordering
        self.start_vector = nn.Parameter(torch.zeros(cfg.d_model))
        self.wte = nn.Embedding(vocab_size, cfg.d_model)
        self.wpe = nn.Embedding(self.context, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = VocabHead(cfg.d_model, vocab_size)
        self.head.weight = self.wte.weight
        self.apply(self._init)
        for name, p in self.named_parameters():
            if name.endswith(("attn.proj.weight", "mlp.2.weight")):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * cfg.n_layer))

    def train_flops_per_variable(self) -> float:
        """6·N for the matrices (the position table is a lookup, not a matmul) plus attention's
        QKᵀ and AV: 2·2·d·T per layer forward at full context, ×3 with the backward pass
        (PaLM's 6N + 12·L·d·T)."""
        n = sum(p.numel() for p in self.parameters()) - self.wpe.weight.numel()
        return 6.0 * n + 12.0 * self.cfg.n_layer * self.cfg.d_model * self.context

    @staticmethod
    def _init(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, 0.0, 0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def _run(self, h: torch.Tensor, positions: torch.Tensor, caches=None) -> torch.Tensor:
        """The final hidden states (after ln_f) of inputs h at `positions`."""
        h = self.drop(h + self.wpe(positions))
        for i, block in enumerate(self.blocks):
            h = self.run_block(block, h) if caches is None else block(h, caches[i])
        return self.ln_f(h)

    def _hidden(self, x: torch.Tensor) -> torch.Tensor:
        B, T = x.shape
        h = torch.cat([self.start_vector.expand(B, 1, -1), self.wte(x[:, :-1])], dim=1)
        return self._run(h, torch.arange(T, device=x.device))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.from_sequence(self.head(self._hidden(self.to_sequence(x))))

    def mean_nll(self, x: torch.Tensor) -> torch.Tensor:
        x = self.to_sequence(x)
        return self.head(self._hidden(x).flatten(0, 1), x.flatten())

    def start(self, n: int):
        p = self.start_vector
        shape = (n, self.cfg.n_head, self.context, self.cfg.d_model // self.cfg.n_head)
        layers = [{"k": p.new_zeros(shape), "v": p.new_zeros(shape), "length": 0} for _ in self.blocks]
        cache = {"layers": layers, "length": 0}
        return cache, self._advance(cache, p.expand(n, 1, -1))

    def step(self, cache: dict, tokens: torch.Tensor) -> torch.Tensor:
        return self._advance(cache, self.wte(tokens))

    def _advance(self, cache: dict, h: torch.Tensor) -> torch.Tensor:
        start, T = cache["length"], h.shape[1]
        hidden = self._run(h, torch.arange(start, start + T, device=h.device), cache["layers"])
        cache["length"] += T
        for layer in cache["layers"]:
            layer["length"] = cache["length"]
        return self.head(hidden[:, -1])
