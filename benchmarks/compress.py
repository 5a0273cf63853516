"""Lossless compression: `arpipe compress` with the demo's models against gzip -9, bzip2 -9,
xz -9e, zstd -19, and FLAC (audio) / PNG (images), on each demo leg's validation split and on
tinyshakespeare, in bits per byte (text), per μ-law sample (audio) and per sub-pixel (images),
with encode and decode speed. arpipe's figures are the whole file (header included); the other
tools compress the concatenation of the same items (text: their UTF-8 bytes; audio: the μ-law
stream, one byte a sample, FLAC as 8-bit PCM; images: one byte a sub-pixel, PNG as one grey
image of all of them stacked). Every arpipe decode is checked against the input.

    python -m pipeline demo                        # the models and shards: runs/demo/{text,audio,image}
    python benchmarks/compress.py [--demo runs/demo] [--tinyshakespeare FILE]
"""

import io
import subprocess
import time
from pathlib import Path

import numpy as np

import common
from common import Row

TOOLS = {"gzip -9": ["gzip", "-9", "-c"], "bzip2 -9": ["bzip2", "-9", "-c"], "xz -9e": ["xz", "-9e", "-c"],
         "zstd -19": ["zstd", "-19", "-c", "-q"]}
UNITS = {"text": "byte", "audio": "sample", "image": "sub-pixel"}
WORK: Path  # the --work directory


def tool(command: list[str], data: bytes) -> tuple[int, float, float]:
    """Compressed size and encode/decode seconds of a command-line compressor (-d decodes)."""
    start = time.perf_counter()
    packed = subprocess.run(command, input=data, capture_output=True, check=True).stdout
    encode = time.perf_counter() - start
    start = time.perf_counter()
    assert subprocess.run([command[0], "-d", "-c"], input=packed, capture_output=True, check=True).stdout == data
    return len(packed), encode, time.perf_counter() - start


def flac(levels: np.ndarray, rate: int) -> tuple[int, float, float]:
    import soundfile as sf

    pcm = ((levels.astype(np.int16) - 128) * 256).astype(np.int16)  # 8-bit PCM of the μ-law levels
    buf = io.BytesIO()
    start = time.perf_counter()
    sf.write(buf, pcm, rate, format="FLAC", subtype="PCM_S8")
    encode = time.perf_counter() - start
    start = time.perf_counter()
    back, _ = sf.read(io.BytesIO(buf.getvalue()), dtype="int16")
    assert np.array_equal(back, pcm)
    return len(buf.getvalue()), encode, time.perf_counter() - start


def png(levels: np.ndarray, width: int) -> tuple[int, float, float]:
    from PIL import Image

    image = levels.astype(np.uint8).reshape(-1, width)
    buf = io.BytesIO()
    start = time.perf_counter()
    Image.fromarray(image).save(buf, format="PNG", optimize=True)
    encode = time.perf_counter() - start
    start = time.perf_counter()
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(buf.getvalue()))), image)
    return len(buf.getvalue()), encode, time.perf_counter() - start


