"""GRU: the small recurrent baseline. Embedding, stacked GRU layers, a linear head.

Position p's input is the embedding of x_{p-1} and position 0's is a learned start vector, so
the output at p gives p(x_p | x_<p) like every arpipe model. Sampling carries the hidden state:
O(layers) work per variable at any sequence length, the recurrent counterpart of a KV cache.
"""

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from pipeline.models.base import ARModel


class GRUConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Literal["gru"] = "gru"
    n_layer: int = Field(2, ge=1)
    d_model: int = Field(256, ge=1)  # embedding and hidden size
    dropout: float = Field(0.0, ge=0, lt=1)  # between GRU layers


class GRU(ARModel):
    Config = GRUConfig
    long_samples = "native"

    def __init__(self, cfg: GRUConfig, vocab_size: int, shape: tuple[int, ...]):
        super().__init__(vocab_size, shape)
        self.cfg = cfg
        self.start_vector = nn.Parameter(torch.zeros(cfg.d_model))
        self.embed = nn.Embedding(vocab_size, cfg.d_model)
        self.rnn = nn.GRU(cfg.d_model, cfg.d_model, cfg.n_layer, batch_first=True,
                          dropout=cfg.dropout if cfg.n_layer > 1 else 0.0)  # torch warns on 1 layer
        self.head = nn.Linear(cfg.d_model, vocab_size)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        x = self.to_sequence(x)
        h = torch.cat([self.start_vector.expand(x.shape[0], 1, -1), self.embed(x[:, :-1])], 1)
        out, _ = self.rnn(h)
        return self.from_sequence(self.head(out))

    def start(self, n: int):
        cache = {"hidden": None}  # None: zeros, as in the full pass
        return cache, self._advance(cache, self.start_vector.expand(n, 1, -1))

    def step(self, cache: dict, tokens: torch.Tensor) -> torch.Tensor:
        return self._advance(cache, self.embed(tokens))

    def _advance(self, cache: dict, h: torch.Tensor) -> torch.Tensor:
        out, cache["hidden"] = self.rnn(h, cache["hidden"])
        return self.head(out[:, -1])
