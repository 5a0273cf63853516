"""Weighted mixtures of shard sets (data.mixture): proportions, separate epochs, exact resume,
another world size, one codec, and evaluation per source and overall."""

import json
import math
import shutil

import numpy as np
import pytest
import torch

from pipeline import ArpipeError
from pipeline.cli import run as cli
from pipeline.config import validate
from pipeline.data.shards import Shards
from pipeline.data.stream import Batches, Source, TokenStream, initial_state
from pipeline.eval.nll import evaluate_nll, evaluate_sources, headline
from tests.unit.test_audio import one_thread  # noqa: F401 (autouse: one intra-op thread)
from tests.unit.test_model_contract import tiny


@pytest.fixture(scope="module")
def small_shards(tmp_path_factory, text_shards):
    """Other documents, sharded with text_shards' tokenizer: the same codec, 40% of the tokens."""
    import pydoc_data.topics

    root = tmp_path_factory.mktemp("small")
    (root / "in").mkdir()
    for name, text in sorted(pydoc_data.topics.topics.items())[60:90]:
        (root / "in" / f"{name}.txt").write_text(text)
    cli(["shard", "text", "--input", str(root / "in"), "--out", str(root / "shards"), "--tokenizer",
         str(text_shards / "tokenizer.json"), "--val-fraction", "0.3", "--chunk-mb", "0.02"])
    return root / "shards"


def mixture(big, small, weights=(0.7, 0.3), **kw):
    kw = {"block_len": 32, "batch_size": 8, "seed": 0, **kw}
    return TokenStream([Shards(big), Shards(small)], "train", kw.pop("block_len"), kw.pop("batch_size"),
                       weights=list(weights), **kw)


def test_rows_come_from_each_source_by_weight_and_epochs_are_per_source(text_shards, small_shards):
    """Each mixture row is the next row of one source's own stream (read alone), the counts
    stay within one row of the weights at every prefix, and the small source starts its second
    epoch while the large one reads on through its first."""
    s = mixture(text_shards, small_shards)
    alone = [Source(Shards(text_shards), "train", 32, seed=[0], shuffle_window=8).rows(0, 1, initial_state()),
             Source(Shards(small_shards), "train", 32, seed=[0, 1], shuffle_window=8).rows(0, 1, initial_state())]
    expected = [next(alone[0])[0], next(alone[1])[0]]
    taken = [0, 0]
    batches = Batches(s)
    for _ in range(650):  # 5200 rows: the small source holds ≈ 1500, the large ≈ 3700
        for row in next(batches).numpy():
            source = [np.array_equal(row, e) for e in expected].index(True)
            taken[source] += 1
            expected[source] = next(alone[source])[0]
            k = sum(taken)
            assert abs(taken[0] - 0.7 * k) < 1 and abs(taken[1] - 0.3 * k) < 1, (k, taken)
    big, small = s.states[0]
    assert small["epoch"] >= 1 and big["epoch"] == 0, (big, small)
    assert [big["rows"], small["rows"]] == taken


@pytest.mark.parametrize("workers", [0, 2])
def test_a_mixture_resumes_exactly(text_shards, small_shards, workers):
    reference = Batches(mixture(text_shards, small_shards, num_workers=workers))
    expected = [next(reference) for _ in range(60)]
    first = Batches(mixture(text_shards, small_shards, num_workers=workers))
    for _ in range(23):
        next(first)
    state = json.loads(json.dumps(first.state_dict()))
    resumed = Batches(mixture(text_shards, small_shards, num_workers=workers))
    resumed.load_state_dict([state], rank=0)
    for a, b in zip(expected[23:], (next(resumed) for _ in range(37))):
        assert torch.equal(a, b)


