import itertools
import json
from collections import Counter

import numpy as np
import pytest
import torch

from pipeline import ArpipeError
from pipeline.cli import run as cli
from pipeline.data.shards import Shards
from pipeline.data.stream import Batches, TokenStream, eval_blocks, initial_state, pack_items, windows
from tests.unit.test_image import DIGITS


def stream(shards_dir, split="train", **kw):
    kw = {"block_len": 32, "batch_size": 4, "seed": 0, **kw}
    return TokenStream(Shards(shards_dir), split, kw.pop("block_len"), kw.pop("batch_size"), **kw)


def documents(shards_dir, split="train"):
    shards, docs = Shards(shards_dir), []
    for shard, entry in shards.chunks(split):
        tokens, offsets = shards.read_chunk(shard, entry["key"])
        docs += [tokens[a:b].tolist() for a, b in zip(offsets[:-1], offsets[1:])]
    return docs


def epoch_tokens(shards_dir, split, world, workers, block_len=32):
    """Each part's tokens of epoch 0 (rows, then the tokens carried into epoch 1), read through
    the trainer's path: one Batches per rank, DataLoader workers, one row per batch; blocks in
    packed order, so documents can be read back (test_shuffled_blocks_… covers the shuffle)."""
    parts = []
    for rank in range(world):
        batches = Batches(stream(shards_dir, split, rank=rank, world=world, num_workers=workers, batch_size=1,
                                 block_len=block_len, shuffle_rows=False))
        tokens, carry = [[] for _ in range(max(1, workers))], [None] * max(1, workers)
        while any(c is None for c in carry):
            row = next(batches)
            worker = (batches.consumed - 1) % len(carry)  # a DataLoader takes its workers in turn
            state = batches.stream.states[worker][0]
            if state["epoch"] == 0:
                tokens[worker] += row[0].tolist()
            elif carry[worker] is None:  # the first row of epoch 1 holds epoch 0's last tokens as carry
                carry[worker] = state["carry"]
        parts += [t + c for t, c in zip(tokens, carry)]
    return parts


