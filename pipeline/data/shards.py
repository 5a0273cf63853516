"""Token shards: plain WebDataset tars plus a manifest, written by resumable parallel tasks.

Layout of OUT/:
  plan.json                       the settings and inputs, fixed by the first run
  tokenizer.json …                the codec's files
  {split}/{split}-{task:05d}-{n:06d}.tar
  _tasks/task-{task:05d}.json     a task's done-marker: its shards, counts, skips and its process's peak RSS
  manifest.json                   everything above merged, written last

One WebDataset sample is a *chunk* of many items (≈ 2 MB of tokens), because WebDataset's cost is
per sample, not per byte: `{key}.tokens.npy` (all items' tokens concatenated, smallest unsigned
dtype), `{key}.offsets.npy` (where each item starts; n+1 entries) and `{key}.meta.json` (each
item's stable key and size). Items go to train or val by a hash of their key before chunking,
so the split does not depend on the number of tasks.

Task i of N reads inputs i, i+N, … It writes to `*.tmp` names, renames a shard when it is
complete and writes its done-marker last. A re-run skips done tasks and redoes the others from
scratch after deleting their files: no duplicates, no gaps. Tars are byte-reproducible (fixed
mtime, owner and order), so a resumed run's shards equal a clean run's.
"""

import ctypes
import fcntl
import functools
import gc
import hashlib
import io
import json
import os
import tarfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from functools import cached_property
from itertools import compress
from multiprocessing import get_context
from pathlib import Path, PurePosixPath

import numpy as np
from tqdm import tqdm

from pipeline import ArpipeError
from pipeline.codecs import Codec, Encoded, load_codec
from pipeline.data import storage
from pipeline.data.hf_inputs import PREFIX, DatasetInput, DatasetPart
from pipeline.data.sources import Records, common_root, relative_name, require_regular_file, split_of
from pipeline.log import LOG

FORMAT = 1
SPLITS = ("train", "val")
EXAMPLES_PER_REASON = 20  # skipped items listed by key in the manifest; the rest are counted


def write_json_atomic(path: Path, data) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def npy_header(dtype, length: int) -> bytes:
    """The .npy header of a 1-D array, as np.save writes it: the data follows it as raw bytes."""
    header = io.BytesIO()
    descr = np.lib.format.dtype_to_descr(np.dtype(dtype))
    np.lib.format.write_array_header_1_0(header, {"descr": descr, "fortran_order": False, "shape": (int(length),)})
    return header.getvalue()


class HashedTar:
    """A tar being written byte for byte as tarfile writes it (USTAR headers, members padded to
    whole blocks, two zero blocks and padding to a whole record at the end), from members in
    pieces (a header and a batch's arrays) that are never copied into one buffer, and hashed on
    the way, so a finished shard's sha256 needs no second read."""

    def __init__(self, path: Path):
        self.file = open(path, "wb")
        self.sha256 = hashlib.sha256()
        self.offset = 0

    def _write(self, data) -> None:
        self.sha256.update(data)
        self.file.write(data)
        self.offset += memoryview(data).nbytes

    def add(self, name: str, parts: list) -> list[int]:
        """A member of `parts` (bytes, contiguous arrays) end to end; returns [data offset, size]."""
        size = sum(memoryview(part).nbytes for part in parts)
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = size, 0, 0o444
        self._write(info.tobuf(tarfile.USTAR_FORMAT, tarfile.ENCODING, "surrogateescape"))
        start = self.offset
        for part in parts:
            self._write(part)
        self._write(bytes(-size % tarfile.BLOCKSIZE))
        return [start, size]

    def close(self) -> None:
        self._write(bytes(2 * tarfile.BLOCKSIZE))
        self._write(bytes(-self.offset % tarfile.RECORDSIZE))
        self.file.close()


