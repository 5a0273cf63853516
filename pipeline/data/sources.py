"""Sources: find the inputs (files, Hugging Face datasets) and read text records from them.

A record has a key that is stable under re-runs and any degree of parallelism: the input's path
relative to the common root of all inputs, and the record's index within that input (for a
dataset: NAME/SPLIT/ROW, see hf_inputs.py). Records a codec must not see (empty, too long,
invalid UTF-8, binary) come out as skips with a reason, so the shard stage can count them instead
of failing or dropping them silently. Everything is read in bounded pieces: a shard worker's
memory does not grow with its inputs.
"""

import bz2
import glob
import gzip
import hashlib
import json
import lzma
import os
import stat
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

from pipeline import ArpipeError
from pipeline.data.hf_inputs import (PREFIX, DatasetInput, DatasetPart, dataset_inputs, import_datasets,
                                     is_saved_dataset)

# File suffixes read by a tabular `datasets` builder (one record per row); all else is plain text.
TABULAR_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
# Compressed or archived input, which `datasets` unpacks: by name, or by magic number.
PACKED_SUFFIXES = {".gz", ".gzip", ".bz2", ".xz", ".lz4", ".zst", ".zstd", ".zip", ".eval", ".tar", ".tgz", ".7z", ".rar"}
PACKED_MAGIC = (b"PK\x03\x04", b"PK\x05\x06", b"PK\x07\x08", b"BZh", b"\x1f\x8b", b"\xfd7zXZ\x00", b"\x04\x22\x4d\x18",
                b"\x28\xb5\x2f\xfd", b"Rar!")
ARCHIVES = (".zip", ".eval", ".tar", ".tgz", ".7z", ".rar", ".tar.gz", ".tar.bz2", ".tar.xz")
# Single compressed streams that arpipe reads itself, in bounded pieces, by magic number.
COMPRESSED_TEXT = {b"\x1f\x8b": gzip.open, b"BZh": bz2.open, b"\xfd7zXZ\x00": lzma.open}
# A longer document is skipped: the tokenizer needs about 500 bytes per token of a document, so
# this bounds a shard worker's memory to about 0.7 GB (cut longer texts with --sample-by
# paragraph or line).
MAX_DOCUMENT_CHARS = 4 << 20
TOO_LONG = "longer than 4 Mi characters"
# A JSON Lines row longer than this is skipped as too long (its text is longer than
# MAX_DOCUMENT_CHARS unless more than half the line is escapes)
MAX_JSON_LINE = 2 * MAX_DOCUMENT_CHARS
TEXT_BATCH = 1024  # documents per Records from a table or dataset (plain text: per read of the file)


class Record(NamedTuple):  # one clip or image (readers make one at a time, then gather them in Records)
    key: str
    value: object = None  # the payload: str for text, arrays for audio and images
    skip: str | None = None  # why the record is unusable; None when it is fine
    meta: dict | None = None  # the item's meta where the reader makes it (an image's source size)


class Records(NamedTuple):
    """Consecutive records of one input as columns: what readers yield, a batch at a time. A text
    file holds millions of paragraphs, and an object per paragraph cost the shard stage as much
    Python as the tokenizer's own work on it."""
    keys: list[str]
    values: list
    skips: list[str | None] | None = None  # why each record is unusable (None: usable); None when all are
    metas: list[dict] | None = None  # each item's meta where the reader makes it (see Record.meta)

    @classmethod
    def of(cls, records: list[Record]) -> "Records":
        """At least one record as columns."""
        if len(records) == 1:  # an image file, a clip: the common case, kept cheap
            key, value, skip, meta = records[0]
            return cls([key], [value], None if skip is None else [skip], None if meta is None else [meta])
        keys, values, skips, metas = map(list, zip(*records))
        return cls(keys, values, skips if any(skips) else None, metas if metas.count(None) < len(metas) else None)


