"""Audio codec: mono waveforms at one sample rate, μ-law quantised to mu+1 levels (256 by default).

μ-law companding spends the levels logarithmically, so quiet and loud passages are both
resolved with 8 bits; WaveNet models the result as a 256-way categorical per sample. Inputs are
decoded with `soundfile` (WAV, FLAC, OGG, …; parquet rows of HF `Audio(decode=False)` columns),
mixed to mono and resampled with `soxr`, a band-limited resampler: naive decimation would fold
everything above the new Nyquist frequency back into the band as aliases.
"""

import io
import os
import re
from pathlib import Path

import numpy as np

from pipeline import ArpipeError
from pipeline.codecs import Codec
from pipeline.data.sources import Record

# audiofolder metadata that sits next to the audio; it is not audio and is not read.
AUDIOFOLDER_METADATA = {"metadata.csv", "metadata.jsonl"}
UNKNOWN_LENGTH = (0, 0xFFFFFFFF)  # data sizes streaming writers put in headers they never patch
# libsndfile's diagnosis of a header that promises more than the file holds, in its log:
# "data : 320000 (should be 32000)" (WAV), "SSND : …" (AIFF), "riff : …" (W64), "Riff size : …"
# (RF64), "Data Size : …" (AU)
SHORT_DATA = re.compile(r"^[^:\n]*:\s*(\d+)\s*\(should be (\d+)\)", re.MULTILINE)


def mu_law_encode(x: np.ndarray, mu: int = 255) -> np.ndarray:
    """Waveform in [-1, 1] (clipped) to integer levels 0..mu, compressed as in G.711 / WaveNet."""
    x = np.clip(np.asarray(x, dtype=np.float64), -1.0, 1.0)
    y = np.sign(x) * np.log1p(mu * np.abs(x)) / np.log1p(mu)
    return np.rint((y + 1) / 2 * mu).astype(np.int64)


def mu_law_decode(q: np.ndarray, mu: int = 255) -> np.ndarray:
    """Levels 0..mu back to a waveform in [-1, 1] (the inverse of the compression)."""
    y = 2 * np.asarray(q, dtype=np.float64) / mu - 1
    return np.sign(y) * np.expm1(np.abs(y) * np.log1p(mu)) / mu


class TruncatedAudio(ValueError):
    pass


def decode_audio(source, sample_rate: int) -> np.ndarray:
    """A file path or file-like object to a float32 mono waveform at `sample_rate`.

    Raises TruncatedAudio for a file shorter than its header says: libsndfile itself reads what
    is there without complaint, which would silently turn a damaged corpus into shorter clips.
    (A FLAC or Vorbis stream cut mid-frame fails to decode; one cut at an OGG page boundary is
    a valid shorter stream and cannot be told apart.)"""
    import soundfile as sf
    import soxr

    with sf.SoundFile(source) as f:
        for declared, actual in SHORT_DATA.findall(f.extra_info):
            if int(declared) > int(actual) and int(declared) not in UNKNOWN_LENGTH:
                raise TruncatedAudio(f"the header declares {declared} bytes where the file holds {actual}")
        rate, frames = f.samplerate, f.frames
        audio = f.read(dtype="float32", always_2d=True)
    if len(audio) < frames:  # a decoder that stopped early without an error
        raise TruncatedAudio(f"the header declares {frames} samples, the file holds {len(audio)}")
    mono = audio.mean(axis=1)
    if rate != sample_rate and len(mono):
        mono = soxr.resample(mono, rate, sample_rate, quality="HQ")
    return mono.astype(np.float32, copy=False)


