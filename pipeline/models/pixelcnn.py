"""PixelCNN (van den Oord et al., 2016): masked convolutions over the image itself.

The model's ordering is raster with R→G→B inside a pixel, the order a convolution can mask:
the logits of sub-pixel (c, y, x) see every pixel above, the pixels to the left in row y, and
the channels before c of pixel (y, x) itself.

- Masks. A masked convolution zeroes the kernel taps after the centre in raster order. At the
  centre, the channels are split into C colour groups and output group g sees input
  groups < g (mask "A", first layer: a sub-pixel must not see itself) or <= g (mask "B", later
  layers: a group may see its own group's features, which already exclude its own input).
- Plain (gated: false): a k×k mask-A convolution, residual blocks of k×k mask-B convolutions.
  Stacked masked convolutions have a *blind spot*: the receptive field grows up and to the
  left but only one pixel per layer up-right, so nearby pixels up and to the right are missed.
- Gated (gated: true, the default): a vertical stack sees the rows above (a (k//2+1)×k
  convolution whose output is shifted down one row before anything else reads it) and a
  horizontal stack sees the row to the left (1×(k//2+1), masked); the vertical stack feeds the
  horizontal one, never the reverse. The receptive field is the whole window above and to the
  left (r0 + n_layer·r + 1 rows up, r0 + n_layer·r columns to each side, for kernel radii r0 of
  the first layer and r of the others): no blind spot. Units are tanh(a)·σ(b); the horizontal
  stack is residual.
- Output: two 1×1 mask-B convolutions to C·levels channels, a levels-way softmax per sub-pixel.

Inputs are the tokens scaled to [-1, 1], one feature per channel: neighbouring levels are
similar intensities, which a scaled input tells the first layer for free (an embedding would
have to learn it, slowly for 256 levels).

Sampling uses the base class's full recompute: one forward pass per sub-pixel, O(D) passes for
D sub-pixels. There is no incremental path: a cache would have to keep every layer's
activations per row and update, per new sub-pixel, the parts of every later layer whose
receptive field holds it, in a schedule that follows the kernels and the vertical stack's
shift (Ramachandran et al., 2017, "Fast Generation for Convolutional Autoregressive Models").
So the contract tests check its cached-vs-full sampling not at all (they would compare the
recompute with itself). Activation checkpointing recomputes each layer (gated: both stacks).
"""

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from pipeline import ArpipeError
from pipeline.models.base import ARModel


class PixelCNNConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Literal["pixelcnn"] = "pixelcnn"
    gated: bool = True  # vertical + horizontal stacks (no blind spot); false: plain masked convolutions
    n_layer: int = Field(8, ge=0)  # layers after the first (mask A) one
    hidden: int = Field(64, ge=1)  # channels; divisible by the image's channels (colour groups)
    kernel: int = Field(3, ge=1)  # kernel of the later layers (odd)
    first_kernel: int = Field(7, ge=1)  # kernel of the first, mask-A layer (odd)
    head: int = Field(128, ge=1)  # channels of the 1×1 output layer


def centre_mask(in_ch: int, out_ch: int, colours: int, include_own: bool, out_blocks: int = 1) -> torch.Tensor:
    """(out, in) bool: which input channels an output channel may read at its own pixel.
    Channels form `colours` contiguous groups (R, G, B); outputs may consist of `out_blocks`
    consecutive blocks (the a and b halves of a gated unit), each grouped the same way."""
    g_in = torch.arange(in_ch) // (in_ch // colours)
    per_block = out_ch // out_blocks
    g_out = (torch.arange(out_ch) % per_block) // (per_block // colours)
    return g_out[:, None] >= g_in[None] if include_own else g_out[:, None] > g_in[None]


class MaskedConv2d(nn.Conv2d):
    """A convolution whose kernel taps after `centre` (raster order) are zero and whose centre tap
    follows the colour groups (mask A: strictly earlier groups, B: also the own group).
    `pad` is F.pad's (left, right, top, bottom), so one class serves k×k and 1×k kernels."""

    def __init__(self, in_ch: int, out_ch: int, kernel: tuple[int, int], centre: tuple[int, int],
                 pad: tuple[int, int, int, int], colours: int, mask_type: str, out_blocks: int = 1):
        super().__init__(in_ch, out_ch, kernel)
        self.pad = pad
        kh, kw = kernel
        mask = torch.zeros(out_ch, in_ch, kh, kw)
        before = torch.arange(kh * kw).view(kh, kw) < centre[0] * kw + centre[1]
        mask[:, :, before] = 1
        mask[:, :, centre[0], centre[1]] = centre_mask(in_ch, out_ch, colours, mask_type == "B", out_blocks).float()
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the mask is a buffer that DeepSpeed's bf16 leaves in float32: multiply in the weight's type
        return F.conv2d(F.pad(x, self.pad), self.weight * self.mask.to(self.weight.dtype), self.bias)


