"""Training and evaluation read shards from a real S3 API on 127.0.0.1: 2 DeepSpeed ranks (each
with a DataLoader worker of its own), SIGKILL after a checkpoint, an exact resume, and eval
from the store scoring what it scores from a local copy of the same shards."""

import json
import os
import signal
import subprocess
import time

import fsspec
import pytest

from tests.conftest import arpipe, deepspeed_command, read_metrics
from tests.s3.conftest import BUCKET

pytestmark = pytest.mark.slow
STEPS = 16


def test_training_from_s3_resumes_exactly_and_eval_equals_local(s3, tmp_path, text_shards):
    fsspec.filesystem("s3").put(str(text_shards), f"{BUCKET}/train-text", recursive=True)
    url = s3.url("train-text")
    config = tmp_path / "config.yaml"
    config.write_text(f"""
data: {{path: "{url}", block_len: 32, batch_size: 4, num_workers: 1}}
model: {{name: gpt, n_layer: 2, n_head: 2, d_model: 32}}
optim: {{lr: 3.0e-3, warmup_steps: 5}}
train: {{steps: {STEPS}, log_every: 4, ckpt_every: 4, zero_stage: 2}}
tracking: {{uri: "sqlite:///{tmp_path / 'mlflow.db'}", experiment: test}}
""")

    def train(out, wait=True):
        command = deepspeed_command(2, "--config", config, f"out_dir={out}")
        if wait:
            result = subprocess.run(command, env=s3.process_env, capture_output=True, text=True, timeout=600)
            assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
            return None
        return subprocess.Popen(command, env=s3.process_env, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    since = s3.mark()
    train(tmp_path / "reference")
    expected = [m["loss"] for m in read_metrics(tmp_path / "reference")]
    assert len(expected) == STEPS
    assert any(method == "GET" and path.startswith(f"/{BUCKET}/train-text/train/") for method, path in
               s3.requests(since))  # the tars came from the store

    killed = tmp_path / "killed"
    proc = train(killed, wait=False)
    deadline = time.time() + 300
    while not (killed / "checkpoints" / "latest").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 4 <= len(read_metrics(killed)) < STEPS, "the kill must land after the first checkpoint, before the end"
    train(killed)
    assert [m["loss"] for m in read_metrics(killed)] == expected  # bitwise: the same floats
    assert json.loads((killed / "export" / "model.json").read_text())["data"] == url

    results = {}
    for name, data in (("s3", url), ("local", text_shards)):
        out = tmp_path / f"eval-{name}.json"
        arpipe("eval", "--model", killed, "--data", data, "--out", out, "--samples", 1, "--prompts", 1,
               env=s3.process_env)
        results[name] = json.loads(out.read_text())
    assert results["s3"]["tokens"] == results["local"]["tokens"] > 0
    assert results["s3"]["nats"] == results["local"]["nats"]
    assert results["s3"]["bits_per_byte"] == results["local"]["bits_per_byte"]
