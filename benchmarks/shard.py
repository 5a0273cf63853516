"""Shard stage: `arpipe shard text|audio|image`, the whole command as users run it, with 1 and
2 workers, against the library that does the modality's real work on the same inputs:

  text   tinyshakespeare (../shared/data; else CPython's pydoc topics, with a note) copied to
         ≥ 150 MB and cut into paragraphs, and the demo's stdlib-docs corpus copied to ≥ 150 MB
         (pydoc topics as JSONL, stdlib modules as files). Baseline: tokenizers'
         encode_batch_fast (what the codec calls for documents that are not ASCII) on the same
         documents, one thread.
  audio  8 hours of generated melodies (stereo WAV and FLAC at 22.05 kHz) -> 16 kHz μ-law, 10 s
         clips. Baseline: soundfile decode, channel mean (the codec's column sum: numpy's mean
         over a 2-wide axis is 10× slower) and soxr HQ resampling of the same files.
  image  200k 28×28 grey PNG files (Fashion-MNIST's first images where Debian's
         dataset-fashion-mnist is installed, else the bundled 8×8 digits scaled up). Baseline:
         listing the folder, Pillow decode and grey conversion of the same files.

Targets: the stage at ≥ 0.9 of its baseline's speed on one core, and ≥ 1.8× from 1 to 2 workers.
Each shard run is a fresh process (start-up included), its work cut into 63 tasks. Task i takes
inputs i, i+63, …: the processes then end within a small task of each other, and each task mixes
the melodies' WAV and FLAC files, which alternate (a FLAC file costs about twice a WAV file).
With 16 tasks every task was WAV-only or FLAC-only; with 15, 2 processes split 15 equal image
tasks 8 to 7 (1.78×). The tokenizer is trained once beforehand. The inputs are large enough
(≈ 15 s of the stage's work on one worker) that start-up is a small part of a run, as on a real
corpus: text is 150 MB since the stage tokenises ASCII ≈ 2.7× faster than encode_batch_fast
(50 MB made 5-s runs, in which the ≈ 0.3 s start-up held 2 workers to ≈ 1.8×). Python caches
bytecode in the shard runs as it does for users, even where the calling shell sets
PYTHONDONTWRITEBYTECODE.

    python benchmarks/shard.py [--repeats 3] [--work DIR] [--only text audio image]
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import common
from common import Row, median_times, rate

TOKENIZER_VOCAB = 8192
TASKS = 63


def run_shard(modality: str, inputs: list[Path], out: Path, workers: int, *options) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-m", "pipeline", "shard", modality, "--input", *map(str, inputs), "--out", str(out),
               "--workers", str(workers), "--num-tasks", str(TASKS), *map(str, options)]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    subprocess.run(command, check=True, capture_output=True, cwd=common.REPO, env=env)
    return json.loads((out / "manifest.json").read_text())


def total(manifest: dict, key: str) -> int:
    return sum(split[key] for split in manifest["splits"].values())


def copies(source: Path, target: Path, count: int) -> list[Path]:
    """`count` copies of a file or directory as target/copy-NN(.suffix): real files (a symlinked
    copy would be read once), distinct keys."""
    target.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = target / f"copy-{i:02d}{source.suffix}"
        if not path.exists():
            (shutil.copytree if source.is_dir() else shutil.copy)(source, path)
        paths.append(path)
    return paths


def size_of(paths: list[Path]) -> int:
    return sum(f.stat().st_size for p in paths for f in ([p] if p.is_file() else p.rglob("*")) if f.is_file())


# --- text
def shakespeare(work: Path, tiny: bool) -> tuple[Path, str]:
    path = work / "tinyshakespeare.txt"
    source = common.SHARED_DATA / "tinyshakespeare.txt"
    if source.exists():
        text, what = source.read_text(), "tinyshakespeare"
    else:
        import pydoc_data.topics

        text = "\n\n".join(t for _, t in sorted(pydoc_data.topics.topics.items()))
        what = f"pydoc topics (no {source}: tinyshakespeare is not shipped)"
    path.write_text(text[:100_000] if tiny else text)
    return path, what


def stdlib_docs(work: Path, tiny: bool) -> Path:
    from pipeline.demo import write_text_corpus

    corpus = work / "stdlib-docs"
    if not corpus.exists():
        write_text_corpus(corpus)
        if tiny:  # a few modules and topics
            for module in sorted((corpus / "stdlib").glob("*.py"))[10:]:
                module.unlink()
            lines = (corpus / "pydoc_topics.jsonl").read_text().splitlines()[:20]
            (corpus / "pydoc_topics.jsonl").write_text("\n".join(lines) + "\n")
    return corpus


def documents(inputs: list[Path], sample_by: str) -> list[str]:
    """The documents the shard stage tokenises, read by its own reader."""
    from pipeline.data.sources import common_root, expand_inputs, read_text

    files = expand_inputs([str(p) for p in inputs])
    root = common_root(files)
    return [text for f in files for records in read_text(f, root, sample_by, "text")
            for text, skip in zip(records.values, records.skips or [None] * len(records.values)) if skip is None]


def text_case(name: str, source: Path, sample_by: str, work: Path, args, min_mb: float) -> list[Row]:
    from tokenizers import Tokenizer

    tok_dir = work / f"tokenizer-{source.stem}"
    if not (tok_dir / "manifest.json").exists():  # train once, on one copy
        run_shard("text", [source], tok_dir, 1, "--vocab-size", TOKENIZER_VOCAB, "--sample-by", sample_by)
    tokenizer_json = tok_dir / "tokenizer.json"
    n = max(1, round(min_mb * 1e6 / size_of([source]) + 0.5))
    inputs = copies(source, work / f"{source.stem}-x{n}", n)
    mb = size_of(inputs) / 1e6
    docs = documents(inputs, sample_by)
    tokenizer = Tokenizer.from_file(str(tokenizer_json))
    tokenizer.encode_special_tokens = True  # as the codec does
    counts = {}

    def raw():
        counts["raw"] = sum(len(e.ids) for i in range(0, len(docs), 256)
                            for e in tokenizer.encode_batch_fast(docs[i : i + 256], add_special_tokens=False))

    def stage(workers):
        def fn():
            manifest = run_shard("text", inputs, work / "out", workers, "--tokenizer", tokenizer_json,
                                 "--sample-by", sample_by)
            counts[workers] = total(manifest, "tokens")
        return fn

    t = median_times({"raw": raw, 1: stage(1), 2: stage(2)}, args.repeats)
    assert counts["raw"] == counts[1] == counts[2], f"token counts differ: {counts}"
    tokens = counts[1]
    label = f"text {name} ({n} × {mb / n:.2f} MB = {mb:.0f} MB, {len(docs)} {sample_by}s, {tokens / len(docs):.0f} tok each)"
    return [
        Row(f"{label}, 1 worker", f"{mb / t[1]:.2f} MB/s, {rate(tokens, t[1], 'tok')}",
            f"encode_batch_fast {rate(tokens, t['raw'], 'tok')}", t["raw"] / t[1], 0.9),
        Row(f"{label}, 2 workers", f"{mb / t[2]:.2f} MB/s, {rate(tokens, t[2], 'tok')}", "1 worker", t[1] / t[2], 1.8),
    ]


# --- audio
def audio_case(work: Path, args) -> list[Row]:
    import soundfile as sf
    import soxr

    from pipeline.codecs.audio import mix_to_mono
    from pipeline.demo import write_melodies

    count, seconds = (2, 2.0) if args.tiny else (480, 60.0)
    corpus = work / f"melodies-{count}"
    if not corpus.exists():
        corpus.mkdir()
        write_melodies(corpus, count=count, seconds=seconds)
    files = sorted(corpus.iterdir())
    audio_seconds = sum(sf.info(f).duration for f in files)

    def raw():
        for f in files:
            wave, rate_in = sf.read(f, dtype="float32", always_2d=True)
            soxr.resample(mix_to_mono(wave), rate_in, 16000, quality="HQ")

    def stage(workers):
        return lambda: run_shard("audio", [corpus], work / "out", workers, "--sample-rate", 16000, "--clip-seconds", 10)

    t = median_times({"raw": raw, 1: stage(1), 2: stage(2)}, args.repeats)
    label = f"audio: {count} generated stereo melodies, {audio_seconds / 60:.0f} min at 22.05 kHz -> 16 kHz"
    return [
        Row(f"{label}, 1 worker", f"{audio_seconds / t[1]:.0f} s of audio/s",
            f"soundfile + soxr {audio_seconds / t['raw']:.0f} s/s", t["raw"] / t[1], 0.9),
        Row(f"{label}, 2 workers", f"{audio_seconds / t[2]:.0f} s of audio/s", "1 worker", t[1] / t[2], 1.8),
    ]


# --- images
def image_case(work: Path, args) -> tuple[list[Row], str]:
    import itertools

    import numpy as np
    from PIL import Image

    count = 100 if args.tiny else 200_000
    folder = work / f"png-{count}"
    fmnist = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
    what = "Fashion-MNIST" if fmnist.exists() else "8×8 digits scaled to 28×28 (no Fashion-MNIST installed)"
    if not folder.exists():
        if fmnist.exists():
            from pipeline.codecs.image import array_images

            images = list(itertools.islice(itertools.cycle(array_images(fmnist)), count))
        else:
            digits = np.load(common.REPO / "pipeline" / "bundled" / "digits.npz")
            digits = next(digits[k] for k in digits.files if digits[k].ndim == 3)
            images = [np.asarray(Image.fromarray(d).resize((28, 28))) for d in np.resize(digits, (count, 8, 8))]
        for i, image in enumerate(images):
            sub = folder / f"{i // 1000:03d}"
            sub.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(sub / f"{i:06d}.png")

    def raw():
        for f in sorted(folder.rglob("*.png")):
            np.asarray(Image.open(f).convert("L"))

    def stage(workers):
        return lambda: run_shard("image", [folder], work / "out", workers)

    t = median_times({"raw": raw, 1: stage(1), 2: stage(2)}, args.repeats)
    label = f"image: {count} PNG files, 28×28 grey ({what})"
    return [
        Row(f"{label}, 1 worker", rate(count, t[1], "images"), f"Pillow decode {rate(count, t['raw'], 'images')}",
            t["raw"] / t[1], 0.9),
        Row(f"{label}, 2 workers", rate(count, t[2], "images"), "1 worker", t[1] / t[2], 1.8),
    ], what


def main(argv=None):
    p = common.parser(__doc__.split("\n\n")[0])
    p.add_argument("--only", nargs="+", choices=["text", "audio", "image"], default=["text", "audio", "image"])
    p.add_argument("--min-mb", type=float, default=150.0, help="each text corpus is copied to at least this size")
    args = p.parse_args(argv)
    if args.tiny:
        args.repeats, args.min_mb = 1, 0.2
    common.single_core()
    work = common.work_dir(args)
    rows, notes = [], ["ratio: the baseline's time over the stage's (1 worker), or 1-worker time over 2-worker time; "
                       "each shard run is a fresh `python -m pipeline shard …` process, start-up included"]
    if "text" in args.only:
        source, what = shakespeare(work, args.tiny)
        rows += text_case(what.split(" (")[0], source, "paragraph", work, args, args.min_mb)
        if what != "tinyshakespeare":
            notes.append(f"text: {what}")
        if not args.tiny:
            rows += text_case("stdlib docs", stdlib_docs(work, args.tiny), "document", work, args, args.min_mb)
    if "audio" in args.only:
        rows += audio_case(work, args)
    if "image" in args.only:
        image_rows, _ = image_case(work, args)
        rows += image_rows
    common.report("Shard stage (benchmarks/shard.py)", rows, args, notes)
    return rows


if __name__ == "__main__":
    main()
