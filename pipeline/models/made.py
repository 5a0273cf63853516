"""MADE (Germain et al., 2015): a masked MLP whose masks implement an ordering of the variables,
order-agnostic training, and the exact ensemble over K orderings.

Masks. Under an ordering o (o_j is the variable at position j) variable d has rank r(d), its
position. Hidden unit k of layer l has a degree m_l(k) in 0..D-2, spread evenly and the same
for every ordering. A unit reads the units below of degree <= its own (an input: rank <= m),
and output d reads the last hidden layer's units of degree < r(d). Every path from input d' to
output d climbs r(d') <= m_1 <= … <= m_L < r(d), so output o_j depends on o_<j only, at any
depth and width. Only the first and last masks depend on the ordering, so a new ordering is two
comparisons of (H, D) tables, not new weights. Inputs are one-hot (see fvsbn.py): categories,
and a given variable of level 0 still differs from one its mask hides, which order-agnostic
training relies on.

Orderings. The model owns K orderings (`orderings`), drawn from `seed` (ordering 0 is the
data's own when `data_order_first`) and saved with the weights as a buffer, so an export
evaluates identically. It orders its variables itself: to_sequence/from_sequence permute by the
*current* ordering; from_data/to_data are plain reshapes of the data rows (see base.py).

State. In training mode every forward draws the current ordering, one of the K
(`train_orderings: fixed`) or a fresh random permutation with new masks (`random`), from
torch's global RNG (which the trainer seeds and checkpoints), and keeps it until the next
forward: the training loss (base.py's `mean_nll`, through `forward(x, loss=True)`) reads the
logits and targets through to_sequence in the ordering the logits were computed in. Entering
eval mode makes o_0 current.

Direct (`direct: true`): masked input->output weights added to the MLP's output, as in the
deep AR networks MADE descends from. The MLP reaches the variable just before o_j only through
hidden units of degree exactly j-1, about one unit when H < D; on textured images the linear
path to every earlier pixel is worth many nats (see the classic-models table in the README).

Sampling in the current ordering is incremental: the first layer's pre-activations are a sum
over the given variables' columns, so each new variable adds one column (O(H_1)) and only the
next variable's output rows are computed from the upper layers (O(H·H + H_L·V)), instead of the
whole masked MLP per variable; direct weights keep running sums for every output, as FVSBN's.

Eval mode is the ensemble (K > 1): log p(x) = log((1/K) Σ_k p_{o_k}(x)), a log-sum-exp over the
members' exact log-likelihoods (a true mixture, never an average of logits). It is no single
product of conditionals, so `token_nll` puts -log p(x) in column 0 and zeros elsewhere: row sums,
which eval adds up, are exact (eval refuses partially padded rows for models that order their
variables). `sample` draws a member k per sample, then the variables in o_k. `forward` and a
sampling `prefix` use o_0: given variables that are not a prefix of every o_k make the
mixture's conditional intractable, so completions come from member 0.
"""

import math
from contextlib import contextmanager
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from pipeline.models.base import ARModel
from pipeline.models.fvsbn import one_hot


class MADEConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Literal["made"] = "made"
    hidden: list[Annotated[int, Field(ge=1)]] = Field([500], min_length=1)  # widths of the hidden layers
    orderings: int = Field(1, ge=1)  # K fixed orderings; in eval mode the model is their exact mixture
    train_orderings: Literal["fixed", "random"] = "fixed"  # per training minibatch: one of the K, or a new one
    data_order_first: bool = True  # ordering 0 is the data's own; the others are random
    seed: int = 0  # draws the orderings (not the weights: `seed` of the training config does that)
    direct: bool = False  # also masked input->output weights, an FVSBN inside (see "Direct" above)


