"""Streams over token shards: shuffled, packed training batches with exact resume, and the
deterministic evaluation blocks that count every token once.

Training. Each epoch permutes the split's chunks (seeded). The stream is cut into `parts`, one
per (rank, DataLoader worker): with at least as many chunks as parts a part takes every
parts-th chunk of the permutation (each rank reads only its own chunks); with fewer chunks
each part takes every parts-th item of every chunk. A part reads `shuffle_window` chunks at a
time, shuffles their items, joins them with an EOS token after each item and cuts blocks of
`block_len` tokens; the tokens left over at a window's end open the next window, so an epoch
trains on every token once. A part's position is (epoch, window, block, carry-in tokens), so
resuming rebuilds one window and skips to the block, and sees exactly the data an
uninterrupted run would have seen.
"""

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline import ArpipeError
from pipeline.data.shards import Shards


def pack_items(tokens: np.ndarray, starts: np.ndarray, lengths: np.ndarray, eos: int) -> np.ndarray:
    """tokens[starts[i] : starts[i]+lengths[i]] for each i, each followed by eos, concatenated.
    Vectorised: items may be tiny (lines) and numerous."""
    sizes = lengths + 1
    out_starts = np.cumsum(sizes) - sizes
    total = int(sizes.sum())
    within = np.arange(total) - np.repeat(out_starts, sizes)
    source = np.repeat(starts, sizes) + within
    is_eos = within == np.repeat(lengths, sizes)
    source[is_eos] = 0
    out = tokens[source] if len(tokens) else np.zeros(total, dtype=tokens.dtype)
    out[is_eos] = eos
    return out


def initial_state() -> dict:
    return {"epoch": 0, "window": 0, "block": 0, "carry": []}


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
        self.eos = shards.codec.eos_id
        self.dtype = shards.codec.token_dtype
        self.block_len, self.batch_size, self.seed = block_len, batch_size, seed
        self.rank, self.world = rank, world
        self.num_workers = max(1, num_workers)
        self.window_size = max(1, shuffle_window)
        self.states = [initial_state() for _ in range(self.num_workers)]
        self.first_worker = 0  # logical worker of DataLoader worker 0 (rotates on resume)

    def _units(self, epoch: int, part: int, parts: int) -> list[tuple[int, int, int]]:
        """(chunk index, item residue, item modulus) a part reads in this epoch, in order."""
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.chunks))
        if len(order) >= parts:
            return [(int(c), 0, 1) for c in order[part::parts]]
        return [(int(c), part, parts) for c in order]

    def _window(self, shards: Shards, epoch: int, window: int, part: int, units) -> np.ndarray:
        arrays, starts, lengths, base = [], [], [], 0
        for c, residue, modulus in units:
            shard, entry = self.chunks[c]
            tokens, offsets = shards.read_chunk(shard, entry["key"])
            keep = np.arange(residue, len(offsets) - 1, modulus)
            arrays.append(tokens)
            starts.append(offsets[keep] + base)
            lengths.append(offsets[keep + 1] - offsets[keep])
            base += len(tokens)
        starts, lengths = np.concatenate(starts), np.concatenate(lengths)
        order = np.random.default_rng([self.seed, epoch, window, part]).permutation(len(starts))
        return pack_items(np.concatenate(arrays), starts[order], lengths[order], self.eos)

    def part_blocks(self, part: int, parts: int, state: dict):
        """(block, state after it) for one part, forever, starting from `state`."""
        shards = Shards(self.dir)
        epoch, window, block, carry = state["epoch"], state["window"], state["block"], state["carry"]
        T = self.block_len
        while True:
            units = self._units(epoch, part, parts)
            windows = [units[i : i + self.window_size] for i in range(0, len(units), self.window_size)]
            epoch_tokens = len(carry)
            while window < len(windows):
                tokens = np.concatenate([np.asarray(carry, self.dtype), self._window(shards, epoch, window, part, windows[window])])
                n = len(tokens) // T
                blocks = tokens[: n * T].reshape(n, T)
                for b in range(block, n):
                    yield blocks[b], {"epoch": epoch, "window": window, "block": b + 1, "carry": carry}
                epoch_tokens += len(tokens)
                carry, window, block = tokens[n * T :].tolist(), window + 1, 0
            if not epoch_tokens:
                raise ArpipeError(f"rank {self.rank}: no training data for stream part {part} of {parts}")
            epoch, window = epoch + 1, 0

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
                "parts": self.stream.world * self.stream.num_workers}

    def load_state_dict(self, state: dict) -> None:
        parts = self.stream.world * self.stream.num_workers
        if state["parts"] != parts or len(state["workers"]) != self.stream.num_workers:
            raise ArpipeError(f"the checkpoint's data stream has {state['parts']} parts, this run {parts} "
                              f"(world size × data.num_workers must match to resume the stream exactly)")
        self.consumed = state["consumed"]
        self.stream.states = [dict(s) for s in state["workers"]]
        self.stream.first_worker = self.consumed % self.stream.num_workers
        self._iter = None

    def __next__(self) -> torch.Tensor:
        if self._iter is None:
            workers = self.stream.num_workers if self.stream.num_workers > 1 else 0
            self._iter = iter(DataLoader(self.stream, batch_size=None, num_workers=workers,
                                         persistent_workers=workers > 0))
        batch, worker, state = next(self._iter)
        self.stream.states[worker] = state
        self.consumed += 1
        return batch

    def __iter__(self):
        return self


def eval_blocks(shards: Shards, split: str, block_len: int, batch_size: int, *, rank: int = 0,
                world: int = 1, max_chunks: int | None = None):
    """Batches (tokens, mask) that cover every token of a split exactly once across ranks.

    Rank r takes chunks r, r+world, …; within a chunk items keep their order, each followed by
    EOS, cut into blocks of block_len (the last one padded, mask False on padding). Blocks never
    cross chunks, so the set of blocks, and the total NLL, do not depend on the world size."""
    codec = shards.codec
    chunks = shards.chunks(split)[:max_chunks]
    rows, masks = [], []
    for shard, entry in chunks[rank::world]:
        tokens, offsets = shards.read_chunk(shard, entry["key"])
        packed = pack_items(tokens, offsets[:-1], np.diff(offsets), codec.eos_id)
        for start in range(0, len(packed), block_len):
            piece = packed[start : start + block_len]
            row = np.zeros(block_len, dtype=np.int64)
            row[: len(piece)] = piece
            mask = np.zeros(block_len, dtype=bool)
            mask[: len(piece)] = True
            rows.append(row)
            masks.append(mask)
            if len(rows) == batch_size:
                yield torch.from_numpy(np.stack(rows)), torch.from_numpy(np.stack(masks))
                rows, masks = [], []
    if rows:
        yield torch.from_numpy(np.stack(rows)), torch.from_numpy(np.stack(masks))


def split_bytes(shards: Shards, split: str, max_chunks: int | None = None) -> int:
    return sum(entry.get("bytes", 0) for _, entry in shards.chunks(split)[:max_chunks])
