"""Training stream: tokens/s (and rows/s) that `Batches(TokenStream(...))` delivers in one process
(shuffle window of 8 chunks, pack / crop / item rows, collated to int64 tensors), against
baselines on the same data, in the same run:

  raw read       the split's tar files read with plain file reads (tokens at their stored size)
  wds + np.load  webdataset's own reader over the same tars, np.load of every chunk's tokens
  one per sample the same items written one per WebDataset sample (the usual layout), read the
                 same way: webdataset's cost is per sample, so this is what chunking avoids

Data: text packed into 1024-token rows (tinyshakespeare paragraphs, ≈ 42 tokens each, and the
stdlib-docs corpus, ≈ 3,000 tokens a document), audio cropped to 11262-sample rows (generated
melodies, 10 s clips), images as 784-token rows (Fashion-MNIST, else the bundled digits scaled
to 28×28). Targets: text ≥ 50 Mtok/s, images ≥ 50k/s, each ≥ 20× the one-per-sample reader.

    python benchmarks/stream.py [--repeats 3] [--work DIR]
"""

import io
import json
import time
from pathlib import Path

import numpy as np

import common
from common import Row, rate
from shard import copies, run_shard, shakespeare, stdlib_docs


def measure(fn, seconds: float) -> tuple[float, int, int]:
    """Call fn() -> (tokens, rows) until `seconds` have passed; (elapsed, tokens, rows)."""
    tokens = rows = 0
    start = time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        t, r = fn()
        tokens, rows = tokens + t, rows + r
    return elapsed, tokens, rows


def train_tars(shards_dir: Path) -> list[Path]:
    manifest = json.loads((shards_dir / "manifest.json").read_text())
    return [shards_dir / e["path"] for e in manifest["shards"] if e["split"] == "train"]


def raw_read(tars: list[Path], itemsize: int):
    def fn():
        n = 0
        for path in tars:
            with open(path, "rb", buffering=0) as f:
                while block := f.read(16 << 20):
                    n += len(block)
        return n // itemsize, 0
    return fn


def wds_read(tars: list[Path], limit: int | None = None):
    """webdataset's reader and np.load of each sample's tokens, for up to `limit` samples."""
    import webdataset as wds

    def fn():
        n = samples = 0
        for sample in wds.WebDataset([str(t) for t in tars], shardshuffle=False, empty_check=False):
            n += len(np.load(io.BytesIO(sample["tokens.npy"]), allow_pickle=False))
            samples += 1
            if samples == limit:
                break
        return n, samples
    return fn


def one_per_sample(shards_dir: Path, out: Path, max_items: int) -> list[Path]:
    """The split's first `max_items` items, one WebDataset sample each (KEY.tokens.npy)."""
    from pipeline.data.shards import HashedTar, Shards, npy_header

    if out.exists():
        return sorted(out.glob("*.tar"))
    out.mkdir(parents=True)
    shards, n = Shards(shards_dir), 0
    tar = HashedTar(out / "items-000000.tar")
    for shard, entry in shards.chunks("train"):
        tokens, offsets = shards.read_chunk(shard, entry["key"])
        for a, b in zip(offsets[:-1], offsets[1:]):
            tar.add(f"{n:09d}.tokens.npy", [npy_header(tokens.dtype, b - a), np.ascontiguousarray(tokens[a:b])])
            n += 1
            if n == max_items:
                break
        if n == max_items:
            break
    tar.close()
    return [out / "items-000000.tar"]


def stream_read(shards_dir: Path, block_len: int, batch_size: int):
    from pipeline.data.shards import Shards
    from pipeline.data.stream import Batches, TokenStream

    batches = Batches(TokenStream(Shards(shards_dir), "train", block_len, batch_size, seed=0, shuffle_window=8))
    next(batches)  # the first window is read here; later windows are read inside the measurement

    def fn():
        batch = next(batches)
        return batch.numel(), batch.shape[0]
    return fn


