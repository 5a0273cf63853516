"""Hugging Face dataset inputs: one split of a dataset, read through `datasets`.

  --input hf://user/name      a Hub dataset from the local cache (arpipe never downloads; with
                              HF_HUB_OFFLINE=0 `datasets` may), --hf-config, --hf-revision
  --input hf://DIR            a local directory in the Hub's layout (data/train-00000-of-00002.parquet,
                              <config>/<split>/*.parquet, .arrow files), prepared by `datasets`
  --input DIR or hf://DIR     a directory written by `save_to_disk` (Dataset or DatasetDict)

`--hf-split` picks the splits (default train). Each split is one input; its rows are the items
(one document, image or sound file each), keyed `NAME[/CONFIG]/SPLIT/ROW` with the row's index in
the split, so keys do not depend on how the work is cut: every shard task takes a contiguous
1/N of every dataset's rows, so even one dataset keeps all workers busy.
"""

import functools
import glob
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, urlencode

from pipeline import ArpipeError

PREFIX = "hf://"
SAVED_MARKERS = ("dataset_dict.json", "state.json")  # what save_to_disk writes
CELL_BATCH_BYTES = 8 << 20  # rows are read from the Arrow table about this much at a time


def import_datasets():
    """HF `datasets`, set up never to download and to stay quiet."""
    # arpipe never downloads: without these, `datasets` probes the Hub (seconds per stall).
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("USE_TORCH", "0")  # else `datasets` imports torch (seconds per worker) for nothing we use
    import datasets

    datasets.disable_progress_bars()
    logging.getLogger("datasets").setLevel(logging.ERROR)
    return datasets


def is_saved_dataset(path: Path) -> bool:
    return any((path / marker).is_file() for marker in SAVED_MARKERS)


@dataclass(frozen=True)
class DatasetInput:
    source: str  # a Hub id or a local directory
    split: str
    config: str | None = None
    revision: str | None = None

    def __str__(self) -> str:
        """The form kept in the shard stage's plan.json."""
        query = {"split": self.split, "config": self.config, "revision": self.revision}
        return f"{PREFIX}{self.source}?{urlencode({k: v for k, v in query.items() if v})}"

    @classmethod
    def parse(cls, text: str) -> "DatasetInput":
        source, _, query = text[len(PREFIX):].rpartition("?")
        return cls(source, **dict(parse_qsl(query)))

    @property
    def local(self) -> bool:
        return Path(self.source).is_dir()

    @property
    def name(self) -> str:
        """The key prefix of its items: NAME[/CONFIG]/SPLIT, NAME a Hub id or a directory's name."""
        label = Path(self.source).resolve().name if self.local else self.source
        return "/".join(filter(None, (label, self.config, self.split)))

    def open(self):
        """The split as a `datasets.Dataset` (memory-mapped Arrow), opened once per process."""
        return open_split(self)

    def part(self, index: int, count: int) -> "DatasetPart":
        return DatasetPart(self, index, count)


@functools.cache
def open_split(item: DatasetInput):
    """The split as a `datasets.Dataset`."""
    datasets = import_datasets()
    if item.local and is_saved_dataset(Path(item.source)):
        splits = datasets.load_from_disk(item.source)
        if isinstance(splits, datasets.Dataset):
            splits = {str(splits.split or "train"): splits}
    elif item.local:
        directory = Path(item.source)
        by_layout = item.config and (directory / item.config).is_dir()  # <config>/<split>/… files
        try:
            splits = datasets.load_dataset(item.source, **({"data_dir": item.config} if by_layout else
                                                           {"name": item.config}))
        except ValueError as e:
            raise ArpipeError(f"--input {PREFIX}{item.source} (--hf-config {item.config}): {e}") from None
    else:
        splits = open_cached(item.source, item.config, item.revision)
    if item.split not in splits:
        raise ArpipeError(f"--hf-split {item.split}: {item.source} has no such split "
                          f"(its splits: {', '.join(splits)})")
    return splits[item.split]


