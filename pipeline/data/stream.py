"""Streams over token shards: shuffled training batches with exact resume, weighted mixtures of
shard sets, and the deterministic evaluation windows that count every variable once.

Training. Each epoch permutes the split's chunks (seeded). The stream is cut into `parts`, one
per (rank, DataLoader worker). With at least as many chunks as parts, a part takes every
parts-th chunk of the permutation (each rank reads only its own chunks). With fewer chunks, the
permuted chunks are laid end to end and cut into `parts` ranges of equal token count, so a
split of a few long documents still feeds every part: an item cut at a range's end goes on at
the start of the next range (pack and crop modes; the EOS token follows an item's last token,
in whichever range that is), while in item mode an item belongs to the range its first token
is in. A split too small to feed every part (pack: fewer tokens than parts; crop: fewer than
block_len tokens per part; item: fewer items than parts) is refused when the stream is made,
on every rank alike, before any collective. A part reads `shuffle_window` chunks (or chunk
ranges) at a time, shuffles their items and turns them into fixed-length rows by the codec's
stream mode:

  pack  (text)   items joined with an EOS token after each, cut into blocks, the window's blocks
                 shuffled (data.shuffle_rows: else a batch of a long document's consecutive
                 blocks is one correlated sample); the tokens left at a window's end open the
                 next window, so an epoch trains on every token once
  crop  (audio)  non-overlapping crops of each item from a random offset, shuffled
  item  (images) one row per item

Mixtures (data.mixture). A stream over several shard sets with one codec keeps a stream as
above per source, each with its own epochs (a small source repeats while a large one reads on),
and takes each row of a part from the source furthest behind its weight: after k rows, of which
n_s came from source s, row k+1 comes from argmax_s (w_s·(k+1) − n_s) (the lowest s on a tie;
weights normalised to sum to 1). The choice depends only on the counts n_s, which are part of
the state, so resume stays exact, and every prefix of a part's rows holds each source's share
to within one row (tests/unit/test_mixture.py). Source 0 is shuffled exactly as it would be
alone (data.path); source i > 0 seeds its shuffles with (seed, i).

A part's position is, per source, (epoch, window, row, carry-in tokens, rows taken), so resuming
rebuilds one window per source and skips to the row: a resumed run sees exactly the data an
uninterrupted run would have seen.

Resuming with another number of parts (world size × workers) cannot be exact; `continue_from`
finishes each source's interrupted epoch on the chunks no part had fully read: no chunk is
skipped, a fully read chunk is not read again in that epoch, the windows that were partly read
(at most one per old part, plus whatever a part had read of the next epoch) and the chunks
split between parts are read again, and the tokens carried between windows (fewer than
block_len per part) are dropped.
"""

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline import ArpipeError
from pipeline.data.shards import Shards


def pack_items(tokens: np.ndarray, starts: np.ndarray, lengths: np.ndarray, eos: int,
               eos_after: np.ndarray | None = None) -> np.ndarray:
    """tokens[starts[i] : starts[i]+lengths[i]] for each i, each followed by eos (only where
    eos_after[i], if given: a piece that does not end its item), concatenated.
    Vectorised: items may be tiny (lines) and numerous."""
    eos_after = np.ones(len(starts), dtype=bool) if eos_after is None else eos_after
    ends = np.cumsum(lengths + eos_after)  # one past each piece (and its EOS) in the output
    total = int(ends[-1]) if len(ends) else 0
    # The source index of every output position is a cumulative sum: +1 along a piece, a jump to
    # the next piece's start after each (EOS slots read a clipped index, then get eos).
    step = np.ones(total, dtype=np.int64)
    last_read = starts[:-1] + lengths[:-1] - 1 + eos_after[:-1]
    step[ends[:-1]] = starts[1:] - last_read
    if total:
        step[0] = starts[0]
    out = np.take(tokens, np.cumsum(step, out=step), mode="clip") if len(tokens) else np.zeros(total, tokens.dtype)
    out[(ends - 1)[eos_after]] = eos
    return out


def initial_state() -> dict:
    return {"epoch": 0, "window": 0, "block": 0, "carry": [], "rows": 0}


