"""Codecs: the one place that knows a modality.

A codec turns raw records into token arrays for the shard stage, tells the model its vocabulary
and shape, and turns sampled tokens back into text, WAV or PNG. Its `config()` is written
into the shard manifest, so training, evaluation and sampling rebuild the identical codec with
`load_codec` and never guess how data was tokenised.
"""

from pathlib import Path
from typing import NamedTuple

import numpy as np

from pipeline import ArpipeError


class Encoded(NamedTuple):
    """Items encoded together: their tokens end to end in one array, each item's token count and
    meta. One array per batch rather than one per item: a paragraph or a small image is a few
    dozen tokens, and an array per item cost the shard stage as much as the Python around it."""
    tokens: np.ndarray
    lengths: np.ndarray
    metas: list[dict]


class Codec:
    modality: str = ""
    help: str = ""  # one line for `arpipe shard --help`
    # How the stream turns items into model inputs (see pipeline/data/stream.py): "pack" joins
    # items with EOS and cuts blocks (text), "crop" cuts crops (audio), "item" takes whole items.
    stream_mode: str = "pack"
    unit: str = "token"  # what one variable is called in metrics: nats_per_<unit>, bits_per_<unit>
    vocab_size: int
    eos_id: int | None = None
    reads_raw_inputs: bool = True  # `arpipe shard <modality>` takes --input files (not shard sets)

    # The shard stage's command line: options, the settings they give (written to plan.json
    # and compared on re-runs), and the function that builds the codec once per shard stage.
    @classmethod
    def add_arguments(cls, parser) -> None:
        pass

    @classmethod
    def shard_settings(cls, args) -> dict:
        return {}

    @classmethod
    def maker(cls, settings: dict, args):
        """make(inputs, root, out) -> codec, called once by `prepare` (e.g. to train a tokenizer)."""
        return lambda inputs, root, out: cls.from_config({"modality": cls.modality, **settings}, out)

    @classmethod
    def from_config(cls, config: dict, root: Path) -> "Codec":
        raise NotImplementedError

    def config(self) -> dict:
        raise NotImplementedError

    def read_records(self, path, root: Path, settings: dict):
        """The records of one input, as pipeline.data.sources.Records batches: a file, as a path
        string, or a DatasetPart (pipeline/data/hf_inputs.py)."""
        raise NotImplementedError

    def encode_records(self, records) -> Encoded:
        """The tokens and per-item metadata (its key, and e.g. UTF-8 bytes) of usable records (a
        pipeline.data.sources.Records batch)."""
        raise NotImplementedError

    def sequence_length(self, block_len: int) -> int:
        """Variables per training row: data.block_len for sequences, C·H·W for images."""
        return block_len

    def model_shape(self, block_len: int) -> tuple[int, ...]:
        """The shape of one model input: (T,) for sequences, (C, H, W) for images."""
        return (self.sequence_length(block_len),)

    @property
    def default_prompt_len(self) -> int:
        """Variables given to completions when eval is not told (`--prompt-len`)."""
        return 32

    def write_samples(self, rows: np.ndarray, directory: Path, name: str, prefix_len: int = 0) -> list[Path]:
        """Render sampled rows (n, D), tokens in the data's ordering, as files in `directory`
        (text, WAV, PNG); the first prefix_len variables of each row were given, not sampled."""
        raise NotImplementedError

    @property
    def token_dtype(self) -> np.dtype:
        """Smallest unsigned dtype that holds every token id, so shards stay small."""
        for bits in (8, 16, 32):  # not np.iinfo: 60 µs a call, once per batch of the shard stage
            if self.vocab_size <= 1 << bits:
                return np.dtype(f"uint{bits}")
        raise ArpipeError(f"vocabulary of {self.vocab_size} tokens is too large")


def codec_file(root: Path, name: str) -> Path:
    """`root / name` for a file a codec's config names (e.g. its tokenizer). Like shard paths, it
    must lie inside the manifest's or export's own directory: absolute names and `..` are refused."""
    path = Path(name)
    if path.is_absolute() or ".." in path.parts:
        raise ArpipeError(f"refusing codec file {name!r} (absolute or '..'): codec files must lie in {root}")
    return root / path


def codec_classes() -> dict[str, type[Codec]]:
    """Every modality, by name."""
    from pipeline.codecs.audio import AudioCodec
    from pipeline.codecs.image import ImageCodec
    from pipeline.codecs.multi import MultiCodec
    from pipeline.codecs.text import TextCodec

    return {c.modality: c for c in (TextCodec, AudioCodec, ImageCodec, MultiCodec)}


def codec_files(config, root: Path) -> list[str]:
    """The codec's own files in `root` (e.g. tokenizer.json), named anywhere in its config
    (a multimodal codec nests its parts' configs)."""
    if isinstance(config, dict):
        return [f for value in config.values() for f in codec_files(value, root)]
    if isinstance(config, list):
        return [f for value in config for f in codec_files(value, root)]
    return [config] if isinstance(config, str) and codec_file(Path(root), config).is_file() else []


def load_codec(config: dict, root: str | Path) -> Codec:
    """Rebuild the codec described by a manifest's `codec` section; `root` holds its files."""
    codecs = codec_classes()
    modality = config.get("modality")
    if modality not in codecs:
        raise ArpipeError(f"unknown codec modality {modality!r}; known: {sorted(codecs)}")
    return codecs[modality].from_config(config, Path(root))