def open_cached(repo: str, config: str | None, revision: str | None):
    """A Hub dataset from `datasets`' cache: the latest cached build, or the one of `revision`
    (a commit, or a branch or tag the hub cache's refs resolve)."""
    datasets = import_datasets()
    if revision is None or not datasets.config.HF_HUB_OFFLINE:
        try:
            return datasets.load_dataset(repo, config, revision=revision)
        except (ConnectionError, FileNotFoundError) as e:
            raise ArpipeError(f"--input {PREFIX}{repo}: not in the local cache ({datasets.config.HF_DATASETS_CACHE}) "
                              f"and arpipe does not download ({e})") from None
        except ValueError as e:  # e.g. several cached configs and no --hf-config
            raise ArpipeError(f"--input {PREFIX}{repo} (--hf-config {config}): {e}") from None
    from datasets.packaged_modules.cache.cache import Cache
    from huggingface_hub.constants import HF_HUB_CACHE

    namespace, _, name = repo.rpartition("/")
    root = Path(datasets.config.HF_DATASETS_CACHE) / "___".join(filter(None, (namespace, name)))
    ref = Path(HF_HUB_CACHE) / f"datasets--{repo.replace('/', '--')}" / "refs" / revision
    commit = ref.read_text().strip() if ref.is_file() else revision
    builds = [Path(p) for p in glob.glob(str(root / (config or "*") / "*" / commit)) if os.path.isdir(p)]
    if len(builds) > 1:
        raise ArpipeError(f"--hf-revision {revision}: {repo} has several configurations cached at that revision "
                          f"({', '.join(sorted(p.parts[-3] for p in builds))}); name one with --hf-config")
    if not builds:
        cached = sorted({p.name for p in root.glob("*/*/*") if p.is_dir()})
        raise ArpipeError(f"--hf-revision {revision}: no cached build of {repo}{f' ({config})' if config else ''} "
                          f"at that revision; cached revisions: {', '.join(cached) or 'none'}")
    config_name, version = builds[0].parts[-3:-1]
    builder = Cache(dataset_name=name, repo_id=repo, config_name=config_name, version=version, hash=commit)
    return {split: builder.as_dataset(split=split) for split in builder.info.splits}


@dataclass(frozen=True)
class DatasetPart:
    """Task `index` of `count`'s share of a dataset split: a contiguous range of its rows."""

    input: DatasetInput
    index: int
    count: int

    def __str__(self) -> str:
        return f"{self.input.name} (part {self.index + 1} of {self.count})"

    def cells(self, column: str, option: str):
        """(key, cell) of the part's rows in `column`, undecoded (str, or {bytes, path} for
        Audio and Image columns: arpipe decodes them itself), read in slices of the Arrow table."""
        dataset = self.input.open()
        if column not in dataset.column_names:
            raise ArpipeError(f"{option} {column}: {self.input.name} has no such column "
                              f"(columns: {', '.join(dataset.column_names)})")
        table, name = dataset.select_columns([column]).with_format("arrow"), self.input.name
        start, stop = (len(dataset) * i // self.count for i in (self.index, self.index + 1))
        per_slice = max(1, min(1024, CELL_BATCH_BYTES * len(dataset) // max(1, dataset.data.nbytes)))
        for first in range(start, stop, per_slice):
            cells = table[first : min(stop, first + per_slice)].column(column).to_pylist()
            yield from ((f"{name}/{row}", cell) for row, cell in enumerate(cells, first))

    @property
    def size(self) -> int:
        """Approximate bytes, for the progress bar."""
        return self.input.open().data.nbytes // self.count

    def resolve(self, path: str) -> Path:
        """A file an Audio or Image cell names by path: relative to a local dataset's directory."""
        return Path(self.input.source) / path if self.input.local else Path(path)


def dataset_inputs(pattern: str, splits: list[str], config: str | None, revision: str | None) -> list[DatasetInput]:
    """The inputs one `--input hf://…` (or a save_to_disk directory) names: one per split."""
    source = pattern[len(PREFIX):] if pattern.startswith(PREFIX) else pattern
    if Path(source).is_dir():
        source = str(Path(source).absolute())
    inputs = [DatasetInput(source, split, config, revision) for split in splits]
    for item in inputs:
        item.open()  # fails now, naming the option to fix, rather than in every task
    return inputs
