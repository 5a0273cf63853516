"""Samples and completions, decoded by the codec, as text for MLflow and the terminal."""

import numpy as np
import torch

from pipeline.data.shards import Shards


def validation_prompts(shards: Shards, split: str, count: int, length: int) -> list[np.ndarray]:
    """The first `length` tokens of the first `count` items of a split (long enough ones)."""
    prompts = []
    for shard, entry in shards.chunks(split):
        tokens, offsets = shards.read_chunk(shard, entry["key"])
        for start, end in zip(offsets[:-1], offsets[1:]):
            if end - start > length:
                prompts.append(tokens[start : start + length].astype(np.int64))
                if len(prompts) == count:
                    return prompts
    return prompts


def sample_report(model, codec, prompts: list[np.ndarray], *, samples: int, temperature: float,
                  top_k: int | None, seed: int) -> str:
    """Unconditional samples, then completions of each prompt, as one readable text."""
    generator = torch.Generator().manual_seed(seed)
    sections = []
    if samples:
        drawn = model.sample(samples, temperature=temperature, top_k=top_k, generator=generator)
        for i, row in enumerate(drawn):
            sections.append(f"=== sample {i} ===\n{codec.decode(row.flatten().tolist())}")
    for i, prompt in enumerate(prompts):
        completed = model.sample(1, prefix=torch.from_numpy(prompt)[None], temperature=temperature,
                                 top_k=top_k, generator=generator)[0].flatten().tolist()
        sections.append(f"=== completion {i} ===\n--- prompt ---\n{codec.decode(prompt.tolist())}\n"
                        f"--- model ---\n{codec.decode(completed[len(prompt):])}")
    return "\n\n".join(sections) + "\n"


def sample_text(model_path: str, n: int, prompt: str | None, temperature: float, top_k: int | None,
                seed: int) -> str:
    """`arpipe sample`: n samples from an export, continuing `prompt` if given."""
    from pipeline.export import load_any

    model, codec, _ = load_any(model_path)
    generator = torch.Generator().manual_seed(seed)
    prefix = torch.from_numpy(codec.encode(prompt).astype(np.int64))[None] if prompt else None
    rows = model.sample(n, prefix=prefix, temperature=temperature, top_k=top_k, generator=generator)
    return "\n\n".join(f"=== sample {i} ===\n{codec.decode(r.flatten().tolist())}" for i, r in enumerate(rows))
