"""Hugging Face dataset inputs: a Hub dataset from the local cache (config, split, revision), a
local directory in the Hub's layout and a `save_to_disk` directory, with text, audio and image
columns, through the same codecs as files; keys NAME/SPLIT/ROW whatever the number of tasks.

There is no network here: the tests build the cache as a download leaves it, with `datasets`'
own parquet builder, moved into the layout of a Hub dataset's cache."""

import io
import json
import shutil
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest
import soundfile as sf
from PIL import Image

from pipeline.codecs.audio import AudioCodec
from pipeline.data.shards import Shards
from pipeline.data.sources import split_of
from tests.conftest import ENV, REPO, arpipe
from tests.unit.test_shards import digest, texts

OLD, NEW = "a" * 40, "b" * 40  # commits of the cached Hub dataset


def wav_bytes(freq: float, seconds: float = 0.5, rate: int = 8000) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, 0.5 * np.sin(2 * np.pi * freq * np.arange(int(seconds * rate)) / rate), rate, format="WAV")
    return buffer.getvalue()


def png_bytes(value: int, size: int = 8) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((size, size), value, np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def media_rows(n: int):
    """A datasets.Dataset with Audio, Image and text columns; row 1's audio and image are broken."""
    import datasets

    rows = datasets.Dataset.from_dict({
        "audio": [{"bytes": b"not audio" if i == 1 else wav_bytes(200 + 50 * i), "path": None} for i in range(n)],
        "image": [{"bytes": b"not an image" if i == 1 else png_bytes(20 * i % 256), "path": None} for i in range(n)],
        "text": [f"row {i}" for i in range(n)],
    })
    return rows.cast_column("audio", datasets.Audio(decode=False)).cast_column("image", datasets.Image(decode=False))


def cache_hub_dataset(home, repo: str, commit: str, splits: dict, config: str = "default"):
    """Put `repo` at `commit` into HF_HOME's `datasets` cache as `load_dataset(repo)` leaves it."""
    import datasets
    from datasets.packaged_modules.parquet.parquet import Parquet

    cache, files = home / "datasets", home / "files" / commit
    files.mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        datasets.Dataset.from_dict(rows).to_parquet(str(files / f"{split}.parquet"))
    namespace, name = repo.split("/")
    builder = Parquet(cache_dir=str(cache), dataset_name=name, config_name=config, hash=commit,
                      data_files={split: str(files / f"{split}.parquet") for split in splits})
    builder.download_and_prepare()
    target = cache / f"{namespace}___{name}" / config / "0.0.0" / commit
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(builder.cache_dir, target)


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory):
    home = tmp_path_factory.mktemp("hf-home")
    cache_hub_dataset(home, "user/tiny", OLD, {"train": {"text": [f"old {i}" for i in range(5)]}})
    cache_hub_dataset(home, "user/tiny", NEW, {"train": {"text": [f"doc {i} " * (i + 1) for i in range(30)]},
                                               "test": {"text": ["a test document", "another one"]}})
    refs = home / "hub" / "datasets--user--tiny" / "refs"
    refs.mkdir(parents=True)
    (refs / "v1").write_text(OLD)  # a tag the hub cache resolves
    return home


def shard_hf(home, *args, check=True) -> subprocess.CompletedProcess:
    """`arpipe shard ARGS` with HF_HOME at the test's cache."""
    result = subprocess.run([sys.executable, "-m", "pipeline", "shard", *map(str, args)], capture_output=True,
                            text=True, env={**ENV, "HF_HOME": str(home)}, cwd=REPO, timeout=600)
    assert not check or result.returncode == 0, result.stderr[-3000:]
    return result


def test_hub_dataset_from_the_cache_by_split_and_revision(tmp_path, hf_home, text_shards):
    tokenizer = text_shards / "tokenizer.json"
    shard_hf(hf_home, "text", "--input", "hf://user/tiny", "--out", tmp_path / "latest", "--tokenizer", tokenizer,
             "--val-fraction", 0.3)
    documents = texts(tmp_path / "latest")
    assert documents == {f"user/tiny/train/{i}": f"doc {i} " * (i + 1) for i in range(30)}
    for split in ("train", "val"):
        shards = Shards(tmp_path / "latest")
        keys = [m["key"] for shard, c in shards.chunks(split)
                for m in json.loads(shards.read(shard, c["key"], "meta.json"))["items"]]
        assert keys and all(split_of(k, 0.3) == split for k in keys)  # arpipe's own split, by key

    for revision in (OLD, "v1"):
        shard_hf(hf_home, "text", "--input", "hf://user/tiny", "--hf-revision", revision, "--out",
                 tmp_path / revision, "--tokenizer", tokenizer)
        assert texts(tmp_path / revision) == {f"user/tiny/train/{i}": f"old {i}" for i in range(5)}
    shard_hf(hf_home, "text", "--input", "hf://user/tiny", "--hf-split", "train", "test", "--out", tmp_path / "both",
             "--tokenizer", tokenizer)
    both = texts(tmp_path / "both")
    assert len(both) == 32 and both["user/tiny/test/1"] == "another one"


