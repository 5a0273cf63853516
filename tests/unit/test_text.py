"""The text codec's token ids: ASCII text takes arpipe's own split and a cache of the model's ids,
which must give exactly what the tokenizer's encode_batch_fast gives."""

import itertools
import os
import random
from pathlib import Path

import pytest
from tokenizers import Tokenizer, pre_tokenizers

from pipeline.codecs.text import EOS, AsciiTokenizer, TextCodec
from tests.conftest import write_corpus

ASCII = [chr(c) for c in range(128)]
# one character of each class GPT-2's pattern tells apart, and the letters of its contractions
CLASSES = list("aZ09 \t\n\x0b\x0c\r\x1c\x1f\x00\x7f'.-_sStTrvmldD")


def tokenizer_ids(tokenizer: Tokenizer, texts: list[str]) -> list[list[int]]:
    return [e.ids for e in tokenizer.encode_batch_fast(texts, add_special_tokens=False)]


@pytest.fixture(scope="module")
def documents(tmp_path_factory) -> list[str]:
    """CPython's pydoc topics (English and reStructuredText, some of it not ASCII) and stdlib modules."""
    topics = sorted(write_corpus(tmp_path_factory.mktemp("corpus"), 100).glob("*.txt"))
    modules = sorted(Path(os.__file__).parent.glob("*.py"))[:60]
    return [p.read_text(encoding="utf-8") for p in topics + modules]


@pytest.fixture(scope="module")
def codec(documents) -> TextCodec:
    return TextCodec.train(documents, 512)


def ascii_strings() -> list[str]:
    rng = random.Random(0)
    return (ASCII + ["".join(pair) for pair in itertools.product(ASCII, repeat=2)]
            + ["".join(triple) for triple in itertools.product(CLASSES, repeat=3)]
            + ["".join(rng.choices(CLASSES, k=rng.randint(4, 40))) for _ in range(20_000)]
            + ["", f"one{EOS}two", "It's   we'LL\t\tgo'd  \n\n  'sx", " " * 200 + "-" * 100 + "x" * 300])


def test_ascii_text_gets_the_tokenizers_own_ids(codec, documents):
    assert codec.ascii is not None  # arpipe's tokenizers take the ASCII path
    texts = ascii_strings() + [d for d in documents if d.isascii()]
    assert len(texts) > 58_000 and sum(map(len, texts)) > 1_500_000
    assert codec.token_ids(texts) == tokenizer_ids(codec.tokenizer, texts)


def test_a_full_piece_cache_starts_over_and_gives_the_same_ids(codec, documents, monkeypatch):
    monkeypatch.setattr(AsciiTokenizer, "CACHE_PIECES", 50)
    fresh = AsciiTokenizer.of(codec.tokenizer)
    texts = [d for d in documents if d.isascii()][:40]
    assert [fresh.ids(t) for t in texts] == tokenizer_ids(codec.tokenizer, texts)
    assert 0 < len(fresh.cache) <= 50


def test_a_batch_mixing_ascii_and_other_text_keeps_its_order(codec):
    texts = ["plain", "café naïve", "", "Ωμέγα 中文 😀", "more plain text", "x\u00a0y"] * 3
    assert codec.token_ids(texts) == tokenizer_ids(codec.tokenizer, texts)


def test_tokenizers_of_another_shape_use_their_own_encode(codec, documents):
    other = Tokenizer.from_str(codec.tokenizer.to_str())
    other.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)  # a space before each document
    prefixed = TextCodec(other)
    assert prefixed.ascii is None
    texts = documents[:20] + ["word", "two words"]
    assert prefixed.token_ids(texts) == tokenizer_ids(other, texts) != codec.token_ids(texts)


def test_truncation_and_padding_in_a_tokenizer_file_are_ignored(codec, documents):
    tokenizer = Tokenizer.from_str(codec.tokenizer.to_str())
    whole = tokenizer_ids(tokenizer, documents[:3])
    tokenizer.enable_truncation(8)
    tokenizer.enable_padding(length=16)
    assert len(tokenizer.encode(documents[0]).ids) == 16  # what such a file would make of a document
    assert TextCodec(tokenizer).token_ids(documents[:3]) == whole