def test_a_mixture_continues_on_another_world_size(text_shards, small_shards):
    """2 ranks stop mid-epoch; 3 ranks finish each source's epoch on the chunks the old parts
    had not fully read (the small source's few chunks by token ranges): with those read before,
    every chunk of each source once."""
    old = [Batches(mixture(text_shards, small_shards, rank=r, world=2, shuffle_window=2, batch_size=64))
           for r in range(2)]
    for batches in old:
        for _ in range(40):
            next(batches)
    saved = [json.loads(json.dumps(b.state_dict())) for b in old]
    new = [Batches(mixture(text_shards, small_shards, rank=r, world=3, shuffle_window=2, batch_size=64))
           for r in range(3)]
    for r, batches in enumerate(new):
        batches.load_state_dict(saved, rank=r)
    for i in range(2):
        sources = [b.stream.sources[i] for b in new]
        done = sources[0].done
        assert all(s.done == done for s in sources) and done["chunks"]
        ranges = sorted(u for r, s in enumerate(sources) for u in s.units(done["epoch"], r, 3))
        remaining = sorted({c for c, _, _ in ranges})
        assert sorted(remaining + done["chunks"]) == list(range(len(sources[0].chunks)))
        for c in remaining:  # the new parts' ranges of a chunk tile it: each token once
            ends = [edge for d, lo, hi in ranges if d == c for edge in (lo, hi)]
            assert ends[0] == 0 and ends[-1] == sources[0].sizes[c] and ends[1:-1:2] == ends[2:-1:2]
    assert all(next(b).shape == (64, 32) for b in new)
    with pytest.raises(ArpipeError, match="does not have this run's 1 source"):
        Batches(TokenStream(Shards(text_shards), "train", 32, 8, seed=0)).load_state_dict(saved, rank=0)
    before_mixtures = [{**s, "workers": [states[0] for states in s["workers"]]} for s in saved]
    with pytest.raises(ArpipeError, match="an arpipe before mixtures"):
        Batches(TokenStream(Shards(text_shards), "train", 32, 8, seed=0)).load_state_dict(before_mixtures, rank=0)


def test_sources_must_share_a_codec(tmp_path, text_shards):
    other = shutil.copytree(text_shards, tmp_path / "other")
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["codec"]["tokenizer_sha256"] = "0" * 64
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArpipeError, match=f"{text_shards} and {other} were sharded with different codecs"):
        mixture(text_shards, other)


def test_mixture_config_is_checked():
    base = {"out_dir": "o", "data": {"mixture": [{"path": "a/web", "weight": 3}, {"path": "b/code", "weight": 1}]}}
    assert validate(base, "c.yaml").data.sources() == [("web", "a/web", 3.0), ("code", "b/code", 1.0)]
    assert validate({"out_dir": "o", "data": {"path": "a/web"}}, "c.yaml").data.sources() == [("web", "a/web", 1.0)]
    bad = [({"path": "x", "mixture": base["data"]["mixture"]}, "give either data.path or data.mixture"),
           ({}, "give either data.path or data.mixture"),
           ({"mixture": [{"path": "a/web", "weight": 1}, {"path": "b/web", "weight": 1}]}, "must differ"),
           ({"mixture": [{"path": "a/web", "weight": 0}]}, r"data.mixture.0.weight: Input should be greater than 0")]
    for data, message in bad:
        with pytest.raises(ArpipeError, match=message):
            validate({"out_dir": "o", "data": data}, "c.yaml")


def test_eval_reports_each_source_and_all_together(text_shards, small_shards):
    model = tiny("gpt", vocab=512)
    sources = {"big": Shards(text_shards), "small": Shards(small_shards)}
    result = evaluate_sources(model, sources, "val", 8, 64, stride=4)
    alone = {name: evaluate_nll(model, shards, "val", 8, 64, stride=4) for name, shards in sources.items()}
    assert result["sources"] == alone
    for key in ("nats", "nats_sliding", "tokens", "bytes"):
        assert result[key] == alone["big"][key] + alone["small"][key]
    assert result["bits_per_token"] == pytest.approx(result["nats"] / result["tokens"] / math.log(2))
    assert result["bits_per_byte_sliding"] == pytest.approx(result["nats_sliding"] / math.log(2) / result["bytes"])
    metrics = headline(result)
    assert metrics["small/bits_per_byte"] == alone["small"]["bits_per_byte"]
    assert metrics["bits_per_byte"] == result["bits_per_byte"]
    one = evaluate_sources(model, {"big": sources["big"]}, "val", 8, 64)
    assert one == evaluate_nll(model, sources["big"], "val", 8, 64)  # one source: its figures alone
