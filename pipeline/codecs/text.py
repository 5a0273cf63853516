"""Text codec: a byte-level BPE tokenizer (HF `tokenizers`) trained on the corpus.

Byte-level BPE is lossless for any valid UTF-8 string, so `decode(encode(s)) == s` and bits/byte
is an honest number. The end-of-document token `<|endoftext|>` is a special token that input text
can never produce: we encode special-token strings as plain text (`encode_special_tokens`).
"""

import hashlib
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from pipeline import ArpipeError
from pipeline.codecs import Codec, codec_file
from pipeline.data.sources import Record, read_text, readable, require_regular_file, split_of
from pipeline.log import LOG

EOS = "<|endoftext|>"


class TextCodec(Codec):
    modality = "text"
    help = "text (plain, JSONL, parquet) through a byte-level BPE tokenizer"
    stream_mode = "pack"
    unit = "token"

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.tokenizer.encode_special_tokens = True
        self.eos_id = tokenizer.token_to_id(EOS)
        if self.eos_id is None:
            raise ArpipeError(f"tokenizer has no {EOS} token; train one with `arpipe shard text`")
        self.vocab_size = tokenizer.get_vocab_size()

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> "TextCodec":
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOS],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tokenizer.train_from_iterator(texts, trainer)
        return cls(tokenizer)

    @classmethod
    def load(cls, path: str | Path) -> "TextCodec":
        try:
            return cls(Tokenizer.from_file(str(path)))
        except Exception as e:  # tokenizers raises plain Exception on bad JSON
            raise ArpipeError(f"cannot load tokenizer {path}: {e}") from None

    @classmethod
    def add_arguments(cls, parser) -> None:
        parser.description = ("Shard text: plain text files are cut into documents by --sample-by; "
                              "JSONL/parquet rows are documents (column --text-field).")
        parser.add_argument("--sample-by", choices=["document", "paragraph", "line"], default="document",
                            help="how plain text files are cut into documents (default: document = whole file)")
        parser.add_argument("--text-field", default="text", help="column holding the text in JSONL/parquet (default text)")
        group = parser.add_mutually_exclusive_group()
        group.add_argument("--vocab-size", type=int, default=8192, help="train a tokenizer of this size (default 8192)")
        group.add_argument("--tokenizer", help="use this tokenizer.json instead of training one")
        parser.add_argument("--tokenizer-train-mb", type=float, default=500.0,
                            help="MB of training-split text the tokenizer is trained on (default 500)")

    @classmethod
    def shard_settings(cls, args) -> dict:
        settings = {"sample_by": args.sample_by, "text_field": args.text_field}
        if args.tokenizer:
            settings["tokenizer_sha256"] = cls.load(args.tokenizer).sha256
        else:
            if args.vocab_size < 257:
                raise ArpipeError(f"--vocab-size {args.vocab_size} is below 257 (256 bytes and EOS)")
            settings["vocab_size"] = args.vocab_size
        return settings

    @classmethod
    def maker(cls, settings: dict, args):
        return text_codec_maker(settings, args.tokenizer, int(args.tokenizer_train_mb * 1e6))

    @classmethod
    def from_config(cls, config: dict, root: Path) -> "TextCodec":
        path = codec_file(root, config["tokenizer"])
        codec = cls.load(path)
        if codec.sha256 != config["tokenizer_sha256"]:
            raise ArpipeError(f"{path} does not match the manifest's tokenizer_sha256")
        return codec

    def save(self, directory: Path) -> Path:
        path = directory / "tokenizer.json"
        path.write_text(self.tokenizer.to_str())
        return path

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.tokenizer.to_str().encode()).hexdigest()

    def config(self) -> dict:
        return {
            "modality": self.modality,
            "vocab_size": self.vocab_size,
            "eos_id": self.eos_id,
            "tokenizer": "tokenizer.json",
            "tokenizer_sha256": self.sha256,
        }

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        dtype = self.token_dtype
        encodings = self.tokenizer.encode_batch_fast(texts, add_special_tokens=False)
        return [np.asarray(e.ids, dtype=dtype) for e in encodings]

    def read_records(self, path: Path, root: Path, settings: dict):
        return read_text(path, root, settings["sample_by"], settings["text_field"])

    def encode_records(self, records: list[Record]) -> list[tuple[np.ndarray, dict]]:
        texts = [r.value for r in records]
        return [(tokens, {"key": r.key, "bytes": len(t) if t.isascii() else len(t.encode())})
                for r, t, tokens in zip(records, texts, self.encode_batch(texts))]

    def encode(self, text: str) -> np.ndarray:
        return self.encode_batch([text])[0]

    def write_samples(self, rows, directory: Path, name: str, prefix_len: int = 0) -> list[Path]:
        sections = []
        for i, row in enumerate(rows):
            row = [int(t) for t in row]
            if prefix_len:
                sections.append(f"=== {name} {i} ===\n--- given ---\n{self.decode(row[:prefix_len])}\n"
                                f"--- sampled ---\n{self.decode(row[prefix_len:])}")
            else:
                sections.append(f"=== {name} {i} ===\n{self.decode(row)}")
        path = Path(directory) / f"{name}.txt"
        path.write_text("\n\n".join(sections) + "\n")
        return [path]

    def decode(self, ids) -> str:
        """Tokens to text, ending at the first end-of-document token."""
        ids = [int(i) for i in ids]
        if self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        return self.tokenizer.decode(ids, skip_special_tokens=False)


def text_codec_maker(settings: dict, tokenizer: str | None, train_bytes: int):
    """For `prepare`: load the given tokenizer, or train one on the training split's documents
    (up to `train_bytes` of text, from inputs in a seeded random order so it sees the corpus
    evenly), and save it as OUT/tokenizer.json."""
    def make(inputs: list[Path], root: Path, out: Path) -> TextCodec:
        if tokenizer:
            codec = TextCodec.load(tokenizer)
        else:
            def texts():
                seen = 0
                for i in np.random.default_rng(0).permutation(len(inputs)):
                    try:
                        if isinstance(inputs[i], Path):
                            require_regular_file(inputs[i])  # a FIFO would block
                        for r in read_text(readable(inputs[i]), root, settings["sample_by"], settings["text_field"]):
                            if r.skip is None and split_of(r.key, settings["val_fraction"]) == "train":
                                yield r.value
                                seen += len(r.value)
                                if seen >= train_bytes:
                                    return
                    except Exception:  # unreadable input: the shard task records it
                        continue

            LOG.info("shard: training a %d-token byte-level BPE tokenizer on up to %.0f MB of text",
                     settings["vocab_size"], train_bytes / 1e6)
            codec = TextCodec.train(texts(), settings["vocab_size"])
        codec.save(out)
        return codec

    return make
