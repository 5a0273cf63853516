"""Exact negative log-likelihood over a whole split, every variable counted once on any number of ranks."""

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

from pipeline.data.shards import Shards
from pipeline.data.stream import eval_blocks, split_bytes


@torch.no_grad()
def evaluate_nll(model, shards: Shards, split: str, block_len: int, batch_size: int, *, rank: int = 0,
                 world: int = 1, max_chunks: int | None = None) -> dict:
    """nats and bits per variable (token, audio sample, sub-pixel: the codec's `unit`), and for
    text bits/byte = total bits / UTF-8 bytes of the split.

    Text items are scored with their EOS token (the model also says where text ends). Sums are
    float64 and all-reduced. Ranks step in lockstep, padding with empty batches, because a
    ZeRO-3 forward pass is a collective."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    distributed = dist.is_available() and dist.is_initialized() and world > 1
    total = torch.zeros(3, dtype=torch.float64, device=device)  # nats, variables, rows
    codec = shards.codec
    parts = getattr(codec, "names", [])  # a multimodal codec: each modality is scored apart too
    by_part = torch.zeros(4, len(parts), dtype=torch.float64, device=device)  # nats, marker nats, variables, items
    last = torch.zeros(1, dtype=torch.long)  # the token before the next row (see MultiCodec.token_parts)
    batches = eval_blocks(shards, split, block_len, batch_size, rank=rank, world=world, max_chunks=max_chunks)
    T = codec.sequence_length(block_len)
    while True:
        x, mask = next(batches, (None, None))
        more = torch.tensor(float(x is not None), device=device)
        if distributed:
            dist.all_reduce(more, op=dist.ReduceOp.MAX)
        if not more:
            break
        if x is None:  # this rank is done, others are not
            x, mask = torch.zeros(1, T, dtype=torch.long), torch.zeros(1, T, dtype=torch.bool)
        nll = model.token_nll(model.from_data(x.to(device))).double()  # in the model's ordering
        mask = model.to_sequence(model.from_data(mask.to(device)))
        total += torch.stack([(nll * mask).sum(), mask.sum().double(), mask.any(1).sum().double()])
        if parts:
            before, last = torch.cat([last, x[:-1, -1]]), x[-1:, -1]
            part = F.one_hot(codec.token_parts(x, before), len(parts)).to(device).double()
            part = model.to_sequence(model.from_data(part)) * mask[..., None]
            marker = model.to_sequence(model.from_data(x.to(device) <= len(parts)))[..., None]  # openers, <end>
            opener = model.to_sequence(model.from_data((x.to(device) >= 1) & (x.to(device) <= len(parts))))[..., None]
            by_part += torch.stack([(nll[..., None] * part).sum((0, 1)), (nll[..., None] * part * marker).sum((0, 1)),
                                    (part * ~marker).sum((0, 1)), (part * opener).sum((0, 1))])
    if distributed:
        dist.all_reduce(total)
        dist.all_reduce(by_part)
    model.train(was_training)
    nats, count = total[0].item(), int(total[1].item())
    unit = codec.unit
    result = {"nats": nats, unit + "s": count, f"nats_per_{unit}": nats / max(count, 1),
              f"bits_per_{unit}": nats / max(count, 1) / math.log(2)}
    if codec.stream_mode == "item":  # a row is a whole item (an image): the papers' nats per image
        items = int(total[2].item())
        result.update(items=items, nats_per_item=nats / max(items, 1))
    text_bytes = split_bytes(shards, split, max_chunks)
    if text_bytes:
        result.update(bytes=text_bytes, bits_per_byte=nats / math.log(2) / text_bytes)
    for i, name in enumerate(parts):
        result.update(part_result(name, codec.parts[name].unit, *by_part[:, i].tolist(), text_bytes))
    return result


def part_result(name: str, unit: str, nats: float, marker_nats: float, variables: float, items: float,
                text_bytes: int) -> dict:
    """One modality of a multimodal evaluation: its rate per its own unit (text: per byte)
    counting its items' openers and <end> tokens too, and what those markers cost per item."""
    unit, count = ("byte", text_bytes) if name == "text" else (unit, int(variables))
    return {f"{unit}s_{name}": count, f"items_{name}": int(items), f"nats_per_{unit}": nats / max(count, 1),
            f"bits_per_{unit}": nats / max(count, 1) / math.log(2),
            f"marker_bits_per_item_{name}": marker_nats / max(items, 1) / math.log(2)}


def headline(result: dict) -> dict:
    """The metrics worth logging: per-variable rates, bits/byte, a multimodal model's marker costs."""
    return {k: v for k, v in result.items() if k.startswith(("nats_per_", "bits_per_", "marker_bits_"))}
