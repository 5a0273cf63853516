"""Codecs: the one place that knows a modality.

A codec turns raw records into token arrays for the shard stage, tells the model its vocabulary
and shape, and turns sampled tokens back into text (later WAV or PNG). Its `config()` is written
into the shard manifest, so training, evaluation and sampling rebuild the identical codec with
`load_codec` and never guess how data was tokenised.
"""

from pathlib import Path

import numpy as np

from pipeline import ArpipeError


class Codec:
    modality: str = ""
    # How the training stream cuts items into model inputs: "pack" concatenates items with an EOS
    # token between them and cuts fixed-length blocks (text).
    stream_mode: str = "pack"
    vocab_size: int
    eos_id: int | None = None

    def config(self) -> dict:
        raise NotImplementedError

    def read_records(self, path: Path, root: Path, settings: dict):
        """The records of one input file (see pipeline.data.sources.Record)."""
        raise NotImplementedError

    def encode_records(self, records: list) -> list[tuple[np.ndarray, dict]]:
        """Tokens and per-item metadata (its key, and e.g. UTF-8 bytes) for each usable record."""
        raise NotImplementedError

    def model_shape(self, block_len: int) -> tuple[int, ...]:
        """The shape of one model input: (T,) for sequences, (C, H, W) for images."""
        return (block_len,)

    @property
    def token_dtype(self) -> np.dtype:
        """Smallest unsigned dtype that holds every token id, so shards stay small."""
        for dtype in (np.uint8, np.uint16, np.uint32):
            if self.vocab_size <= np.iinfo(dtype).max + 1:
                return np.dtype(dtype)
        raise ArpipeError(f"vocabulary of {self.vocab_size} tokens is too large")


def load_codec(config: dict, root: str | Path) -> Codec:
    """Rebuild the codec described by a manifest's `codec` section; `root` holds its files."""
    from pipeline.codecs.text import TextCodec

    codecs = {c.modality: c for c in (TextCodec,)}
    modality = config.get("modality")
    if modality not in codecs:
        raise ArpipeError(f"unknown codec modality {modality!r}; known: {sorted(codecs)}")
    return codecs[modality].from_config(config, Path(root))
