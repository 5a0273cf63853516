"""The one interface every autoregressive model implements.

Variables are numbered 0..D-1 in the model's ordering (D = prod(shape)); a model's input `x`
has shape (batch, *shape) and holds token ids.

- `forward(x)` -> logits (batch, *shape, vocab): teacher forcing. The logits at variable i
  parameterise p(x_i | x_<i) for *every* i; the model supplies the first one's context itself
  (a learned start vector), so no BOS token is spent from the vocabulary or the data.
- `log_prob(x)` -> (batch,) exact log-likelihood in nats.
- `sample(n, prefix=..., temperature=..., top_k=..., generator=...)` draws one variable at a
  time; `prefix` fixes the first variables in the ordering.

Incremental sampling goes through `start(n)` and `step(cache, tokens)`. The defaults here
recompute the full forward pass at every step (the reference the fast paths are tested
against); models override them with a KV cache, a recurrent state or activation queues.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn


class ARModel(nn.Module):
    # The data ordering a model's architecture implements (PixelCNN: "raster"); None means the
    # model takes its variables in whatever ordering the data has (GPT, GRU).
    required_ordering: str | None = None
    # True for a model that orders its variables itself (MADE): to_sequence/from_sequence apply
    # its ordering, so the data's first P variables are not its first P (see completions in
    # eval/samples.py) and a row padded at the end has no exact likelihood (check_ordering).
    orders_variables: bool = False
    # True for models that use each weight once per item rather than once per variable (the
    # dense classic models: FVSBN, NADE, MADE); train_flops_per_variable divides by D.
    weights_used_once_per_item: bool = False

    def __init__(self, vocab_size: int, shape: tuple[int, ...]):
        super().__init__()
        self.vocab_size = vocab_size
        self.shape = tuple(shape)
        self.num_vars = math.prod(self.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def summary(self) -> dict:
        """Derived facts worth logging with the run (e.g. a receptive field); values are scalars."""
        return {}

    def train_flops_per_variable(self) -> float:
        """Training FLOPs (forward + backward) per modelled variable, for MFU: 6 per parameter
        use (2 forward, 4 backward). Models whose compute is not one use of each weight per
        variable (attention, convolutions) override it or set `weights_used_once_per_item`."""
        flops = 6.0 * sum(p.numel() for p in self.parameters())
        return flops / self.num_vars if self.weights_used_once_per_item else flops

    def token_nll(self, x: torch.Tensor) -> torch.Tensor:
        """-log p(x_i | x_<i) in nats for every variable, shape (batch, D) in the ordering."""
        logits = self.to_sequence(self(x))
        targets = self.to_sequence(x)
        nll = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
        return nll.view(targets.shape)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        return -self.token_nll(x).sum(1)

    # The ordering: how (batch, *shape) maps to (batch, D) variables in order. Sequence models
    # keep their own order; image models with an in-model ordering override both.
    def to_sequence(self, t: torch.Tensor) -> torch.Tensor:
        n = len(self.shape)
        return t.flatten(1, n) if n > 1 else t

    def from_sequence(self, t: torch.Tensor) -> torch.Tensor:
        return t.view(t.shape[0], *self.shape, *t.shape[2:])

    # Data rows (batch, D) arrive in the shards' ordering. Models that take that ordering as
    # theirs (GPT, GRU, WaveNet, and PixelCNN on raster shards) read them as their sequence;
    # a model that orders variables itself (MADE) reads them as a layout and overrides both.
    def from_data(self, rows: torch.Tensor) -> torch.Tensor:
        """Data rows -> model input (batch, *shape)."""
        return self.from_sequence(rows)

    def to_data(self, x: torch.Tensor) -> torch.Tensor:
        """Model input (batch, *shape) -> data rows in the shards' ordering (for rendering)."""
        return self.to_sequence(x)

    # Incremental interface; defaults recompute everything (slow, obviously correct).
    def start(self, n: int) -> tuple[dict, torch.Tensor]:
        """A fresh cache for n sequences and the logits (n, vocab) for variable 0."""
        return self._recompute_start(n)

    def step(self, cache: dict, tokens: torch.Tensor) -> torch.Tensor:
        """Append variables tokens (n, k) after those seen; logits (n, vocab) for the next one."""
        return self._recompute_step(cache, tokens)

    def _recompute_start(self, n: int):
        device = next(self.parameters()).device
        cache = {"x": torch.zeros(n, self.num_vars, dtype=torch.long, device=device), "length": 0}
        return cache, self._recompute_logits(cache)

    def _recompute_step(self, cache: dict, tokens: torch.Tensor) -> torch.Tensor:
        k = tokens.shape[1]
        cache["x"][:, cache["length"] : cache["length"] + k] = tokens
        cache["length"] += k
        return self._recompute_logits(cache)

    def _recompute_logits(self, cache: dict) -> torch.Tensor:
        # Variables after `length` are zeros; causality means they cannot change these logits.
        logits = self.to_sequence(self(self.from_sequence(cache["x"])))
        return logits[:, cache["length"]]

    @torch.no_grad()
    def sample(self, n: int, *, prefix: torch.Tensor | None = None, temperature: float = 1.0,
               top_k: int | None = None, generator: torch.Generator | None = None,
               cached: bool = True) -> torch.Tensor:
        """n samples of shape (n, *shape). `prefix` (n, P) or (P,) fixes variables 0..P-1 in the
        ordering. `cached=False` uses the full-recompute path (for tests and benchmarks)."""
        start, step = (self.start, self.step) if cached else (self._recompute_start, self._recompute_step)
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        out = torch.zeros(n, self.num_vars, dtype=torch.long, device=device)
        cache, logits = start(n)
        p = 0
        if prefix is not None:
            prefix = torch.as_tensor(prefix, device=device).long().expand(n, -1)
            p = prefix.shape[1]
            if p > self.num_vars:
                raise ValueError(f"prefix of {p} variables is longer than the model's {self.num_vars}")
            out[:, :p] = prefix
            if 0 < p < self.num_vars:
                logits = step(cache, prefix)
        for i in range(p, self.num_vars):
            out[:, i] = draw(logits, temperature, top_k, generator)
            if i + 1 < self.num_vars:
                logits = step(cache, out[:, i : i + 1])
        self.train(was_training)
        return self.from_sequence(out)


def draw(logits: torch.Tensor, temperature: float, top_k: int | None, generator) -> torch.Tensor:
    """One token per row from logits (n, vocab): temperature 0 is greedy; top-k keeps the k best."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)
