"""Text codec: a byte-level BPE tokenizer (HF `tokenizers`) trained on the corpus, or one the user brings.

Byte-level BPE is lossless for any valid UTF-8 string, so `decode(encode(s)) == s` and bits/byte
is an honest number; a tokenizer that is not (one that normalises text) is refused. The
end-of-document token (`<|endoftext|>` for tokenizers arpipe trains, the tokenizer's own
eos_token or `--eos-token` for others) is a special token that input text can never produce: we
encode special-token strings as plain text (`encode_special_tokens`) and never let a tokenizer's
post-processor add its BOS/EOS (`add_special_tokens=False`).
"""

import hashlib
import json
import re
from collections.abc import Iterable
from itertools import chain, repeat
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from pipeline import ArpipeError
from pipeline.codecs import Codec, Encoded, codec_file
from pipeline.data.sources import Records, read_text, readable, require_regular_file, split_of
from pipeline.log import LOG

EOS = "<|endoftext|>"  # ends documents in tokenizers arpipe trains (and GPT-2's)
# decode(encode(PROBE)) must give PROBE back: spaces, tabs, CRLF, case, accents, ligatures,
# scripts, emoji and markup are what normalising tokenizers change
PROBE = " Hello WORLD!  Two spaces,\ttab,\r\nCRLF\n\ncafé naïve Ωμέγα 中文 😀 ﬁx² <b>&amp;</b> trailing  "


def configured_token(directory: Path, name: str) -> str | None:
    """A special token (`eos_token`, `bos_token`) named by an HF tokenizer directory's
    tokenizer_config.json or special_tokens_map.json; as a string or an {"content": …} entry."""
    for file in ("tokenizer_config.json", "special_tokens_map.json"):
        path = directory / file
        if path.is_file():
            try:
                value = json.loads(path.read_text()).get(name)
            except (ValueError, AttributeError) as e:
                raise ArpipeError(f"cannot read {path}: {e}") from None
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str) and value:
                return value
    return None


class AsciiTokenizer:
    r"""Token ids of ASCII text, the same as the tokenizer's, ≈ 3× faster for byte-level BPE tokenizers
    of GPT-2's shape (arpipe's, GPT-2's). encode_batch_fast builds an Encoding per document, with a
    string, offsets and masks for every token; on ASCII text GPT-2's split pattern has plain classes
    (\p{L} is [A-Za-z], \p{N} is [0-9], \s is [\t\n\v\f\r ]), so Python's re splits it as the
    tokenizer does, and each piece's ids come from the tokenizer's own model, once per piece. Tests
    compare with encode_batch_fast on every ASCII string of up to 2 characters and on corpora."""

    SPACE = r"\t\n\x0b\x0c\r "  # onig's \s on ASCII (Python's str.isspace adds \x1c-\x1f)
    PIECES = re.compile(rf"'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]+| ?[^{SPACE}A-Za-z0-9]+"
                        rf"|[{SPACE}]+(?![^{SPACE}])|[{SPACE}]+")
    CACHE_PIECES = 1 << 17  # ≈ 25 MB at most; a corpus with more distinct pieces starts over
    LONGEST_CACHED = 64  # characters: long runs of spaces or punctuation are rare and would crowd the cache

    def __init__(self, tokenizer: Tokenizer):
        self.model = tokenizer.model
        # the byte-level alphabet as the tokenizer itself maps ASCII ("Ġ" for a space)
        self.alphabet = {c: tokenizer.pre_tokenizer.pre_tokenize_str(chr(c))[0][0] for c in range(128)}
        self.cache: dict[str, tuple[int, ...]] = {}

    @classmethod
    def of(cls, tokenizer: Tokenizer) -> "AsciiTokenizer | None":
        """One for a tokenizer whose encoding of ASCII text is exactly this class's, else None."""
        spec = json.loads(tokenizer.to_str())
        pre, model = spec.get("pre_tokenizer") or {}, spec["model"]
        gpt2_shaped = (spec.get("normalizer") is None and pre.get("type") == "ByteLevel"
                       and not pre.get("add_prefix_space") and pre.get("use_regex", True)
                       and model["type"] == "BPE" and not model.get("dropout")
                       # special tokens are encoded as text (encode_special_tokens); other added ones are split out
                       and all(t["special"] for t in spec.get("added_tokens", [])))
        return cls(tokenizer) if gpt2_shaped else None

    def ids(self, text: str) -> list[int]:
        pieces = self.PIECES.findall(text)
        try:  # every piece seen before: the usual case once a corpus is under way
            return list(chain.from_iterable(map(self.cache.__getitem__, pieces)))
        except KeyError:
            return list(chain.from_iterable(map(self.piece_ids, pieces)))

    def piece_ids(self, piece: str) -> tuple[int, ...]:
        ids = self.cache.get(piece)
        if ids is None:
            ids = tuple(t.id for t in self.model.tokenize(piece.translate(self.alphabet)))
            if len(piece) <= self.LONGEST_CACHED:
                if len(self.cache) >= self.CACHE_PIECES:
                    self.cache.clear()
                self.cache[piece] = ids
        return ids