class MaskedLinear(nn.Linear):
    """A linear layer whose weights are masked per call (the ordering may change every minibatch).
    A module of its own, so ZeRO-3 gathers its weights when it runs."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * mask, self.bias)


class MADE(ARModel):
    Config = MADEConfig
    weights_used_once_per_item = True
    orders_variables = True

    def __init__(self, cfg: MADEConfig, vocab_size: int, shape: tuple[int, ...]):
        super().__init__(vocab_size, shape)
        self.cfg = cfg
        D = self.num_vars
        widths = [D * vocab_size, *cfg.hidden, D * vocab_size]
        self.layers = nn.ModuleList(MaskedLinear(a, b) for a, b in zip(widths, widths[1:]))
        self.direct = MaskedLinear(widths[0], widths[-1], bias=False) if cfg.direct else None
        if self.direct is not None:
            nn.init.normal_(self.direct.weight, std=0.01)  # as fvsbn.py: small, so the MLP leads at first
        g = torch.Generator().manual_seed(cfg.seed)
        orders = [torch.randperm(D, generator=g) for _ in range(cfg.orderings)]
        if cfg.data_order_first:
            orders[0] = torch.arange(D)
        self.register_buffer("orderings", torch.stack(orders))  # (K, D): o_k[j] = variable at position j
        self.order = self.orderings[0]  # the current ordering (see "State" above)

    def summary(self) -> dict:
        return {"orderings": len(self.orderings), "train_orderings": self.cfg.train_orderings}

    def train(self, mode: bool = True):
        if self.training and not mode:
            self.order = self.orderings[0]
        return super().train(mode)

    # --- masks and the masked MLP
    def masks(self, order: torch.Tensor) -> list[torch.Tensor]:
        """Every layer's (out, in) bool mask for ordering `order`, inputs and outputs one-hot,
        then the direct weights' mask if the model has them."""
        D, V, device = self.num_vars, self.vocab_size, order.device
        rank = torch.empty_like(order)
        rank[order] = torch.arange(D, device=device)
        degrees = [rank] + [torch.arange(h, device=device) * max(D - 1, 0) // h for h in self.cfg.hidden]
        masks = [upper[:, None] >= lower[None, :] for lower, upper in zip(degrees, degrees[1:])]
        masks[0] = masks[0].repeat_interleave(self.vocab_size, 1)
        masks.append((rank[:, None] > degrees[-1][None, :]).repeat_interleave(self.vocab_size, 0))
        if self.direct is not None:
            masks.append((rank[:, None] > rank[None, :]).repeat_interleave(V, 0).repeat_interleave(V, 1))
        return masks

    def logits_in(self, x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
        """Logits (B, *shape, V) of every conditional under ordering `order`, in the layout."""
        inputs = h = one_hot(x, self.vocab_size, self.layers[0].weight.dtype)
        masks = self.masks(order.to(x.device))
        for i, (layer, mask) in enumerate(zip(self.layers, masks)):
            h = layer(h if i == 0 else F.relu(h), mask)
        if self.direct is not None:
            h = h + self.direct(inputs, masks[-1])
        return h.view(x.shape[0], *self.shape, self.vocab_size)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            if self.cfg.train_orderings == "random":
                self.order = torch.randperm(self.num_vars)
            else:
                self.order = self.orderings[torch.randint(len(self.orderings), ()).item()]
        return self.logits_in(x, self.order)

    # --- the ordering: data rows are a plain layout; the sequence is the layout permuted by o
    def to_sequence(self, t: torch.Tensor) -> torch.Tensor:
        return super().to_sequence(t)[:, self.order.to(t.device)]

    def from_sequence(self, t: torch.Tensor) -> torch.Tensor:
        return super().from_sequence(t[:, torch.argsort(self.order).to(t.device)])

    def from_data(self, rows: torch.Tensor) -> torch.Tensor:
        return ARModel.from_sequence(self, rows)

    def to_data(self, x: torch.Tensor) -> torch.Tensor:
        return ARModel.to_sequence(self, x)

    # --- completing data: an ordering that puts the given variables first
    def ordering_with_first(self, first: torch.Tensor) -> tuple[torch.Tensor, str] | None:
        """An ordering whose first variables are exactly those marked in `first` ((D,) bool over
        the layout) and what it is: one of the K orderings whose start they are, else for a model
        trained order-agnostically on random orderings (whose masks were trained for any
        ordering) the marked variables, then the others, each in layout order. None if neither."""
        first = first.to(self.orderings.device)
        n = int(first.sum())
        for k, order in enumerate(self.orderings):
            if first[order[:n]].all():
                return order, f"its ordering {k} of {len(self.orderings)}"
        if self.cfg.train_orderings == "random":
            order = torch.cat([first.nonzero()[:, 0], (~first).nonzero()[:, 0]])
            return order, "a new ordering with the given variables first (the model was trained on random orderings)"
        return None

    @contextmanager
    def in_order(self, order: torch.Tensor):
        """Run (eval mode: forward, to_sequence, sample with a prefix) in `order`; o_0 after."""
        self.order = order.to(self.orderings.device)
        try:
            yield self
        finally:
            self.order = self.orderings[0]
    # --- incremental sampling in the current ordering (see "Sampling" above)
    def start(self, n: int):
        order = self.order.to(self.orderings.device)
        masks = self.masks(order)
        weights = [layer.weight * mask for layer, mask in zip(self.layers, masks)]
        cache = {"order": order, "weights": weights, "length": 0,
                 "a": self.layers[0].bias.expand(n, -1).clone()}  # the first layer's pre-activations: nothing given yet
        if self.direct is not None:
            cache["direct"] = self.direct.weight * masks[-1]
            cache["sums"] = cache["direct"].new_zeros(n, self.num_vars * self.vocab_size)
        return cache, self._next_logits(cache)

    def step(self, cache: dict, tokens: torch.Tensor) -> torch.Tensor:
        V = self.vocab_size
        for t in tokens.unbind(1):  # variable o_length takes value t: add its one-hot column
            column = cache["order"][cache["length"]] * V + t
            cache["a"] += cache["weights"][0][:, column].T
            if self.direct is not None:
                cache["sums"] += cache["direct"][:, column].T
            cache["length"] += 1
        return self._next_logits(cache)

    def _next_logits(self, cache: dict) -> torch.Tensor:
        """Logits (n, V) of variable o_length from the cache."""
        h = cache["a"]
        for layer, weight in zip(self.layers[1:-1], cache["weights"][1:-1]):
            h = F.linear(F.relu(h), weight, layer.bias)
        V, var = self.vocab_size, cache["order"][cache["length"]].item()
        rows = slice(var * V, (var + 1) * V)
        logits = F.linear(F.relu(h), cache["weights"][-1][rows], self.layers[-1].bias[rows])
        return logits + cache["sums"][:, rows] if self.direct is not None else logits

    # --- the ensemble
    def member_log_probs(self, x: torch.Tensor) -> torch.Tensor:
        """(K, batch) float64: log p_{o_k}(x) of every member, each an exact product of conditionals."""
        out = []
        for order in self.orderings:
            logp = torch.log_softmax(self.logits_in(x, order).float(), -1).gather(-1, x[..., None])
            out.append(logp.flatten(1).sum(1, dtype=torch.float64))
        return torch.stack(out)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        if self.training or len(self.orderings) == 1:
            return super().log_prob(x)
        return torch.logsumexp(self.member_log_probs(x), 0) - math.log(len(self.orderings))

    def token_nll(self, x: torch.Tensor) -> torch.Tensor:
        if self.training or len(self.orderings) == 1:
            return super().token_nll(x)
        nll = torch.zeros(x.shape[0], self.num_vars, dtype=torch.float64, device=x.device)
        nll[:, 0] = -self.log_prob(x)  # the mixture's total; see the module docstring
        return nll

    @torch.no_grad()
    def sample(self, n: int, *, prefix: torch.Tensor | None = None, generator: torch.Generator | None = None,
               **options) -> torch.Tensor:
        """The ensemble's sample: a member k per sample, then its variables in o_k. With a
        prefix (or K = 1) member 0 samples: the prefix is in o_0."""
        K = len(self.orderings)
        if K == 1 or prefix is not None:
            return super().sample(n, prefix=prefix, generator=generator, **options)
        was_training = self.training
        self.eval()
        member = torch.randint(K, (n,), generator=generator, device="cpu" if generator is None else generator.device)
        out = torch.zeros(n, *self.shape, dtype=torch.long, device=self.orderings.device)
        for k in member.unique().tolist():
            rows = (member == k).nonzero().squeeze(1).to(out.device)
            self.order = self.orderings[k]
            out[rows] = super().sample(len(rows), generator=generator, **options)
        self.order = self.orderings[0]
        self.train(was_training)
        return out