class AudioCodec(Codec):
    modality = "audio"
    help = "audio (WAV, FLAC, OGG, parquet of HF Audio) as μ-law samples"
    stream_mode = "crop"
    unit = "sample"

    def __init__(self, sample_rate: int = 16000, mu: int = 255):
        if sample_rate < 1:
            raise ArpipeError(f"sample rate must be positive, got {sample_rate}")
        if not 1 <= mu <= 255:
            raise ArpipeError(f"mu must be in 1..255 (mu+1 levels as uint8 tokens), got {mu}")
        self.sample_rate, self.mu = sample_rate, mu
        self.vocab_size = mu + 1

    @classmethod
    def add_arguments(cls, parser) -> None:
        parser.description = ("Shard audio: every input is decoded with soundfile, mixed to mono, resampled "
                              "with soxr and μ-law quantised. Parquet rows hold HF Audio columns "
                              "({bytes, path}); undecodable or truncated files are counted and skipped.")
        parser.add_argument("--sample-rate", type=int, default=16000, help="target sample rate in Hz")
        parser.add_argument("--mu", type=int, default=255, help="μ-law parameter: mu+1 levels")
        parser.add_argument("--clip-seconds", type=float,
                            help="cut each file into items of at most this many seconds (default: one item per file)")
        parser.add_argument("--audio-field", default="audio", help="parquet column holding the audio")

    @classmethod
    def shard_settings(cls, args) -> dict:
        if args.clip_seconds is not None and not args.clip_seconds > 0:
            raise ArpipeError(f"--clip-seconds must be positive, got {args.clip_seconds}")
        cls(args.sample_rate, args.mu)  # the codec's own checks, before any work is planned
        return {"sample_rate": args.sample_rate, "mu": args.mu, "clip_seconds": args.clip_seconds,
                "audio_field": args.audio_field}

    @classmethod
    def from_config(cls, config: dict, root: Path) -> "AudioCodec":
        return cls(int(config["sample_rate"]), int(config["mu"]))

    @property
    def default_prompt_len(self) -> int:
        return self.sample_rate // 8  # 125 ms: enough to set pitch and timbre for a continuation

    def config(self) -> dict:
        return {"modality": self.modality, "vocab_size": self.vocab_size,
                "sample_rate": self.sample_rate, "mu": self.mu}

    def read_records(self, path: Path, root: Path, settings: dict):
        """One record per clip, keyed path:index (counting clips across a parquet file's rows).
        A file that cannot be decoded raises (the shard task skips and reports it); a parquet row
        that cannot be decoded is a skipped record."""
        if path.name in AUDIOFOLDER_METADATA:
            return
        name = str(path.relative_to(root))
        clip = settings.get("clip_seconds")
        clip_len = max(1, round(clip * self.sample_rate)) if clip else None
        if path.suffix.lower() != ".parquet":
            yield from self._clips(name, 0, decode_audio(path, self.sample_rate), clip_len)
            return
        index = 0
        for audio in read_audio_column(path, settings.get("audio_field", "audio")):
            try:
                if audio.get("bytes"):
                    wave = decode_audio(io.BytesIO(audio["bytes"]), self.sample_rate)
                elif audio.get("path"):
                    wave = decode_audio(path.parent / audio["path"], self.sample_rate)
                else:
                    raise ValueError("no audio")
            except Exception as e:  # soundfile's errors, truncation, missing files: one row lost
                yield Record(f"{name}:{index}", skip="truncated" if isinstance(e, TruncatedAudio) else "undecodable")
                index += 1
                continue
            for record in self._clips(name, index, wave, clip_len):
                yield record
                index += 1

    @staticmethod
    def _clips(name: str, first: int, wave: np.ndarray, clip_len: int | None):
        """Records name:first, name:first+1, … cutting `wave` into pieces of at most clip_len."""
        if not len(wave):
            yield Record(f"{name}:{first}", skip="empty")
            return
        if not np.isfinite(wave).all():  # float WAVs can hold NaN/inf; μ-law of NaN is garbage
            yield Record(f"{name}:{first}", skip="non-finite samples")
            return
        step = clip_len or len(wave)
        for i, start in enumerate(range(0, len(wave), step)):
            yield Record(f"{name}:{first + i}", wave[start : start + step])

    def encode_records(self, records: list[Record]) -> list[tuple[np.ndarray, dict]]:
        return [(self.encode_wave(r.value), {"key": r.key, "samples": len(r.value),
                                             "seconds": len(r.value) / self.sample_rate})
                for r in records]

    def encode_wave(self, wave: np.ndarray) -> np.ndarray:
        return mu_law_encode(wave, self.mu).astype(self.token_dtype)

    def decode(self, tokens) -> np.ndarray:
        return mu_law_decode(tokens, self.mu).astype(np.float32)

    def encode(self, path: str) -> np.ndarray:
        """A sound file's tokens (for `arpipe sample --prompt clip.wav`)."""
        try:
            return self.encode_wave(decode_audio(path, self.sample_rate))
        except Exception as e:
            raise ArpipeError(f"cannot read audio prompt {path}: {e}") from None

    def write_samples(self, rows, directory: Path, name: str, prefix_len: int = 0) -> list[Path]:
        """One 16-bit PCM WAV per row; for completions the first prefix_len samples are the given clip."""
        import soundfile as sf

        paths = []
        for i, row in enumerate(rows):
            path = Path(directory) / f"{name}-{i:02d}.wav"
            sf.write(path, self.decode(row), self.sample_rate, subtype="PCM_16")
            paths.append(path)
        return paths


def read_audio_column(path: Path, field: str):
    """The `field` column of a parquet file as HF Audio dicts {bytes, path}, undecoded: we decode
    with soundfile ourselves, so `datasets` needs no audio backend."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # arpipe never downloads
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import datasets

    datasets.disable_progress_bars()
    rows = datasets.load_dataset("parquet", data_files=[str(path)], split="train", streaming=True)
    if rows.features is not None and field not in rows.features:
        raise ValueError(f"no {field!r} column (columns: {sorted(rows.features)})")
    for row in rows.cast_column(field, datasets.Audio(decode=False)):
        yield row[field] or {}