def square(in_ch, out_ch, k, colours, mask_type, out_blocks=1) -> MaskedConv2d:
    """k×k, centred, same-size output."""
    return MaskedConv2d(in_ch, out_ch, (k, k), (k // 2, k // 2), (k // 2,) * 4, colours, mask_type, out_blocks)


class GatedLayer(nn.Module):
    """One layer of both stacks. Layer 0 reads the image (mask A, no residual); later ones read
    the previous layer's stacks (mask B, residual horizontal stack)."""

    def __init__(self, in_ch: int, hidden: int, k: int, colours: int, first: bool):
        super().__init__()
        r = k // 2
        self.first = first
        # rows y-r..y, all columns x-r..x+r: only used after the one-row shift down
        self.v_conv = nn.Conv2d(in_ch, 2 * hidden, (r + 1, k))
        self.v_pad = (r, r, r, 0)
        self.v_to_h = nn.Conv2d(2 * hidden, 2 * hidden, 1)  # reads rows strictly above: no mask
        self.h_conv = MaskedConv2d(in_ch, 2 * hidden, (1, r + 1), (0, r), (r, 0, 0, 0), colours,
                                   "A" if first else "B", out_blocks=2)
        self.h_out = square(hidden, hidden, 1, colours, "B")

    def forward(self, v: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        v_pre = self.v_conv(F.pad(v, self.v_pad))
        v_down = F.pad(v_pre, (0, 0, 1, 0))[:, :, :-1]  # row y now holds what rows < y gave
        h_pre = self.h_conv(h) + self.v_to_h(v_down)
        h_new = self.h_out(gate(h_pre))
        return gate(v_pre), h_new if self.first else h + h_new


def gate(t: torch.Tensor) -> torch.Tensor:
    a, b = t.chunk(2, dim=1)
    return torch.tanh(a) * torch.sigmoid(b)


class PixelCNN(ARModel):
    Config = PixelCNNConfig
    checkpointable = True
    required_ordering = "raster"  # the ordering its masks implement; the trainer and eval check the data's

    def __init__(self, cfg: PixelCNNConfig, vocab_size: int, shape: tuple[int, ...]):
        super().__init__(vocab_size, shape)
        if len(self.shape) != 3:
            raise ArpipeError(f"pixelcnn needs image data of shape (channels, height, width), got shape {self.shape}")
        C = self.shape[0]
        if cfg.hidden % C or cfg.head % C:
            raise ArpipeError(f"model.hidden ({cfg.hidden}) and model.head ({cfg.head}) must be divisible by "
                              f"the {C} image channels (one group per colour)")
        if cfg.kernel % 2 == 0 or cfg.first_kernel % 2 == 0:
            raise ArpipeError("model.kernel and model.first_kernel must be odd")
        self.cfg, self.colours = cfg, C
        if cfg.gated:
            self.layers = nn.ModuleList(GatedLayer(C if i == 0 else cfg.hidden, cfg.hidden,
                                                   cfg.first_kernel if i == 0 else cfg.kernel, C, first=i == 0)
                                        for i in range(cfg.n_layer + 1))
        else:
            self.layers = nn.ModuleList([square(C, cfg.hidden, cfg.first_kernel, C, "A")] + [
                square(cfg.hidden, cfg.hidden, cfg.kernel, C, "B") for _ in range(cfg.n_layer)])
        self.head = nn.Sequential(nn.ReLU(), square(cfg.hidden, cfg.head, 1, C, "B"), nn.ReLU(),
                                  square(cfg.head, C * vocab_size, 1, C, "B"))

    def summary(self) -> dict:
        return {"ordering": self.required_ordering, "gated": self.cfg.gated}

    def train_flops_per_variable(self) -> float:
        # a convolution uses each weight once per pixel (masked taps are computed too), and a
        # pixel holds C variables
        return 6.0 * sum(p.numel() for p in self.parameters()) / self.shape[0]

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        # from_sequence gives channels-last strides (ambiguous ones when C = 1, which .contiguous()
        # keeps), and convolutions and activations round differently per memory format: the same
        # pixels would get logits that differ in the last bit. A fresh standard layout avoids it.
        u = x.to(torch.float32, memory_format=torch.contiguous_format) * (2 / (self.vocab_size - 1)) - 1
        return self.scaled_logits(u.to(self.head[-1].weight.dtype))  # bfloat16 when DeepSpeed trains in bf16

    def scaled_logits(self, u: torch.Tensor) -> torch.Tensor:
        """Logits (B, C, H, W, vocab) from the scaled input u (B, C, H, W); differentiable in u,
        which the causality tests use."""
        if self.cfg.gated:
            v = h = u
            for layer in self.layers:
                v, h = self.run_block(layer, v, h)
        else:
            h = self.layers[0](u)
            for layer in self.layers[1:]:
                h = self.run_block(lambda h, layer=layer: h + layer(F.relu(h)), h)
        B, _, H, W = u.shape
        out = self.head(h).view(B, self.colours, self.vocab_size, H, W)
        return out.permute(0, 1, 3, 4, 2)

    # The data's rows are raster with the channel innermost; the model's tensors are (C, H, W).
    def to_sequence(self, t: torch.Tensor) -> torch.Tensor:
        return t.movedim(1, 3).flatten(1, 3)

    def from_sequence(self, t: torch.Tensor) -> torch.Tensor:
        C, H, W = self.shape
        return t.unflatten(1, (H, W, C)).movedim(3, 1)