def in_batches(records: Iterable[Record], size: int, max_bytes: int = 1 << 20) -> Iterator[Records]:
    """Records of at most `size` at a time and not much more than `max_bytes` of payload (texts'
    characters, arrays' bytes): a table's rows may be megabytes each. Those read before a reader
    fails come out before its exception does: an input that fails part-way keeps what was read."""
    batch, payload = [], 0
    try:
        for record in records:
            batch.append(record)
            value = record.value
            payload += len(value) if isinstance(value, str) else getattr(value, "nbytes", 0)
            if len(batch) == size or payload >= max_bytes:
                yield Records.of(batch)
                batch, payload = [], 0
    except Exception:
        if batch:
            yield Records.of(batch)
        raise
    if batch:
        yield Records.of(batch)


def split_of(key: str, val_fraction: float, blake2b=hashlib.blake2b) -> str:
    """train or val, from a hash of the item's key: stable under re-runs and parallelism."""
    h = int.from_bytes(blake2b(key.encode(), digest_size=8).digest(), "little")
    return "val" if h < val_fraction * 2**64 else "train"


def expand_inputs(patterns: list[str], hf_splits=("train",), hf_config: str | None = None,
                  hf_revision: str | None = None) -> list[str | DatasetInput]:
    """Files named by paths, directories (recursively) and globs (`**` allowed), as sorted
    absolute path strings; then the Hugging Face datasets named by `hf://…` or by a directory
    `save_to_disk` wrote, one input per split (see hf_inputs.py). File inputs stay strings through
    the shard stage: making a Path costs microseconds, as much as a small image's other overhead.

    A file reached through several symlinked paths is listed once. Directory loops made of
    symlinks are walked once. Broken symlinks, symlink loops and special files (FIFOs, sockets)
    are listed too: the shard task that meets them records them as skipped, with the reason."""
    found: dict[str, str] = {}  # real path -> first path that reached it

    def add(path: str, real: str | None = None):
        try:  # `real` is what resolve() gives, known without a system call per file
            found.setdefault(real or str(Path(path).resolve(strict=True)), path)
        except (OSError, RuntimeError):  # broken symlink or symlink loop: keep it to report it
            found.setdefault(path, path)

    splits = []
    for pattern in patterns:
        if pattern.startswith(PREFIX) or is_saved_dataset(Path(pattern)):
            splits += dataset_inputs(pattern, list(hf_splits), hf_config, hf_revision)
            continue
        matches = glob.glob(os.path.expanduser(pattern), recursive=True)
        if not matches:
            raise ArpipeError(f"--input {pattern!r} matches no file")
        for match in map(os.path.abspath, matches):
            if not os.path.isdir(match):
                add(match)
                continue
            seen_dirs, directories = set(), [match]
            while directories:  # followed into symlinked directories, each real one walked once
                directory = directories.pop()
                real = os.path.realpath(directory)
                if real in seen_dirs:
                    continue
                seen_dirs.add(real)
                try:
                    with os.scandir(directory) as entries:
                        for entry in entries:
                            if is_directory(entry):
                                directories.append(entry.path)
                            else:
                                add(entry.path, None if entry.is_symlink() else os.path.join(real, entry.name))
                except PermissionError:  # listed, so that the shard task reports it as skipped
                    add(directory)
    return sorted(found.values()) + splits


def is_directory(entry: os.DirEntry) -> bool:
    """Whether a directory entry is, or links to, a directory (a symlink loop is not)."""
    try:
        return entry.is_dir()
    except OSError:
        return False


def require_regular_file(path: str) -> int:
    """The size of `path`; raises (with a reason for the manifest) unless it is a regular file:
    reading a FIFO would block forever. An unreadable file raises PermissionError when read."""
    info = os.stat(path)  # OSError for broken symlinks, symlink loops
    if not stat.S_ISREG(info.st_mode):
        raise OSError(f"not a regular file ({stat.filemode(info.st_mode)})")
    return info.st_size


