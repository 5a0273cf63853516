"""Exact negative log-likelihood over a whole split, every token counted once on any number of ranks."""

import math

import torch
import torch.distributed as dist

from pipeline.data.shards import Shards
from pipeline.data.stream import eval_blocks, split_bytes


def _num_batches(shards: Shards, split: str, block_len: int, batch_size: int, rank: int, world: int,
                 max_chunks: int | None) -> int:
    blocks = sum(math.ceil((e["tokens"] + e["items"]) / block_len)
                 for _, e in shards.chunks(split)[:max_chunks][rank::world])
    return math.ceil(blocks / batch_size)


@torch.no_grad()
def evaluate_nll(model, shards: Shards, split: str, block_len: int, batch_size: int, *, rank: int = 0,
                 world: int = 1, max_chunks: int | None = None) -> dict:
    """nats/token, bits/token and (text) bits/byte = total bits / UTF-8 bytes of the split.

    Each item is scored with its EOS token (so the model assigns a probability to where text
    ends). Sums are float64 and all-reduced. Ranks run the same number of forward passes,
    padding with empty batches, because a ZeRO-3 forward is a collective."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total = torch.zeros(2, dtype=torch.float64, device=device)  # nats, tokens
    batches = eval_blocks(shards, split, block_len, batch_size, rank=rank, world=world, max_chunks=max_chunks)
    count = torch.tensor(_num_batches(shards, split, block_len, batch_size, rank, world, max_chunks), device=device)
    distributed = dist.is_available() and dist.is_initialized() and world > 1
    if distributed:
        dist.all_reduce(count, op=dist.ReduceOp.MAX)
    for _ in range(int(count)):
        x, mask = next(batches, (None, None))
        if x is None:
            x, mask = torch.zeros(1, block_len, dtype=torch.long), torch.zeros(1, block_len, dtype=torch.bool)
        nll = model.token_nll(x.to(device)).double()
        mask = mask.to(device)
        total += torch.stack([(nll * mask).sum(), mask.sum().double()])
    if distributed:
        dist.all_reduce(total)
    model.train(was_training)
    nats, tokens = total[0].item(), int(total[1].item())
    result = {"nats": nats, "tokens": tokens, "nats_per_token": nats / max(tokens, 1),
              "bits_per_token": nats / max(tokens, 1) / math.log(2)}
    text_bytes = split_bytes(shards, split, max_chunks)
    if text_bytes:
        result.update(bytes=text_bytes, bits_per_byte=nats / math.log(2) / text_bytes)
    return result