class TextCodec(Codec):
    modality = "text"
    help = "text (plain, JSONL, parquet) through a byte-level BPE tokenizer"
    stream_mode = "pack"
    unit = "token"

    def __init__(self, tokenizer: Tokenizer, eos_token: str = EOS):
        self.tokenizer = tokenizer
        self.tokenizer.encode_special_tokens = True
        # a tokenizer.json may carry truncation or padding (BERT-era ones do): a document is all of its tokens
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        self.ascii = AsciiTokenizer.of(tokenizer)
        self.eos_token = eos_token
        self.eos_id = tokenizer.token_to_id(eos_token)
        specials = sorted(t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special)
        if self.eos_id is None:
            raise ArpipeError(f"tokenizer has no {eos_token} token: name its end-of-document token with --eos-token "
                              f"(its special tokens: {', '.join(specials[:8]) or 'none'})")
        if eos_token not in specials:  # a plain token could come out of ordinary text
            raise ArpipeError(f"{eos_token} is not a special token of the tokenizer, so text could produce it; "
                              f"name one of its special tokens with --eos-token ({', '.join(specials[:8]) or 'none'})")
        self.vocab_size = tokenizer.get_vocab_size()
        back = self.decode(self.encode(PROBE))
        if back != PROBE:
            at = next(i for i, (a, b) in enumerate(zip(PROBE + "\0", back + "\0")) if a != b)
            raise ArpipeError(f"tokenizer is not lossless: {PROBE[max(0, at - 10):at + 10]!r} decodes as "
                              f"{back[max(0, at - 10):at + 10]!r}; exact bits/byte and samples need "
                              f"decode(encode(text)) == text: use a byte-level BPE tokenizer (GPT-2's, Llama-3's) "
                              f"or let `arpipe shard text --vocab-size N` train one")

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
    def load(cls, path: str | Path, eos_token: str | None = None) -> "TextCodec":
        """A tokenizer.json, or an HF tokenizer directory holding one. The end-of-document token:
        `eos_token`, else the eos_token of tokenizer_config.json / special_tokens_map.json beside
        tokenizer.json, else <|endoftext|> if the tokenizer has it."""
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        try:
            tokenizer = Tokenizer.from_file(str(file))
        except Exception as e:  # tokenizers raises plain Exception on bad JSON
            raise ArpipeError(f"cannot load tokenizer {file}: {e}") from None
        try:
            return cls(tokenizer, eos_token or configured_token(file.parent, "eos_token") or EOS)
        except ArpipeError as e:
            raise ArpipeError(f"{file}: {e}") from None

    @classmethod
    def add_arguments(cls, parser) -> None:
        parser.description = ("Shard text: plain text files are cut into documents by --sample-by; "
                              "JSONL/parquet rows are documents (column --text-field).")
        parser.add_argument("--sample-by", choices=["document", "paragraph", "line"], default="document",
                            help="how plain text files are cut into documents (document: a whole file)")
        parser.add_argument("--text-field", default="text", help="column holding the text in JSONL/parquet")
        group = parser.add_mutually_exclusive_group()
        group.add_argument("--vocab-size", type=int, default=8192, help="train a tokenizer of this size")
        group.add_argument("--tokenizer", help="use this tokenizer instead of training one: a tokenizer.json or an HF "
                           "tokenizer directory (tokenizer.json with tokenizer_config.json / special_tokens_map.json)")
        parser.add_argument("--eos-token", help="with --tokenizer: its end-of-document token, e.g. '</s>' (default: "
                            "the eos_token of its tokenizer_config.json or special_tokens_map.json, else "
                            "<|endoftext|>)")
        parser.add_argument("--tokenizer-train-mb", type=float, default=500.0,
                            help="MB of training-split text the tokenizer is trained on")

    @classmethod
    def shard_settings(cls, args) -> dict:
        settings = {"sample_by": args.sample_by, "text_field": args.text_field}
        if args.tokenizer:
            codec = cls.load(args.tokenizer, args.eos_token)
            settings.update(tokenizer_sha256=codec.sha256, eos_token=codec.eos_token)
        elif args.eos_token:
            raise ArpipeError(f"--eos-token needs --tokenizer; a tokenizer arpipe trains ends documents with {EOS}")
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
        codec = cls.load(path, config.get("eos_token"))
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
            "eos_token": self.eos_token,
            "tokenizer": "tokenizer.json",
            "tokenizer_sha256": self.sha256,
        }

    def token_ids(self, texts: list[str]) -> list[list[int]]:
        """Each text's token ids, without the tokenizer's BOS/EOS: the one place text becomes tokens."""
        if self.ascii is None:
            return [e.ids for e in self.tokenizer.encode_batch_fast(texts, add_special_tokens=False)]
        others = [text for text in texts if not text.isascii()]
        encoded = (e.ids for e in self.tokenizer.encode_batch_fast(others, add_special_tokens=False)) if others else None
        return [self.ascii.ids(text) if text.isascii() else next(encoded) for text in texts]

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [np.asarray(ids, dtype=self.token_dtype) for ids in self.token_ids(texts)]

    def read_records(self, path, root: Path, settings: dict):
        return read_text(path, root, settings["sample_by"], settings["text_field"])

    def encode_records(self, records: Records) -> Encoded:
        texts = records.values
        ids = self.token_ids(texts)
        lengths = list(map(len, ids))
        # one array of all the batch's tokens: an array per paragraph costs more than its tokens
        tokens = np.fromiter(chain.from_iterable(ids), self.token_dtype, sum(lengths))
        return Encoded(tokens, np.array(lengths, dtype=np.int64),
                       [{"key": key, "bytes": len(text) if text.isascii() else len(text.encode())}
                        for key, text in zip(records.keys, texts)])

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
    def make(inputs: list, root: Path, out: Path) -> TextCodec:
        if tokenizer:
            codec = TextCodec.load(tokenizer, settings["eos_token"])
        else:
            def texts():
                seen = 0
                for i in np.random.default_rng(0).permutation(len(inputs)):
                    try:
                        if isinstance(inputs[i], str):
                            require_regular_file(inputs[i])  # a FIFO would block
                        for records in read_text(readable(inputs[i]), root, settings["sample_by"],
                                                 settings["text_field"]):
                            for key, text, skip in zip(records.keys, records.values,
                                                       records.skips or repeat(None)):
                                if skip is None and split_of(key, settings["val_fraction"]) == "train":
                                    yield text
                                    seen += len(text)
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
