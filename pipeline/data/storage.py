"""Where shards live: a local directory or an object store (`s3://bucket/prefix`), through fsspec.

s3fs takes its settings from the standard AWS environment: `AWS_ENDPOINT_URL` (any S3-compatible
store), `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_DEFAULT_REGION`, or ~/.aws.

A location is always a string here: `Path("s3://b/k")` is the local path `s3:/b/k`, so URLs never
go through pathlib.
"""

import hashlib
import os
from pathlib import Path

import fsspec

from pipeline import ArpipeError


def is_url(location: str | Path) -> bool:
    return "://" in str(location)


def location(directory: str | Path) -> str:
    """A URL as it is, a local directory as an absolute path."""
    return str(directory) if is_url(directory) else str(Path(directory).absolute())


def filesystem(where: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(file system, root path in it). fsspec keeps one instance per process, so a forked or
    spawned DataLoader worker gets its own connections."""
    try:
        return fsspec.core.url_to_fs(where)
    except (ImportError, ValueError) as e:  # an unknown protocol, or gs:// without gcsfs
        raise ArpipeError(f"cannot open {where}: {e}") from None


def unreachable(where: str, e: Exception) -> ArpipeError:
    """The error for a store that cannot be reached or refuses us."""
    return ArpipeError(f"cannot read {where}: {type(e).__name__}: {e} (the store and its credentials come from "
                       f"AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION or ~/.aws)")


def join(root: str, *names: str) -> str:
    return "/".join([root.rstrip("/"), *names])


def read(fs, path: str) -> bytes:
    """A whole object in one GET (s3fs's plain cat_file asks for its size first)."""
    return fs.cat_file(path, start=0)


def cache_root() -> Path:
    """Local copies of remote manifests and codec files ($ARPIPE_CACHE, default ~/.cache/arpipe)."""
    return Path(os.environ.get("ARPIPE_CACHE") or Path.home() / ".cache" / "arpipe")


def write_atomic(path: Path, data: bytes) -> None:
    """Several ranks on one node may fill the same cache: each writes its own file, then renames."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def local_copy(fs, root: str, url: str, manifest: bytes, names: list[str]) -> Path:
    """A local directory holding `manifest` and the files `names` of a remote shard directory
    (those that exist there), fetched once: the directory is named after the URL and the
    manifest's content, so a re-sharded prefix gets a new one."""
    key = hashlib.sha256(url.encode() + b"\0" + manifest).hexdigest()[:20]
    directory = cache_root() / "shards" / key
    directory.mkdir(parents=True, exist_ok=True)
    if not (directory / "manifest.json").exists():
        present = {p.rsplit("/", 1)[-1] for p in fs.ls(root, detail=False, refresh=True)}
        for name in names:
            if name in present and not (directory / name).exists():
                write_atomic(directory / name, read(fs, join(root, name)))
        write_atomic(directory / "manifest.json", manifest)  # last: it marks the copy complete
    return directory
