"""Exact negative log-likelihood over a whole split, every variable counted once on any number of
ranks: in blocks, and optionally with sliding windows; per shard set and over several."""

import math

import torch
import torch.distributed as dist

from pipeline import ArpipeError
from pipeline.data.shards import Shards
from pipeline.data.stream import eval_blocks, split_bytes

SUMMED = ("nats", "nats_sliding", "items", "bytes")  # with the variable count: what adds up over shard sets


def check_stride(model, codec, block_len: int, stride: int | None) -> None:
    """Refuse a sliding window where there is nothing to slide over: fixed-shape items (images)
    are scored whole, and a model with its own ordering reads only whole items."""
    if stride is None:
        return
    if codec.stream_mode == "item" or model.orders_variables or model.required_ordering:
        raise ArpipeError(f"--stride (eval.stride): {type(model).__name__} on {codec.modality} data scores each item "
                          f"whole in one pass, so there is no window to slide; leave the stride out")
    T = codec.sequence_length(block_len)
    if not 1 <= stride <= T:
        raise ArpipeError(f"--stride (eval.stride) {stride}: must be from 1 to the model's block_len, {T}")


@torch.no_grad()
def _sum_nll(model, batches, T: int, distributed: bool) -> list[float]:
    """(nats, scored variables, rows with any) summed over this rank's batches and all-reduced.
    Ranks step in lockstep, padding with empty batches, because a ZeRO-3 forward pass is a
    collective."""
    device = next(model.parameters()).device
    total = torch.zeros(3, dtype=torch.float64, device=device)
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
    if distributed:
        dist.all_reduce(total)
    return total.tolist()


def evaluate_nll(model, shards: Shards, split: str, block_len: int, batch_size: int, *, rank: int = 0,
                 world: int = 1, max_chunks: int | None = None, stride: int | None = None) -> dict:
    """nats and bits per variable (token, audio sample, sub-pixel: the codec's `unit`), and for
    text bits/byte = total bits / UTF-8 bytes of the split; with a stride also the same figures
    scored with sliding windows (`*_sliding`; see stream.windows).

    Text items are scored with their EOS token (the model also says where text ends). Sums are
    float64 and all-reduced."""
    codec = shards.codec
    check_stride(model, codec, block_len, stride)
    was_training = model.training
    model.eval()
    distributed = dist.is_available() and dist.is_initialized() and world > 1
    T = codec.sequence_length(block_len)

    def score(window_stride):
        batches = eval_blocks(shards, split, block_len, batch_size, rank=rank, world=world, max_chunks=max_chunks,
                              stride=window_stride)
        return _sum_nll(model, batches, T, distributed)

    nats, count, rows = score(None)
    totals = {"nats": nats, codec.unit + "s": int(count)}
    if text_bytes := split_bytes(shards, split, max_chunks):
        totals["bytes"] = text_bytes
    if codec.stream_mode == "item":  # a row is a whole item (an image): the papers' nats per image
        totals["items"] = int(rows)
    if stride:
        totals.update(nats_sliding=score(stride)[0], stride=stride)
    model.train(was_training)
    return with_rates(totals, codec.unit)


def with_rates(totals: dict, unit: str) -> dict:
    """Totals plus the rates derived from them: per variable, per byte (text), per item (images)."""
    result, count = dict(totals), max(totals[unit + "s"], 1)
    for suffix in ("", "_sliding"):
        if "nats" + suffix in totals:
            nats = totals["nats" + suffix]
            result[f"nats_per_{unit}{suffix}"] = nats / count
            result[f"bits_per_{unit}{suffix}"] = nats / count / math.log(2)
            if "bytes" in totals:
                result[f"bits_per_byte{suffix}"] = nats / math.log(2) / totals["bytes"]
    if "items" in totals:
        result["nats_per_item"] = totals["nats"] / max(totals["items"], 1)
    return result


def evaluate_sources(model, sources: dict[str, Shards], split: str, block_len: int, batch_size: int,
                     **kwargs) -> dict:
    """`evaluate_nll` of each shard set (a mixture's sources, by name) and over all of them:
    total nats / total variables, total bits / total bytes. One source gives its result alone;
    several give the overall figures with each source's result under "sources"."""
    results = {name: evaluate_nll(model, shards, split, block_len, batch_size, **kwargs)
               for name, shards in sources.items()}
    first = next(iter(results.values()))
    if len(results) == 1:
        return first
    unit = next(iter(sources.values())).codec.unit
    totals = {k: sum(r[k] for r in results.values()) for k in first if k in (*SUMMED, unit + "s")}
    if "stride" in first:
        totals["stride"] = first["stride"]
    return {**with_rates(totals, unit), "sources": results}


def headline(result: dict) -> dict:
    """The metrics worth logging: per-variable rates and bits/byte, overall and per source
    (`<source>/bits_per_byte`)."""
    rates = {k: v for k, v in result.items() if k.startswith(("nats_per_", "bits_per_"))}
    for name, source in result.get("sources", {}).items():
        rates.update({f"{name}/{k}": v for k, v in headline(source).items()})
    return rates