class ShardWriter:
    """Writes one task's items of one split into chunks and tars of bounded size.

    The tars are written by HashedTar, not webdataset's TarWriter: `import webdataset` imports
    torch, 2.5 s of CPU time per shard worker process (measured on the 2-core CI machine), more
    than the whole stage takes on a small input, for the same tar (pipeline/data/wds.py reads
    the shards with webdataset)."""

    def __init__(self, directory: Path, split: str, task: int, dtype, chunk_bytes: int, shard_bytes: int):
        self.directory, self.split, self.task, self.dtype = directory, split, task, np.dtype(dtype)
        self.chunk_tokens, self.shard_bytes = chunk_bytes // self.dtype.itemsize, shard_bytes
        self.entries: list[dict] = []
        self.tar: HashedTar | None = None
        self.n_chunks = 0
        self._new_chunk()

    def _new_chunk(self):
        self.tokens: list[np.ndarray] = []  # pieces of batches, items end to end
        self.lengths: list[np.ndarray] = []  # their items' token counts
        self.meta: list[dict] = []
        self.size = 0

    def add(self, tokens: np.ndarray, meta: dict) -> None:
        """One item: its tokens (in the codec's token dtype) and meta."""
        self.add_batch(Encoded(tokens, np.array([len(tokens)]), [meta]))

    def add_batch(self, batch: Encoded) -> None:
        """Items in order (see Codec.encode_records). A chunk ends after the item that fills it,
        so a batch may end one chunk and start the next."""
        ends = np.cumsum(batch.lengths)
        first, start = 0, 0  # the first item and token not yet in a chunk
        while first < len(ends):
            # the item whose end fills the chunk (len(ends) if none does)
            last = int(np.searchsorted(ends, start + self.chunk_tokens - self.size))
            stop = min(last + 1, len(ends))
            end = int(ends[stop - 1])
            self.tokens.append(batch.tokens[start:end])
            self.lengths.append(batch.lengths[first:stop])
            self.meta += batch.metas[first:stop]
            self.size += end - start
            first, start = stop, end
            if self.size >= self.chunk_tokens:
                self._flush_chunk()

    def _flush_chunk(self):
        if not self.meta:
            return
        if self.tar is None:
            name = f"{self.split}-{self.task:05d}-{len(self.entries):06d}.tar"
            self.path = self.directory / self.split / name
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.tmp = self.path.with_name(name + ".tmp")
            self.tar = HashedTar(self.tmp)
            self.chunks: list[dict] = []
        key = f"{self.split}-{self.task:05d}-{self.n_chunks:06d}"
        offsets = np.zeros(len(self.meta) + 1, dtype=np.int64)
        np.cumsum(np.concatenate(self.lengths), out=offsets[1:])
        tokens = [np.ascontiguousarray(piece, self.dtype) for piece in self.tokens]
        # [data offset, size] of each member in the tar: readers fetch a chunk with one range
        # read and never walk the tar's headers
        ranges = {
            "tokens.npy": self.tar.add(f"{key}.tokens.npy", [npy_header(self.dtype, offsets[-1]), *tokens]),
            "offsets.npy": self.tar.add(f"{key}.offsets.npy", [npy_header(np.int64, len(offsets)), offsets]),
            # check_circular=False: items' metas are plain data we made (a fifth faster)
            "meta.json": self.tar.add(f"{key}.meta.json",
                                      [json.dumps({"items": self.meta}, check_circular=False).encode()]),
        }
        self.chunks.append({"key": key, "items": len(self.meta), "tokens": int(offsets[-1]),
                            "bytes": sum(m.get("bytes", 0) for m in self.meta), "members": ranges})
        self.n_chunks += 1
        self._new_chunk()
        if self.tar.offset >= self.shard_bytes:
            self._close_shard()

    def _close_shard(self):
        tar, self.tar = self.tar, None
        tar.close()
        os.replace(self.tmp, self.path)
        self.entries.append({
            "path": str(self.path.relative_to(self.directory)),
            "split": self.split,
            "sha256": tar.sha256.hexdigest(),
            "items": sum(c["items"] for c in self.chunks),
            "tokens": sum(c["tokens"] for c in self.chunks),
            "bytes": sum(c["bytes"] for c in self.chunks),
            "chunks": self.chunks,
        })

    def close(self) -> list[dict]:
        self._flush_chunk()
        if self.tar is not None:
            self._close_shard()
        return self.entries


