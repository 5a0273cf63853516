"""The training loss of a vocabulary head without its fp32 logits.

The plain loss, `F.cross_entropy(head(h).float(), targets)`, holds (N, vocab) logits in fp32 —
3.3 GB for 16 × 1024 tokens of a 50k vocabulary — and autograd keeps them (or their softmax)
until the backward pass. `VocabHead(h, targets)` instead runs over chunks of rows: per chunk
the logits (in the matmul's dtype, bf16 under autocast or DeepSpeed's bf16), their log-sum-exp
and softmax in fp32, and right away the chunk's gradients with respect to h and the weight
(softmax − one-hot, times the weight or the rows). Only those gradients, of the size of h and
of the weight, wait for the backward pass, which scales them by its incoming gradient; nothing
is recomputed, so the FLOPs are the plain loss's. The loss is the plain one's mean NLL, to
float rounding (tests/unit/test_llama.py compares loss and gradients).

The head is a module and computes this in its own forward, so ZeRO-3 gathers its weight around
exactly this computation, as it does for the logits.
"""

import torch
import torch.nn.functional as F
from torch import nn

CHUNK_LOGITS = 2**26  # logits per chunk: 256 MiB in fp32, whatever the vocabulary


class VocabHead(nn.Linear):
    """A bias-free linear layer to the vocabulary: `head(h)` gives logits, `head(h, targets)`
    the mean NLL in nats of targets (N,) given rows h (N, d)."""

    def __init__(self, d_model: int, vocab_size: int):
        super().__init__(d_model, vocab_size, bias=False)

    def forward(self, h: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        if targets is None:
            return super().forward(h)
        rows = max(1, CHUNK_LOGITS // self.out_features)
        return ChunkedNLL.apply(h, self.weight, targets, rows)


class ChunkedNLL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, rows):
        n = h.shape[0]
        want_h, want_w = ctx.needs_input_grad[:2]
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
        for a in range(0, n, rows):
            hc, tc = h[a : a + rows], targets[a : a + rows]
            z = F.linear(hc, weight)  # the matmul's dtype: bf16 under autocast
            logits = z.float()
            target = logits.gather(-1, tc[:, None])
            top = logits.amax(-1, keepdim=True)
            g = logits.sub_(top).exp_()  # in place of the logits (one chunk-sized tensor in all)
            norm = g.sum(-1, keepdim=True)
            total += (top + norm.log() - target).sum()  # log-sum-exp minus the target's logit
            if want_h or want_w:
                g.div_(norm)  # the softmax
                g[torch.arange(len(tc), device=g.device), tc] -= 1
                g = g.to(z.dtype)
                if want_h:
                    grad_h[a : a + rows] = g @ weight.to(z.dtype)
                if want_w and z.dtype == torch.float32:
                    grad_w.addmm_(g.T, hc)  # in place: no (vocab, d) temporary per chunk
                elif want_w:
                    grad_w += (g.T @ hc.to(z.dtype)).float()
        ctx.save_for_backward(grad_h, grad_w)
        ctx.n, ctx.h_dtype, ctx.w_dtype = n, h.dtype, weight.dtype
        return total / n

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors  # used once (no double backward): scaled in place
        scale = grad_loss / ctx.n
        return (None if grad_h is None else grad_h.mul_(scale).to(ctx.h_dtype),
                None if grad_w is None else grad_w.mul_(scale).to(ctx.w_dtype), None, None)
