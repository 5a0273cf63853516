"""Audio end to end: shard sound files, train WaveNet on 2 DeepSpeed processes, `arpipe eval`
its export into the training's MLflow run with bits/sample and playable WAV samples."""

import json
import math
import subprocess

import numpy as np
import pytest
import soundfile as sf
from mlflow.tracking import MlflowClient

from pipeline.codecs.audio import AudioCodec
from pipeline.data.shards import Shards
from pipeline.eval.samples import validation_prompts
from tests.conftest import ENV, arpipe, deepspeed_command

pytestmark = pytest.mark.slow


def test_wavenet_trains_on_two_processes_and_eval_writes_wavs(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "in").mkdir()
    for i in range(12):  # one-second chords at 11.025 kHz, resampled to 8 kHz by the shard stage
        t = np.arange(11025) / 11025
        wave = sum(0.2 * np.sin(2 * np.pi * f * t) for f in rng.uniform(100, 1500, 3))
        sf.write(tmp_path / "in" / f"chord-{i:02d}.wav", wave.astype(np.float32), 11025)
    shards = tmp_path / "shards"
    arpipe("shard", "audio", "--input", tmp_path / "in", "--out", shards, "--sample-rate", 8000,
           "--val-fraction", 0.25, "--chunk-mb", 0.01, "--workers", 2)
    config = tmp_path / "config.yaml"
    config.write_text(f"""
out_dir: {tmp_path / 'run'}
data: {{path: {shards}, block_len: 48, batch_size: 4}}  # receptive field 16 + 32 targets
model: {{name: wavenet, stacks: 1, layers_per_stack: 4, residual_channels: 16, gate_channels: 16, skip_channels: 32}}
optim: {{lr: 1.0e-2, warmup_steps: 2}}
train: {{steps: 300, log_every: 100, zero_stage: 2}}
tracking: {{uri: "sqlite:///{tmp_path / 'mlflow.db'}", experiment: test}}
""")
    train = subprocess.run(deepspeed_command(2, "--config", config), env=ENV, capture_output=True, text=True,
                           timeout=600)
    assert train.returncode == 0, train.stderr[-5000:]
    assert "model wavenet" in train.stderr and "receptive_field 16" in train.stderr

    out = tmp_path / "eval.json"
    arpipe("eval", "--model", tmp_path / "run", "--data", shards, "--out", out, "--samples", 1, "--prompts", 2,
           "--prompt-len", 24, "--sample-length", 4000)  # half a second: WaveNet runs on past block_len
    result = json.loads(out.read_text())
    manifest = json.loads((shards / "manifest.json").read_text())
    assert result["samples"] == manifest["splits"]["val"]["tokens"] > 0  # every validation sample scored once
    # a uniform code over the 256 μ-law levels needs 8 bits/sample; these 300 steps reached 5.84
    assert 0 < result["bits_per_sample"] < 6.3
    assert result["nats_per_sample"] == pytest.approx(result["bits_per_sample"] * math.log(2))

    client = MlflowClient(result["tracking_uri"])
    run = client.get_run(result["run_id"])
    assert run.data.metrics["val/bits_per_sample"] == pytest.approx(result["bits_per_sample"])
    assert run.data.tags["receptive_field"] == "16"
    folder = "samples/val-step00000300"
    assert [a.path for a in client.list_artifacts(result["run_id"], folder)] == \
        [f"{folder}/completions-00.wav", f"{folder}/completions-01.wav", f"{folder}/samples-00.wav"]
    local = client.download_artifacts(result["run_id"], f"{folder}/completions-01.wav", str(tmp_path))
    info = sf.info(local)
    assert (info.samplerate, info.channels, info.frames, info.subtype) == (8000, 1, 4000, "PCM_16")
    given = validation_prompts(Shards(shards), "val", 2, 24)[1]
    assert np.array_equal(AudioCodec(8000).encode(local)[:24], given)  # it continues a validation clip
