"""Hostile input for every modality: each bad file is skipped with a reason in the manifest, the
good ones are sharded, the run completes and its memory stays bounded."""

import io
import json
import os
import struct
import subprocess
import sys
import wave
import zlib

import numpy as np
import pytest

from tests.conftest import ENV, write_corpus

RNG = np.random.default_rng(0)
MEMORY_LIMIT_MB = 500  # peak RSS of each shard worker, as it reports it (tests/reliability/test_shard_memory.py)


def noise(n: int) -> bytes:
    return RNG.integers(0, 256, n, dtype=np.uint8).tobytes()


def wav_bytes(seconds=0.5, rate=8000, channels=1) -> bytes:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        t = np.arange(int(seconds * rate)) / rate
        w.writeframes((np.sin(2 * np.pi * 440 * t) * 8000).astype("<i2").repeat(channels).tobytes())
    return buffer.getvalue()


def png_bytes(width=8, height=8) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(RNG.integers(0, 256, (height, width), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def png_header(width: int, height: int) -> bytes:
    """A valid PNG that declares a huge size (a decompression bomb) with almost no data."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def special_files(directory, ext):
    """An unreadable file, a FIFO, a broken symlink and a symlink loop, named *.ext."""
    (directory / f"unreadable.{ext}").write_bytes(b"secret")
    os.chmod(directory / f"unreadable.{ext}", 0)
    os.mkfifo(directory / f"fifo.{ext}")
    os.symlink(directory / "missing", directory / f"dangling.{ext}")
    os.symlink(directory / f"loop-b.{ext}", directory / f"loop-a.{ext}")
    os.symlink(directory / f"loop-a.{ext}", directory / f"loop-b.{ext}")
    return {f"unreadable.{ext}", f"fifo.{ext}", f"dangling.{ext}", f"loop-a.{ext}", f"loop-b.{ext}"}


def text_inputs(d):
    write_corpus(d, documents=5)
    bad = {
        "empty.txt": b"", "blank.txt": b" \n\t\n", "latin1.txt": "café".encode("latin-1"),
        "nul.txt": b"abc\x00def", "random.txt": noise(4000), "random.md": noise(100),
        "png-named.txt": png_bytes(), "wav-named.txt": wav_bytes(),
        "truncated.jsonl": b'{"text": "ok"}\n{"text": "cut', "random.jsonl": noise(300),
        "no-field.jsonl": b'{"body": "x"}\n', "number.jsonl": b'{"text": 5}\n', "empty.jsonl": b"",
        "random.parquet": noise(500), "random.jsonl.gz": noise(200), "random.csv": b"\x00\x01,\x02\n" + noise(50),
    }
    for name, data in bad.items():
        (d / name).write_bytes(data)
    parquet = d / "truncated.parquet"
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["a b c"] * 100}), parquet)
    parquet.write_bytes(parquet.read_bytes()[:-40])
    return set(bad) | {"truncated.parquet"} | special_files(d, "txt"), 5


def audio_inputs(d):
    good = wav_bytes()
    for i in range(3):
        (d / f"good{i}.wav").write_bytes(wav_bytes(channels=i + 1))
    lying = bytearray(good)
    lying[40:44] = struct.pack("<I", 10 * len(good))  # data chunk claims 10× what the file holds
    bad = {
        "empty.wav": b"", "truncated.wav": good[: len(good) // 2], "header-only.wav": good[:44],
        "lying-header.wav": bytes(lying), "random.wav": noise(5000), "text-named.wav": b"hello world\n" * 50,
        "png-named.wav": png_bytes(), "random.flac": noise(3000), "random.ogg": noise(3000),
        "truncated.flac": b"fLaC" + noise(100), "zero-rate.wav": good[:24] + b"\x00\x00\x00\x00" + good[28:],
    }
    for name, data in bad.items():
        (d / name).write_bytes(data)
    return set(bad) | special_files(d, "wav"), 3


def image_inputs(d):
    for i in range(4):
        (d / f"good{i}.png").write_bytes(png_bytes())
    good = png_bytes(16, 16)
    bad = {
        "empty.png": b"", "truncated.png": good[: len(good) // 2], "random.png": noise(2000),
        "text-named.png": b"not an image\n" * 20, "wav-named.png": wav_bytes(), "random.jpg": noise(2000),
        "truncated.jpg": b"\xff\xd8\xff\xe0" + noise(64), "bomb.png": png_header(40000, 40000),
        "bad-crc.png": good[:20] + b"\x00\x00\x00\x00" + good[24:], "random.npz": noise(300),
        "random.idx": noise(300),
    }
    for name, data in bad.items():
        (d / name).write_bytes(data)
    buffer = io.BytesIO()
    np.save(buffer, np.array([{"pickled": True}], dtype=object), allow_pickle=True)
    (d / "pickled.npy").write_bytes(buffer.getvalue())
    return set(bad) | {"pickled.npy"} | special_files(d, "png"), 4


def run_shard(*args) -> subprocess.CompletedProcess:
    """The CLI in a child process; as root without the capability to read any file, so that a
    mode-000 file is as unreadable as for other users."""
    command = [sys.executable, "-m", "pipeline", "shard", *map(str, args)]
    if os.geteuid() == 0:
        command = ["setpriv", "--inh-caps=-dac_override,-dac_read_search",
                   "--bounding-set=-dac_override,-dac_read_search", *command]
    return subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=600)


CASES = {
    "text": (text_inputs, ["--vocab-size", "300"]),
    "audio": (audio_inputs, ["--sample-rate", "8000"]),
    "image": (image_inputs, ["--size", "8x8", "--channels", "1", "--levels", "4"]),
}


@pytest.mark.parametrize("modality", CASES)
def test_every_bad_input_is_skipped_with_a_reason(tmp_path, modality):
    make, options = CASES[modality]
    inputs = tmp_path / "in"
    inputs.mkdir()
    bad, good = make(inputs)
    result = run_shard(modality, "--input", inputs, "--out", tmp_path / "out", "--workers", 2, "--val-fraction", 0,
                       *options)
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    skipped = manifest["skipped"]
    reasons = {f["input"]: f["reason"] for f in skipped["files"]}
    reasons.update({key.rsplit(":", 1)[0]: reason for reason, keys in skipped["examples"].items() for key in keys})
    assert set(reasons) == bad, f"missing: {bad - set(reasons)}, unexpected: {set(reasons) - bad}"
    assert all(reason for reason in reasons.values())
    assert manifest["splits"]["train"]["items"] >= good
    peaks = [json.loads(p.read_text())["peak_rss_mb"] for p in (tmp_path / "out" / "_tasks").glob("*.json")]
    assert len(peaks) == 2 and max(peaks) < MEMORY_LIMIT_MB, f"shard workers peaked at {peaks} MB"


def test_there_are_at_least_50_hostile_inputs(tmp_path):
    total = 0
    for name, (make, _) in CASES.items():
        (tmp_path / name).mkdir()
        total += len(make(tmp_path / name)[0])
    assert total >= 50, total
