"""Token shards: plain WebDataset tars plus a manifest, written by resumable parallel tasks.

Layout of OUT/:
  plan.json                       the settings and inputs, fixed by the first run
  tokenizer.json …                the codec's files
  {split}/{split}-{task:05d}-{n:06d}.tar
  _tasks/task-{task:05d}.json     a task's done-marker: its shards, counts and skips
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

import fcntl
import hashlib
import io
import json
import os
import stat
import tarfile
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from functools import cached_property
from multiprocessing import get_context
from pathlib import Path, PurePosixPath

import numpy as np
from tqdm import tqdm

from pipeline import ArpipeError
from pipeline.codecs import Codec, load_codec
from pipeline.data import storage
from pipeline.data.sources import Record, common_root
from pipeline.log import LOG

FORMAT = 1
SPLITS = ("train", "val")
EXAMPLES_PER_REASON = 20  # skipped items listed by key in the manifest; the rest are counted


def split_of(key: str, val_fraction: float) -> str:
    """train or val, from a hash of the item's key: stable under re-runs and parallelism."""
    h = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")
    return "val" if h < val_fraction * 2**64 else "train"


def write_json_atomic(path: Path, data) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


class ShardWriter:
    """Writes one task's items of one split into chunks and tars of bounded size."""

    def __init__(self, directory: Path, split: str, task: int, dtype, chunk_bytes: int, shard_bytes: int):
        self.directory, self.split, self.task, self.dtype = directory, split, task, dtype
        self.chunk_bytes, self.shard_bytes = chunk_bytes, shard_bytes
        self.entries: list[dict] = []
        self.tar = None
        self.n_chunks = 0
        self._new_chunk()

    def _new_chunk(self):
        self.tokens: list[np.ndarray] = []
        self.meta: list[dict] = []
        self.size = 0

    def add(self, tokens: np.ndarray, meta: dict) -> None:
        self.tokens.append(tokens.astype(self.dtype, copy=False))
        self.meta.append(meta)
        self.size += tokens.nbytes
        if self.size >= self.chunk_bytes:
            self._flush_chunk()

    def _flush_chunk(self):
        if not self.tokens:
            return
        if self.tar is None:
            name = f"{self.split}-{self.task:05d}-{len(self.entries):06d}.tar"
            self.path = self.directory / self.split / name
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.tmp = self.path.with_name(name + ".tmp")
            self.tar = tarfile.open(self.tmp, "w", format=tarfile.USTAR_FORMAT)
            self.chunks: list[dict] = []
        key = f"{self.split}-{self.task:05d}-{self.n_chunks:06d}"
        offsets = np.zeros(len(self.tokens) + 1, dtype=np.int64)
        np.cumsum([len(t) for t in self.tokens], out=offsets[1:])
        members = {
            "tokens.npy": _npy_bytes(np.concatenate(self.tokens)),
            "offsets.npy": _npy_bytes(offsets),
            "meta.json": json.dumps({"items": self.meta}).encode(),
        }
        ranges = {}
        for ext, data in members.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), 0, 0o444
            self.tar.addfile(info, io.BytesIO(data))
            # [data offset, size] in the tar, after the member's zero padding to a whole block:
            # readers fetch a chunk with one range read and never walk the tar's headers
            ranges[ext] = [self.tar.offset - -(-len(data) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE, len(data)]
        self.chunks.append({"key": key, "items": len(self.tokens), "tokens": int(offsets[-1]),
                            "bytes": sum(m.get("bytes", 0) for m in self.meta), "members": ranges})
        self.n_chunks += 1
        self._new_chunk()
        if self.tar.fileobj.tell() >= self.shard_bytes:
            self._close_shard()

    def _close_shard(self):
        self.tar.close()
        self.tar = None
        os.replace(self.tmp, self.path)
        self.entries.append({
            "path": str(self.path.relative_to(self.directory)),
            "split": self.split,
            "sha256": hashlib.sha256(self.path.read_bytes()).hexdigest(),
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
        return cls(out, json.loads((out / "plan.json").read_text()))

    inputs = cached_property(lambda self: [Path(p) for p in self.data["inputs"]])
    root = property(lambda self: Path(self.data["root"]))
    num_tasks = property(lambda self: self.data["num_tasks"])

    @cached_property
    def codec(self) -> Codec:
        return load_codec(self.data["codec"], self.out)

    def task_inputs(self, task: int) -> list[Path]:
        return self.inputs[task :: self.num_tasks]

    def marker(self, task: int) -> Path:
        return self.out / "_tasks" / f"task-{task:05d}.json"

    def pending(self) -> list[int]:
        return [t for t in range(self.num_tasks) if not self.marker(t).exists()]


def prepare(out: Path, settings: dict, inputs: list[Path], num_tasks: int | None,
            make_codec: Callable[[list[Path], Path, Path], Codec]) -> Plan:
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
        return Plan(out, data)


_progress = None  # bytes of input done, shared with pool workers for the progress bar


def _init_worker(progress):
    global _progress
    _progress = progress
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker: --workers is the parallelism


def run_task(out: Path, task: int) -> dict:
    """Shard task `task` unless its done-marker exists. Returns the done-marker's contents."""
    plan = Plan.load(out)
    marker = plan.marker(task)
    if marker.exists():
        return json.loads(marker.read_text())
    for split in SPLITS:  # leftovers of a killed attempt: redo from scratch
        for stale in (out / split).glob(f"{split}-{task:05d}-*"):
            stale.unlink()
    settings = plan.data["settings"]
    codec = plan.codec
    writers = {s: ShardWriter(out, s, task, codec.token_dtype, settings["chunk_bytes"], settings["shard_bytes"])
               for s in SPLITS}
    skipped_files, skipped_items, examples = [], Counter(), {}
    batch: list[tuple[str, Record]] = []

    def flush():
        for (split, record), (tokens, meta) in zip(batch, codec.encode_records([r for _, r in batch])):
            writers[split].add(tokens, meta)
        batch.clear()

    for path in plan.task_inputs(task):
        try:
            require_regular_file(path)
            for record in codec.read_records(path, plan.root, settings):
                if record.skip:
                    skipped_items[record.skip] += 1
                    examples.setdefault(record.skip, [])
                    if len(examples[record.skip]) < EXAMPLES_PER_REASON:
                        examples[record.skip].append(record.key)
                    continue
                batch.append((split_of(record.key, settings["val_fraction"]), record))
                if len(batch) >= 256:
                    flush()
        except Exception as e:  # an unreadable input is skipped and reported, never fatal
            reason = "empty file" if _size(path) == 0 and os.path.isfile(path) else f"{type(e).__name__}: {e}"
            skipped_files.append({"input": str(path.relative_to(plan.root)), "reason": reason[:500]})
        flush()
        if _progress is not None:
            with _progress.get_lock():
                _progress.value += _size(path)
    result = {"task": task, "shards": [e for s in SPLITS for e in writers[s].close()],
              "skipped_files": skipped_files, "skipped_items": dict(skipped_items), "skipped_examples": examples}
    marker.parent.mkdir(exist_ok=True)
    write_json_atomic(marker, result)
    return result


def require_regular_file(path: Path) -> None:
    """Raise (with a reason for the manifest) unless `path` is a readable regular file; reading
    a FIFO would block the task forever."""
    mode = os.stat(path).st_mode  # OSError for broken symlinks, symlink loops
    if not stat.S_ISREG(mode):
        raise OSError(f"not a regular file ({stat.filemode(mode)})")
    with open(path, "rb") as f:  # PermissionError for an unreadable file
        f.read(1)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def run_tasks(out: Path, tasks: list[int], workers: int) -> None:
    """Run shard tasks in a process pool with a progress bar over input bytes."""
    plan = Plan.load(out)
    ctx = get_context("spawn")  # fork after tokenizers/torch threads started can deadlock
    progress = ctx.Value("q", 0)
    total = sum(_size(p) for t in tasks for p in plan.task_inputs(t))
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="shard", disable=None)
    if workers <= 1:
        _init_worker(progress)
        for t in tasks:
            run_task(out, t)
            bar.update(progress.value - bar.n)
    else:
        with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(progress,)) as pool:
            pending = {pool.submit(run_task, out, t) for t in tasks}
            while pending:
                done, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
                for future in done:
                    future.result()
                bar.update(progress.value - bar.n)
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
        "inputs": {"root": plan.data["root"], "files": len(plan.inputs)},
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


def run_stage(out: Path, settings: dict, inputs: list[Path], make_codec, *, workers: int = 1,
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
        run_task(out, task)
        return None
    pending = plan.pending()
    LOG.info("shard: %d inputs, %d tasks, %d to run, %d workers -> %s",
             len(plan.inputs), plan.num_tasks, len(pending), workers, out)
    run_tasks(out, pending, workers)
    manifest = finalize(out)
    for split, totals in manifest["splits"].items():
        LOG.info("shard: %s: %d items, %d tokens, %d chunks in %d shards",
                 split, totals["items"], totals["tokens"], totals["chunks"], totals["shards"])
    skipped = manifest["skipped"]
    if skipped["files"] or skipped["items"]:
        LOG.warning("shard: skipped %d unreadable inputs and items %s (reasons in %s)",
                    len(skipped["files"]), skipped["items"], out / "manifest.json")
    return manifest
