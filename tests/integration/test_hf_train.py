"""train.init_from through the real trainer: the first step's loss is the source model's loss on
the same batch, and a resumed run continues from its checkpoint, not from init_from."""

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.data.shards import Shards
from pipeline.data.stream import Batches, TokenStream
from pipeline.export import load_export
from tests.conftest import arpipe, read_metrics
from tests.unit.test_hf import random_export

pytestmark = pytest.mark.slow


def first_batch(shards_dir) -> torch.Tensor:
    """The batch the trainer of `train_config` (block_len 32, batch 4, seed 0, one rank) takes first."""
    return next(Batches(TokenStream(Shards(shards_dir), "train", 32, 4, seed=0)))


def test_fine_tune_an_export_then_resume(tmp_path, train_config, text_shards):
    export = random_export(tmp_path / "export", text_shards, block_len=32)
    run = tmp_path / "fine-tuned"
    arpipe("train", "--config", train_config, f"out_dir={run}", f"train.init_from={export}", "train.steps=2",
           "train.ckpt_every=1")
    model, _, _ = load_export(export)
    with torch.no_grad():
        expected = model.token_nll(first_batch(text_shards)).mean().item()
    assert abs(expected - math.log(512)) > 0.5  # far from a fresh model's loss, so the check can fail
    assert read_metrics(run)[0]["loss"] == pytest.approx(expected, abs=1e-5)

    # resumed: the checkpoint wins; an init_from that would be refused (another shape) is not read
    other = random_export(tmp_path / "other", text_shards,
                          cfg={"name": "gpt", "n_layer": 1, "n_head": 2, "d_model": 32})
    arpipe("train", "--config", train_config, f"out_dir={run}", f"train.init_from={other}", "train.steps=3")
    assert [m["step"] for m in read_metrics(run)] == [1, 2, 3]


def test_fine_tune_a_transformers_gpt2(tmp_path, train_config, text_shards):
    from transformers import GPT2Config, GPT2LMHeadModel

    codec = Shards(text_shards).codec
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=codec.vocab_size, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                                    activation_function="gelu", bos_token_id=codec.eos_id,
                                    eos_token_id=codec.eos_id)).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    hf.save_pretrained(tmp_path / "gpt2")
    codec.save(tmp_path / "gpt2")  # its tokenizer.json: the vocabularies are compared token by token
    run = tmp_path / "fine-tuned"
    arpipe("train", "--config", train_config, f"out_dir={run}", f"train.init_from={tmp_path / 'gpt2'}", "train.steps=1")
    x = first_batch(text_shards)
    with torch.no_grad():  # HF reads BOS, then each row but its last token
        logits = hf(torch.cat([torch.full((len(x), 1), codec.eos_id), x[:, :-1]], 1)).logits
    expected = F.cross_entropy(logits.flatten(0, 1), x.flatten()).item()
    assert abs(expected - math.log(512)) > 0.5
    assert read_metrics(run)[0]["loss"] == pytest.approx(expected, abs=1e-5)
