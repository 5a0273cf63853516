"""Streams over token shards: shuffled training batches with exact resume, and the
deterministic evaluation blocks that count every variable once.

Training. Each epoch permutes the split's chunks (seeded). The stream is cut into `parts`, one
per (rank, DataLoader worker): with at least as many chunks as parts a part takes every
parts-th chunk of the permutation (each rank reads only its own chunks); with fewer chunks
each part takes every parts-th item of every chunk. A part reads `shuffle_window` chunks at a
time, shuffles their items and turns them into fixed-length rows by the codec's stream mode:

  pack  (text)   items joined with an EOS token after each, cut into blocks; the tokens left at
                 a window's end open the next window, so an epoch trains on every token once
  crop  (audio)  non-overlapping crops of each item from a random offset, shuffled
  item  (images) one row per item

A part's position is (epoch, window, row, carry-in tokens), so resuming rebuilds one window and
skips to the row: a resumed run sees exactly the data an uninterrupted run would have seen.

Resuming with another number of parts (world size × workers) cannot be exact; `continue_from`
finishes the interrupted epoch on the chunks no part had fully read: no chunk is skipped, a
fully read chunk is not read again in that epoch, the windows that were partly read (at most one
per old part, plus whatever a part had read of the next epoch) are read again, and the tokens
carried between windows (fewer than block_len per part) are dropped.
"""

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline import ArpipeError
from pipeline.data.shards import Shards


def pack_items(tokens: np.ndarray, starts: np.ndarray, lengths: np.ndarray, eos: int) -> np.ndarray:
    """tokens[starts[i] : starts[i]+lengths[i]] for each i, each followed by eos, concatenated.
    Vectorised: items may be tiny (lines) and numerous."""
    ends = np.cumsum(lengths + 1)  # one past each item's EOS in the output
    total = int(ends[-1]) if len(ends) else 0
    # The source index of every output position is a cumulative sum: +1 along an item, a jump
    # to the next item's start after each EOS (EOS slots read a clipped index, then get eos).
    step = np.ones(total, dtype=np.int64)
    step[ends[:-1]] = starts[1:] - (starts[:-1] + lengths[:-1])
    if total:
        step[0] = starts[0]
    out = np.take(tokens, np.cumsum(step, out=step), mode="clip") if len(tokens) else np.zeros(total, tokens.dtype)
    out[ends - 1] = eos
    return out


def initial_state() -> dict:
    return {"epoch": 0, "window": 0, "block": 0, "carry": []}


def gather_rows(tokens: np.ndarray, starts: np.ndarray, length: int) -> np.ndarray:
    """Rows tokens[s : s+length] for each start s, as one (len(starts), length) array: one row
    copy each from a strided view (an index per token would cost 10× more)."""
    if not len(starts):
        return np.zeros((0, length), tokens.dtype)
    return np.lib.stride_tricks.sliding_window_view(tokens, length)[starts]


