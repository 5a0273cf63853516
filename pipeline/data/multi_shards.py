"""`arpipe shard multi`: finished shard sets of text, images and audio joined into one multimodal
set (pipeline/codecs/multi.py) without touching raw data."""

import json
import shutil
from pathlib import Path

from pipeline import ArpipeError
from pipeline.codecs import codec_files
from pipeline.codecs.multi import MultiCodec
from pipeline.data.shards import FORMAT, SPLITS, ShardWriter, Shards, finalize, write_json_atomic
from pipeline.log import LOG


def interleave(parts: dict[str, tuple[int, object]]):
    """(part, item) from every part's iterator of items, always taking the part least far
    through its tokens (`parts`: name -> (total tokens, items)): every stretch of the output
    mixes the parts in proportion to their size."""
    done = {name: 0 for name in parts}
    heads = {name: next(items, None) for name, (_, items) in parts.items()}
    while any(head is not None for head in heads.values()):
        name = min((n for n in parts if heads[n] is not None), key=lambda n: done[n] / max(1, parts[n][0]))
        item = heads[name]
        yield name, item
        done[name] += len(item[0])
        heads[name] = next(parts[name][1], None)


def items_of(shards, split: str):
    """(tokens, meta) of every item of a split, chunk by chunk."""
    for shard, entry in shards.chunks(split):
        tokens, offsets = shards.read_chunk(shard, entry["key"])
        meta = json.loads(shards.read(shard, entry["key"], "meta.json"))["items"]
        for start, end, item_meta in zip(offsets[:-1], offsets[1:], meta):
            yield tokens[start:end], item_meta


def shard_multi(sources: dict[str, Path], out: Path, chunk_bytes: int, shard_bytes: int) -> dict:
    """Re-map finished shard sets into one multimodal set in `out` (plan, one task, manifest as
    `arpipe shard` writes them, so `Shards` and the trainer read it like any other)."""
    sets = {name: Shards(path) for name, path in sources.items() if path is not None}
    if not sets:
        raise ArpipeError("arpipe shard multi needs at least one of --text, --image, --audio")
    for name, shards in sets.items():
        if shards.codec.modality != name:
            raise ArpipeError(f"--{name} {shards.dir} holds {shards.codec.modality} shards, not {name}")
    sources_info = {name: str(Path(s.dir).resolve()) for name, s in sets.items()}
    if (out / "manifest.json").exists() and json.loads((out / "plan.json").read_text())["settings"]["sources"] == sources_info:
        LOG.info("shard multi: %s already holds these shard sets", out)
        return json.loads((out / "manifest.json").read_text())
    if out.exists() and any(out.iterdir()):
        raise ArpipeError(f"{out} is not empty; use a new --out directory")
    out.mkdir(parents=True, exist_ok=True)
    for shards in sets.values():  # the parts' own files (the tokenizer), beside the manifest
        for name in codec_files(shards.manifest["codec"], shards.meta_dir):
            shutil.copy(shards.meta_dir / name, out / name)
    codec = MultiCodec({name: shards.codec for name, shards in sets.items()})
    write_json_atomic(out / "plan.json", {"format": FORMAT, "settings": {"modality": "multi", "sources": sources_info},
                                          "root": str(out.resolve()), "inputs": [], "num_tasks": 1,
                                          "codec": codec.config()})
    writers = {s: ShardWriter(out, s, 0, codec.token_dtype, chunk_bytes, shard_bytes) for s in SPLITS}
    for split in SPLITS:  # memory holds one chunk per part
        parts = {name: (sum(c["tokens"] for _, c in shards.chunks(split)), items_of(shards, split))
                 for name, shards in sets.items()}
        for name, (tokens, meta) in interleave(parts):
            writers[split].add(codec.item(name, tokens), {**meta, "modality": name})
    result = {"task": 0, "shards": [e for s in SPLITS for e in writers[s].close()], "skipped_files": [],
              "skipped_items": {}, "skipped_examples": {}}
    (out / "_tasks").mkdir(exist_ok=True)
    write_json_atomic(out / "_tasks" / "task-00000.json", result)
    manifest = finalize(out)
    for split, totals in manifest["splits"].items():
        LOG.info("shard multi: %s: %d items, %d tokens (%s) -> %s", split, totals["items"], totals["tokens"],
                 ", ".join(sets), out)
    return manifest