@pytest.mark.parametrize("args, message", [
    (["--input", "hf://user/tiny", "--hf-split", "validation"], "--hf-split validation: user/tiny has no such split "
                                                                "(its splits: train, test)"),
    (["--input", "hf://user/tiny", "--hf-revision", "c" * 40],
     f"--hf-revision {'c' * 40}: no cached build of user/tiny at that revision; cached revisions: {OLD}, {NEW}"),
    (["--input", "hf://user/absent"], "--input hf://user/absent: not in the local cache"),
    (["--input", "hf://user/tiny", "--text-field", "body"], "--text-field body: user/tiny/train has no such column "
                                                            "(columns: text)"),
])
def test_dataset_errors_name_the_option_to_change(tmp_path, hf_home, text_shards, args, message):
    result = shard_hf(hf_home, "text", *args, "--out", tmp_path / "o", "--tokenizer", text_shards / "tokenizer.json",
                      check=False)
    assert result.returncode == 2 and message in result.stderr, result.stderr[-2000:]


def test_saved_dataset_audio_and_image_columns_go_through_the_codecs(tmp_path):
    import datasets

    rows = media_rows(4)
    datasets.DatasetDict({"train": rows, "test": rows.select([0])}).save_to_disk(str(tmp_path / "saved"))
    arpipe("shard", "audio", "--input", tmp_path / "saved", "--out", tmp_path / "audio", "--sample-rate", 8000,
           "--clip-seconds", 0.25, "--val-fraction", 0)
    manifest = json.loads((tmp_path / "audio" / "manifest.json").read_text())
    assert manifest["skipped"]["examples"] == {"undecodable": ["saved/train/1:0"]}
    shards = Shards(tmp_path / "audio")
    clips = {}
    for shard, chunk in shards.chunks("train"):
        tokens, offsets = shards.read_chunk(shard, chunk["key"])
        meta = json.loads(shards.read(shard, chunk["key"], "meta.json"))["items"]
        clips.update({m["key"]: tokens[a:b] for m, a, b in zip(meta, offsets, offsets[1:])})
    assert sorted(clips) == [f"saved/train/{row}:{clip}" for row in (0, 2, 3) for clip in (0, 1)]
    (tmp_path / "row2.wav").write_bytes(wav_bytes(300))  # row 2's sound as a file: the same tokens
    assert np.array_equal(np.concatenate([clips["saved/train/2:0"], clips["saved/train/2:1"]]),
                          AudioCodec(8000).encode(str(tmp_path / "row2.wav")))

    arpipe("shard", "image", "--input", f"hf://{tmp_path / 'saved'}", "--out", tmp_path / "image", "--size", "8x8",
           "--channels", 1, "--hf-split", "test", "train")
    manifest = json.loads((tmp_path / "image" / "manifest.json").read_text())
    assert manifest["skipped"]["examples"] == {"undecodable image": ["saved/train/1"]}
    assert manifest["splits"]["train"]["items"] + manifest["splits"]["val"]["items"] == 4


def test_hub_layout_directory_rows_are_split_across_tasks(tmp_path):
    """data/train-0000N-of-00002.parquet with an Image column; `<config>/<split>/` parquet and
    Arrow files named by --hf-config; 2 workers shard one dataset's rows in 2 tasks, into the same
    items as 1."""
    rows = media_rows(40)
    (tmp_path / "hub" / "data").mkdir(parents=True)
    rows.select(range(25)).to_parquet(str(tmp_path / "hub" / "data" / "train-00000-of-00002.parquet"))
    rows.select(range(25, 40)).to_parquet(str(tmp_path / "hub" / "data" / "train-00001-of-00002.parquet"))
    options = ["--size", "4x4", "--channels", 1, "--levels", 16, "--val-fraction", 0.2]
    arpipe("shard", "image", "--input", f"hf://{tmp_path / 'hub'}", "--out", tmp_path / "one", *options)
    arpipe("shard", "image", "--input", f"hf://{tmp_path / 'hub'}", "--out", tmp_path / "two", "--workers", 2, *options)
    assert digest(tmp_path / "one") == digest(tmp_path / "two")
    assert len(digest(tmp_path / "one")) == 39 and "hub/train/39" in {k for _, k in digest(tmp_path / "two")}
    markers = [json.loads(p.read_text()) for p in sorted((tmp_path / "two" / "_tasks").glob("*.json"))]
    assert [sum(s["items"] for s in m["shards"]) for m in markers] == [19, 20]  # rows 0-19 (one broken), 20-39

    for config in ("en", "fr"):
        (tmp_path / "configs" / config / "train").mkdir(parents=True)
    rows.select(range(3)).to_parquet(str(tmp_path / "configs" / "en" / "train" / "0000.parquet"))
    table = rows.select(range(2)).with_format("arrow")[:]  # Arrow files, as the Hub also holds them
    with pa.OSFile(str(tmp_path / "configs" / "fr" / "train" / "0000.arrow"), "wb") as f:
        with pa.ipc.new_stream(f, table.schema) as writer:
            writer.write_table(table)
    arpipe("shard", "image", "--input", f"hf://{tmp_path / 'configs'}", "--hf-config", "fr", "--out",
           tmp_path / "fr", *options)
    assert {k for _, k in digest(tmp_path / "fr")} == {"configs/fr/train/0"}  # row 1 is the broken image
