"""arpipe shards through a real `webdataset.WebDataset` pipeline (pipeline/data/wds.py): every
item once, with the tokens and meta the shard reader gives, from files or any URL webdataset opens."""

import hashlib
import random

from pipeline.data.wds import items, shard_urls
from tests.unit.test_shards import digest, texts


def test_webdataset_pipeline_yields_every_item_with_its_tokens(text_shards):
    expected = digest(text_shards)  # (split, key) -> sha256 of the item's tokens, by the shard reader
    documents = texts(text_shards)
    seen = {}
    for split in ("train", "val"):
        urls = shard_urls(text_shards, split)
        if split == "val":  # any URL webdataset opens: here a pipe
            urls = [f"pipe:cat {url}" for url in urls]
        for item in items(urls):
            assert (split, item["__key__"]) not in seen
            seen[split, item["__key__"]] = hashlib.sha256(item["tokens"].tobytes()).hexdigest()
            assert item["bytes"] == len(documents[item["__key__"]].encode())
    assert seen == expected


def test_webdataset_stages_compose_with_the_items(text_shards):
    urls = shard_urls(text_shards, "train")
    in_order = [item["__key__"] for item in items(urls)]
    shuffled = [item["__key__"] for item in items(urls).shuffle(50, rng=random.Random(0))]
    assert sorted(shuffled) == sorted(in_order) and shuffled != in_order
    lengths = list(items(urls).map(lambda item: len(item["tokens"])).batched(8, collation_fn=list))
    assert sum(len(batch) for batch in lengths) == len(in_order)
