"""Exact evaluation with sliding windows (`arpipe eval --stride`): a normalised distribution,
the block figure at stride = block_len, better figures with more context, refusals."""

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline import ArpipeError
from pipeline.data.shards import Shards
from pipeline.data.stream import Batches, TokenStream, pack_items, window_rows
from pipeline.eval.nll import evaluate_nll
from pipeline.models import build_model
from tests.unit.test_audio import one_thread  # noqa: F401 (autouse: one intra-op thread)
from tests.unit.test_model_contract import FAMILIES, tiny
from tests.unit.test_multi import multi, sources  # noqa: F401 (fixtures)
from tests.unit.test_stream import digit_shards  # noqa: F401 (a fixture)


def sliding_log_prob(model, sequences: torch.Tensor, stride: int) -> torch.Tensor:
    """log p(sequence) of equally long sequences under the sliding-window model, from the windows
    eval scores."""
    windows = [next(window_rows(sequence, model.num_vars, stride, 100)) for sequence in sequences.numpy()]
    rows, mask = (torch.from_numpy(np.stack(w)) for w in zip(*windows))  # (sequences, windows, T)
    nll = model.token_nll(rows.flatten(0, 1).long()).double().view(rows.shape)
    return -(nll * mask).sum((1, 2))


@pytest.mark.parametrize("name", ["gpt", "llama", "gru", "wavenet", "fvsbn"])
@pytest.mark.parametrize("stride", [1, 2])
def test_the_sliding_window_model_is_normalised(name, stride):
    """A window of 3 slid over sequences of 7: each conditional depends on earlier tokens only,
    so the product over all 3^7 sequences sums to 1, and it is another model than blocks."""
    model = tiny(name, vocab=3, shape=(3,))
    everything = torch.tensor(list(itertools.product(range(3), repeat=7)))
    with torch.no_grad():
        sliding = sliding_log_prob(model, everything, stride)
        blocks = sliding_log_prob(model, everything, 3)
    assert sliding.exp().sum().item() == pytest.approx(1.0, abs=1e-6)
    assert blocks.exp().sum().item() == pytest.approx(1.0, abs=1e-6)
    assert (sliding - blocks).abs().max() > 1e-3


@pytest.fixture(scope="module")
def trained(text_shards):
    """A tiny GPT trained on the training split (a plain loop) long enough to use some context."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_model({"name": "gpt", "n_layer": 2, "n_head": 2, "d_model": 32}, 512, (32,))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batches = Batches(TokenStream(Shards(text_shards), "train", 32, 16, seed=0))
    for _ in range(600):
        x = next(batches)
        loss = F.cross_entropy(model(x).flatten(0, 1), x.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    torch.set_num_threads(threads)
    return model.eval()


def test_stride_of_block_len_is_the_block_figure_and_shorter_strides_do_better(text_shards, trained):
    shards = Shards(text_shards)
    T = 32
    reference = 0.0  # consecutive blocks of each chunk's items, each block on its own
    for shard, entry in shards.chunks("val"):
        tokens, offsets = shards.read_chunk(shard, entry["key"])
        packed = torch.from_numpy(pack_items(tokens, offsets[:-1], np.diff(offsets), shards.codec.eos_id)).long()
        for start in range(0, len(packed), T):
            block = packed[start : start + T]
            with torch.no_grad():
                nll = trained.token_nll(F.pad(block, (0, T - len(block)))[None]).double()
            reference += nll[0, : len(block)].sum().item()
    blocks = evaluate_nll(trained, shards, "val", T, 8)
    assert blocks["nats"] == pytest.approx(reference, rel=1e-6)
    assert "nats_sliding" not in blocks
    same = evaluate_nll(trained, shards, "val", T, 8, stride=T)
    assert same["nats_sliding"] == same["nats"] == blocks["nats"]
    assert same["bits_per_byte_sliding"] == blocks["bits_per_byte"]
    sliding = evaluate_nll(trained, shards, "val", T, 8, stride=8)
    assert sliding["tokens"] == blocks["tokens"] and sliding["nats"] == blocks["nats"]
    # at least 24 tokens of context for every token past the first window of each chunk
    assert sliding["bits_per_byte_sliding"] < blocks["bits_per_byte"] - 0.01  # measured: 2.919 against 2.957


def test_stride_is_refused_where_nothing_slides(digit_shards, text_shards):  # noqa: F811
    shards = Shards(digit_shards)
    for name in ("pixelcnn-gated-grey", "made", "gpt"):  # images are scored whole, by any model
        cfg, _, _ = FAMILIES[name]
        model = build_model(cfg, shards.codec.vocab_size, shards.codec.model_shape(0))
        with pytest.raises(ArpipeError, match="no window to slide; leave the stride out"):
            evaluate_nll(model, shards, "val", 0, 16, stride=4)
    text = Shards(text_shards)
    with pytest.raises(ArpipeError, match="must be from 1 to the model's block_len, 8"):
        evaluate_nll(tiny("gpt", vocab=512), text, "val", 8, 16, stride=9)


def test_a_multimodal_model_is_scored_per_modality_in_sliding_windows_too(multi):  # noqa: F811
    """Each scored variable of a window is counted for its own modality (a window's first
    position, its context, never needs the token before it): the same variables per modality as
    in blocks, whose nats add up to the sliding total; stride = block_len repeats the blocks."""
    shards = Shards(multi)
    torch.manual_seed(0)
    model = build_model({"name": "gpt", "n_layer": 1, "n_head": 2, "d_model": 16}, shards.codec.vocab_size, (32,))
    blocks = evaluate_nll(model, shards, "val", 32, 8)
    sliding = evaluate_nll(model, shards, "val", 32, 8, stride=5)
    units = (("text", "byte"), ("image", "dim"), ("audio", "sample"))
    for name, unit in units:
        for count in (f"{unit}s_{name}", f"items_{name}"):
            assert sliding[count] == blocks[count]
    parts = sum(sliding[f"nats_per_{unit}_sliding"] * sliding[f"{unit}s_{name}"] for name, unit in units)
    assert parts == pytest.approx(sliding["nats_sliding"], rel=1e-9)
    same = evaluate_nll(model, shards, "val", 32, 8, stride=32)
    assert all(same[f"bits_per_{unit}_sliding"] == blocks[f"bits_per_{unit}"] for _, unit in units)
