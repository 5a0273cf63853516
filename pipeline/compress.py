"""`arpipe compress` / `arpipe decompress`: lossless compression with a model's exact conditionals.

A range coder (`constriction`'s queue coder) spends -log2 q(x_i | x_<i) bits on each variable,
where q is the model's conditional with its probabilities quantised to integers, so a file costs
the model's exact NLL of it plus a fraction of a percent. The coder needs the *same* q on both
sides, bit for bit, so:

- encoder and decoder run one loop (`run_rows`): the model's incremental path (`start`/`step`:
  GPT's KV cache, WaveNet's queues, GRU state) one variable at a time over the same batch of
  rows, with the same shapes, feeding the same tokens (0 for rows that are done). The encoder
  never takes the faster full pass: its floats could differ from the step's.
- probabilities are quantised deterministically (`quantize`): softmax in float64, integer
  frequencies summing to 2^24, every symbol at least 1, the remainder on the most probable one.
- what float results depend on is recorded in the header and checked before decoding: the
  model's fingerprint (weights, config, codec), torch/numpy/constriction versions, the thread
  count (decoding sets the encoder's), the device and the CPU's kernel family (AVX2/AVX512 kernels
  sum in other orders). The decoded tokens' CRC32 is checked.

Rows. An item (a file; an image) longer than `segment` variables is cut into pieces, each coded
from an empty context. Pieces are sorted by length and coded `batch` at a time in lockstep.
Models whose cache has a fixed capacity (GPT: block_len positions) slide their context: the
first window codes block_len variables; then every `stride` variables the cache is rebuilt from
the start vector and the last block_len - stride variables (the conditionals of a sliding-window
evaluation with that stride). WaveNet's queues and GRU's state run over any length unchanged.

What goes in and comes back:
  text   any bytes. Valid UTF-8 runs go through the model's byte-level BPE; each byte that is
         not valid UTF-8 becomes its own single-byte token (every byte-level BPE vocabulary has
         all 256), so the output is byte-identical to the input.
  image  one item per image (an .npz/.npy/IDX array gives one per row), through the model's
         codec, written back as PNG: pixel-identical for 8-bit images of the model's size at 256
         levels (an input the codec resizes or quantises is stored as the codec's tokens; we warn).
  audio  the μ-law stream the codec makes (mono, the model's sample rate): the output is a
         16-bit WAV of that stream, not the original PCM.

File: b"ARPZ", u32 header length, u32 header CRC32, the zlib-compressed JSON header (format,
model fingerprint, environment, settings, the items' names and lengths, the CRC32 of their tokens
and of the payload),
then the payload (the range coder's little-endian 32-bit words).
"""

import hashlib
import json
import math
import platform
import struct
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline import ArpipeError
from pipeline.log import LOG

MAGIC = b"ARPZ"
FORMAT = 1
PRECISION = 24  # integer frequencies sum to 2^24: a symbol costs at most 24 bits
SEGMENT = 16384  # default longest piece of an item (pieces are coded in parallel rows)


def quantize(logits: torch.Tensor) -> np.ndarray:
    """Logits (n, V) -> integer frequencies (n, V), each >= 1, each row summing to 2^PRECISION,
    as float64 (exact) for constriction. A deterministic function of the logits' bits."""
    total, vocab = 1 << PRECISION, logits.shape[-1]
    p = torch.softmax(logits.double(), -1)
    freq = torch.floor(p * (total - vocab)).long() + 1
    rows = torch.arange(len(freq))
    freq[rows, p.argmax(-1)] += total - freq.sum(-1)
    return freq.numpy().astype(np.float64)


