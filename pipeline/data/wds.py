"""arpipe shards in your own loop, through `webdataset`.

    from pipeline.data.wds import items, shard_urls

    for item in items(shard_urls("shards/text", "train")).shuffle(1000):
        item["__key__"], item["tokens"]  # one document (clip, image): its key, tokens and meta

`items(urls)` is a `webdataset.WebDataset` over the tars whose samples are arpipe's items: each
chunk sample (tokens.npy, offsets.npy, meta.json) is taken apart into its items. Any URL
webdataset opens works, e.g. `pipe:aws s3 cp s3://bucket/shards/text/train/train-00000-000000.tar -`
for shards in object storage.
arpipe's own trainer reads the same tars by random access instead (pipeline/data/stream.py),
for exact resume.
"""

import io
import json
from pathlib import Path

import numpy as np
import webdataset as wds

from pipeline.data import storage
from pipeline.data.shards import Shards


def chunk_items(samples):
    """A webdataset stage: arpipe chunk samples in, their items out, each a dict with the item's
    `__key__`, its `tokens` (a numpy array) and the rest of its meta (e.g. `bytes` for text).
    Arrays are read with allow_pickle=False: a shard holds numbers, never objects."""
    for sample in samples:
        tokens = np.load(io.BytesIO(sample["tokens.npy"]), allow_pickle=False)
        offsets = np.load(io.BytesIO(sample["offsets.npy"]), allow_pickle=False)
        for meta, start, end in zip(json.loads(sample["meta.json"])["items"], offsets[:-1], offsets[1:]):
            yield {"__key__": meta["key"], "__url__": sample["__url__"], "tokens": tokens[start:end],
                   **{k: v for k, v in meta.items() if k != "key"}}


def items(urls, **options) -> wds.WebDataset:
    """The items of the tars at `urls` (a list, or a brace pattern such as
    `train-{00000..00003}-{000000..000009}.tar`), in order unless `options` shuffle shards."""
    return wds.WebDataset(urls, **{"shardshuffle": False, **options}).compose(chunk_items)


def shard_urls(directory: str | Path, split: str) -> list[str]:
    """The paths (or URLs, for a directory in object storage) of a split's tars, from the manifest
    of a finished `arpipe shard` run."""
    shards = Shards(directory)  # refuses manifests that point outside their directory
    return [storage.join(shards.dir, entry["path"]) for entry in shards.manifest["shards"] if entry["split"] == split]
