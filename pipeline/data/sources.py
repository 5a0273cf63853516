"""Sources: find input files and read their records through HF `datasets`.

A record has a key that is stable under re-runs and any degree of parallelism: the input's path
relative to the common root of all inputs, and the record's index within that input. Records a
codec must not see (empty, invalid UTF-8, binary) come out as skips with a reason, so the shard
stage can count them instead of failing or dropping them silently.
"""

import glob
import hashlib
import io
import logging
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pipeline import ArpipeError

# File suffixes read by a tabular `datasets` builder (one record per row); all else is plain text.
TABULAR_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
# Compressed or archived input, which `datasets` unpacks: by name, or by magic number.
PACKED_SUFFIXES = {".gz", ".gzip", ".bz2", ".xz", ".lz4", ".zst", ".zstd", ".zip", ".eval", ".tar", ".tgz", ".7z", ".rar"}
PACKED_MAGIC = (b"PK\x03\x04", b"PK\x05\x06", b"PK\x07\x08", b"BZh", b"\x1f\x8b", b"\xfd7zXZ\x00", b"\x04\x22\x4d\x18",
                b"\x28\xb5\x2f\xfd", b"Rar!")


@dataclass(frozen=True)
class Record:
    key: str
    value: object = None  # the payload: str for text
    skip: str | None = None  # why the record is unusable; None when it is fine


def split_of(key: str, val_fraction: float) -> str:
    """train or val, from a hash of the item's key: stable under re-runs and parallelism."""
    h = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")
    return "val" if h < val_fraction * 2**64 else "train"


def expand_inputs(patterns: list[str]) -> list[Path]:
    """Files named by paths, directories (recursively) and globs (`**` allowed), sorted.

    A file reached through several symlinked paths is listed once. Directory loops made of
    symlinks are walked once. Broken symlinks, symlink loops and special files (FIFOs, sockets)
    are listed too: the shard task that meets them records them as skipped, with the reason."""
    found: dict[str, Path] = {}  # real path -> first path that reached it

    def add(path: Path, real_dir: str | None = None):
        try:
            if real_dir is not None and not stat.S_ISLNK(os.lstat(path).st_mode):
                key = os.path.join(real_dir, path.name)  # what resolve() gives, without its lstat per component
            else:
                key = str(path.resolve(strict=True))
        except (OSError, RuntimeError):  # broken symlink or symlink loop: keep it to report it
            key = str(path.absolute())
        found.setdefault(key, path.absolute())

    for pattern in patterns:
        matches = glob.glob(os.path.expanduser(pattern), recursive=True)
        if not matches:
            raise ArpipeError(f"--input {pattern!r} matches no file")
        for match in map(Path, matches):
            if not match.is_dir():
                add(match)
                continue
            seen_dirs = set()
            for directory, subdirs, files in os.walk(match, followlinks=True):
                real = os.path.realpath(directory)
                if real in seen_dirs:  # a symlink loop back into a walked directory
                    subdirs.clear()
                    continue
                seen_dirs.add(real)
                for name in files:
                    add(Path(directory, name), real)
    return sorted(found.values())


def common_root(files: list[Path]) -> Path:
    if not files:
        raise ArpipeError("no input files")
    return Path(os.path.commonpath([str(f.parent) for f in files]))


def builder_for(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in (".gz", ".bz2", ".xz", ".zst"):
        suffixes = suffixes[:-1]
    return TABULAR_BUILDERS.get(suffixes[-1] if suffixes else "", "text")


def read_text(path: Path, root: Path, sample_by: str = "document", text_field: str = "text") -> Iterator[Record]:
    """Documents of one input file. Plain text is cut by `sample_by`; tabular rows are documents.

    Raises OSError/ValueError-like exceptions from `datasets` for unreadable files; the caller
    records the file as skipped.
    """
    name = str(path.relative_to(root))
    builder = builder_for(path)
    if builder == "text" and is_plain_file(path):  # the same documents, without `datasets` (see below)
        for index, text in enumerate(plain_text_documents(path, sample_by)):
            yield Record(f"{name}:{index}", text, text_problem(text))
        return
    # arpipe never downloads: without these, `datasets` probes the Hub (seconds per stall).
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("USE_TORCH", "0")  # else `datasets` imports torch (seconds per worker) for nothing we use
    import datasets

    datasets.disable_progress_bars()
    logging.getLogger("datasets").setLevel(logging.ERROR)
    # streaming: read the file where it lies, no Arrow cache copy of the corpus.
    # "replace" turns undecodable bytes into U+FFFD, which text_problem reports per document.
    options = {"sample_by": sample_by, "encoding_errors": "replace"} if builder == "text" else {}
    rows = datasets.load_dataset(builder, data_files=[str(path)], split="train", streaming=True, **options)
    for index, row in enumerate(rows):
        key = f"{name}:{index}"
        if builder == "text":
            text = row["text"]
        elif text_field not in row:
            raise ValueError(f"no {text_field!r} field (columns: {sorted(row)})")
        else:
            text = row[text_field]
        yield Record(key, text, text_problem(text))


def is_plain_file(path: Path) -> bool:
    """A regular file that is neither compressed nor an archive (by name and by magic number)."""
    if path.suffix.lower() in PACKED_SUFFIXES or not stat.S_ISREG(os.stat(path).st_mode):
        return False
    with open(path, "rb") as f:
        return not f.read(8).startswith(PACKED_MAGIC)


def plain_text_documents(path: Path, sample_by: str, chunk: int = 10 << 20) -> Iterator[str]:
    """A plain text file's documents, cut exactly as `datasets`' text builder cuts them (universal
    newlines; paragraphs split at blank lines, empty ones dropped; lines without their line break)
    and read in 10 MB pieces as it does. Reading the file directly is 5-10× faster, and a shard
    worker then never imports `datasets` and torch (seconds per process)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        if sample_by == "document":
            yield f.read()
        elif sample_by == "line":
            while batch := f.read(chunk):
                yield from (line.rstrip("\n") for line in io.StringIO(batch + f.readline()).readlines())
        else:
            carry = ""
            while batch := f.read(chunk):
                *paragraphs, carry = (carry + batch + f.readline()).split("\n\n")
                yield from (p for p in paragraphs if p)
            if carry:
                yield carry


def text_problem(text) -> str | None:
    """Why a document cannot be tokenised, or None."""
    if not isinstance(text, str):
        return "not a string"
    if not text.strip():
        return "empty"
    if "\x00" in text:
        return "NUL bytes"
    if "\ufffd" in text:  # how undecodable bytes come out of the reader
        return "invalid UTF-8"
    return None
