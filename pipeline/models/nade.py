"""NADE (Larochelle & Murray, 2011): one hidden layer whose weights are shared by all conditionals,

    a_i = c + Σ_{j<i} W_j[x_j],    h_i = σ(a_i),    p(x_i | x_<i) = softmax(b_i + V_i h_i),

in the data's ordering, with W_j[v] the hidden layer's weights for variable j taking level v
(one-hot inputs, as in fvsbn.py: categories, not intensities). Because a_{i+1} = a_i + W_i[x_i],
all D conditionals cost O(D·H) together instead of O(D²·H): the teacher-forcing pass gathers the
D contributions W_j[x_j] and takes their exclusive prefix sum; sampling carries a_i and adds one
row per variable. tests/unit/test_classic.py checks both against the per-conditional formula.
"""

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from pipeline.models.base import ARModel
from pipeline.models.fvsbn import check_tokens


class NADEConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Literal["nade"] = "nade"
    hidden: int = Field(500, ge=1)  # H, the shared hidden layer's width


class NADE(ARModel):
    Config = NADEConfig
    weights_used_once_per_item = True

    def __init__(self, cfg: NADEConfig, vocab_size: int, shape: tuple[int, ...]):
        super().__init__(vocab_size, shape)
        self.cfg = cfg
        D, V, H = self.num_vars, vocab_size, cfg.hidden
        # a_i sums up to D-1 rows: std 1/sqrt(D) keeps it O(1), so σ starts unsaturated
        self.W = nn.Parameter(torch.randn(D, V, H) / D**0.5)
        self.c = nn.Parameter(torch.zeros(H))
        self.V = nn.Parameter(torch.randn(D, V, H) / H**0.5)
        self.b = nn.Parameter(torch.zeros(D, V))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        check_tokens(x, self.vocab_size)
        # a_i = c + Σ_{j<i} W_j[x_j] is a prefix sum of the rows W_{i-1}[x_{i-1}] (a zero row for
        # i = 0): shifting the small table and the tokens, not the (B, D, H) sums, saves a copy
        shifted_W = F.pad(self.W[:-1], (0, 0, 0, 0, 1, 0))  # (D, V, H): row i is W_{i-1}
        shifted_x = F.pad(x.flatten(1)[:, :-1], (1, 0))  # (B, D): column i is x_{i-1}
        a = self.c + shifted_W[torch.arange(self.num_vars, device=x.device), shifted_x].cumsum(1)
        logits = torch.einsum("bdh,dvh->bdv", torch.sigmoid(a), self.V) + self.b
        return logits.view(x.shape[0], *self.shape, self.vocab_size)

    def _logits(self, i: int, a: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(a) @ self.V[i].T + self.b[i]

    def start(self, n: int):
        cache = {"a": self.c.expand(n, -1).clone(), "length": 0}
        return cache, self._logits(0, cache["a"])

    def step(self, cache: dict, tokens: torch.Tensor) -> torch.Tensor:
        for t in tokens.unbind(1):  # a_{i+1} = a_i + W_i[x_i]: O(H) per variable
            cache["a"] = cache["a"] + self.W[cache["length"], t]
            cache["length"] += 1
        return self._logits(cache["length"], cache["a"])
