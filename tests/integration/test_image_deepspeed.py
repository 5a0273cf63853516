"""Images on real multi-process DeepSpeed: a PixelCNN trains on 2 processes and `arpipe eval`
reports finite bits/dim with PNG samples in MLflow; a recipe compares orderings in one parent run."""

import json
import math
import re
import subprocess

import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from tests.conftest import ENV, REPO, arpipe, deepspeed_command, read_metrics

pytestmark = pytest.mark.slow
DIGITS = REPO / "pipeline" / "bundled" / "digits.npz"


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    out = tmp_path_factory.mktemp("images") / "digits"
    arpipe("shard", "image", "--input", DIGITS, "--out", out, "--levels", "17", "--val-fraction", "0.1")
    return out


def test_pixelcnn_trains_on_two_processes_and_eval_reports_bits_per_dim(tmp_path, digits):
    config = tmp_path / "pixelcnn.yaml"
    config.write_text(f"""
out_dir: {tmp_path / 'run'}
data: {{path: {digits}, batch_size: 16}}
model: {{name: pixelcnn, n_layer: 2, hidden: 8, head: 16, first_kernel: 3}}
optim: {{lr: 1.0e-2, warmup_steps: 2, weight_decay: 0.0}}
train: {{steps: 30, zero_stage: 2, log_every: 5, ckpt_every: 30}}
tracking: {{uri: "sqlite:///{tmp_path / 'mlflow.db'}", experiment: test}}
""")
    result = subprocess.run(deepspeed_command(2, "--config", config), env=ENV, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    losses = [m["loss"] for m in read_metrics(tmp_path / "run")]
    assert len(losses) == 30 and losses[-1] < losses[0]

    out = tmp_path / "eval.json"
    arpipe("eval", "--model", tmp_path / "run", "--data", digits, "--out", out, "--samples", 4, "--prompts", 2)
    r = json.loads(out.read_text())
    manifest = json.loads((digits / "manifest.json").read_text())
    assert r["dims"] == 64 * manifest["splits"]["val"]["items"]
    assert r["bits_per_dim"] == pytest.approx(r["nats"] / (r["dims"] * math.log(2)))
    # a uniform code over the 17 levels needs 4.09 bits/dim; these 30 steps reached 2.82
    assert 0 < r["bits_per_dim"] < 3.1
    client = MlflowClient(r["tracking_uri"])
    assert client.get_run(r["run_id"]).data.metrics["val/bits_per_dim"] == pytest.approx(r["bits_per_dim"])
    folder = "samples/val-step00000030"
    assert [a.path for a in client.list_artifacts(r["run_id"], folder)] == [f"{folder}/completions.png",
                                                                           f"{folder}/samples.png"]
    grid = Image.open(client.download_artifacts(r["run_id"], f"{folder}/samples.png", str(tmp_path)))
    assert grid.mode == "RGB" and grid.size == (2 + 2 * 66, 2 + 2 * 66)  # 2×2 cells of 8×8 pixels ×8, 2 px gaps


def test_recipe_compares_orderings_in_one_parent_run(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"""
name: test-orderings
question: Does the ordering matter?
metric: bits_per_dim
shard: {{modality: image, args: [--input, {DIGITS}, --levels, "17"]}}
config: configs/image-gpt.yaml
overrides: [model.n_layer=1, model.n_head=2, model.d_model=16, model.dropout=0.0, data.batch_size=8,
            optim.lr=1.0e-2, optim.min_lr=1.0e-3, optim.warmup_steps=2, data.num_workers=0, train.steps=40,
            train.precision=fp32, train.zero_stage=0, train.eval_every=0, train.ckpt_every=40,
            "tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", tracking.experiment=recipes]
eval: {{samples: 1, prompts: 1}}
variants:
  raster: {{shard: [--ordering, raster]}}
  column: {{shard: [--ordering, column]}}
""")
    result = arpipe("recipe", recipe, "--out", tmp_path / "out")
    rows = json.loads((tmp_path / "out" / "table.json").read_text())
    assert [r["variant"] for r in rows] == ["raster", "column"]
    # uniform over 17 levels: 4.09 bits/dim; 40 steps reached 2.41 (raster) and 2.33 (column)
    assert all(0 < r["bits_per_dim"] < 2.8 for r in rows)
    parent = re.search(r"MLflow parent run (\w+)", result.stdout)[1]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(parent)
    assert run.info.status == "FINISHED"
    assert run.data.metrics == {f"bits_per_dim/{r['variant']}": pytest.approx(r["bits_per_dim"]) for r in rows}
    assert {a.path for a in client.list_artifacts(parent)} == {"recipe.yaml", "table.md", "table.json"}
    for r in rows:  # each variant's own run (training + eval) is nested under the recipe's
        child = client.get_run(r["run_id"])
        assert child.data.tags["mlflow.parentRunId"] == parent and "val/bits_per_dim" in child.data.metrics
        assert child.info.run_name == f"test-orderings · {r['variant']}"
        codec = json.loads((tmp_path / "out" / r["variant"] / "export" / "codec.json").read_text())
        assert codec["ordering"] == r["variant"]
