"""A classic model on real multi-process DeepSpeed: MADE trained order-agnostically (a new random
ordering every minibatch) on 2 processes, then `arpipe eval` scores the 3-ordering ensemble
exactly (nats per image) and writes its samples and completions."""

import json
import math
import subprocess

import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from tests.conftest import ENV, REPO, arpipe, deepspeed_command, read_metrics

pytestmark = pytest.mark.slow
DIGITS = REPO / "pipeline" / "bundled" / "digits.npz"


def test_order_agnostic_made_trains_on_two_processes_and_evaluates_as_an_ensemble(tmp_path):
    shards = tmp_path / "digits"
    arpipe("shard", "image", "--input", DIGITS, "--out", shards, "--levels", "2", "--val-fraction", "0.1")
    config = tmp_path / "made.yaml"
    config.write_text(f"""
out_dir: {tmp_path / 'run'}
data: {{path: {shards}, batch_size: 16}}
model: {{name: made, hidden: [64, 64], orderings: 3, train_orderings: random}}
optim: {{lr: 1.0e-2, warmup_steps: 2, weight_decay: 0.0}}
train: {{steps: 40, zero_stage: 2, log_every: 5, ckpt_every: 40, eval_every: 20}}
tracking: {{uri: "sqlite:///{tmp_path / 'mlflow.db'}", experiment: test}}
""")
    result = subprocess.run(deepspeed_command(2, "--config", config), env=ENV, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    losses = [m["loss"] for m in read_metrics(tmp_path / "run")]
    assert len(losses) == 40 and sum(losses[-5:]) < sum(losses[:5])

    out = tmp_path / "eval.json"
    arpipe("eval", "--model", tmp_path / "run", "--data", shards, "--out", out, "--samples", 4, "--prompts", 2)
    r = json.loads(out.read_text())
    items = json.loads((shards / "manifest.json").read_text())["splits"]["val"]["items"]
    assert r["items"] == items and r["dims"] == 64 * items
    assert r["nats_per_item"] == pytest.approx(r["nats"] / items)
    assert r["bits_per_dim"] == pytest.approx(r["nats"] / (r["dims"] * math.log(2)))
    # a fair coin per pixel needs 64 ln 2 = 44.4 nats per image; these 40 steps reached 27.6
    assert 0 < r["nats_per_item"] < 31
    client = MlflowClient(r["tracking_uri"])
    run = client.get_run(r["run_id"])
    assert run.data.metrics["val/nats_per_item"] == pytest.approx(r["nats_per_item"])
    assert run.data.tags["orderings"] == "3" and run.data.tags["train_orderings"] == "random"
    folder = "samples/val-step00000040"
    grid = Image.open(client.download_artifacts(r["run_id"], f"{folder}/completions.png", str(tmp_path)))
    assert grid.size == (2 + 4 * 66, 2 + 66)  # one row of 2 completions, each with its map of given pixels
