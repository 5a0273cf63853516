"""What the classic compressors make of the same text: the bar a model's bits/byte should clear.

A likelihood model is a compressor (an arithmetic coder turns -log2 p into that many bits), so
its validation bits/byte compares directly with xz, bzip2 and gzip on the same bytes. Python's
lzma, bz2 and gzip modules wrap the same libraries as the command-line tools: `xz -9e` and
`bzip2 -9` give byte-identical output; gzip here is zlib's deflate at level 9, whose output is
within 0.2% of GNU gzip's own deflate (tests/unit/test_baselines.py compares with the tools).
"""

import bz2
import gzip
import lzma

from pipeline import ArpipeError
from pipeline.data.shards import Shards
from pipeline.data.stream import split_bytes

COMPRESSORS = {  # the command line each stands for -> the same preset through Python
    "xz -9e": lambda data: lzma.compress(data, preset=9 | lzma.PRESET_EXTREME),
    "bzip2 -9": lambda data: bz2.compress(data, compresslevel=9),
    "gzip -9": lambda data: gzip.compress(data, compresslevel=9, mtime=0),
}


def compressor_bits_per_byte(data: bytes) -> dict[str, float]:
    """Bits per byte of `data` (compressed size × 8 / size) for each of COMPRESSORS."""
    if not data:
        raise ValueError("no bytes to compress")
    return {name: 8 * len(compress(data)) / len(data) for name, compress in COMPRESSORS.items()}


def split_text(shards: Shards, split: str) -> bytes:
    """A text split's items as UTF-8, in shard order, without the EOS the model also scores.
    Decoded from the tokens: byte-level BPE decodes to exactly the text it encoded, so these are
    the bytes that `arpipe eval`'s bits/byte divides by (checked against the manifest's count)."""
    codec = shards.codec
    if codec.modality != "text":
        raise ArpipeError(f"{shards.dir} holds {codec.modality} shards, not text")
    pieces = []
    for shard, entry in shards.chunks(split):
        tokens, offsets = shards.read_chunk(shard, entry["key"])
        pieces += [codec.decode(tokens[a:b]).encode() for a, b in zip(offsets[:-1], offsets[1:])]
    data = b"".join(pieces)
    if len(data) != (counted := split_bytes(shards, split)):
        raise ArpipeError(f"{shards.dir}: the {split} tokens decode to {len(data)} bytes, the manifest "
                          f"counts {counted}: not byte-level BPE shards?")
    return data