def read_bytes(path: str) -> bytes:
    """A whole file, in few system calls: one read of the size fstat gives, more only where that
    comes back short. Pillow's own open also sets up a buffer, asks whether the file is a
    terminal and reads until an empty read: ≈ 10 µs more, a sixth of a small PNG's decode."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO fails rather than blocks
    try:
        size = os.fstat(fd).st_size  # 0 for some files with content (/proc's): then read to the end
        parts = [os.read(fd, size or 1 << 16)]
        if size and len(parts[0]) == size:
            return parts[0]
        while parts[-1]:  # to the end: a network file system may return less than asked for
            parts.append(os.read(fd, 1 << 16))  # (64 KiB: a buffer of 1 MiB or more is an mmap per call)
    finally:
        os.close(fd)
    return b"".join(parts)


def common_root(inputs: list) -> Path:
    """The directory input files' keys are relative to (the current one without files)."""
    if not inputs:
        raise ArpipeError("no input files")
    files = [f for f in inputs if isinstance(f, str)]
    if not files:
        return Path.cwd()
    # what all files share, the first and the last in sorted order share: no need to split them all
    return Path(os.path.commonpath([os.path.dirname(min(files)), os.path.dirname(max(files))]))


def relative_name(path: str, root: Path) -> str:
    """An input file's name relative to the common root of all inputs."""
    prefix = str(root).rstrip("/") + "/"
    return path[len(prefix):] if path.startswith(prefix) else os.path.relpath(path, root)


def readable(item: str | DatasetInput) -> str | DatasetPart:
    """What a codec reads for a whole input: the file, or all of a dataset split's rows."""
    return item.part(0, 1) if isinstance(item, DatasetInput) else item


def builder_for(path: str) -> str:
    suffixes = ["." + s for s in os.path.basename(path).lower().lstrip(".").split(".")[1:]]
    if suffixes and suffixes[-1] in (".gz", ".bz2", ".xz", ".zst"):
        suffixes = suffixes[:-1]
    return TABULAR_BUILDERS.get(suffixes[-1] if suffixes else "", "text")


def read_text(path: str | DatasetPart, root: Path, sample_by: str = "document",
              text_field: str = "text") -> Iterator[Records]:
    """Documents of one input, a batch at a time. Plain text (also gzip, bzip2 or xz compressed)
    is cut by `sample_by`; tabular rows and dataset rows are documents.

    Raises OSError/ValueError-like exceptions from `datasets` for unreadable files; the caller
    records the file as skipped.
    """
    if isinstance(path, DatasetPart):
        cells = path.cells(text_field, "--text-field")
        yield from in_batches((Record(key, text, text_problem(text)) for key, text in cells), TEXT_BATCH)
        return
    name = relative_name(path, root)
    builder = builder_for(path)
    if builder == "text" and (opener := text_opener(path)):  # the same documents, without `datasets` (see below)
        with opener(path, "rt", encoding="utf-8", errors="replace") as f:
            index = 0
            for documents in text_documents(f, sample_by):  # a list at a time: millions of lines are cheap
                keys = [f"{name}:{i}" for i in range(index, index + len(documents))]
                yield Records(keys, documents, text_problems(documents))
                index += len(documents)
        return
    if builder == "json" and is_json_lines(path) and (opener := text_opener(path)):
        with opener(path, "rt", encoding="utf-8", errors="replace") as f:
            yield from in_batches(json_lines(f, name, text_field), TEXT_BATCH)
        return
    datasets = import_datasets()
    # streaming: read the file where it lies, no Arrow cache copy of the corpus.
    # "replace" turns undecodable bytes into U+FFFD, which text_problem reports per document.
    options = {"sample_by": sample_by, "encoding_errors": "replace"} if builder == "text" else {}
    rows = datasets.load_dataset(builder, data_files=[path], split="train", streaming=True, **options)

    def documents():
        for index, row in enumerate(rows):
            if builder == "text":
                text = row["text"]
            elif text_field not in row:
                raise ValueError(f"no {text_field!r} field (columns: {sorted(row)})")
            else:
                text = row[text_field]
            yield Record(f"{name}:{index}", text, text_problem(text))

    yield from in_batches(documents(), TEXT_BATCH)


def is_json_lines(path: str) -> bool:
    """A .jsonl file, also gzip, bzip2 or xz compressed."""
    name = os.path.basename(path).lower()
    for suffix in (".gz", ".bz2", ".xz"):
        name = name.removesuffix(suffix)
    return name.endswith(".jsonl")


