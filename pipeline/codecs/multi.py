"""The multimodal codec: text, images and audio in one vocabulary, for one model over all three.

Token ids:
  0                 <end>, the stream's EOS: the pack stream puts it after every item
  1 .. P            one opener per part, <text>, <image>, <audio> (in the order of `parts`)
  P+1 ..            each part's own vocabulary, shifted into a range of its own
An item is its opener followed by its own tokens, shifted; a model reads which modality comes,
then the item, then <end>. Items of every modality are packed into blocks like text.

`arpipe shard multi --text DIR --image DIR --audio DIR --out DIR` builds a shard set from
finished ones without touching raw data: every item keeps its split, key and metadata (text
keeps its UTF-8 byte count, so bits/byte stays honest) and gains "modality"; chunks interleave
the parts in proportion to their tokens, so training sees every modality throughout.

Evaluation (pipeline/eval/nll.py) scores each modality apart: `token_parts` gives every
variable's part. An item's opener, its tokens and the <end> after it all count for its part,
so bits/byte of text, bits/dim of images and bits/sample of audio hold everything it costs to
code an item of that modality in the joint stream; `markers_*` says how much of it the opener
and <end> are.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import torch

from pipeline import ArpipeError
from pipeline.codecs import Codec, codec_files, load_codec
from pipeline.log import LOG

END = 0


class MultiCodec(Codec):
    modality = "multi"
    help = "text, images and audio in one vocabulary, from finished shard sets (no raw inputs)"
    stream_mode = "pack"
    unit = "token"
    eos_id = END
    reads_raw_inputs = False  # `arpipe shard multi` takes shard sets, not --input files

    def __init__(self, parts: dict[str, Codec]):
        if not parts:
            raise ArpipeError("a multimodal codec needs at least one part (--text, --image or --audio)")
        self.parts = parts
        self.names = list(parts)
        self.openers = {name: 1 + i for i, name in enumerate(self.names)}
        self.offsets, offset = {}, 1 + len(parts)
        for name, codec in parts.items():
            self.offsets[name] = offset
            offset += codec.vocab_size
        self.vocab_size = offset

    @classmethod
    def add_arguments(cls, parser) -> None:
        parser.description = ("Build one shard set of text, images and audio from finished shard sets: every "
                              "modality's tokens get their own id range and an opening token; items keep their "
                              "split, key and metadata.")
        for name in ("text", "image", "audio"):
            parser.add_argument(f"--{name}", type=Path, metavar="DIR", help=f"a finished {name} shard set")
        parser.add_argument("--out", required=True, type=Path, help="output directory for shards and manifest.json")
        parser.add_argument("--chunk-mb", type=float, default=2.0, help="MB of tokens per WebDataset sample (default 2)")
        parser.add_argument("--shard-mb", type=float, default=256.0, help="MB per tar shard (default 256)")

    @classmethod
    def from_config(cls, config: dict, root: Path) -> "MultiCodec":
        return cls({part["name"]: load_codec(part["codec"], root) for part in config["parts"]})

    def config(self) -> dict:
        return {"modality": self.modality, "vocab_size": self.vocab_size, "eos_id": END,
                "parts": [{"name": n, "opener": self.openers[n], "offset": self.offsets[n],
                           "codec": self.parts[n].config()} for n in self.names]}

    # --- items <-> joint tokens
    def item(self, name: str, tokens: np.ndarray) -> np.ndarray:
        """A part's item as joint tokens: its opener, then its tokens shifted into its range."""
        return np.concatenate([[self.openers[name]], np.asarray(tokens, dtype=np.int64) + self.offsets[name]])

    def part_of_ids(self) -> torch.Tensor:
        """(vocab,) the part index of every id: openers and own tokens; -1 for <end>."""
        part = torch.full((self.vocab_size,), -1, dtype=torch.long)
        for i, name in enumerate(self.names):
            part[self.openers[name]] = i
            part[self.offsets[name] : self.offsets[name] + self.parts[name].vocab_size] = i
        return part

    def token_parts(self, rows: torch.Tensor, before: torch.Tensor) -> torch.Tensor:
        """The part index of every variable of data rows (n, T): an id's own part, and for <end>
        the part of the token before it (the item it ends). `before` (n,) holds the token before
        each row (the previous row's last on this rank; a chunk's first row starts with an opener)."""
        part = self.part_of_ids().to(rows.device)
        previous = torch.cat([before[:, None], rows[:, :-1]], 1)
        own = part[rows]
        return torch.where(own >= 0, own, part[previous]).clamp(min=0)

    def split_items(self, row) -> list[tuple[str, list[int]]]:
        """The items of a token row: (part, its own tokens) for every opener; an item runs to
        <end>, the next opener or the row's end, and keeps only the tokens of its own range."""
        items, current = [], None
        for t in (int(t) for t in row):
            name = next((n for n in self.names if self.openers[n] == t), None)
            if name is not None or t == END:
                current = (name, []) if name is not None else None
                if current:
                    items.append(current)
            elif current is not None:
                own = t - self.offsets[current[0]]
                if 0 <= own < self.parts[current[0]].vocab_size:
                    current[1].append(own)
        return items

    # --- what the trainer, eval and sampling ask of a codec
    @property
    def default_prompt_len(self) -> int:
        return 33  # an opener and 32 variables

    def opener(self, modality: str) -> int:
        if modality not in self.openers:
            raise ArpipeError(f"--modality {modality!r}: this model knows {', '.join(self.names)}")
        return self.openers[modality]

    def encode(self, text: str) -> np.ndarray:
        """A text prompt as a text item's start (for `arpipe sample --prompt`)."""
        if "text" not in self.parts:
            raise ArpipeError("this multimodal model has no text part to take a --prompt")
        return self.item("text", self.parts["text"].encode(text))

    def write_samples(self, rows, directory: Path, name: str, prefix_len: int = 0) -> list[Path]:
        """Each row's items rendered by their own codec: `{name}-text.txt`, `{name}-image.png`,
        `{name}-audio-NN.wav`. An image cut short by the row's end is padded with level 0 (a
        warning says so). With a prefix the first item of each row shows what was given."""
        by_part: dict[tuple[str, int], list] = {}
        for row in rows:
            for i, (part, tokens) in enumerate(self.split_items(row)):
                given = max(0, prefix_len - 1) if i == 0 else 0  # the opener is no variable of the item
                by_part.setdefault((part, given), []).append(tokens)
        files = []
        for (part, given), items in sorted(by_part.items()):
            codec = self.parts[part]
            stem = f"{name}-{part}" + (f"-given{given}" if given else "")
            if codec.stream_mode == "item":
                size = codec.sequence_length(0)
                if any(len(t) < size for t in items):
                    LOG.warning("samples: %d %s items were cut short by the sample's length and are padded",
                                sum(len(t) < size for t in items), part)
                items = [np.pad(np.asarray(t[:size], dtype=np.int64), (0, size - len(t[:size]))) for t in items]
            files += codec.write_samples(items, directory, stem, prefix_len=given)
        return files


# --- `arpipe shard multi`
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
    from pipeline.data.shards import FORMAT, SPLITS, ShardWriter, Shards, finalize, write_json_atomic

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