def gather_rows(tokens: np.ndarray, starts: np.ndarray, length: int) -> np.ndarray:
    """Rows tokens[s : s+length] for each start s, as one (len(starts), length) array: one row
    copy each from a strided view (an index per token would cost 10× more)."""
    if not len(starts):
        return np.zeros((0, length), tokens.dtype)
    return np.lib.stride_tricks.sliding_window_view(tokens, length)[starts]


class Source:
    """One shard set of a training stream: the rows each part reads of it, epoch after epoch."""

    def __init__(self, shards: Shards, split: str, block_len: int, *, seed: list[int], shuffle_window: int,
                 shuffle_rows: bool = True):
        self.dir = shards.dir
        self.split = split
        self.chunks = shards.chunks(split)
        if not self.chunks:
            raise ArpipeError(f"{shards.dir} has no {split} data")
        codec = shards.codec
        self.mode, self.eos, self.dtype = codec.stream_mode, codec.eos_id, codec.token_dtype
        self.block_len = codec.sequence_length(block_len)
        self.seed = seed
        self.window_size = max(1, shuffle_window)
        self.shuffle_rows = shuffle_rows
        self.sizes = [entry["tokens"] for _, entry in self.chunks]
        self.done = {"epoch": -1, "chunks": []}  # chunks read in `epoch` before a change of world size

    def check_parts(self, parts: int) -> None:
        """Refuse a split too small to give each of `parts` parts rows in every epoch, from the
        manifest alone (every rank decides the same, before reading data)."""
        if len(self.chunks) >= parts:
            return
        tokens, items = sum(self.sizes), sum(entry["items"] for _, entry in self.chunks)
        need = {"pack": (tokens < parts, "a token"),
                "crop": (tokens // parts < self.block_len, f"{self.block_len} tokens (data.block_len)"),
                "item": (items < parts, "an item")}[self.mode]
        if need[0]:
            raise ArpipeError(
                f"{self.dir}: the {self.split} split ({len(self.chunks)} chunks, {items} items, {tokens} tokens) "
                f"cannot give each of {parts} stream parts (ranks × data.num_workers) {need[1]} per epoch; "
                f"use fewer data.num_workers or ranks, or more data")

    def units(self, epoch: int, part: int, parts: int, done: dict | None = None) -> list[tuple[int, int, int]]:
        """(chunk index, first token, end token) of each chunk range a part reads in this epoch, in order."""
        done = done or self.done
        order = np.random.default_rng([*self.seed, epoch]).permutation(len(self.chunks))
        if epoch == done["epoch"]:
            order = order[~np.isin(order, done["chunks"])]
        if len(order) >= parts:
            return [(int(c), 0, self.sizes[c]) for c in order[part::parts]]
        units, start = [], 0
        total = sum(self.sizes[c] for c in order)
        lo, hi = part * total // parts, (part + 1) * total // parts  # this part's tokens, end to end
        for c in order:
            end = start + self.sizes[c]
            if start < hi and end > lo:
                units.append((int(c), max(lo, start) - start, min(hi, end) - start))
            start = end
        return units

    def whole(self, unit: tuple[int, int, int]) -> bool:
        c, lo, hi = unit
        return lo == 0 and hi == self.sizes[c]

    def _items(self, shards: Shards, units) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The units' chunks' tokens, concatenated, and the start, length and whether it ends
        its item, of each piece of an item in the units' ranges (items are never empty)."""
        arrays, starts, lengths, ends_item, base = [], [], [], [], 0
        for c, lo, hi in units:
            shard, entry = self.chunks[c]
            tokens, offsets = shards.read_chunk(shard, entry["key"])
            a, b = offsets[:-1], offsets[1:]
            if self.mode == "item":  # items are whole: each belongs to the range its first token is in
                keep = (a >= lo) & (a < hi)
                first, end = a[keep], b[keep]
            else:
                keep = (b > lo) & (a < hi)
                first, end = np.maximum(a[keep], lo), np.minimum(b[keep], hi)
            arrays.append(tokens)
            starts.append(first + base)
            lengths.append(end - first)
            ends_item.append(b[keep] <= hi)
            base += len(tokens)
        return tuple(np.concatenate(x) for x in (arrays, starts, lengths, ends_item))

    def _window(self, shards: Shards, epoch: int, window: int, part: int, units, carry) -> tuple[np.ndarray, list]:
        """The rows of one window, and the tokens it carries into the next (pack mode only)."""
        tokens, starts, lengths, ends_item = self._items(shards, units)
        rng = np.random.default_rng([*self.seed, epoch, window, part])
        order = rng.permutation(len(starts))
        starts, lengths, ends_item, T = starts[order], lengths[order], ends_item[order], self.block_len
        if self.mode == "pack":
            packed = pack_items(tokens, starts, lengths, self.eos, ends_item)
            joined = np.concatenate([np.asarray(carry, self.dtype), packed])
            n = len(joined) // T
            rows = joined[: n * T].reshape(n, T)
            if self.shuffle_rows:  # a batch draws from the whole window, not from one or two long documents
                rows = rows[rng.permutation(n)]
            return rows, joined[n * T :].tolist()
        if self.mode == "item":
            if np.any(lengths != T):
                raise ArpipeError(f"items of {self.dir} are not all {T} tokens long")
            return gather_rows(tokens, starts, T), []
        # crop: every item long enough gives its non-overlapping crops from a random offset
        long = lengths >= T
        starts, lengths = starts[long], lengths[long]
        offsets = (rng.random(len(starts)) * np.minimum(T, lengths - T + 1)).astype(np.int64)
        counts = (lengths - offsets) // T
        first = np.repeat(starts + offsets, counts)
        index = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
        crops = first + index * T
        return gather_rows(tokens, crops[rng.permutation(len(crops))], T), []

    def rows(self, part: int, parts: int, state: dict):
        """(row, state after it) for one part, forever, starting from `state`."""
        shards = Shards(self.dir)  # each DataLoader worker reads through its own
        epoch, window, block, carry, taken = (state[k] for k in ("epoch", "window", "block", "carry", "rows"))
        while True:
            units = self.units(epoch, part, parts)
            windows = [units[i : i + self.window_size] for i in range(0, len(units), self.window_size)]
            epoch_rows = 0
            while window < len(windows):
                rows, carry_out = self._window(shards, epoch, window, part, windows[window], carry)
                for b in range(block, len(rows)):
                    taken += 1
                    yield rows[b], {"epoch": epoch, "window": window, "block": b + 1, "carry": carry, "rows": taken}
                epoch_rows += len(rows)
                carry, window, block = carry_out, window + 1, 0
            if not epoch_rows and (self.mode != "pack" or not windows) and epoch != self.done["epoch"]:
                raise ArpipeError(f"no training rows of {self.block_len} tokens in {self.dir} for stream part "
                                  f"{part} of {parts} (too little data, or items shorter than data.block_len)")
            epoch, window = epoch + 1, 0

    def continue_from(self, states: list[dict], parts: int, done_before: dict) -> None:
        """Mark the chunks read fully by the old parts (`states`, one per old part, in order) in
        the earliest epoch any of them was in; the new parts finish that epoch on the others."""
        epoch = min(s["epoch"] for s in states)
        read = set(done_before["chunks"]) if done_before["epoch"] == epoch else set()
        for part, state in enumerate(states):
            units = self.units(epoch, part, parts, done_before)
            finished = len(units) if state["epoch"] > epoch else state["window"] * self.window_size
            read.update(unit[0] for unit in units[:finished] if self.whole(unit))  # a shared chunk is read again
        self.done = {"epoch": epoch, "chunks": sorted(read)}


class TokenStream(IterableDataset):
    """Batches (batch_size, block_len) of int64 tokens for one rank, forever (epoch after epoch),
    from one shard set or a weighted mixture of several (`shards` a list, `weights` alike).

    Iterating yields (batch, logical worker, that worker's per-source states after the batch);
    `Batches` keeps the states and turns them into `state_dict()`.
    """

    def __init__(self, shards: Shards | list[Shards], split: str, block_len: int, batch_size: int, *, seed: int,
                 weights: list[float] | None = None, rank: int = 0, world: int = 1, num_workers: int = 0,
                 shuffle_window: int = 8, shuffle_rows: bool = True):
        sets = shards if isinstance(shards, list) else [shards]
        for other in sets[1:]:
            if other.manifest["codec"] != sets[0].manifest["codec"]:
                raise ArpipeError(f"{sets[0].dir} and {other.dir} were sharded with different codecs (compare codec in "
                                  f"their manifest.json); a mixture needs one: shard both with the same settings "
                                  f"(text: the same --tokenizer)")
        self.sources = [Source(s, split, block_len, seed=[seed] if i == 0 else [seed, i], shuffle_window=shuffle_window,
                               shuffle_rows=shuffle_rows) for i, s in enumerate(sets)]
        weights = weights or [1.0] * len(sets)
        self.weights = [w / sum(weights) for w in weights]
        self.batch_size = batch_size
        self.rank, self.world = rank, world
        self.num_workers = max(1, num_workers)
        for source in self.sources:
            source.check_parts(world * self.num_workers)
        self.states = [[initial_state() for _ in self.sources] for _ in range(self.num_workers)]
        self.first_worker = 0  # logical worker of DataLoader worker 0 (rotates on resume)

    def part_rows(self, part: int, parts: int, states: list[dict]):
        """(row, every source's state after it) for one part, forever: each row from the source
        furthest behind its weight (see the module docstring)."""
        streams = [source.rows(part, parts, state) for source, state in zip(self.sources, states)]
        if len(streams) == 1:  # nothing to choose: spare the per-row choice (a fifth of the stream's time)
            for row, state in streams[0]:
                yield row, [state]
        states = list(states)
        while True:
            k = sum(state["rows"] for state in states) + 1
            i = max(range(len(streams)), key=lambda s: self.weights[s] * k - states[s]["rows"])
            row, states[i] = next(streams[i])
            yield row, list(states)

    def continue_from(self, saved: list[dict]) -> None:
        """Start where a run with another number of parts stopped; `saved` holds every old
        rank's `Batches.state_dict()`, in rank order (see the module docstring)."""
        parts = saved[0]["parts"]
        old_parts = [w for rank in saved for w in rank["workers"]]  # part p = rank × workers + worker
        for i, source in enumerate(self.sources):
            source.continue_from([states[i] for states in old_parts], parts, saved[0]["done"][i])
        self.states = [[{**initial_state(), "epoch": s.done["epoch"]} for s in self.sources]
                       for _ in range(self.num_workers)]
        self.first_worker = 0

    def __iter__(self):
        info = get_worker_info()
        worker = ((info.id if info else 0) + self.first_worker) % self.num_workers
        parts = self.world * self.num_workers
        rows = self.part_rows(self.rank * self.num_workers + worker, parts, self.states[worker])
        while True:
            batch = []
            for row, states in rows:
                batch.append(row)
                if len(batch) == self.batch_size:
                    break
            yield torch.from_numpy(np.stack(batch).astype(np.int64)), worker, states


def as_is(item):
    return item


class Batches:
    """The training iterator: batches of a TokenStream through a DataLoader, with exact resume.

    A DataLoader takes batches from its workers in turn, so after `consumed` batches the next
    comes from logical worker consumed % workers; resuming rotates the workers to match."""

    def __init__(self, stream: TokenStream):
        self.stream = stream
        self.consumed = 0
        self._iter = None

    def state_dict(self) -> dict:
        return {"consumed": self.consumed, "workers": [[dict(s) for s in states] for states in self.stream.states],
                "parts": self.stream.world * self.stream.num_workers, "done": [s.done for s in self.stream.sources]}

    def load_state_dict(self, saved: list[dict], rank: int) -> None:
        """Resume from every old rank's state: exactly if the number of parts is unchanged,
        else as `TokenStream.continue_from` describes."""
        sources = len(self.stream.sources)
        if any(isinstance(states, dict) for r in saved for states in r["workers"]):
            raise ArpipeError("the checkpoint's data stream state comes from an arpipe before mixtures (one state "
                              "per worker, not one per source): train it on with that version, or start a new out_dir")
        if any(len(states) != sources for r in saved for states in r["workers"]):
            raise ArpipeError(f"the checkpoint's data stream does not have this run's {sources} source(s): resume "
                              f"with the data.path / data.mixture it was trained on, or start a new out_dir")
        state = saved[rank] if rank < len(saved) else None
        if state is None or state["parts"] != self.stream.world * self.stream.num_workers \
                or len(state["workers"]) != self.stream.num_workers:
            self.stream.continue_from(saved)
            self.consumed = 0
        else:
            self.consumed = state["consumed"]
            self.stream.states = [[dict(s) for s in states] for states in state["workers"]]
            for source, done in zip(self.stream.sources, state["done"]):
                source.done = done
            self.stream.first_worker = self.consumed % self.stream.num_workers
        self._iter = None

    def __next__(self) -> torch.Tensor:
        if self._iter is None:
            workers = self.stream.num_workers if self.stream.num_workers > 1 else 0
            # collate_fn: the items are ready; DataLoader's default_convert would walk every
            # int of each state's carry list (up to block_len of them), most of the stream's time
            self._iter = iter(DataLoader(self.stream, batch_size=None, num_workers=workers,
                                         persistent_workers=workers > 0, collate_fn=as_is))
        batch, worker, states = next(self._iter)
        self.stream.states[worker] = states
        self.consumed += 1
        return batch

    def __iter__(self):
        return self


def windows(length: int, block_len: int, stride: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sliding windows over a sequence of `length` variables: each window's first position and
    the range [lo, hi) of positions it scores. Window k starts at k·stride; the first scores all
    of its block_len positions, every later one its last `stride`, so each position is scored
    exactly once, with at least block_len − stride earlier positions as context (all earlier
    ones in the first window). stride = block_len gives consecutive blocks."""
    n = 0 if length == 0 else 1 + max(0, -(-(length - block_len) // stride))
    begin = np.arange(n, dtype=np.int64) * stride
    lo = np.where(begin == 0, 0, begin + block_len - stride)
    hi = np.minimum(begin + block_len, length)
    return begin, lo, hi


def window_rows(sequence: np.ndarray, block_len: int, stride: int, size: int):
    """A sequence's sliding windows as rows (≤ size, block_len), padded past its end, each with
    the mask of the positions it scores; `size` windows at a time, so that memory stays bounded
    whatever the stride."""
    begin, lo, hi = windows(len(sequence), block_len, stride)
    padded = np.concatenate([sequence, np.zeros(block_len, sequence.dtype)])
    offset = np.arange(block_len)
    for i in range(0, len(begin), size):
        b, first, end = begin[i : i + size, None], lo[i : i + size, None], hi[i : i + size, None]
        yield gather_rows(padded, b[:, 0], block_len), (offset >= first - b) & (offset < end - b)


def eval_blocks(shards: Shards, split: str, block_len: int, batch_size: int, *, rank: int = 0,
                world: int = 1, max_chunks: int | None = None, stride: int | None = None):
    """Batches (tokens, mask) that score every variable of a split exactly once across ranks;
    mask marks the scored positions of each row.

    Rank r takes chunks r, r+world, … and slides windows of block_len over each sequence in
    them (`windows`): pack (text) a chunk's items in order, each followed by EOS; crop (audio)
    each item; item (images) each item, which is one row. Without a stride (or stride =
    block_len) the windows are consecutive blocks that each start from empty context. Windows
    never cross chunks, so the set of windows, and the total NLL, do not depend on the world
    size; a row past a sequence's end is padded (mask False there)."""
    codec = shards.codec
    T = codec.sequence_length(block_len)
    stride = stride or T
    rows, masks, count = [], [], 0
    for shard, entry in shards.chunks(split)[:max_chunks][rank::world]:
        tokens, offsets = shards.read_chunk(shard, entry["key"])
        if codec.stream_mode == "pack":
            sequences = [pack_items(tokens, offsets[:-1], np.diff(offsets), codec.eos_id)]
        else:
            sequences = [tokens[a:b] for a, b in zip(offsets[:-1], offsets[1:])]
        for sequence in sequences:
            for x, mask in window_rows(sequence, T, stride, batch_size):
                rows.append(x)
                masks.append(mask)
                count += len(x)
                if count >= batch_size:
                    x, mask = np.concatenate(rows).astype(np.int64), np.concatenate(masks)
                    yield torch.from_numpy(x[:batch_size]), torch.from_numpy(mask[:batch_size])
                    rows, masks, count = [x[batch_size:]], [mask[batch_size:]], count - batch_size
    if count:
        yield torch.from_numpy(np.concatenate(rows).astype(np.int64)), torch.from_numpy(np.concatenate(masks))


def split_bytes(shards: Shards, split: str, max_chunks: int | None = None) -> int:
    return sum(entry.get("bytes", 0) for _, entry in shards.chunks(split)[:max_chunks])