def case(name: str, shards_dir: Path, block_len: int, batch_size: int, unit: str, work: Path, args,
         target: float | None = None, target_unit: str = "") -> list[Row]:
    """Rows for one dataset: the stream against its three baselines (medians of interleaved runs).
    `target` is in tokens/s, or in rows/s when target_unit is "images/s"."""
    from pipeline.data.shards import Shards

    tars = train_tars(shards_dir)
    itemsize = Shards(shards_dir).codec.token_dtype.itemsize
    seconds = 0.2 if args.tiny else 2.0
    singles = one_per_sample(shards_dir, work / f"{shards_dir.name}-one-per-sample", 200 if args.tiny else 50_000)
    variants = {"stream": stream_read(shards_dir, block_len, batch_size), "raw": raw_read(tars, itemsize),
                "wds": wds_read(tars), "single": wds_read(singles)}
    runs = {k: [] for k in variants}
    for _ in range(args.repeats):
        for k, fn in variants.items():
            runs[k].append(measure(fn, seconds))
    speed = {k: sorted(t / s for s, t, _ in r)[len(r) // 2] for k, r in runs.items()}  # median tokens/s
    rows_per_s = sorted(r / s for s, _, r in runs["stream"])[len(runs["stream"]) // 2]
    items_per_s = sorted(r / s for s, _, r in runs["single"])[len(runs["single"]) // 2]
    value = f"{rate(speed['stream'], 1, unit)}, {rate(rows_per_s, 1, 'rows')}"
    T = speed["stream"] / rows_per_s
    achieved = rows_per_s if target_unit == "images/s" else speed["stream"]
    rows = [Row(f"{name}: stream (rows of {T:.0f}, batch {batch_size})", value,
                f"target speed {rate(target, 1, target_unit.split('/')[0])}" if target else "",
                achieved / target if target else None, 1.0 if target else None)]
    rows.append(Row(f"{name}: stream vs one item per sample", value,
                    f"wds + np.load, one item per sample: {rate(speed['single'], 1, unit)} "
                    f"({rate(items_per_s, 1, 'samples')})", speed["stream"] / speed["single"],
                    20.0 if target else None))
    rows.append(Row(f"{name}: stream vs wds + np.load of the same tars", value,
                    f"{rate(speed['wds'], 1, unit)}", speed["stream"] / speed["wds"]))
    rows.append(Row(f"{name}: stream vs raw read of the same tars", value,
                    f"{rate(speed['raw'] * itemsize, 1, 'B')} = {rate(speed['raw'], 1, unit)}",
                    speed["stream"] / speed["raw"]))
    return rows


def text_shards(work: Path, source: Path, sample_by: str, copies_n: int) -> Path:
    out = work / f"shards-{source.stem}"
    if not (out / "manifest.json").exists():
        tokenizer = work / f"tokenizer-{source.stem}"
        if not (tokenizer / "manifest.json").exists():
            run_shard("text", [source], tokenizer, 1, "--vocab-size", 8192, "--sample-by", sample_by)
        inputs = copies(source, work / f"{source.stem}-x{copies_n}", copies_n)
        run_shard("text", inputs, out, 2, "--tokenizer", tokenizer / "tokenizer.json", "--sample-by", sample_by)
    return out


def audio_shards(work: Path, tiny: bool) -> Path:
    from pipeline.demo import write_melodies

    out = work / "shards-audio"
    if not (out / "manifest.json").exists():
        corpus = work / "stream-melodies"
        corpus.mkdir(exist_ok=True)
        write_melodies(corpus, count=2 if tiny else 24, seconds=4.0 if tiny else 60.0)
        run_shard("audio", [corpus], out, 2, "--sample-rate", 16000, "--clip-seconds", 10)
    return out


def image_shards(work: Path, tiny: bool) -> tuple[Path, str]:
    out = work / "shards-image"
    fmnist = Path("/usr/share/datasets/fashion-mnist")
    what = "Fashion-MNIST" if fmnist.exists() and not tiny else "digits scaled to 28×28"
    if not (out / "manifest.json").exists():
        if what == "Fashion-MNIST":
            inputs = [fmnist]
        else:
            from PIL import Image

            digits = np.load(common.REPO / "pipeline" / "bundled" / "digits.npz")
            digits = next(digits[k] for k in digits.files if digits[k].ndim == 3)
            big = np.stack([np.asarray(Image.fromarray(d).resize((28, 28))) for d in digits])
            inputs = [work / "digits28.npy"]
            np.save(inputs[0], np.resize(big, (400 if tiny else 20000, 28, 28)))
        run_shard("image", inputs, out, 2)
    return out, what


def main(argv=None):
    p = common.parser(__doc__.split("\n\n")[0])
    p.add_argument("--only", nargs="+", choices=["text", "audio", "image"], default=["text", "audio", "image"])
    args = common.parse(p, argv)
    common.single_core()
    work = common.work_dir(args)
    rows, notes = [], []
    if "text" in args.only:
        source, what = shakespeare(work, args.tiny)
        if what != "tinyshakespeare":
            notes.append(f"text: {what}")
        rows += case("text tinyshakespeare paragraphs", text_shards(work, source, "paragraph", 1 if args.tiny else 24),
                     1024, 16, "tok", work, args, 50e6, "tok/s")
        rows += case("text stdlib docs", text_shards(work, stdlib_docs(work, args.tiny), "document", 1 if args.tiny else 8),
                     1024, 16, "tok", work, args, 50e6, "tok/s")
    if "audio" in args.only:
        rows += case("audio 16 kHz", audio_shards(work, args.tiny), 11262, 8, "samples", work, args)
    if "image" in args.only:
        shards, what = image_shards(work, args.tiny)
        rows += case(f"images 28×28 ({what})", shards, 0, 64, "tok", work, args, 50e3, "images/s")
    notes.append("one process, one thread; `stream` is Batches(TokenStream(…)) as the trainer uses it, timed after "
                 "its first batch; the first row's ratio is the stream's speed over the target speed")
    common.report("Training stream (benchmarks/stream.py)", rows, args, notes)
    return rows


if __name__ == "__main__":
    main()
