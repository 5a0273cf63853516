"""The shard stage with an object-store --out (`s3://bucket/prefix`).

An object store has no rename, but putting an object is atomic: it appears whole or not at all.
So the stage runs as it does locally (`shards.run_stage`) in a local staging directory, and a
thread copies what is finished to the store, in this order:

  the codec's files, then plan.json    the plan lands after the files it names
  each finished tar                    as soon as the task renamed it from .tmp
  the task's _tasks/task-N.json        once every tar the marker names is on the store
  manifest.json                        last, after every task's marker

Completeness is marked by those objects: readers (`Shards`) trust only the shards manifest.json
names, and a task is done when its marker object exists. A re-run copies plan.json, the codec's
files and the markers from the store into a fresh staging directory, deletes the store's
objects of tasks without a marker (a killed attempt's uploads) and runs only those tasks, so
the result is byte-identical to an uninterrupted run's. A task's tars leave the staging
directory once its marker is on the store: staging holds the shards of the running tasks only.
"""

import json
import tempfile
import threading
from pathlib import Path

from pipeline import ArpipeError
from pipeline.data import storage
from pipeline.data.shards import SPLITS, run_stage
from pipeline.log import LOG

NOT_UPLOADED = {"plan.json", ".plan.lock", "manifest.json"}  # plan.json goes after the codec's files


def _task_of(shard_name: str) -> int:
    return int(shard_name.rsplit("/", 1)[-1].split("-")[1])  # {split}-{task:05d}-{n:06d}.tar


class Store:
    """The stage's --out on an object store: fetch its state, upload finished objects."""

    def __init__(self, url: str):
        self.url = url
        self.fs, self.root = storage.filesystem(url)

    def path(self, name: str) -> str:
        return storage.join(self.root, name)

    def put(self, local: Path, name: str) -> None:
        self.fs.put_file(str(local), self.path(name))  # one object, visible only when complete

    def files(self, folder: str = "") -> list[str]:
        """Names (relative to the root) of the objects directly in `folder`."""
        base = self.path(folder) if folder else self.root
        return [p[len(self.root) + 1 :] for p in self.fs.find(base, maxdepth=1)]

    def fetch(self, staging: Path, task: int | None) -> set[str]:
        """Copy plan.json, the codec's files and the done-markers (only `task`'s, if given) into
        `staging`. Returns the markers' names; nothing is copied if the stage is not planned."""
        top = [name for name in self.files() if name != "manifest.json"]
        if "plan.json" not in top:
            return set()
        markers = self.files("_tasks") if task is None else \
            [m for m in [f"_tasks/task-{task:05d}.json"] if self.fs.exists(self.path(m))]
        (staging / "_tasks").mkdir()
        names = top + markers
        self.fs.get([self.path(n) for n in names], [str(staging / n) for n in names])
        return {m.rsplit("/", 1)[-1] for m in markers}

    def remove_unfinished(self, tasks: list[int]) -> None:
        """Delete the tars that killed attempts of `tasks` left on the store."""
        tasks = set(tasks)
        stale = [self.path(name) for split in SPLITS for name in self.files(split) if _task_of(name) in tasks]
        if stale:
            LOG.info("shard: deleting %d objects of unfinished tasks from %s", len(stale), self.url)
            self.fs.rm(stale)


class Uploader(threading.Thread):
    """Copies finished files from the staging directory to the store while the stage runs."""

    def __init__(self, store: Store, staging: Path, planned: bool, markers: set[str]):
        super().__init__(daemon=True, name="shard-upload")
        self.store, self.staging, self.planned = store, staging, planned
        self.markers = set(markers)  # done-markers already on the store
        self.uploaded: set[str] = set()  # tars already on the store
        self.error: Exception | None = None
        self.stopping = threading.Event()

    def run(self):
        try:
            while not self.stopping.wait(0.2):
                self.sweep()
            self.sweep()
        except Exception as e:  # reported by finish(): the stage must not end as if uploaded
            self.error = e

    def sweep(self):
        if not self.planned:
            if not (self.staging / "plan.json").exists():
                return
            for path in sorted(self.staging.iterdir()):
                if path.is_file() and path.name not in NOT_UPLOADED and not path.name.endswith(".tmp"):
                    self.store.put(path, path.name)
            self.store.put(self.staging / "plan.json", "plan.json")
            self.planned = True
        for split in SPLITS:
            for tar in sorted((self.staging / split).glob("*.tar")):
                name = f"{split}/{tar.name}"
                if name not in self.uploaded:
                    self.store.put(tar, name)
                    self.uploaded.add(name)
        for marker in sorted((self.staging / "_tasks").glob("task-*.json")):
            if marker.name in self.markers:
                continue
            shards = [entry["path"] for entry in json.loads(marker.read_text())["shards"]]
            if all(name in self.uploaded for name in shards):
                self.store.put(marker, f"_tasks/{marker.name}")
                self.markers.add(marker.name)
                for name in shards:
                    (self.staging / name).unlink()

    def finish(self) -> None:
        self.stopping.set()
        self.join()
        if self.error:
            raise ArpipeError(f"uploading shards to {self.store.url} failed: "
                              f"{type(self.error).__name__}: {self.error}") from self.error


def run_remote_stage(url: str, settings: dict, inputs: list[Path], make_codec, *, workers: int = 1,
                     num_tasks: int | None = None, task: int | None = None,
                     finalize_only: bool = False) -> dict | None:
    """`shards.run_stage` with --out on an object store; the same arguments and result."""
    store = Store(url)
    with tempfile.TemporaryDirectory(prefix="arpipe-stage-") as tmp:
        staging = Path(tmp)
        try:
            markers = store.fetch(staging, task)
        except Exception as e:  # an unreachable endpoint, refused credentials, …
            raise storage.unreachable(url, e) from None
        planned = (staging / "plan.json").exists()
        if task and not planned:  # array tasks on other nodes share no lock on a store: task 0 plans alone
            raise ArpipeError(f"{url}/plan.json not found: on an object store task 0 plans the stage; run "
                              f"--task 0 first, then the other tasks (`arpipe submit` does)")
        if planned and not finalize_only:
            num_planned = json.loads((staging / "plan.json").read_text())["num_tasks"]
            todo = [task] if task is not None else range(num_planned)
            store.remove_unfinished([t for t in todo if f"task-{t:05d}.json" not in markers])
        LOG.info("shard: staging in %s, uploading to %s", staging, url)
        uploader = Uploader(store, staging, planned, markers)
        uploader.start()
        try:
            manifest = run_stage(staging, settings, inputs, make_codec, workers=workers, num_tasks=num_tasks,
                                 task=task, finalize_only=finalize_only)
        except ArpipeError as e:
            raise ArpipeError(str(e).replace(str(staging), url)) from None
        finally:
            uploader.finish()
        if manifest is not None:
            store.put(staging / "manifest.json", "manifest.json")
            LOG.info("shard: %s/manifest.json written", url)
        return manifest
