"""A weighted mixture of two shard sets trained on 2 DeepSpeed processes, evaluated per source and
overall, with sliding windows, during training and by `arpipe eval`."""

import json
import math
import subprocess

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import ENV, arpipe, deepspeed_command

pytestmark = pytest.mark.slow


def test_a_mixture_trains_and_evaluates_each_source(tmp_path, text_shards):
    import pydoc_data.topics

    (tmp_path / "more").mkdir()
    for name, text in sorted(pydoc_data.topics.topics.items())[60:90]:
        (tmp_path / "more" / f"{name}.txt").write_text(text)
    more = tmp_path / "more-shards"
    arpipe("shard", "text", "--input", tmp_path / "more", "--out", more, "--tokenizer",
           text_shards / "tokenizer.json", "--val-fraction", "0.3", "--chunk-mb", "0.02")
    config = tmp_path / "config.yaml"
    config.write_text(f"""
out_dir: {tmp_path / 'run'}
data:
  mixture: [{{path: {text_shards}, weight: 3, name: docs}}, {{path: {more}, weight: 1}}]
  block_len: 32
  batch_size: 4
model: {{name: gpt, n_layer: 2, n_head: 2, d_model: 32}}
optim: {{lr: 3.0e-3, warmup_steps: 5}}
train: {{steps: 10, log_every: 5, ckpt_every: 10, eval_every: 5, zero_stage: 2}}
eval: {{stride: 8}}
tracking: {{uri: "sqlite:///{tmp_path / 'mlflow.db'}", experiment: mixture}}
""")
    result = subprocess.run(deepspeed_command(2, "--config", config), env=ENV, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-5000:]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = client.search_runs([client.get_experiment_by_name("mixture").experiment_id])[0].info.run_id
    final = {}
    for name in ("docs", "more-shards"):  # unnamed sources are named by their directories
        for rate in ("bits_per_byte", "bits_per_byte_sliding"):
            history = client.get_metric_history(run_id, f"val/{name}/{rate}")
            assert [m.step for m in history] == [5, 10]
            final[name, rate] = history[-1].value
    overall = client.get_run(run_id).data.metrics["val/bits_per_byte"]
    artifacts = {a.path for a in client.list_artifacts(run_id, "data")}
    assert artifacts == {"data/docs", "data/more-shards"}

    out = tmp_path / "eval.json"
    printed = arpipe("eval", "--model", tmp_path / "run", "--data", text_shards, more, "--stride", 8, "--out", out,
                     "--samples", 0, "--prompts", 0).stdout
    evaluation = json.loads(out.read_text())
    assert evaluation["run_id"] == run_id
    assert set(evaluation["sources"]) == {text_shards.name, "more-shards"}
    assert f"val {text_shards.name}: " in printed and "val more-shards: " in printed
    assert "bits/byte sliding" in printed
    per_source = evaluation["sources"].values()
    assert evaluation["bits_per_byte_sliding"] == pytest.approx(
        sum(r["nats_sliding"] for r in per_source) / math.log(2) / sum(r["bytes"] for r in per_source))
    for name, source in (("docs", text_shards.name), ("more-shards", "more-shards")):  # the same model and data
        for rate in ("bits_per_byte", "bits_per_byte_sliding"):
            assert evaluation["sources"][source][rate] == pytest.approx(final[name, rate], rel=1e-5)
    assert evaluation["bits_per_byte"] == pytest.approx(overall, rel=1e-5)
