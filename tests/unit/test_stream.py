import itertools
import json

import numpy as np
import pytest
import torch

from pipeline.data.shards import Shards
from pipeline.data.stream import Batches, TokenStream, eval_blocks, initial_state, pack_items


def stream(shards_dir, **kw):
    kw = {"block_len": 32, "batch_size": 4, "seed": 0, **kw}
    return TokenStream(Shards(shards_dir), "train", kw.pop("block_len"), kw.pop("batch_size"), **kw)


def documents(shards_dir, split="train"):
    shards, docs = Shards(shards_dir), []
    for shard, entry in shards.chunks(split):
        tokens, offsets = shards.read_chunk(shard, entry["key"])
        docs += [tokens[a:b].tolist() for a, b in zip(offsets[:-1], offsets[1:])]
    return docs


def test_pack_items_puts_eos_after_each_item():
    out = pack_items(np.arange(10, dtype=np.uint16), np.array([5, 0, 9]), np.array([2, 3, 0]), 99)
    assert out.tolist() == [5, 6, 99, 0, 1, 2, 99, 99]


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_sees_exactly_the_uninterrupted_data(text_shards, workers):
    reference = Batches(stream(text_shards, num_workers=workers))
    expected = [next(reference) for _ in range(60)]
    first = Batches(stream(text_shards, num_workers=workers))
    for _ in range(23):
        next(first)
    state = json.loads(json.dumps(first.state_dict()))  # it must survive JSON (the checkpoint)
    resumed = Batches(stream(text_shards, num_workers=workers))
    resumed.load_state_dict([state], rank=0)
    for a, b in zip(expected[23:], (next(resumed) for _ in range(37))):
        assert torch.equal(a, b)


def test_an_epoch_is_every_document_once_each_followed_by_eos(text_shards):
    s = stream(text_shards, shuffle_window=1000, block_len=16)  # one window holds the whole epoch
    eos = Shards(text_shards).codec.eos_id
    rows, carry = s._window(Shards(text_shards), 0, 0, 0, s._units(0, 0, 1), [])
    window = rows.flatten().tolist() + carry
    pieces = " ".join(map(str, window)).split(f" {eos}")
    assert window[-1] == eos and pieces[-1] == ""
    found = sorted(tuple(map(int, p.split())) for p in pieces[:-1])
    assert found == sorted(map(tuple, documents(text_shards)))
    blocks = itertools.islice(s.part_blocks(0, 1, initial_state()), len(window) // 16)
    assert np.concatenate([b for b, _ in blocks]).tolist() == window[: len(window) // 16 * 16]


def test_ranks_read_disjoint_chunks_covering_the_split(text_shards):
    s = stream(text_shards)
    n = len(s.chunks)
    assert n >= 4
    for epoch in range(3):
        parts = [s._units(epoch, p, 4) for p in range(4)]
        chunks = [c for units in parts for c, _, _ in units]
        assert sorted(chunks) == list(range(n))
    assert [c for c, _, _ in s._units(0, 0, 4)] != [c for c, _, _ in s._units(1, 0, 4)]  # reshuffled per epoch


def test_fewer_chunks_than_parts_split_items(text_shards):
    s = stream(text_shards)
    parts = len(s.chunks) + 3
    for part in range(parts):
        units = s._units(0, part, parts)
        assert len(units) == len(s.chunks) and all(r == part and m == parts for _, r, m in units)


def test_ranks_get_different_batches(text_shards):
    a = next(Batches(stream(text_shards, rank=0, world=2)))
    b = next(Batches(stream(text_shards, rank=1, world=2)))
    assert not torch.equal(a, b)


def test_eval_blocks_cover_every_token_once_on_any_world_size(text_shards):
    shards = Shards(text_shards)
    expected = sum(len(d) + 1 for d in documents(text_shards, "val"))
    for world in (1, 2, 3):
        count = 0
        for rank in range(world):
            for x, mask in eval_blocks(shards, "val", 32, 5, rank=rank, world=world):
                assert x.shape == mask.shape and x.shape[1] == 32
                count += int(mask.sum())
        assert count == expected


@pytest.mark.parametrize("old_world, new_world", [(2, 1), (1, 2), (2, 3)])
def test_another_world_size_finishes_the_epoch_without_skipping_chunks(text_shards, old_world, new_world):
    """A run on old_world ranks stops mid-epoch; a run on new_world ranks continues it: together
    they read every chunk of the epoch, re-reading at most the partly read windows."""
    G = 2  # chunks per shuffle window
    old = [Batches(stream(text_shards, rank=r, world=old_world, shuffle_window=G, batch_size=64))
           for r in range(old_world)]
    for batches in old:
        for _ in range(25):  # ≈ 50k tokens per part: past the first window
            next(batches)
    saved = [json.loads(json.dumps(b.state_dict())) for b in old]
    new = [stream(text_shards, rank=r, world=new_world, shuffle_window=G, batch_size=64) for r in range(new_world)]
    for r, s in enumerate(new):
        Batches(s).load_state_dict(saved, rank=r)
    done = set(new[0].done["chunks"])
    assert new[0].done["epoch"] == 0 and all(s.done == new[0].done for s in new)
    remaining = [c for r, s in enumerate(new) for c, _, _ in s._units(0, r, new_world)]
    n = len(new[0].chunks)
    assert sorted(remaining + sorted(done)) == list(range(n))  # every chunk once: none skipped, none twice
    read_before = set()
    for r, b in enumerate(old):
        units = b.stream._units(0, r, old_world)
        window = b.stream.states[0]["window"]
        read_before.update(c for c, _, _ in units[: window * G])
        partly = {c for c, _, _ in units[window * G : (window + 1) * G]}
        assert not partly & done  # a partly read window is read again
    assert done == read_before and done
