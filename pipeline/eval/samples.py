"""Samples and completions, rendered by the codec (text, WAV, PNG) for MLflow and the terminal."""

from pathlib import Path

import numpy as np
import torch

from pipeline import ArpipeError
from pipeline.data.shards import Shards
from pipeline.log import LOG


def validation_items(shards: Shards, split: str, count: int, longer_than: int) -> list[np.ndarray]:
    """The first `count` items of a split that are longer than `longer_than` variables, whole,
    in the data's ordering."""
    items = []
    for shard, entry in shards.chunks(split):
        tokens, offsets = shards.read_chunk(shard, entry["key"])
        for start, end in zip(offsets[:-1], offsets[1:]):
            if end - start > longer_than:
                items.append(tokens[start:end].astype(np.int64))
                if len(items) == count:
                    return items
    return items


def validation_prompts(shards: Shards, split: str, count: int, length: int) -> list[np.ndarray]:
    """The first `length` variables (in the data's ordering) of the first `count` items of a
    split that are longer than that."""
    return [item[:length] for item in validation_items(shards, split, count, length)]


def write_samples(model, codec, prompts: list[np.ndarray], directory: Path, *, samples: int,
                  temperature: float, top_k: int | None, seed: int, prompt_len: int | None = None,
                  length: int | None = None, stride: int | None = None) -> list[Path]:
    """Unconditional samples and completions of each prompt (validation items in the data's
    ordering) given its first `prompt_len` variables (default: the shortest prompt's length)
    in the model's ordering, as the codec's files. Samples and completions are `length`
    variables long (default: the model's shape; longer: see ARModel.sample and `stride`)."""
    directory.mkdir(parents=True, exist_ok=True)
    model.eval()  # a model with its own ordering takes a prefix in its eval ordering
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    files = []
    if samples:
        rows = model.to_data(model.sample(samples, length=length, stride=stride, temperature=temperature,
                                          top_k=top_k, generator=generator))
        files += codec.write_samples(rows.cpu().numpy(), directory, "samples")
    if prompts:
        prompt_len = prompt_len or min(len(p) for p in prompts)
        if not model.orders_variables:
            prefix = torch.from_numpy(np.stack([p[:prompt_len] for p in prompts]))
            rows = model.to_data(model.sample(len(prompts), length=length, stride=stride, prefix=prefix,
                                              temperature=temperature, top_k=top_k, generator=generator))
            files += codec.write_samples(rows.cpu().numpy(), directory, "completions", prefix_len=prompt_len)
        else:
            rows, given = complete_in_model_order(model, prompts, prompt_len, temperature=temperature, top_k=top_k,
                                                  generator=generator)  # whole items: its shape
            files += codec.write_samples(rows.cpu().numpy(), directory, "completions", given=given.cpu().numpy())
    return files


def complete_in_model_order(model, items: list[np.ndarray], length: int, **sampling) -> tuple:
    """Completions for a model that orders the variables itself (MADE): the data's first
    `length` variables are no prefix in its ordering, so the given ones are its first `length`,
    taken from whole items wherever they lie. Returns the rows (n, D) in the data's ordering
    and the (D,) bool mask of given positions in them (the same for every row)."""
    if any(len(item) != model.num_vars for item in items):
        raise ArpipeError(f"completions of {type(model).__name__} need whole items of {model.num_vars} variables")
    device = next(model.parameters()).device
    prefix = model.to_sequence(model.from_data(torch.from_numpy(np.stack(items)).to(device)))[:, :length]
    rows = model.to_data(model.sample(len(items), prefix=prefix, **sampling))
    in_order = torch.arange(model.num_vars, device=device)[None] < length
    given = model.to_data(model.from_sequence(in_order))[0]
    LOG.info("completions: %s orders the variables itself: the first %d of %d in its ordering are given",
             type(model).__name__, length, model.num_vars)
    return rows, given


def sample_text(model_path: str, n: int, prompt: str | None, temperature: float, top_k: int | None,
                seed: int, out: str | None, length: int | None = None, stride: int | None = None,
                modality: str | None = None) -> list[Path]:
    """`arpipe sample`: n samples of `length` variables (default: the model's shape) from a model,
    continuing `prompt` (text, or a sound file) if given, or items of `modality` from a
    multimodal model, written by the codec into `out` (text is also printed)."""
    import tempfile

    from pipeline.export import load_any

    model, codec, _ = load_any(model_path)
    if prompt and not hasattr(codec, "encode"):
        raise ArpipeError(f"--prompt cannot be encoded for {codec.modality} data; "
                          f"`arpipe eval` writes completions of validation items")
    if modality and not hasattr(codec, "opener"):
        raise ArpipeError(f"--modality needs a multimodal model (trained on `arpipe shard multi` shards); "
                          f"{model_path} models {codec.modality} alone")
    if modality and prompt and modality != "text":
        raise ArpipeError("--prompt is text: it cannot open an item of --modality " + modality)
    generator = torch.Generator().manual_seed(seed)
    prefix = torch.from_numpy(codec.encode(prompt).astype(np.int64))[None] if prompt else None
    if modality and prefix is None:  # the modality's opening token
        prefix = torch.tensor([[codec.opener(modality)]])
    length = length or model.num_vars
    if prefix is not None and prefix.shape[1] >= length:
        raise ArpipeError(f"--prompt is {prefix.shape[1]} tokens; a sample is {length} in all (--length), "
                          f"so a prompt must be shorter")
    rows = model.to_data(model.sample(n, length=length, stride=stride, prefix=prefix, temperature=temperature,
                                      top_k=top_k, generator=generator))
    directory = Path(out or tempfile.mkdtemp(prefix="arpipe-samples-"))
    directory.mkdir(parents=True, exist_ok=True)
    return codec.write_samples(rows.numpy(), directory, "samples", prefix_len=0 if prefix is None else prefix.shape[1])