class TokenStream(IterableDataset):
    """Batches (batch_size, block_len) of int64 tokens for one rank, forever (epoch after epoch).

    Iterating yields (batch, logical worker, that worker's state after the batch); `Batches`
    keeps the states and turns them into `state_dict()`.
    """

    def __init__(self, shards: Shards, split: str, block_len: int, batch_size: int, *, seed: int,
                 rank: int = 0, world: int = 1, num_workers: int = 0, shuffle_window: int = 8):
        self.dir = shards.dir
        self.chunks = shards.chunks(split)
        if not self.chunks:
            raise ArpipeError(f"{shards.dir} has no {split} data")
        codec = shards.codec
        self.mode, self.eos, self.dtype = codec.stream_mode, codec.eos_id, codec.token_dtype
        self.block_len = codec.sequence_length(block_len)
        self.batch_size, self.seed = batch_size, seed
        self.rank, self.world = rank, world
        self.num_workers = max(1, num_workers)
        self.window_size = max(1, shuffle_window)
        self.states = [initial_state() for _ in range(self.num_workers)]
        self.first_worker = 0  # logical worker of DataLoader worker 0 (rotates on resume)
        self.done = {"epoch": -1, "chunks": []}  # chunks read in `epoch` before a change of world size

    def _units(self, epoch: int, part: int, parts: int, done: dict | None = None) -> list[tuple[int, int, int]]:
        """(chunk index, item residue, item modulus) a part reads in this epoch, in order."""
        done = done or self.done
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.chunks))
        if epoch == done["epoch"]:
            order = order[~np.isin(order, done["chunks"])]
        if len(order) >= parts:
            return [(int(c), 0, 1) for c in order[part::parts]]
        return [(int(c), part, parts) for c in order]

    def _items(self, shards: Shards, units) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The window's tokens, concatenated, and each of its items' start and length."""
        arrays, starts, lengths, base = [], [], [], 0
        for c, residue, modulus in units:
            shard, entry = self.chunks[c]
            tokens, offsets = shards.read_chunk(shard, entry["key"])
            keep = np.arange(residue, len(offsets) - 1, modulus)
            arrays.append(tokens)
            starts.append(offsets[keep] + base)
            lengths.append(offsets[keep + 1] - offsets[keep])
            base += len(tokens)
        return np.concatenate(arrays), np.concatenate(starts), np.concatenate(lengths)

    def _window(self, shards: Shards, epoch: int, window: int, part: int, units, carry) -> tuple[np.ndarray, list]:
        """The rows of one window, and the tokens it carries into the next (pack mode only)."""
        tokens, starts, lengths = self._items(shards, units)
        rng = np.random.default_rng([self.seed, epoch, window, part])
        order = rng.permutation(len(starts))
        starts, lengths, T = starts[order], lengths[order], self.block_len
        if self.mode == "pack":
            joined = np.concatenate([np.asarray(carry, self.dtype), pack_items(tokens, starts, lengths, self.eos)])
            n = len(joined) // T
            return joined[: n * T].reshape(n, T), joined[n * T :].tolist()
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

    def part_blocks(self, part: int, parts: int, state: dict):
        """(row, state after it) for one part, forever, starting from `state`."""
        shards = Shards(self.dir)
        epoch, window, block, carry = state["epoch"], state["window"], state["block"], state["carry"]
        while True:
            units = self._units(epoch, part, parts)
            windows = [units[i : i + self.window_size] for i in range(0, len(units), self.window_size)]
            epoch_rows = 0
            while window < len(windows):
                rows, carry_out = self._window(shards, epoch, window, part, windows[window], carry)
                for b in range(block, len(rows)):
                    yield rows[b], {"epoch": epoch, "window": window, "block": b + 1, "carry": carry}
                epoch_rows += len(rows)
                carry, window, block = carry_out, window + 1, 0
            if not epoch_rows and (self.mode != "pack" or not windows) and epoch != self.done["epoch"]:
                raise ArpipeError(f"rank {self.rank}: no training rows of {self.block_len} tokens for stream part "
                                  f"{part} of {parts} (too little data, or items shorter than data.block_len)")
            epoch, window = epoch + 1, 0

    def continue_from(self, saved: list[dict]) -> None:
        """Start where a run with another number of parts stopped; `saved` holds every old
        rank's `Batches.state_dict()`, in rank order (see the module docstring)."""
        parts = saved[0]["parts"]
        states = [w for rank in saved for w in rank["workers"]]  # part p = rank × workers + worker
        done_before = saved[0]["done"]
        epoch = min(s["epoch"] for s in states)
        read = set(done_before["chunks"]) if done_before["epoch"] == epoch else set()
        for part, state in enumerate(states):
            units = self._units(epoch, part, parts, done_before)
            finished = len(units) if state["epoch"] > epoch else state["window"] * self.window_size
            read.update(c for c, _, modulus in units[:finished] if modulus == 1)
        self.done = {"epoch": epoch, "chunks": sorted(read)}
        self.states = [{**initial_state(), "epoch": epoch} for _ in range(self.num_workers)]
        self.first_worker = 0

    def __iter__(self):
        info = get_worker_info()
        worker = ((info.id if info else 0) + self.first_worker) % self.num_workers
        parts = self.world * self.num_workers
        blocks = self.part_blocks(self.rank * self.num_workers + worker, parts, self.states[worker])
        while True:
            rows = []
            for block, state in blocks:
                rows.append(block)
                if len(rows) == self.batch_size:
                    break
            yield torch.from_numpy(np.stack(rows).astype(np.int64)), worker, state


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
        return {"consumed": self.consumed, "workers": [dict(s) for s in self.stream.states],
                "parts": self.stream.world * self.stream.num_workers, "done": self.stream.done}

    def load_state_dict(self, saved: list[dict], rank: int) -> None:
        """Resume from every old rank's state: exactly if the number of parts is unchanged,
        else as `TokenStream.continue_from` describes."""
        state = saved[rank] if rank < len(saved) else None
        if state is None or state["parts"] != self.stream.world * self.stream.num_workers \
                or len(state["workers"]) != self.stream.num_workers:
            self.stream.continue_from(saved)
            self.consumed = 0
        else:
            self.consumed = state["consumed"]
            self.stream.states = [dict(s) for s in state["workers"]]
            self.stream.done = state["done"]
            self.stream.first_worker = self.consumed % self.stream.num_workers
        self._iter = None

    def __next__(self) -> torch.Tensor:
        if self._iter is None:
            workers = self.stream.num_workers if self.stream.num_workers > 1 else 0
            # collate_fn: the items are ready; DataLoader's default_convert would walk every
            # int of each state's carry list (up to block_len of them), most of the stream's time
            self._iter = iter(DataLoader(self.stream, batch_size=None, num_workers=workers,
                                         persistent_workers=workers > 0, collate_fn=as_is))
        batch, worker, state = next(self._iter)
        self.stream.states[worker] = state
        self.consumed += 1
        return batch

    def __iter__(self):
        return self