class Plan:
    """The settings of a shard stage in OUT/plan.json, fixed by the first run so re-runs and
    array tasks agree on inputs, task count and codec."""

    def __init__(self, out: Path, data: dict):
        self.out, self.data = out, data

    @classmethod
    def load(cls, out: Path) -> "Plan":
        """OUT's plan, read once per process: a pool worker's tasks share it and its codec (a plan
        lists every input file, and a folder of images has hundreds of thousands)."""
        return _load_plan(str(out), os.stat(out / "plan.json").st_mtime_ns)

    root = property(lambda self: Path(self.data["root"]))
    num_tasks = property(lambda self: self.data["num_tasks"])

    @cached_property
    def codec(self) -> Codec:
        return load_codec(self.data["codec"], self.out)

    files = cached_property(lambda self: [p for p in self.data["inputs"] if not p.startswith(PREFIX)])
    datasets = cached_property(lambda self: [DatasetInput.parse(p) for p in self.data["inputs"]
                                             if p.startswith(PREFIX)])

    def task_inputs(self, task: int) -> list[str | DatasetPart]:
        """Files i, i+N, … of task i of N, then its 1/N of every dataset split's rows."""
        return self.files[task :: self.num_tasks] + [d.part(task, self.num_tasks) for d in self.datasets]

    def marker(self, task: int) -> Path:
        return self.out / "_tasks" / f"task-{task:05d}.json"

    def pending(self) -> list[int]:
        return [t for t in range(self.num_tasks) if not self.marker(t).exists()]


@functools.lru_cache(maxsize=8)
def _load_plan(out: str, mtime_ns: int) -> Plan:  # plan.json is written once, by an atomic rename
    return Plan(Path(out), json.loads((Path(out) / "plan.json").read_text()))


def prepare(out: Path, settings: dict, inputs: list[str | DatasetInput], num_tasks: int | None,
            make_codec: Callable[[list, Path, Path], Codec]) -> Plan:
    """Create OUT/plan.json (and the codec's files) once; later runs check they ask the same.

    `settings` holds everything that changes the output (modality, codec and reader options,
    split fraction, sizes). A file lock makes concurrent array tasks build the codec only once.
    """
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".plan.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (out / "plan.json").exists():
            plan = Plan.load(out)
            for key, value in settings.items():
                if plan.data["settings"].get(key) != value:
                    raise ArpipeError(
                        f"{out} was sharded with {key}={plan.data['settings'].get(key)!r}, not {value!r}; "
                        f"use a new --out directory")
            if [str(p) for p in inputs] != plan.data["inputs"]:
                raise ArpipeError(f"{out} was sharded from other inputs; use a new --out directory")
            if num_tasks is not None and num_tasks != plan.num_tasks:
                raise ArpipeError(f"{out} was planned with --num-tasks {plan.num_tasks}, not {num_tasks}")
            return plan
        root = common_root(inputs)
        codec = make_codec(inputs, root, out)
        data = {"format": FORMAT, "settings": settings, "root": str(root),
                "inputs": [str(p) for p in inputs], "num_tasks": num_tasks or 1, "codec": codec.config()}
        write_json_atomic(out / "plan.json", data)
        plan = Plan(out, data)
        plan.codec = codec  # what tasks in this process use, rather than loading it back
        return plan


_progress = None  # (bytes done, bytes of the started tasks' inputs), shared with pool workers for the progress bar
_claimed = None  # a flag per task, set by the process that runs it (see run_tasks)
BATCH_ITEMS, BATCH_BYTES = 256, 1 << 20  # what one encode call gets: bounded in count and in size


def _init_worker(progress, claimed):
    global _progress, _claimed
    _progress, _claimed = progress, claimed
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker: --workers is the parallelism


def claim(task: int) -> bool:
    """Whether this process takes `task`: no other process has."""
    with _claimed.get_lock():
        taken, _claimed[task] = _claimed[task], 1
    return not taken


def run_claimed_task(out: Path, task: int) -> None:
    if claim(task):
        run_task(out, task)


