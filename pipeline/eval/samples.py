"""Samples and completions, rendered by the codec (text, WAV, PNG) for MLflow and the terminal."""

from pathlib import Path

import numpy as np
import torch

from pipeline import ArpipeError
from pipeline.data.shards import Shards


def validation_prompts(shards: Shards, split: str, count: int, length: int) -> list[np.ndarray]:
    """The first `length` variables (in the data's ordering) of the first `count` items of a
    split that are longer than that."""
    prompts = []
    for shard, entry in shards.chunks(split):
        tokens, offsets = shards.read_chunk(shard, entry["key"])
        for start, end in zip(offsets[:-1], offsets[1:]):
            if end - start > length:
                prompts.append(tokens[start : start + length].astype(np.int64))
                if len(prompts) == count:
                    return prompts
    return prompts


def write_samples(model, codec, prompts: list[np.ndarray], directory: Path, *, samples: int,
                  temperature: float, top_k: int | None, seed: int) -> list[Path]:
    """Unconditional samples and completions of each prompt, as the codec's files."""
    directory.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    files = []
    if samples:
        rows = model.to_data(model.sample(samples, temperature=temperature, top_k=top_k, generator=generator))
        files += codec.write_samples(rows.cpu().numpy(), directory, "samples")
    if prompts:
        length = min(len(p) for p in prompts)
        prefix = torch.from_numpy(np.stack([p[:length] for p in prompts]))
        rows = model.to_data(model.sample(len(prompts), prefix=prefix, temperature=temperature, top_k=top_k,
                                          generator=generator))
        files += codec.write_samples(rows.cpu().numpy(), directory, "completions", prefix_len=length)
    return files


def sample_text(model_path: str, n: int, prompt: str | None, temperature: float, top_k: int | None,
                seed: int, out: str | None) -> list[Path]:
    """`arpipe sample`: n samples from a model, continuing `prompt` (text) if given, written
    by the codec into `out` (text is also printed)."""
    import tempfile

    from pipeline.export import load_any

    model, codec, _ = load_any(model_path)
    if prompt and not hasattr(codec, "encode"):
        raise ArpipeError(f"--prompt cannot be encoded for {codec.modality} data; "
                          f"`arpipe eval` writes completions of validation items")
    generator = torch.Generator().manual_seed(seed)
    prefix = torch.from_numpy(codec.encode(prompt).astype(np.int64))[None] if prompt else None
    if prefix is not None and prefix.shape[1] >= model.num_vars:
        raise ArpipeError(f"--prompt is {prefix.shape[1]} tokens; the model generates {model.num_vars} "
                          f"in all, so a prompt must be shorter")
    rows = model.to_data(model.sample(n, prefix=prefix, temperature=temperature, top_k=top_k, generator=generator))
    directory = Path(out or tempfile.mkdtemp(prefix="arpipe-samples-"))
    directory.mkdir(parents=True, exist_ok=True)
    return codec.write_samples(rows.numpy(), directory, "samples", prefix_len=0 if prefix is None else prefix.shape[1])
