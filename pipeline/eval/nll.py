"""Exact negative log-likelihood over a whole split, every variable counted once on any number of
ranks: in blocks, and optionally with sliding windows; per shard set and over several."""

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

from pipeline import ArpipeError
from pipeline.data.shards import Shards
from pipeline.data.stream import eval_blocks, split_bytes
from pipeline.log import Progress

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
def _sum_nll(model, codec, batches, T: int, distributed: bool, progress) -> tuple[list[float], torch.Tensor]:
    """(nats, scored variables, rows with any) summed over this rank's batches and all-reduced,
    and for a multimodal codec the same per part: (nats, marker nats, variables, items) × parts.
    Ranks step in lockstep, padding with empty batches, because a ZeRO-3 forward pass is a
    collective."""
    device = next(model.parameters()).device
    total = torch.zeros(3, dtype=torch.float64, device=device)
    parts = getattr(codec, "names", [])  # a multimodal codec: each modality is scored apart too
    by_part = torch.zeros(4, len(parts), dtype=torch.float64, device=device)
    # The token before the next row (see MultiCodec.token_parts). A sliding window's first
    # position is context, never scored, unless the window opens a sequence (with an opener).
    last = torch.zeros(1, dtype=torch.long)
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
        progress.update(int(mask.sum()))
        if parts:
            before, last = torch.cat([last, x[:-1, -1]]), x[-1:, -1]
            part = F.one_hot(codec.token_parts(x, before), len(parts)).to(device).double()
            part = model.to_sequence(model.from_data(part)) * mask[..., None]
            marker = model.to_sequence(model.from_data(x.to(device) <= len(parts)))[..., None]  # openers, <end>
            opener = model.to_sequence(model.from_data((x.to(device) >= 1) & (x.to(device) <= len(parts))))[..., None]
            by_part += torch.stack([(nll[..., None] * part).sum((0, 1)), (nll[..., None] * part * marker).sum((0, 1)),
                                    (part * ~marker).sum((0, 1)), (part * opener).sum((0, 1))])
    progress.close()
    if distributed:
        dist.all_reduce(total)
        dist.all_reduce(by_part)
    return total.tolist(), by_part


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

    # this rank's variables (with text's EOS tokens): each is scored once, by blocks or windows
    mine = sum(e["tokens"] + (e["items"] if codec.stream_mode == "pack" else 0)
               for _, e in shards.chunks(split)[:max_chunks][rank::world])

    def score(window_stride):
        batches = eval_blocks(shards, split, block_len, batch_size, rank=rank, world=world, max_chunks=max_chunks,
                              stride=window_stride)
        progress = Progress(mine, f"eval {split}{' sliding' if window_stride else ''}", unit=codec.unit,
                            active=rank == 0)
        return _sum_nll(model, codec, batches, T, distributed, progress)

    (nats, count, rows), by_part = score(None)
    totals = {"nats": nats, codec.unit + "s": int(count)}
    text_bytes = split_bytes(shards, split, max_chunks)
    if text_bytes:
        totals["bytes"] = text_bytes
    if codec.stream_mode == "item":  # a row is a whole item (an image): the papers' nats per image
        totals["items"] = int(rows)
    passes = [("", by_part)]
    if stride:
        (nats_sliding, _, _), by_part_sliding = score(stride)
        totals.update(nats_sliding=nats_sliding, stride=stride)
        passes.append(("_sliding", by_part_sliding))
    model.train(was_training)
    result = with_rates(totals, codec.unit)
    for i, name in enumerate(getattr(codec, "names", [])):
        for suffix, sums in passes:
            result.update(part_result(name, codec.parts[name].unit, *sums[:, i].tolist(), text_bytes, suffix))
    return result


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


def part_result(name: str, unit: str, nats: float, marker_nats: float, variables: float, items: float,
                text_bytes: int, suffix: str = "") -> dict:
    """One modality of a multimodal evaluation: its rate per its own unit (text: per byte)
    counting its items' openers and <end> tokens too, and what those markers cost per item."""
    unit, count = ("byte", text_bytes) if name == "text" else (unit, int(variables))
    return {f"{unit}s_{name}": count, f"items_{name}": int(items), f"nats_per_{unit}{suffix}": nats / max(count, 1),
            f"bits_per_{unit}{suffix}": nats / max(count, 1) / math.log(2),
            f"marker_bits_per_item_{name}{suffix}": marker_nats / max(items, 1) / math.log(2)}


def headline(result: dict) -> dict:
    """The metrics worth logging: per-variable rates, bits/byte, a multimodal model's marker
    costs, overall and per source (`<source>/bits_per_byte`)."""
    rates = {k: v for k, v in result.items() if k.startswith(("nats_per_", "bits_per_", "marker_bits_"))}
    for name, source in result.get("sources", {}).items():
        rates.update({f"{name}/{k}": v for k, v in headline(source).items()})
    return rates