@functools.cache
def keep_freed_memory() -> None:
    """Have glibc's malloc keep freed memory for reuse rather than hand it back to the kernel at
    once. Tasks allocate and free megabyte arrays for every block of audio (decoded, mixed,
    resampled, quantised), and memory handed back faults again, page by page, when the next block
    touches it: ≈ 1 400 faults a minute of stereo audio, 6–15 % of the audio stage's time on a VM.
    Peak memory is unchanged (what is kept was in use). Elsewhere than glibc: nothing to do."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return
    mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD: blocks under 32 MiB come from the heap, not mmap
    mallopt(-1, 64 << 20)  # M_TRIM_THRESHOLD: the heap's free top is returned beyond 64 MiB


def run_task(out: Path, task: int, plan: Plan | None = None) -> dict:
    """Shard task `task` unless its done-marker exists. Returns the done-marker's contents.

    Records are encoded in batches per split (the encoder's per-call cost is then negligible);
    an input that fails part-way keeps the items read before the failure and is listed with the
    reason and that count."""
    plan = plan or Plan.load(out)
    marker = plan.marker(task)
    if marker.exists():
        return json.loads(marker.read_text())
    keep_freed_memory()
    # What exists before the task (modules, the plan's inputs) is left out of garbage collection:
    # items' objects come and go by reference counting, and the full collections their numbers
    # set off would walk everything alive each time
    gc.freeze()
    try:
        return _run_task(out, task, plan, marker)
    finally:
        gc.unfreeze()


def _run_task(out: Path, task: int, plan: Plan, marker: Path) -> dict:
    for split in SPLITS:  # leftovers of a killed attempt: redo from scratch
        for stale in (out / split).glob(f"{split}-{task:05d}-*"):
            stale.unlink()
    settings = plan.data["settings"]
    val_fraction = settings["val_fraction"]
    codec = plan.codec
    writers = {s: ShardWriter(out, s, task, codec.token_dtype, settings["chunk_bytes"], settings["shard_bytes"])
               for s in SPLITS}
    skipped_files, skipped_items, examples = [], Counter(), {}
    pending = {s: Records([], [], None, []) for s in SPLITS}  # usable records not yet encoded
    pending_bytes = dict.fromkeys(SPLITS, 0)

    def flush(split):
        keys, values, _, metas = pending[split]
        for i in range(0, len(keys), BATCH_ITEMS):
            j = i + BATCH_ITEMS
            writers[split].add_batch(codec.encode_records(Records(keys[i:j], values[i:j], None, metas[i:j] or None)))
        pending[split], pending_bytes[split] = Records([], [], None, []), 0

    def enqueue(split: str, keys: list, values: list, metas: list | None) -> None:
        queue = pending[split]
        queue.keys.extend(keys)
        queue.values.extend(values)
        if metas:
            queue.metas.extend(metas)
        pending_bytes[split] += payload_bytes(values)
        if len(queue.keys) >= BATCH_ITEMS or pending_bytes[split] >= BATCH_BYTES:
            flush(split)

    def add(records: Records) -> int:
        """Count the unusable records, queue the others for their split; returns how many were usable."""
        keys, values, skips, metas = records
        if skips is not None:
            for key, skip in zip(keys, skips):
                if skip:
                    skipped_items[skip] += 1
                    if len(listed := examples.setdefault(skip, [])) < EXAMPLES_PER_REASON:
                        listed.append(key)
            usable = [skip is None for skip in skips]
            keys, values = list(compress(keys, usable)), list(compress(values, usable))
            metas = metas and list(compress(metas, usable))
        if len(keys) == 1:  # an image file, a clip: nothing to sort into splits
            enqueue(split_of(keys[0], val_fraction), keys, values, metas)
        else:
            splits = [split_of(key, val_fraction) for key in keys]
            for split in SPLITS:
                ours = [s == split for s in splits]
                enqueue(split, list(compress(keys, ours)), list(compress(values, ours)),
                        metas and list(compress(metas, ours)))
        return len(keys)

    inputs, root = plan.task_inputs(task), plan.root
    checked = [check_input(path) for path in inputs]  # each task stats its own inputs, in parallel
    progress = Progress(sum(size for size, _ in checked))
    for path, (size, problem) in zip(inputs, checked):
        items = 0
        try:
            if problem:
                raise problem
            for records in codec.read_records(path, root, settings):
                items += add(records)
        except ArpipeError:  # an option to change (a dataset's split, column, …): fatal, with its message
            raise
        except Exception as e:  # an unreadable input is skipped and reported, never fatal
            empty = size == 0 and problem is None and isinstance(path, str)
            reason = "empty file" if empty else f"{type(e).__name__}: {e}"
            name = relative_name(path, root) if isinstance(path, str) else str(path)
            skipped = {"input": name, "reason": reason[:500]}
            skipped_files.append({**skipped, "items_kept": items} if items else skipped)
        progress.add(size)
    for split in SPLITS:
        flush(split)
    progress.add(0, force=True)
    result = {"task": task, "shards": [e for s in SPLITS for e in writers[s].close()],
              "skipped_files": skipped_files, "skipped_items": dict(skipped_items), "skipped_examples": examples,
              "peak_rss_mb": peak_rss_mb()}
    marker.parent.mkdir(exist_ok=True)
    write_json_atomic(marker, result)
    return result


def payload_bytes(values: list) -> int:
    """Characters of texts, bytes of arrays: what bounds the batches the codec encodes."""
    return sum(v.nbytes for v in values) if values and isinstance(values[0], np.ndarray) else sum(map(len, values))


def peak_rss_mb() -> int | None:
    """This process's own peak resident memory in MB: VmHWM, which starts afresh at exec, unlike
    getrusage's ru_maxrss, which also counts the process it was forked from. None off Linux."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) >> 10 for line in f if line.startswith("VmHWM:"))
    except OSError:
        return None


def check_input(path: str | DatasetPart) -> tuple[int, Exception | None]:
    """(size in bytes, the problem that makes it unreadable or None): a file must be a regular
    one (reading a FIFO would block); a dataset part's size is approximate."""
    if isinstance(path, DatasetPart):
        return path.size, None
    try:
        return require_regular_file(path), None
    except OSError as e:  # broken symlinks, symlink loops, FIFOs
        return 0, e


class Progress:
    """A task's input bytes: all of them added to the shared total at its start, those done
    added at most twice a second (not once per file: a folder of images has many)."""

    def __init__(self, total: int):
        self.bytes, self.last = 0, time.monotonic()
        if _progress is not None:
            with _progress.get_lock():
                _progress[1] += total

    def add(self, size: int, force: bool = False) -> None:
        self.bytes += size
        if _progress is not None and (force or time.monotonic() - self.last > 0.5):
            with _progress.get_lock():
                _progress[0] += self.bytes
            self.bytes, self.last = 0, time.monotonic()


def run_tasks(plan: Plan, tasks: list[int], workers: int) -> None:
    """Run shard tasks in `workers` processes, with a progress bar over input bytes (the total
    grows as tasks start: each measures its own inputs).

    This process is one of them, beside workers − 1 spawned ones; each claims a task before it runs
    it. It has everything imported already, so it works while the others start (≈ 0.3 s each). All
    take tasks in order: tasks with one input more come first in the plan, so the last to run are
    the smaller ones and the processes end close together."""
    ctx = get_context("spawn")  # fork after tokenizers/torch threads started can deadlock
    progress, claimed = ctx.Array("q", 2), ctx.Array("b", plan.num_tasks)
    _init_worker(progress, claimed)
    bar = tqdm(total=0, unit="B", unit_scale=True, desc="shard", disable=None)
    done = threading.Event()

    def update():
        bar.total = progress[1]
        bar.update(progress[0] - bar.n)

    def refresh():  # this process is busy with its own tasks
        while not done.wait(0.5):
            update()

    refresher = threading.Thread(target=refresh, daemon=True)
    refresher.start()
    pool = (ProcessPoolExecutor(workers - 1, mp_context=ctx, initializer=_init_worker, initargs=(progress, claimed))
            if workers > 1 else None)
    try:
        futures = [pool.submit(run_claimed_task, plan.out, t) for t in tasks] if pool else []
        for t in tasks:
            if any(f.done() and f.exception() for f in futures):
                break  # a worker failed: start nothing more
            if claim(t):
                run_task(plan.out, t, plan)
        for future in futures:
            future.result()  # a worker's exception, raised here
    finally:
        if pool:
            pool.shutdown(cancel_futures=True)
        done.set()
        refresher.join()
        update()
        bar.close()


def finalize(out: Path) -> dict:
    """Merge the done-markers into OUT/manifest.json. All tasks must be done."""
    plan = Plan.load(out)
    if missing := plan.pending():
        raise ArpipeError(f"{len(missing)} of {plan.num_tasks} tasks are not done (first: {missing[0]}); "
                          f"run them before finalizing")
    results = [json.loads(plan.marker(t).read_text()) for t in range(plan.num_tasks)]
    shards = [e for r in results for e in r["shards"]]
    splits = {}
    for split in SPLITS:
        entries = [e for e in shards if e["split"] == split]
        splits[split] = {"shards": len(entries), "chunks": sum(len(e["chunks"]) for e in entries),
                         **{k: sum(e[k] for e in entries) for k in ("items", "tokens", "bytes")}}
    items, examples = Counter(), {}
    for r in results:
        items.update(r["skipped_items"])
        for reason, keys in r["skipped_examples"].items():
            examples[reason] = (examples.get(reason, []) + keys)[:EXAMPLES_PER_REASON]
    manifest = {
        "format": FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "codec": plan.data["codec"],
        "settings": plan.data["settings"],
        "inputs": {"root": plan.data["root"], "files": len(plan.data["inputs"])},
        "tasks": plan.num_tasks,
        "splits": splits,
        "skipped": {"files": [f for r in results for f in r["skipped_files"]],
                    "items": dict(items), "examples": examples},
        "shards": shards,
    }
    write_json_atomic(out / "manifest.json", manifest)
    return manifest


class Shards:
    """A finished shard directory, local or in object storage (storage.py): its manifest, codec
    and random access to chunks.

    Only shards the manifest names are read, so a stage still running (or killed) on the same
    directory is invisible. A chunk is one read: a range covering its tokens and offsets, found
    in the manifest (members' byte ranges) or, for manifests written before those were recorded,
    in the tar's headers (read once per shard). For a URL that is one ranged GET per chunk; the
    manifest is one GET, the codec's files are fetched once into a local cache (`meta_dir`).
    """

    def __init__(self, directory: str | Path):
        self.dir = storage.location(directory)  # a string: never a Path, which mangles URLs
        self._pid, self._fs = None, None
        path = storage.join(self.root, "manifest.json")
        try:
            self._manifest_bytes = storage.read(self.fs, path)
        except FileNotFoundError:
            raise ArpipeError(f"{self.dir}/manifest.json not found: is {self.dir} the --out of a finished "
                              f"`arpipe shard` run?") from None
        except Exception as e:  # an unreachable endpoint, refused credentials, …
            raise storage.unreachable(f"{self.dir}/manifest.json", e) from None
        self.manifest = json.loads(self._manifest_bytes)
        for entry in self.manifest["shards"]:
            p = PurePosixPath(entry["path"])
            if p.is_absolute() or ".." in p.parts:  # a manifest must not point outside its directory
                raise ArpipeError(f"{self.dir}/manifest.json: refusing shard path {entry['path']!r}")
        self._ranges = {(e["path"], c["key"]): c["members"] for e in self.manifest["shards"]
                        for c in e["chunks"] if "members" in c}
        self._members: dict[str, dict[str, tuple[int, int]]] = {}

    def _handle(self) -> tuple:
        if self._pid != os.getpid():  # a DataLoader worker (forked or spawned) opens its own
            self._fs, self._root = storage.filesystem(self.dir)
            self._pid = os.getpid()
        return self._fs, self._root

    fs = property(lambda self: self._handle()[0], doc="this process's fsspec file system")
    root = property(lambda self: self._handle()[1], doc="the shard directory's path in `fs`")

    @cached_property
    def meta_dir(self) -> Path:
        """A local directory with manifest.json and the codec's files (e.g. tokenizer.json): the
        shard directory itself, or a cached copy of a remote one's."""
        if not storage.is_url(self.dir):
            return Path(self.dir)
        names = [v for v in self.manifest["codec"].values() if isinstance(v, str) and v and "/" not in v]
        return storage.local_copy(self.fs, self.root, self.dir, self._manifest_bytes, names)

    @property
    def manifest_sha256(self) -> str:
        return hashlib.sha256(self._manifest_bytes).hexdigest()

    @cached_property
    def codec(self) -> Codec:
        return load_codec(self.manifest["codec"], self.meta_dir)

    def chunks(self, split: str) -> list[tuple[str, dict]]:
        """(shard path, chunk entry) for every chunk of a split, in a fixed order."""
        return [(e["path"], c) for e in self.manifest["shards"] if e["split"] == split for c in e["chunks"]]

    def _index(self, shard: str) -> dict[str, tuple[int, int]]:
        """Member name -> (data offset, size), from the tar headers (read once per shard)."""
        if shard not in self._members:
            with self.fs.open(storage.join(self.root, shard), "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
                members = tar.getmembers()
            for m in members:  # a shard is data, never a path: refuse names a tool could write outside
                if m.name.startswith("/") or ".." in m.name.split("/") or not m.isfile():
                    raise ArpipeError(f"{self.dir}/{shard}: refusing member {m.name!r} (absolute, '..' or not a file)")
            self._members[shard] = {m.name: (m.offset_data, m.size) for m in members}
        return self._members[shard]

    def _read_members(self, shard: str, key: str, exts: tuple[str, ...]) -> list[bytes]:
        """Members `key.ext` of a chunk, fetched with one read that spans them and their headers.
        Each header must name exactly its member: a shard is data, never a path, and the
        manifest's byte ranges must point at the members it names."""
        ranges = self._ranges.get((shard, key))
        spans = [ranges[ext] if ranges else self._index(shard)[f"{key}.{ext}"] for ext in exts]
        start, end = min(o for o, _ in spans) - tarfile.BLOCKSIZE, max(o + n for o, n in spans)
        data = self.fs.cat_file(storage.join(self.root, shard), start=start, end=end)
        members = []
        for ext, (offset, size) in zip(exts, spans):
            at = offset - start
            try:
                info = tarfile.TarInfo.frombuf(data[at - tarfile.BLOCKSIZE : at], tarfile.ENCODING, "surrogateescape")
            except tarfile.HeaderError as e:
                raise ArpipeError(f"{self.dir}/{shard}: cannot read chunk {key}: no tar header before byte {offset} "
                                  f"({e})") from None
            if info.name != f"{key}.{ext}" or not info.isfile():
                raise ArpipeError(f"{self.dir}/{shard}: refusing member {info.name!r} where the manifest has "
                                  f"{key}.{ext}")
            if info.size != size:
                raise ArpipeError(f"{self.dir}/{shard}: cannot read chunk {key}: {info.name} holds {info.size} bytes, "
                                  f"the manifest says {size} (was the shard changed after sharding?)")
            members.append(data[at : at + size])
        return members

    def read(self, shard: str, key: str, ext: str) -> bytes:
        return self._read_members(shard, key, (ext,))[0]

    def read_chunk(self, shard: str, key: str) -> tuple[np.ndarray, np.ndarray]:
        """A chunk's concatenated tokens and item offsets (adjacent members: one read)."""
        try:  # allow_pickle=False: a shard holds numbers, never objects to unpickle
            tokens, offsets = (np.load(io.BytesIO(b), allow_pickle=False)
                               for b in self._read_members(shard, key, ("tokens.npy", "offsets.npy")))
        except (ValueError, KeyError) as e:
            raise ArpipeError(f"{self.dir}/{shard}: cannot read chunk {key}: {e}") from None
        return tokens, offsets


def run_stage(out: Path, settings: dict, inputs: list[str | DatasetInput], make_codec, *, workers: int = 1,
              num_tasks: int | None = None, task: int | None = None, finalize_only: bool = False) -> dict | None:
    """A whole shard stage: plan once, run the unfinished tasks (or just `task`), merge the manifest.

    With `task` set (a Slurm array element) only that task runs; `finalize_only` merges afterwards.
    Returns the manifest when it was written.
    """
    if finalize_only:
        return finalize(out)
    if task is not None and num_tasks is None and not (out / "plan.json").exists():
        raise ArpipeError("--task needs --num-tasks (the array size) on the first run")
    fresh = not (out / "plan.json").exists()
    plan = prepare(out, settings, inputs, num_tasks or (max(1, workers) if fresh else None), make_codec)
    if task is not None:
        if not 0 <= task < plan.num_tasks:
            raise ArpipeError(f"--task {task} is outside 0..{plan.num_tasks - 1}")
        run_task(out, task, plan)
        return None
    pending = plan.pending()
    LOG.info("shard: %d inputs, %d tasks, %d to run, %d workers -> %s",
             len(plan.data["inputs"]), plan.num_tasks, len(pending), workers, out)
    run_tasks(plan, pending, workers)
    manifest = finalize(out)
    for split, totals in manifest["splits"].items():
        LOG.info("shard: %s: %d items, %d tokens, %d chunks in %d shards",
                 split, totals["items"], totals["tokens"], totals["chunks"], totals["shards"])
    skipped = manifest["skipped"]
    if skipped["files"] or skipped["items"]:
        LOG.warning("shard: skipped %d unreadable inputs and items %s (reasons in %s)",
                    len(skipped["files"]), skipped["items"], out / "manifest.json")
    return manifest