def test_pack_items_puts_eos_after_each_item():
    out = pack_items(np.arange(10, dtype=np.uint16), np.array([5, 0, 9]), np.array([2, 3, 0]), 99)
    assert out.tolist() == [5, 6, 99, 0, 1, 2, 99, 99]
    out = pack_items(np.arange(10, dtype=np.uint16), np.array([5, 0, 8]), np.array([2, 3, 1]), 99,
                     np.array([False, True, False]))  # pieces that do not end their item have no EOS
    assert out.tolist() == [5, 6, 0, 1, 2, 99, 8]


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
    s = stream(text_shards, shuffle_window=1000, block_len=16, shuffle_rows=False)  # one window: the whole epoch
    source = s.sources[0]
    eos = Shards(text_shards).codec.eos_id
    rows, carry = source._window(Shards(text_shards), 0, 0, 0, source.units(0, 0, 1), [])
    window = rows.flatten().tolist() + carry
    pieces = " ".join(map(str, window)).split(f" {eos}")
    assert window[-1] == eos and pieces[-1] == ""
    found = sorted(tuple(map(int, p.split())) for p in pieces[:-1])
    assert found == sorted(map(tuple, documents(text_shards)))
    blocks = itertools.islice(source.rows(0, 1, initial_state()), len(window) // 16)
    assert np.concatenate([b for b, _ in blocks]).tolist() == window[: len(window) // 16 * 16]


def test_shuffled_blocks_are_the_packed_blocks_in_another_order(text_shards):
    """data.shuffle_rows permutes each window's blocks and nothing else: the same blocks, the same
    tokens carried into the next window, an order that mixes the window's documents."""
    shards = Shards(text_shards)
    shuffled, packed = (stream(text_shards, shuffle_window=2, shuffle_rows=on).sources[0] for on in (True, False))
    units = packed.units(0, 0, 1)
    carry = []
    for window in range(0, len(units), 2):
        a, carry_a = shuffled._window(shards, 0, window // 2, 0, units[window : window + 2], carry)
        b, carry_b = packed._window(shards, 0, window // 2, 0, units[window : window + 2], carry)
        assert carry_a == carry_b and sorted(map(tuple, a.tolist())) == sorted(map(tuple, b.tolist()))
        assert len(a) < 3 or a.tolist() != b.tolist()
        carry = carry_a


def test_ranks_and_workers_together_read_every_document_once_per_epoch(text_shards):
    """2 ranks × 2 DataLoader workers, 9 chunks: each part reads whole chunks, and the parts'
    epochs hold every training document exactly once, each followed by EOS."""
    eos = Shards(text_shards).codec.eos_id
    parts = epoch_tokens(text_shards, "train", world=2, workers=2, block_len=256)
    found = []
    for tokens in parts:
        assert tokens and tokens[-1] == eos
        found += [tuple(map(int, p.split())) for p in " ".join(map(str, tokens)).split(f" {eos}")[:-1]]
    assert sorted(found) == sorted(map(tuple, documents(text_shards)))


@pytest.mark.timeout(60)  # the old stream looped for ever on a part without items
@pytest.mark.parametrize("world, workers", [(8, 0), (4, 2)])
def test_fewer_chunks_than_parts_feed_every_part_each_token_once(text_shards, world, workers):
    """The val split has 2 chunks of 3 and 2 documents; 8 parts each get a range of its tokens
    (documents are cut between parts), and together they read each token and each EOS once."""
    shards = Shards(text_shards)
    assert [entry["items"] for _, entry in shards.chunks("val")] == [3, 2]
    for rank in range(world):  # every rank gets batches (the old stream hung on ranks past the items)
        assert next(Batches(stream(text_shards, "val", rank=rank, world=world, num_workers=workers))).shape == (4, 32)
    parts = epoch_tokens(text_shards, "val", world=world, workers=workers)
    assert len(parts) == 8 and all(len(tokens) >= 6332 // 8 for tokens in parts)
    packed = [t for d in documents(text_shards, "val") for t in d + [shards.codec.eos_id]]
    assert Counter(t for tokens in parts for t in tokens) == Counter(packed)


def test_chunk_ranges_cut_the_epoch_into_equal_token_shares(text_shards):
    source = stream(text_shards).sources[0]
    parts = len(source.chunks) + 3
    total = sum(source.sizes)
    for epoch in range(2):
        ranges = [source.units(epoch, p, parts) for p in range(parts)]
        assert [sum(hi - lo for _, lo, hi in units) for units in ranges] == \
            [(p + 1) * total // parts - p * total // parts for p in range(parts)]
        pieces = sorted((c, lo, hi) for units in ranges for c, lo, hi in units)  # tile every chunk
        for c in range(len(source.chunks)):
            mine = [(lo, hi) for d, lo, hi in pieces if d == c]
            assert mine[0][0] == 0 and mine[-1][1] == source.sizes[c]
            assert all(a[1] == b[0] for a, b in zip(mine, mine[1:]))


def test_ranks_read_disjoint_chunks_covering_the_split(text_shards):
    source = stream(text_shards).sources[0]
    n = len(source.chunks)
    assert n >= 4
    for epoch in range(3):
        parts = [source.units(epoch, p, 4) for p in range(4)]
        chunks = [c for units in parts for c, _, _ in units]
        assert sorted(chunks) == list(range(n)) and all(source.whole(u) for units in parts for u in units)
    assert source.units(0, 0, 4) != source.units(1, 0, 4)  # reshuffled per epoch


@pytest.fixture(scope="module")
def digit_shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits") / "shards"
    cli(["shard", "image", "--input", str(DIGITS), "--out", str(out), "--levels", "17", "--val-fraction", "0.01"])
    return out


def test_a_split_too_small_for_the_parts_is_refused_on_every_rank(text_shards, digit_shards):
    with pytest.raises(ArpipeError, match=r"val split \(2 chunks, 5 items, 6332 tokens\) cannot give each of 6400 "
                                          r"stream parts .* a token per epoch; use fewer data.num_workers"):
        stream(text_shards, "val", rank=3, world=3200, num_workers=2)
    items = Shards(digit_shards).manifest["splits"]["val"]["items"]
    with pytest.raises(ArpipeError, match=f"cannot give each of {items + 1} stream parts .* an item"):
        stream(digit_shards, "val", world=items + 1)
    for rank in (0, items - 1):  # as many parts as items: one image each per epoch
        s = Batches(stream(digit_shards, "val", rank=rank, world=items, batch_size=2))
        a, b = next(s), next(s)
        assert torch.equal(a[0], a[1]) and torch.equal(a, b)


def test_eval_blocks_score_every_token_once_in_order_on_any_world_size(text_shards):
    """The scored tokens of each rank, in order, are its chunks' items each followed by EOS: no
    token missing, none twice, none moved; for blocks and for sliding windows."""
    shards = Shards(text_shards)
    chunks = shards.chunks("val")
    for world, stride in [(1, None), (2, None), (3, None), (1, 7), (2, 32), (3, 1)]:
        for rank in range(world):
            expected = []
            for shard, entry in chunks[rank::world]:
                tokens, offsets = shards.read_chunk(shard, entry["key"])
                expected += pack_items(tokens, offsets[:-1], np.diff(offsets), shards.codec.eos_id).tolist()
            scored = []
            for x, mask in eval_blocks(shards, "val", 32, 5, rank=rank, world=world, stride=stride):
                assert x.shape == mask.shape and x.shape[1] == 32 and x.shape[0] <= 5
                scored += x[mask].tolist()
            assert scored == expected


@pytest.mark.parametrize("block_len, stride", [(8, 8), (8, 1), (8, 3), (5, 4), (1, 1)])
def test_sliding_windows_score_each_position_once_with_the_promised_context(block_len, stride):
    for length in range(0, 40):
        begin, lo, hi = windows(length, block_len, stride)
        scored = [p for a, b in zip(lo, hi) for p in range(a, b)]
        assert scored == list(range(length))  # each position once, in order
        assert np.all(begin <= lo) and np.all(hi <= begin + block_len)  # scored inside the window
        later = begin > 0
        assert np.all(lo[later] - begin[later] >= block_len - stride)  # context after the first window
        assert np.all(begin[~later] == 0)
    if stride == block_len:  # consecutive blocks
        begin, lo, hi = windows(21, block_len, stride)
        assert begin.tolist() == lo.tolist() == list(range(0, 21, block_len))


@pytest.mark.parametrize("old_world, new_world", [(2, 1), (1, 2), (2, 3), (12, 2)])
def test_another_world_size_finishes_the_epoch_without_skipping_chunks(text_shards, old_world, new_world):
    """A run on old_world ranks stops mid-epoch; a run on new_world ranks continues it: together
    they read every chunk of the epoch, re-reading at most the partly read windows and the chunks
    split between parts (12 parts > 9 chunks)."""
    G = 2  # chunks per shuffle window
    old = [Batches(stream(text_shards, rank=r, world=old_world, shuffle_window=G, batch_size=64))
           for r in range(old_world)]
    for batches in old:
        for _ in range(25 if old_world < 12 else 3):  # past the first window
            next(batches)
    saved = [json.loads(json.dumps(b.state_dict())) for b in old]
    new = [stream(text_shards, rank=r, world=new_world, shuffle_window=G, batch_size=64) for r in range(new_world)]
    for r, s in enumerate(new):
        Batches(s).load_state_dict(saved, rank=r)
    sources = [s.sources[0] for s in new]
    done = set(sources[0].done["chunks"])
    assert sources[0].done["epoch"] == 0 and all(s.done == sources[0].done for s in sources)
    remaining = [c for r, s in enumerate(sources) for c, _, _ in s.units(0, r, new_world)]
    n = len(sources[0].chunks)
    assert sorted(remaining + sorted(done)) == list(range(n))  # every chunk once: none skipped, none twice
    read_before = set()
    for r, b in enumerate(old):
        source = b.stream.sources[0]
        units = source.units(0, r, old_world)
        window = b.stream.states[0][0]["window"]
        read_before.update(c for c, lo, hi in units[: window * G] if source.whole((c, lo, hi)))
        partly = {c for c, _, _ in units[window * G : (window + 1) * G]}
        assert not partly & done  # a partly read window is read again
    assert done == read_before and done