def fingerprint(model, codec_config: dict) -> str:
    """sha256 of the model's tensors (names, dtypes, shapes, bytes), its config and the codec."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    meta = {"class": type(model).__name__, "config": getattr(model, "cfg", None) and model.cfg.model_dump(),
            "vocab": model.vocab_size, "shape": list(model.shape), "codec": codec_config}
    h.update(json.dumps(meta, sort_keys=True).encode())
    return h.hexdigest()


def environment(threads: int) -> dict:
    """What the model's float results depend on besides the weights: recorded, then checked."""
    import constriction

    return {"torch": torch.__version__, "numpy": np.__version__,
            "constriction": getattr(constriction, "__version__", _version("constriction")),
            "threads": threads, "device": "cpu", "machine": platform.machine(),
            "cpu_kernels": torch.backends.cpu.get_cpu_capability()}


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def context_window(model) -> int | None:
    """Variables one cache can hold: None for models whose incremental state runs over any
    length with unchanged conditionals (`long_samples == "native"`: WaveNet's queues, GRU's
    hidden state), else the model's length (GPT's and Llama's positions, as `sample(length=…)`
    slides them; an image model's items are exactly that long)."""
    return None if model.long_samples == "native" else model.num_vars


# --- the one loop encoder and decoder share
@torch.no_grad()
def run_rows(model, lengths: list[int], window: int | None, stride: int, code) -> np.ndarray:
    """Run the model over rows of the given lengths in lockstep, one variable at a time, and
    return the tokens (n, max length). `code(t, freqs, logits, active)` gets the quantised
    conditionals of variable t (n, V), the logits they come from and which rows still have a
    variable t, and returns its tokens (n,): the encoder codes the data's, the decoder decodes."""
    n, steps = len(lengths), max(lengths)
    lengths_t = torch.tensor(lengths)
    tokens = torch.zeros(n, steps, dtype=torch.long)

    def reprime(t: int) -> bool:  # a new window starts at variable t
        return window is not None and t >= window and (t - window) % stride == 0

    cache, logits = model.start(n)
    for t in range(steps):
        if reprime(t):
            cache, logits = model.start(n)
            if window - stride:
                logits = model.step(cache, tokens[:, t - (window - stride) : t])
        logits = logits.float()
        tokens[:, t] = torch.as_tensor(code(t, quantize(logits), logits, (t < lengths_t).numpy()), dtype=torch.long)
        if t + 1 < steps and not reprime(t + 1):
            logits = model.step(cache, tokens[:, t : t + 1])
    return tokens


def pieces(lengths: list[int], segment: int) -> list[tuple[int, int, int]]:
    """(item, start, length) of every piece, longest first (ties in item order): rows of
    similar length share a batch. Both sides derive it from the header's lengths."""
    out = []
    for item, n in enumerate(lengths):
        count = max(1, math.ceil(n / segment))
        bounds = [round(i * n / count) for i in range(count + 1)]
        out += [(item, a, b - a) for a, b in zip(bounds[:-1], bounds[1:])]
    return sorted(out, key=lambda p: -p[2])


@dataclass
class Settings:
    """What encoder and decoder share besides the model (all in the header)."""
    batch: int  # rows coded in lockstep
    stride: int  # variables per context window after the first
    window: int | None  # variables one cache holds (None: the model's state runs on)
    segment: int  # the longest piece an item is coded in


def in_model_order(model, items: list[np.ndarray], back: bool = False) -> list[np.ndarray]:
    """Items of a model that orders its variables itself (MADE: its ordering 0) go through its
    incremental path in that ordering; other models take the data's ordering as theirs."""
    if not model.orders_variables:
        return items
    convert = (lambda t: model.to_data(model.from_sequence(t))) if back else \
        (lambda t: model.to_sequence(model.from_data(t)))
    return [convert(torch.as_tensor(x, dtype=torch.long)[None])[0].numpy() for x in items]


def encode_items(model, items: list[np.ndarray], settings: Settings) -> tuple[bytes, dict]:
    """The payload coding `items` (token arrays), and `model_bits`: the bits the model's float
    conditionals give the data (its exact NLL under the conditionals the coder used)."""
    items = in_model_order(model, items)
    import constriction  # its submodules are attributes of a native module, not importable by name

    encoder = constriction.stream.queue.RangeEncoder()
    family = constriction.stream.model.Categorical(perfect=False)
    stats = {"model_bits": 0.0}
    plan = pieces([len(x) for x in items], settings.segment)
    for b in range(0, len(plan), settings.batch):
        group = plan[b : b + settings.batch]
        data = torch.zeros(len(group), max(n for _, _, n in group), dtype=torch.long)
        for row, (item, start, n) in enumerate(group):
            data[row, :n] = torch.from_numpy(np.asarray(items[item][start : start + n], dtype=np.int64))

        def code(t, freqs, logits, active):
            if active.any():
                s = data[active.nonzero()[0], t].numpy()
                encoder.encode(s.astype(np.int32), family, freqs[active])
                logp = torch.log_softmax(logits[torch.from_numpy(active)].double(), -1)[np.arange(len(s)), s]
                stats["model_bits"] -= float(logp.sum()) / math.log(2)
            return data[:, t]

        run_rows(model, [n for _, _, n in group], settings.window, settings.stride, code)
    words = encoder.get_compressed()
    return words.astype("<u4").tobytes(), stats