def json_lines(f, name: str, field: str) -> Iterator[Record]:
    """The rows of a JSON Lines stream, read the way `datasets`' json builder reads them (blank
    lines are no rows; a line that is not a JSON object fails the file, after the rows before
    it; a field missing from the first row is an error, from a later row a skipped row), but
    without importing `datasets`, which costs a shard worker seconds. A line longer than
    MAX_JSON_LINE characters is a skipped row, read past in bounded pieces."""
    index = 0
    while line := f.readline(MAX_JSON_LINE + 1):
        if len(line) > MAX_JSON_LINE and not line.endswith("\n"):
            while (rest := f.readline(MAX_JSON_LINE)) and not rest.endswith("\n"):
                pass
            yield Record(f"{name}:{index}", skip=TOO_LONG)
        elif line.isspace():
            continue
        else:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError(f"row {index} is a JSON {type(row).__name__}, not an object")
            if field not in row and index == 0:
                raise ValueError(f"no {field!r} field (columns: {sorted(row)})")
            text = row.get(field)
            yield Record(f"{name}:{index}", text, text_problem(text))
        index += 1
    if index == 0:
        raise ValueError("no rows")


def text_opener(path: str):
    """How arpipe reads a text file itself: `open` for a plain file, the decompressor's own
    `open` for one gzip, bzip2 or xz stream (by magic number); None for archives (zip, tar, …)
    and other packings, which `datasets` unpacks."""
    with open(path, "rb") as f:
        magic = f.read(8)
    name = os.path.basename(path).lower()
    if name.endswith(ARCHIVES):
        return None
    for prefix, opener in COMPRESSED_TEXT.items():
        if magic.startswith(prefix):
            return opener
    if os.path.splitext(name)[1] in PACKED_SUFFIXES or magic.startswith(PACKED_MAGIC):
        return None
    return open


def text_documents(f, sample_by: str, chunk: int = 1 << 20) -> Iterator[list[str]]:
    """A text stream's documents, a list at a time, cut exactly as `datasets`' text builder cuts
    them (universal newlines; paragraphs split at blank lines, empty ones dropped; lines without
    their line break), read `chunk` characters at a time. Reading directly is 5-10× faster, and
    a shard worker then never imports `datasets` and torch (seconds per process).

    Memory stays bounded: a document longer than MAX_DOCUMENT_CHARS comes out as its first
    MAX_DOCUMENT_CHARS + 1 characters, which `text_problem` refuses, and the rest is skipped
    unread into memory."""
    if sample_by == "document":
        yield [f.read(MAX_DOCUMENT_CHARS + 1)]
        return
    separator = "\n" if sample_by == "line" else "\n\n"
    keep = len(separator) - 1  # what a separator split across two reads leaves of it
    carry, too_long = "", False
    while batch := f.read(chunk):
        *pieces, carry = (carry + batch).split(separator)
        if too_long and pieces:  # the end of a document already reported as too long
            pieces, too_long = pieces[1:], False
        if sample_by == "paragraph":
            pieces = [p for p in pieces if p]
        if too_long or len(carry) > MAX_DOCUMENT_CHARS:
            if not too_long:
                pieces.append(carry[: MAX_DOCUMENT_CHARS + 1])
                too_long = True
            carry = carry[len(carry) - keep :]
        yield pieces
    if carry and not too_long:
        yield [carry]


def text_problem(text) -> str | None:
    """Why a document cannot be tokenised, or None."""
    if not isinstance(text, str):
        return "not a string"
    if not text or text.isspace():
        return "empty"
    if len(text) > MAX_DOCUMENT_CHARS:
        return TOO_LONG
    if "\x00" in text:
        return "NUL bytes"
    if "\ufffd" in text:  # how undecodable bytes come out of the reader
        return "invalid UTF-8"
    return None


def text_problems(texts: list[str]) -> list[str | None] | None:
    """Why each document cannot be tokenised (None where it can), or None when all can: the
    common case, checked in bulk (a paragraph costs the tokenizer about 30 µs, a check per
    paragraph in Python about 0.5)."""
    if (all(texts) and not any(map(str.isspace, texts)) and max(map(len, texts), default=0) <= MAX_DOCUMENT_CHARS
            and not ("\x00" in (joined := "".join(texts)) or "\ufffd" in joined)):
        return None
    problems = [text_problem(text) for text in texts]
    return problems if any(problems) else None