def eval_blocks(shards: Shards, split: str, block_len: int, batch_size: int, *, rank: int = 0,
                world: int = 1, max_chunks: int | None = None):
    """Batches (tokens, mask) that cover every variable of a split exactly once across ranks.

    Rank r takes chunks r, r+world, … and keeps their items in order. pack (text): each item is
    followed by EOS and the chunk is cut into blocks; crop (audio): each item is cut into
    consecutive blocks; item (images): one row per item. The last block of a chunk or item is
    padded (mask False there). Blocks never cross chunks, so the set of blocks, and the total
    NLL, do not depend on the world size."""
    codec = shards.codec
    T = codec.sequence_length(block_len)
    rows, masks = [], []
    for shard, entry in shards.chunks(split)[:max_chunks][rank::world]:
        tokens, offsets = shards.read_chunk(shard, entry["key"])
        if codec.stream_mode == "pack":
            pieces = [pack_items(tokens, offsets[:-1], np.diff(offsets), codec.eos_id)]
        else:
            pieces = [tokens[a:b] for a, b in zip(offsets[:-1], offsets[1:])]
        for piece in pieces:
            for start in range(0, len(piece), T):
                block = piece[start : start + T]
                row, mask = np.zeros(T, dtype=np.int64), np.zeros(T, dtype=bool)
                row[: len(block)], mask[: len(block)] = block, True
                rows.append(row)
                masks.append(mask)
                if len(rows) == batch_size:
                    yield torch.from_numpy(np.stack(rows)), torch.from_numpy(np.stack(masks))
                    rows, masks = [], []
    if rows:
        yield torch.from_numpy(np.stack(rows)), torch.from_numpy(np.stack(masks))


def split_bytes(shards: Shards, split: str, max_chunks: int | None = None) -> int:
    return sum(entry.get("bytes", 0) for _, entry in shards.chunks(split)[:max_chunks])
