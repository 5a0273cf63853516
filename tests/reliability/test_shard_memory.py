"""The shard stage's memory stays bounded: decompression bombs for every reader that inflates
(silent FLAC, a gzipped IDX file, a gzipped text of one endless document) and an input several
times the memory limit the stage runs under.

Each stage is a real `arpipe shard` process; every task writes its own process's peak RSS
(VmHWM, read by that process) into its done-marker, and that is what is checked, not
RUSAGE_CHILDREN of the test process (the largest child it ever had) nor a child's ru_maxrss
(which counts the test process it was forked from).
"""

import gzip
import json
import resource
import struct
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

from tests.conftest import ENV

PEAK_LIMIT_MB = 250  # every bomb below inflates to at least twice this


def shard(*args, address_space: int | None = None) -> tuple[dict, int]:
    """Run `arpipe shard ARGS`; the manifest and the largest peak RSS (MB) any task reported.
    `address_space` caps the process's virtual memory (RLIMIT_AS): beyond it, allocations fail."""
    def limit():
        if address_space:
            resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))

    out = args[args.index("--out") + 1]
    result = subprocess.run([sys.executable, "-m", "pipeline", "shard", *map(str, args)], env=ENV,
                            capture_output=True, text=True, timeout=600, preexec_fn=limit)
    assert result.returncode == 0, result.stderr[-3000:]
    peaks = [json.loads(p.read_text())["peak_rss_mb"] for p in (out / "_tasks").glob("*.json")]
    return json.loads((out / "manifest.json").read_text()), max(peaks)


def items(manifest: dict) -> int:
    return sum(split["items"] for split in manifest["splits"].values())


def test_silent_flac_bomb_is_clipped_as_it_is_decoded(tmp_path):
    """20 minutes of silent 48 kHz stereo FLAC: 0.4 MB on disk, 460 MB decoded as float32."""
    (tmp_path / "in").mkdir()
    with sf.SoundFile(tmp_path / "in" / "silence.flac", "w", 48000, 2, format="FLAC", subtype="PCM_16") as f:
        block = np.zeros((1 << 20, 2), np.int16)
        for start in range(0, 20 * 60 * 48000, len(block)):
            f.write(block[: 20 * 60 * 48000 - start])
    assert (tmp_path / "in" / "silence.flac").stat().st_size < 1 << 20
    manifest, peak = shard("audio", "--input", tmp_path / "in", "--out", tmp_path / "out", "--sample-rate", 8000,
                           "--clip-seconds", 10)
    assert items(manifest) == 120 and sum(s["tokens"] for s in manifest["splits"].values()) == 20 * 60 * 8000
    assert peak < PEAK_LIMIT_MB, f"the audio stage peaked at {peak} MB"


def test_gzipped_idx_bomb_is_read_image_by_image(tmp_path):
    """24 blank 4096×4096 images in a gzipped IDX file: 0.4 MB on disk, 400 MB inflated."""
    (tmp_path / "in").mkdir()
    shape = (24, 4096, 4096)
    with gzip.open(tmp_path / "in" / "bomb-idx3-ubyte.gz", "wb", compresslevel=1) as f:
        f.write(bytes([0, 0, 0x08, 3]) + np.array(shape, ">i4").tobytes())
        for _ in range(shape[0]):
            f.write(bytes(shape[1] * shape[2]))
    assert (tmp_path / "in" / "bomb-idx3-ubyte.gz").stat().st_size < 4 << 20
    manifest, peak = shard("image", "--input", tmp_path / "in", "--out", tmp_path / "out", "--size", "8x8",
                           "--channels", 1, "--levels", 2)
    assert items(manifest) == 24 and not manifest["skipped"]["files"]
    assert peak < PEAK_LIMIT_MB, f"the image stage peaked at {peak} MB"


@pytest.mark.parametrize("sample_by, after", [
    ("document", {}),  # the whole file is the document: nothing after the bomb
    ("paragraph", {"bomb.txt.gz:1": "next paragraph\nits second line\n"}),  # as datasets cuts it
    ("line", {"bomb.txt.gz:2": "next paragraph", "bomb.txt.gz:3": "its second line"}),  # :1 is empty
])
def test_gzipped_text_bomb_is_refused_without_reading_it_whole(tmp_path, text_shards, sample_by, after):
    """One 256 MB document (no blank line, no line break) in 0.3 MB of gzip, then a short
    paragraph: the bomb is skipped as too long, what follows it is read as usual."""
    from tests.unit.test_shards import texts

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "good.txt").write_text("a short document\n")
    with gzip.open(tmp_path / "in" / "bomb.txt.gz", "wb", compresslevel=1) as f:
        for _ in range(32):
            f.write(b"all work and no play " * ((8 << 20) // 21))
        f.write(b"\n\nnext paragraph\nits second line\n")
    manifest, peak = shard("text", "--input", tmp_path / "in", "--out", tmp_path / "out", "--sample-by", sample_by,
                           "--tokenizer", text_shards / "tokenizer.json", "--val-fraction", 0)
    empty = {"empty": 1} if sample_by == "line" else {}
    assert manifest["skipped"]["items"] == {"longer than 4 Mi characters": 1, **empty}
    assert manifest["skipped"]["examples"]["longer than 4 Mi characters"] == ["bomb.txt.gz:0"]
    documents = texts(tmp_path / "out")
    assert documents.pop("good.txt:0").strip() == "a short document" and documents == after
    assert peak < PEAK_LIMIT_MB, f"the text stage peaked at {peak} MB"


def test_an_input_three_times_the_memory_limit(tmp_path):
    """A 1.2 GB WAV (48 kHz stereo float, 55 minutes; sparse, so silent) sharded to 8 kHz clips
    under a 400 MiB address-space limit, with a peak RSS a sixth of the input. Audio is the modality
    whose readers get through gigabytes in seconds; text and images stream the same way (1 MB
    pieces, one image or array block at a time), as the bombs above show."""
    (tmp_path / "in").mkdir()
    data_bytes = 1200 << 20
    path = tmp_path / "in" / "long.wav"
    with open(path, "wb") as f:  # a float WAV header, then zeros up to the declared size
        f.write(b"RIFF" + struct.pack("<I", 36 + data_bytes) + b"WAVEfmt " +
                struct.pack("<IHHIIHH", 16, 3, 2, 48000, 48000 * 8, 8, 32) + b"data" + struct.pack("<I", data_bytes))
        f.truncate(44 + data_bytes)
    assert sf.info(path).frames == data_bytes // 8
    manifest, peak = shard("audio", "--input", tmp_path / "in", "--out", tmp_path / "out", "--sample-rate", 8000,
                           "--clip-seconds", 60, address_space=400 << 20)
    seconds = data_bytes / (48000 * 8)
    assert sum(s["tokens"] for s in manifest["splits"].values()) == round(seconds * 8000)
    assert peak * 6 < data_bytes >> 20, f"the stage peaked at {peak} MB"
