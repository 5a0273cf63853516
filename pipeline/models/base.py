"""The one interface every autoregressive model implements.

Variables are numbered 0..D-1 in the model's ordering (D = prod(shape)); a model's input `x`
has shape (batch, *shape) and holds token ids.

- `forward(x)` -> logits (batch, *shape, vocab): teacher forcing. The logits at variable i
  parameterise p(x_i | x_<i) for *every* i; the model supplies the first one's context itself
  (a learned start vector), so no BOS token is spent from the vocabulary or the data.
  Families implement `logits(x)`, which `forward` calls.
- `forward(x, loss=True)` -> the mean NLL in nats over the batch's variables (fp32): the
  training loss, through the same call as the logits, so DeepSpeed's engine (ZeRO-3 gathers
  parameters in module hooks) runs it. The default is the cross-entropy of `logits`; models with
  a vocabulary head (GPT, Llama) never hold the (batch, T, vocab) logits in fp32 (models/loss.py).
- `log_prob(x)` -> (batch,) exact log-likelihood in nats.
- `sample(n, length=..., prefix=..., temperature=..., top_k=..., generator=...)` draws one
  variable at a time; `prefix` fixes the first variables in the ordering; `length` goes beyond
  the model's shape where the family can (see `long_samples`).

Incremental sampling goes through `start(n)` and `step(cache, tokens)`. The defaults here
recompute the full forward pass at every step (the reference the fast paths are tested
against); models override them with a KV cache, a recurrent state, activation queues or running
sums (PixelCNN keeps the default: see pixelcnn.py).
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from pipeline import ArpipeError


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
    # How a 1-D model samples beyond its shape: "native" (a state that runs for ever: WaveNet's
    # queues, GRU's hidden state), "window" (a context of num_vars positions, re-primed with the
    # last num_vars - stride variables when full: GPT, Llama) or None (a fixed shape).
    long_samples: str | None = None
    # True for families whose blocks (run through `run_block`) activation checkpointing may
    # recompute (train.activation_checkpointing); the others have nothing worth recomputing.
    checkpointable: bool = False

    def __init__(self, vocab_size: int, shape: tuple[int, ...]):
        super().__init__()
        self.vocab_size = vocab_size
        self.shape = tuple(shape)
        self.num_vars = math.prod(self.shape)
        self.activation_checkpointing = False

    def forward(self, x: torch.Tensor, loss: bool = False) -> torch.Tensor:
        """Logits (batch, *shape, vocab) of every conditional; with loss=True the mean NLL in
        nats of the batch's variables, the training loss."""
        return self.mean_nll(x) if loss else self.logits(x)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def mean_nll(self, x: torch.Tensor) -> torch.Tensor:
        # to_sequence after the logits: a model that draws its ordering per forward (MADE) has it now
        logits = self.to_sequence(self.logits(x))
        return F.cross_entropy(logits.float().flatten(0, 1), self.to_sequence(x).flatten())

    def set_activation_checkpointing(self, on: bool) -> None:
        """Recompute each block's activations in the backward pass instead of keeping them
        (torch.utils.checkpoint, non-reentrant; the RNG state is restored, so dropout repeats)."""
        if on and not self.checkpointable:
            raise ArpipeError(f"train.activation_checkpointing: {type(self).__name__} has no blocks whose "
                              f"activations are worth recomputing; set it to false")
        self.activation_checkpointing = on

    def run_block(self, block, *args):
        """block(*args): a module or a function of modules, checkpointed when that is on."""
        if self.activation_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

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
    def sample(self, n: int, *, length: int | None = None, stride: int | None = None,
               prefix: torch.Tensor | None = None, temperature: float = 1.0, top_k: int | None = None,
               generator: torch.Generator | None = None, cached: bool = True) -> torch.Tensor:
        """n samples of shape (n, *shape), or (n, length) for a 1-D model given a `length`.
        `prefix` (n, P) or (P,) fixes variables 0..P-1 in the ordering. `cached=False` uses the
        full-recompute path (for tests and benchmarks).

        Beyond num_vars a "window" model (see `long_samples`) draws variable i from its context
        window: the first num_vars variables from the first window, then from windows that start
        every `stride` variables (default num_vars // 2), each re-primed with the last
        num_vars - stride variables at positions 1.. after the start vector, as in training. So
        every variable sees at least num_vars - stride earlier ones and positions stay below
        num_vars: exactly the conditionals that sliding-window evaluation with this stride scores."""
        length = self.num_vars if length is None else length
        T = self.num_vars
        if length != T and (self.long_samples is None or len(self.shape) != 1):
            raise ArpipeError(f"{type(self).__name__} samples exactly its shape {self.shape} ({T} variables), not "
                              f"{length}; longer samples need a sequence model (gpt, llama: a sliding "
                              f"window; wavenet, gru: natively)")
        stride = max(1, T // 2) if stride is None else stride
        if not 1 <= stride <= T:
            raise ArpipeError(f"stride {stride} must lie in 1..{T} (the model's context)")
        if not cached and length > T and self.long_samples != "window":
            raise ValueError("the full-recompute path runs within the model's shape; build the model with "
                             f"shape ({length},) to recompute a sample of {length}")
        start, step = (self.start, self.step) if cached else (self._recompute_start, self._recompute_step)
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        out = torch.zeros(n, length, dtype=torch.long, device=device)
        p = 0
        if prefix is not None:
            prefix = torch.as_tensor(prefix, device=device).long().expand(n, -1)
            p = prefix.shape[1]
            if p > length:
                raise ValueError(f"prefix of {p} variables is longer than the {length} to sample")
            out[:, :p] = prefix
        window, fed = 0, 0  # the current window's first variable; variables [window, fed) are in the cache
        cache = logits = None
        for i in range(p, length):
            first = 0 if self.long_samples != "window" or i < T else (i - T + stride) // stride * stride
            if cache is None or first != window:  # a new window: the start vector, then its first variables
                (cache, logits), window, fed = start(n), first, first
            if fed < i:
                logits = step(cache, out[:, fed:i])
                fed = i
            out[:, i] = draw(logits, temperature, top_k, generator)
        self.train(was_training)
        return self.from_sequence(out) if length == T else out


def draw(logits: torch.Tensor, temperature: float, top_k: int | None, generator) -> torch.Tensor:
    """One token per row from logits (n, vocab): temperature 0 is greedy; top-k keeps the k best."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)
