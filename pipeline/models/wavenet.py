"""WaveNet: stacks of dilated causal convolutions with gated units, residual and skip paths, and
a 256-way softmax over μ-law levels (van den Oord et al., 2016).

Each layer is a kernel-2 convolution with dilation d: its output at time t reads its input at
t - d and t. Dilations run 1, 2, …, 2^(L-1) in each of S stacks, so the prediction of x_t sees
the receptive_field = S·(2^L − 1) + 1 samples x_{t-R} … x_{t-1} (the input is shifted by one
inside the model; position 0 reads a learned start vector).

Generation uses per-layer activation queues (Paine et al., 2016, "Fast WaveNet"): the layer of
dilation d keeps the last d inputs it saw in a ring buffer, so one new sample costs one
two-tap product per layer — O(layers) work, not a pass over the receptive field. The full pass
and the step run the same `GatedLayer.forward`, with the tap at t - d taken from a shifted
copy of the sequence or from the queue.
"""

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from pipeline.models.base import ARModel


class WaveNetConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Literal["wavenet"] = "wavenet"
    stacks: int = Field(2, ge=1)  # repeats of the dilation cycle
    layers_per_stack: int = Field(10, ge=1, le=20)  # dilations 1, 2, …, 2^(layers_per_stack-1)
    residual_channels: int = Field(64, ge=1)
    gate_channels: int = Field(64, ge=1)  # the tanh and the sigmoid half each have this many
    skip_channels: int = Field(256, ge=1)


class GatedLayer(nn.Module):
    """z = tanh(W_f·[h_{t-d}, h_t]) ⊙ σ(W_g·[h_{t-d}, h_t]); z feeds the skip sum and, except in
    the last layer (whose residual output nothing reads), the residual stream h + W_r·z."""

    def __init__(self, cfg: WaveNetConfig, dilation: int, last: bool):
        super().__init__()
        self.dilation, self.skip_channels = dilation, cfg.skip_channels
        self.conv = nn.Linear(2 * cfg.residual_channels, 2 * cfg.gate_channels)  # the two taps of the conv
        self.out = nn.Linear(cfg.gate_channels, cfg.skip_channels + (0 if last else cfg.residual_channels))

    def forward(self, past: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """past = h at t - d, h at t (channels last); returns the residual stream and the skip output."""
        f, g = self.conv(torch.cat([past, h], -1)).chunk(2, -1)
        out = self.out(torch.tanh(f) * torch.sigmoid(g))
        skip, residual = out.split([self.skip_channels, out.shape[-1] - self.skip_channels], -1)
        return (h + residual if residual.shape[-1] else h), skip


class WaveNet(ARModel):
    Config = WaveNetConfig
    long_samples = "native"
    checkpointable = True

    def __init__(self, cfg: WaveNetConfig, vocab_size: int, shape: tuple[int, ...]):
        super().__init__(vocab_size, shape)
        self.cfg = cfg
        dilations = [2**i for _ in range(cfg.stacks) for i in range(cfg.layers_per_stack)]
        self.receptive_field = sum(dilations) + 1
        self.start_vector = nn.Parameter(torch.zeros(cfg.residual_channels))
        self.embed = nn.Embedding(vocab_size, cfg.residual_channels)
        self.layers = nn.ModuleList(GatedLayer(cfg, d, i == len(dilations) - 1) for i, d in enumerate(dilations))
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(cfg.skip_channels, cfg.skip_channels), nn.ReLU(),
                                  nn.Linear(cfg.skip_channels, vocab_size))

    def summary(self) -> dict:
        return {"receptive_field": self.receptive_field}

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        x = self.to_sequence(x)
        B = x.shape[0]
        h = torch.cat([self.start_vector.expand(B, 1, -1), self.embed(x[:, :-1])], 1)  # (B, T, channels)
        skips = 0
        for layer in self.layers:
            h, skip = self.run_block(self._full_pass_layer, layer, h)
            skips = skips + skip
        return self.from_sequence(self.head(skips))

    @staticmethod
    def _full_pass_layer(layer: GatedLayer, h: torch.Tensor):
        past = F.pad(h, (0, 0, layer.dilation, 0))[:, : h.shape[1]]  # h shifted by d; zeros before the start
        return layer(past, h)

    # Fast generation: cache = one queue (dilation, n, channels) per layer and the time t.
    # Slot t % d of a layer's queue holds its input at time t - d until time t overwrites it;
    # queues start as zeros, exactly the padding the full pass sees before the start.
    def start(self, n: int):
        p = self.start_vector
        cache = {"queues": [p.new_zeros(layer.dilation, n, p.shape[0]) for layer in self.layers], "t": 0}
        return cache, self._advance(cache, p.expand(n, -1))

    def step(self, cache: dict, tokens: torch.Tensor) -> torch.Tensor:
        inputs = self.embed(tokens)  # (n, k, channels); a prefix is fed one sample at a time
        for j in range(inputs.shape[1]):
            logits = self._advance(cache, inputs[:, j])
        return logits

    def _advance(self, cache: dict, h: torch.Tensor) -> torch.Tensor:
        """The input h (n, channels) at time t through every layer; logits (n, vocab) for time t."""
        t = cache["t"]
        skips = 0
        for layer, queue in zip(self.layers, cache["queues"]):
            slot = t % layer.dilation
            h_next, skip = layer(queue[slot], h)
            queue[slot] = h  # after the read: this slot is read again at t + d
            h, skips = h_next, skips + skip
        cache["t"] += 1
        return self.head(skips)
