"""FVSBN, the fully visible sigmoid belief net (Frey, 1998): each conditional is a softmax of a
linear function of the variables before it,

    p(x_i | x_<i) = softmax(b_i + Σ_{j<i} W_ij · onehot(x_j)),

in the data's ordering. For binary data this is the classic logistic regression on x_<i
(onehot(x) = (1 − x, x) spans the same functions as (1, x)). The inputs are one-hot, not scaled
values, so the same model serves any fixed-length token vector, where ids are categories and
not intensities; the price is one weight per pair of (variable, level), (D·V)² in all, which
is fine for binarised 28×28 images (2.5M) and refused when it would not fit in memory.

All conditionals are one masked matrix product (teacher forcing). Sampling keeps the running
sums b + Σ_{j<i} W_ij·onehot(x_j) for every later variable: each new variable adds one column,
O(D·V) work per variable instead of a full product.
"""

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict
from torch import nn

from pipeline import ArpipeError
from pipeline.models.base import ARModel

MAX_WEIGHTS = 2**30  # 4 GiB of fp32 weights: beyond this the quadratic table is a mistake, not a model


class FVSBNConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Literal["fvsbn"] = "fvsbn"


def check_tokens(x: torch.Tensor, vocab_size: int) -> None:
    """A clear error for ids outside the vocabulary (an index error on a GPU is a device assert)."""
    if x.numel() and (x.min() < 0 or x.max() >= vocab_size):
        raise ArpipeError(f"token ids must lie in 0..{vocab_size - 1}, found {x.min().item()}..{x.max().item()}")


def one_hot(x: torch.Tensor, vocab_size: int, dtype: torch.dtype) -> torch.Tensor:
    """(batch, *shape) token ids -> (batch, D·V) one-hot rows, variable-major."""
    check_tokens(x, vocab_size)
    return F.one_hot(x.flatten(1), vocab_size).flatten(1).to(dtype)


class FVSBN(ARModel):
    Config = FVSBNConfig
    weights_used_once_per_item = True

    def __init__(self, cfg: FVSBNConfig, vocab_size: int, shape: tuple[int, ...]):
        super().__init__(vocab_size, shape)
        self.cfg = cfg
        n = self.num_vars * vocab_size
        if n * n > MAX_WEIGHTS:
            raise ArpipeError(f"fvsbn on {self.num_vars} variables × {vocab_size} levels needs {n * n:.1e} weights "
                              f"(one per pair of variable and level); shard with fewer --levels or use made/nade")
        self.weight = nn.Parameter(torch.randn(n, n) * 0.01)
        self.bias = nn.Parameter(torch.zeros(n))
        var = torch.arange(n) // vocab_size
        # row (i, v) reads column (j, u) only for j < i: strictly lower block-triangular
        self.register_buffer("mask", var[:, None] > var[None, :], persistent=False)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        h = one_hot(x, self.vocab_size, self.weight.dtype)
        out = F.linear(h, self.weight * self.mask, self.bias)
        return out.view(x.shape[0], *self.shape, self.vocab_size)

    def start(self, n: int):
        V = self.vocab_size
        sums = self.bias.view(1, self.num_vars, V).repeat(n, 1, 1)  # (n, D, V): every conditional so far
        cache = {"sums": sums, "weight": self.weight * self.mask, "length": 0}
        return cache, sums[:, 0]

    def step(self, cache: dict, tokens: torch.Tensor) -> torch.Tensor:
        for t in tokens.unbind(1):  # variable `length` takes value t: add its column to every sum
            column = cache["weight"][:, cache["length"] * self.vocab_size + t]  # (D·V, n)
            cache["sums"] += column.T.view_as(cache["sums"])
            cache["length"] += 1
        return cache["sums"][:, cache["length"]]
