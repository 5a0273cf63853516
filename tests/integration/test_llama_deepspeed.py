"""Llama through the real trainer: 2 DeepSpeed processes with ZeRO-3, whose module hooks gather
the weights for the chunked loss (forward(x, loss=True)) and again for the blocks that activation
checkpointing recomputes in the backward pass."""

import subprocess

import pytest
import yaml

from tests.conftest import ENV, arpipe, deepspeed_command, read_metrics

pytestmark = pytest.mark.slow
LLAMA = ["model.name=llama", "model.n_layer=2", "model.n_head=4", "model.n_kv_head=2", "model.d_model=32",
         "model.tie_embeddings=false"]


def test_llama_under_zero3_trains_identically_with_activation_checkpointing(tmp_path, train_config):
    losses = {}
    for on in (False, True):
        out = tmp_path / f"checkpointing-{on}"
        command = deepspeed_command(2, "--config", train_config, *LLAMA, "train.zero_stage=3", "train.steps=8",
                                    f"train.activation_checkpointing={str(on).lower()}", f"out_dir={out}")
        result = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
        losses[on] = [m["loss"] for m in read_metrics(out)]
    assert len(losses[True]) == 8 and losses[True] == losses[False]  # bitwise: the same floats
    assert losses[True][-1] < losses[True][0]
    result = arpipe("sample", "--model", tmp_path / "checkpointing-True", "--length", 80, "--stride", 8, "-n", 1)
    assert result.stdout.strip()  # text beyond the 32-token context


def test_a_model_without_blocks_refuses_activation_checkpointing_at_start(tmp_path, train_config):
    config = yaml.safe_load(train_config.read_text())
    config["model"] = {"name": "gru", "n_layer": 1, "d_model": 16}
    (tmp_path / "gru.yaml").write_text(yaml.safe_dump(config))
    result = arpipe("train", "--config", tmp_path / "gru.yaml", "train.activation_checkpointing=true", check=False)
    assert result.returncode == 2
    assert "train.activation_checkpointing: GRU has no blocks whose activations are worth recomputing" in result.stderr