def arpipe(model, codec, items: list[np.ndarray], batch: int, segment: int) -> tuple[int, float, float, float]:
    """File bytes (header included), encode and decode seconds, and the model's NLL in bits."""
    from pipeline.compress import Settings, context_window, decode_items, encode_items, make_header, write_container

    window = context_window(model)
    settings = Settings(batch, window // 2 if window else 1, window, segment)
    start = time.perf_counter()
    payload, stats = encode_items(model, items, settings)
    encode = time.perf_counter() - start
    start = time.perf_counter()
    back = decode_items(model, payload, [len(x) for x in items], settings)
    decode = time.perf_counter() - start
    assert all(np.array_equal(a, b) for a, b in zip(items, back)), "arpipe did not decode its input"
    header = make_header(model, codec, settings, 1, [("", x) for x in items])  # no names: the others store none
    size = write_container(WORK / "bench.arpz", header, payload) + len(payload)
    return size, encode, decode, stats["model_bits"]


def val_items(shards) -> list[np.ndarray]:
    items = []
    for shard, entry in shards.chunks("val"):
        tokens, offsets = shards.read_chunk(shard, entry["key"])
        items += [tokens[a:b].astype(np.int64) for a, b in zip(offsets[:-1], offsets[1:])]
    return items


def first(items: list[np.ndarray], limit: int | None) -> list[np.ndarray]:
    """The items up to `limit` variables in all, the last one cut."""
    out, left = [], limit if limit else sum(len(x) for x in items)
    for x in items:
        if left <= 0:
            break
        out.append(x[:left])
        left -= len(out[-1])
    return out


def raw_bytes(leg: str, codec, items: list[np.ndarray]) -> bytes:
    if leg == "text":
        from pipeline.compress import TextFiles

        files = TextFiles(codec)
        return b"".join(files.bytes_of(x) for x in items)
    return np.concatenate(items).astype(np.uint8).tobytes()


def measure(name: str, leg: str, model, codec, items: list[np.ndarray], raw: bytes, args) -> list[Row]:
    unit = UNITS[leg]
    count = len(raw)  # bytes of text; samples and sub-pixels are one byte each here
    size, enc, dec, nll_bits = arpipe(model, codec, items, args.batch, args.segment)
    ours = 8 * size / count
    short = "B" if unit == "byte" else unit + "s"

    def speed(encode: float, decode: float) -> str:
        return f"encode {common.rate(count, encode, short)}, decode {common.rate(count, decode, short)}"

    results = {}
    for tool_name, command in TOOLS.items():
        results[tool_name] = tool(command, raw)
    if leg == "audio":
        results["FLAC (8-bit PCM of the levels)"] = flac(np.frombuffer(raw, np.uint8), codec.sample_rate)
    if leg == "image":
        results["PNG (all stacked, optimize)"] = png(np.frombuffer(raw, np.uint8), codec.width * codec.channels)
    best = min(results, key=lambda k: results[k][0])
    rows = [Row(f"{name}: arpipe ({count} {unit}s, {len(items)} items)",
                f"{ours:.3f} bits/{unit} ({size} B; model NLL {nll_bits / count:.3f})", f"{best} {8 * results[best][0] / count:.3f} bits/{unit}; "
                f"{speed(enc, dec)}", results[best][0] / size)]
    for tool_name, (n, e, d) in results.items():
        rows.append(Row(f"{name}: {tool_name}", f"{8 * n / count:.3f} bits/{unit} ({n} B)", speed(e, d), n / size))
    return rows


def tiny_demo(work: Path) -> Path:
    """Random models and small shards in the demo's layout: only checks the script runs."""
    import pydoc_data.topics
    import soundfile as sf
    import torch

    from pipeline.cli import run as cli
    from pipeline.data.shards import Shards
    from pipeline.export import save_export
    from pipeline.models import build_model

    demo = work / "demo"
    (work / "corpus").mkdir(parents=True, exist_ok=True)
    for i, text in enumerate(list(pydoc_data.topics.topics.values())[:10]):
        (work / "corpus" / f"{i}.txt").write_text(text)
    sf.write(work / "tone.wav", 0.5 * np.sin(np.arange(8000) / 5.0), 8000)
    legs = {"text": (["text", "--input", str(work / "corpus"), "--vocab-size", "300"], {"name": "gpt", "n_layer": 1,
                                                                                        "n_head": 1, "d_model": 16}, (32,)),
            "audio": (["audio", "--input", str(work / "tone.wav"), "--sample-rate", "8000", "--clip-seconds", "0.05"],
                      {"name": "wavenet", "stacks": 1, "layers_per_stack": 2, "residual_channels": 4, "gate_channels": 4,
                       "skip_channels": 4}, (64,)),
            "image": (["image", "--input", str(common.REPO / "pipeline" / "bundled" / "digits.npz"), "--levels", "17"],
                      {"name": "pixelcnn", "n_layer": 1, "hidden": 4, "head": 4, "first_kernel": 3}, None)}
    for leg, (args, cfg, shape) in legs.items():
        shards = demo / leg / "shards"
        if not (shards / "manifest.json").exists():
            cli(["shard", *args, "--out", str(shards), "--val-fraction", "0.2"])
        codec = Shards(shards).codec
        shape = shape or codec.model_shape(0)
        torch.manual_seed(0)
        model = build_model(cfg, codec.vocab_size, shape)
        save_export(demo / leg / "train" / "export", {k: v.detach() for k, v in model.named_parameters()}, cfg,
                    codec.vocab_size, shape, codec.config(), shards, {})
    return demo


def main():
    p = common.parser(__doc__.split("\n")[0])
    p.add_argument("--demo", type=Path, default=common.REPO / "runs" / "demo",
                   help="the demo's output: {text,audio,image}/{shards,train} (default runs/demo)")
    p.add_argument("--tinyshakespeare", type=Path, default=common.SHARED_DATA / "tinyshakespeare.txt",
                   help="a text file also compressed with the demo's text model (skipped if absent)")
    p.add_argument("--batch", type=int, default=16, help="rows arpipe codes in parallel")
    p.add_argument("--max-variables", type=int, help="code only each dataset's first N variables (default: all)")
    p.add_argument("--segment", type=int, default=16384, help="arpipe compress --segment (default 16384)")
    p.add_argument("--legs", nargs="+", choices=list(UNITS), default=list(UNITS), help="the demo legs to measure")
    args = p.parse_args()
    common.single_core()
    import torch  # noqa: F401  (after single_core: one thread)

    from pipeline.data.shards import Shards
    from pipeline.export import load_any

    global WORK
    WORK = common.work_dir(args)
    demo = tiny_demo(WORK) if args.tiny else args.demo
    limit = 256 if args.tiny else args.max_variables
    rows = []
    for leg in args.legs:
        if not (demo / leg / "shards" / "manifest.json").exists():
            print(f"skipping {leg}: no {demo / leg / 'shards'} (run `arpipe demo` first)")
            continue
        model, codec, _ = load_any(demo / leg / "train")
        items = first(val_items(Shards(demo / leg / "shards")), limit)
        rows += measure(f"{leg} (demo val)", leg, model, codec, items, raw_bytes(leg, codec, items), args)
        if leg == "text" and args.tinyshakespeare.exists() and not args.tiny:
            from pipeline.compress import TextFiles

            items = first([TextFiles(codec).read(args.tinyshakespeare, "tinyshakespeare")[0][1]], limit)
            rows += measure("tinyshakespeare (demo text model)", leg, model, codec, items,
                            raw_bytes(leg, codec, items), args)
    notes = ["ratio: that compressor's file over arpipe's (above 1: arpipe is smaller); arpipe's first row compares "
             "with the best other tool", "one thread; arpipe codes --batch rows at a time through the model's "
             f"incremental path (decode is sequential per row), --segment {args.segment}",
             f"models: {demo}/{{text,audio,image}}/train (the demo's; the text model never saw Shakespeare)"]
    common.report("Lossless compression (benchmarks/compress.py)", rows, args, notes, how="one run each")


if __name__ == "__main__":
    main()