def decode_items(model, payload: bytes, lengths: list[int], settings: Settings) -> list[np.ndarray]:
    import constriction

    if len(payload) % 4:
        raise ArpipeError("the compressed data is truncated (not a whole number of 32-bit words)")
    decoder = constriction.stream.queue.RangeDecoder(np.frombuffer(payload, dtype="<u4").astype(np.uint32))
    family = constriction.stream.model.Categorical(perfect=False)
    items = [np.zeros(n, dtype=np.int64) for n in lengths]
    plan = pieces(lengths, settings.segment)
    for b in range(0, len(plan), settings.batch):
        group = plan[b : b + settings.batch]

        def code(t, freqs, logits, active):
            out = np.zeros(len(freqs), dtype=np.int64)
            if active.any():
                out[active] = decoder.decode(family, freqs[active])
            return out

        tokens = run_rows(model, [n for _, _, n in group], settings.window, settings.stride, code).numpy()
        for row, (item, start, n) in enumerate(group):
            items[item][start : start + n] = tokens[row, :n]
    return in_model_order(model, items, back=True)


# --- files <-> items, per modality (what the codec itself does not offer: any bytes, file names)
def byte_alphabet() -> list[str]:
    """GPT-2's byte -> character map, in which byte-level BPE writes its token strings: printable
    Latin-1 bytes stand for themselves, the other 68 for characters from U+0100 on."""
    keep = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    extra = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


class TextFiles:
    """Any bytes <-> tokens: valid UTF-8 runs through the BPE, each invalid byte as its own
    single-byte token (found in the vocabulary through the byte alphabet)."""

    def __init__(self, codec):
        self.codec = codec
        alphabet = byte_alphabet()
        self.byte_ids = [codec.tokenizer.token_to_id(c) for c in alphabet]
        if None in self.byte_ids:
            raise ArpipeError("the model's tokenizer lacks single-byte tokens; compress needs a byte-level BPE")
        to_byte = {c: b for b, c in enumerate(alphabet)}
        vocab = codec.tokenizer.get_vocab()
        self.token_bytes = [None] * codec.vocab_size
        for token, i in vocab.items():
            if i != codec.eos_id and all(c in to_byte for c in token):
                self.token_bytes[i] = bytes(to_byte[c] for c in token)

    def read(self, path: Path, name: str) -> list[tuple[str, np.ndarray, dict]]:
        import re

        data = path.read_bytes()
        parts = re.split("([\udc80-\udcff])", data.decode("utf-8", "surrogateescape"))  # odd: one invalid byte
        valid = self.codec.token_ids(parts[0::2])
        ids = []
        for i, part in enumerate(parts):
            ids += valid[i // 2] if i % 2 == 0 else [self.byte_ids[ord(part) - 0xDC00]]
        tokens = np.asarray(ids, dtype=np.int64)
        if self.bytes_of(tokens) != data:  # e.g. a tokenizer with a normaliser: refuse rather than lose data
            raise ArpipeError(f"{path}: the model's tokenizer does not reproduce these bytes")
        return [(name, tokens, {"bytes": len(data)})]

    def bytes_of(self, tokens) -> bytes:
        try:
            return b"".join(self.token_bytes[t] for t in tokens)
        except TypeError:  # a token with no bytes (the end-of-text token): not data we wrote
            raise ArpipeError("decoded a token that stands for no bytes: the file is corrupt") from None

    def write(self, tokens, path: Path) -> Path:
        path.write_bytes(self.bytes_of(tokens))
        return path


class ImageFiles:
    """Image files (or arrays of images) <-> the codec's tokens, one item per image; PNG out."""

    def __init__(self, codec):
        self.codec = codec

    def read(self, path: Path, name: str) -> list[tuple[str, np.ndarray, dict]]:
        from pipeline.codecs.image import read_images, source_shape

        c = self.codec
        records = list(read_images(str(path), path.parent))  # the shard stage's reader takes path strings
        items = []
        for i, record in enumerate(records):
            h, w, _ = source_shape(record.value)
            if (h, w) != (c.height, c.width) or c.levels != 256:
                LOG.warning("compress: %s is %dx%d and the model's codec makes %dx%d at %d levels: what is stored "
                            "is the codec's version of it, not the original pixels", record.key, h, w,
                            c.height, c.width, c.levels)
            stem = str(Path(name).with_suffix(""))
            items.append((f"{stem}-{i:04d}.png" if len(records) > 1 else f"{stem}.png",
                          c.tokens(c.pixels(record.value)).astype(np.int64), {}))
        return items

    def write(self, tokens, path: Path) -> Path:
        from PIL import Image

        pixels = self.codec.to_pixels(np.asarray(tokens)[None])[0]
        Image.fromarray(pixels[..., 0] if self.codec.channels == 1 else pixels).save(path)
        return path


class AudioFiles:
    """Sound files -> the codec's μ-law stream; out: a 16-bit WAV of that stream."""

    def __init__(self, codec):
        self.codec = codec

    def read(self, path: Path, name: str) -> list[tuple[str, np.ndarray, dict]]:
        return [(str(Path(name).with_suffix(".wav")), self.codec.encode(str(path)).astype(np.int64), {})]

    def write(self, tokens, path: Path) -> Path:
        import soundfile as sf

        sf.write(path, self.codec.decode(tokens), self.codec.sample_rate, subtype="PCM_16")
        return path


FILES = {"text": TextFiles, "image": ImageFiles, "audio": AudioFiles}


def file_format(codec):
    if codec.modality not in FILES:
        raise ArpipeError(f"compress handles text, image and audio models, not {codec.modality!r} ones")
    return FILES[codec.modality](codec)


def crc(items: list[np.ndarray]) -> int:
    """CRC32 of all items' tokens (one for the file: a CRC per item would cost ~5 bytes each)."""
    value = 0
    for tokens in items:
        value = zlib.crc32(np.asarray(tokens, dtype="<i4").tobytes(), value)
    return value


# --- the container
def write_container(path: Path, header: dict, payload: bytes) -> int:
    header = {**header, "payload_bytes": len(payload), "payload_crc32": zlib.crc32(payload)}
    packed = zlib.compress(json.dumps(header, separators=(",", ":")).encode(), 9)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(MAGIC + struct.pack("<II", len(packed), zlib.crc32(packed)) + packed + payload)
    return 12 + len(packed)


def read_container(path: Path) -> tuple[dict, bytes]:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ArpipeError(f"cannot read {path}: {e.strerror}") from None
    if data[:4] != MAGIC or len(data) < 12:
        raise ArpipeError(f"{path} is not an arpipe compressed file (it does not start with {MAGIC!r})")
    size, check = struct.unpack("<II", data[4:12])
    packed = data[12 : 12 + size]
    if len(packed) != size or zlib.crc32(packed) != check:
        raise ArpipeError(f"{path}: the header is damaged (CRC32 mismatch)")
    header = json.loads(zlib.decompress(packed))
    if header.get("format") != FORMAT:
        raise ArpipeError(f"{path} has format {header.get('format')}; this arpipe reads format {FORMAT}")
    payload = data[12 + size :]
    if len(payload) != header["payload_bytes"] or zlib.crc32(payload) != header["payload_crc32"]:
        raise ArpipeError(f"{path}: the compressed data is damaged or truncated (CRC32 mismatch)")
    return header, payload


def check_match(header: dict, model, codec, path) -> None:
    """Refuse to decode with another model or in an environment whose floats may differ."""
    found = fingerprint(model, codec.config())
    if found != header["model"]:
        raise ArpipeError(f"{path} was compressed with another model (fingerprint {header['model'][:12]}…, "
                          f"this model's is {found[:12]}…): decompress with the exact model that compressed it")
    here = environment(header["env"]["threads"])
    differ = [f"{k}: file {v!r}, here {here.get(k)!r}" for k, v in header["env"].items() if here.get(k) != v]
    if differ:
        raise ArpipeError(f"{path} was compressed where the model's floats may differ from here ({'; '.join(differ)}); "
                          f"decompress with the same versions on the same kind of machine")


def make_header(model, codec, settings: Settings, threads: int, items: list[tuple[str, np.ndarray]]) -> dict:
    return {"format": FORMAT, "model": fingerprint(model, codec.config()), "env": environment(threads),
            "modality": codec.modality, "batch": settings.batch, "stride": settings.stride, "window": settings.window,
            "segment": settings.segment, "names": [name for name, _ in items],
            "lengths": [len(tokens) for _, tokens in items], "crc32": crc([tokens for _, tokens in items])}


def load_model(model_path):
    from pipeline.export import load_any

    model, codec, _ = load_any(model_path)
    return model.eval(), codec


def compress(model_path: str, inputs: list[str], out: str, *, batch: int = 16, stride: int | None = None,
             threads: int = 1, segment: int = SEGMENT) -> dict:
    """Compress files (paths, folders, globs) into one file; returns sizes, bits and timings."""
    from pipeline.data.sources import common_root, expand_inputs

    torch.set_num_threads(threads)
    model, codec = load_model(model_path)
    files = file_format(codec)
    window = context_window(model)
    stride = stride or (window // 2 if window else 1)
    if window is not None and not 1 <= stride <= window:
        raise ArpipeError(f"--stride must be in 1..{window} (the model's context), got {stride}")
    found = expand_inputs(inputs)  # path strings, as the shard stage takes them
    root = common_root(found)
    paths = [Path(f) for f in found]
    items = []
    for path in paths:
        items += files.read(path, str(path.relative_to(root)) if len(paths) > 1 else path.name)
    if not items:
        raise ArpipeError("nothing to compress")
    start = time.time()
    settings = Settings(batch, stride, window, segment)
    payload, stats = encode_items(model, [tokens for _, tokens, _ in items], settings)
    header = make_header(model, codec, settings, threads, [(name, tokens) for name, tokens, _ in items])
    header_bytes = write_container(Path(out), header, payload)
    variables = sum(len(tokens) for _, tokens, _ in items)
    result = {**stats, "items": len(items), "variables": variables, "input_bytes": sum(p.stat().st_size for p in paths),
              "header_bytes": header_bytes, "payload_bytes": len(payload), "file_bytes": header_bytes + len(payload),
              "seconds": time.time() - start}
    LOG.info("compress: %d items, %d variables, %d input bytes -> %s: %d bytes (%d header + %d payload); the model's "
             "NLL of them is %.0f bytes (%.3f bits per %s); %.1f s", len(items), variables, result["input_bytes"], out,
             result["file_bytes"], header_bytes, len(payload), stats["model_bits"] / 8,
             stats["model_bits"] / variables, codec.unit, result["seconds"])
    return result


def decompress(path: str, model_path: str, out_dir: str) -> list[Path]:
    """Decode a compressed file with the model that made it into `out_dir`; returns the files."""
    header, payload = read_container(Path(path))
    model, codec = load_model(model_path)
    check_match(header, model, codec, path)
    torch.set_num_threads(header["env"]["threads"])
    names = header["names"]
    for name in names:  # a file names outputs; never outside out_dir
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise ArpipeError(f"{path}: refusing output name {name!r}")
    settings = Settings(header["batch"], header["stride"], header["window"], header["segment"])
    start = time.time()
    items = decode_items(model, payload, header["lengths"], settings)
    if crc(items) != header["crc32"]:
        raise ArpipeError(f"{path} decoded wrongly (CRC32 mismatch): the model's floats differ from the encoder's")
    files, written = file_format(codec), []
    for name, tokens in zip(names, items):
        target = Path(out_dir) / name
        target.parent.mkdir(parents=True, exist_ok=True)
        written.append(files.write(tokens, target))
    LOG.info("decompress: %d items -> %s in %.1f s", len(written), out_dir, time.time() - start)
    return written
