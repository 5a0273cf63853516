"""Training survives SIGKILL anywhere, resumes on another world size, and handles non-finite losses."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import ENV, arpipe, deepspeed_command, read_metrics

pytestmark = pytest.mark.slow
STEPS = 60


def start(command):
    return subprocess.Popen(command, env=ENV, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)


def finish(command):
    result = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def saving_now(run) -> bool:
    """A checkpoint directory newer than `latest` exists: a save is under way."""
    checkpoints = run / "checkpoints"
    latest = (checkpoints / "latest").read_text().strip() if (checkpoints / "latest").exists() else ""
    return any(p.name > latest for p in checkpoints.glob("step_*"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, text_shards):
    """The uninterrupted 2-process ZeRO-2 run every trial must reproduce bitwise."""
    tmp = tmp_path_factory.mktemp("reference")
    config = tmp / "config.yaml"
    config.write_text(f"""
out_dir: {tmp / 'run'}
data: {{path: {text_shards}, block_len: 32, batch_size: 4}}
model: {{name: gpt, n_layer: 2, n_head: 2, d_model: 64}}
optim: {{lr: 3.0e-3, warmup_steps: 5}}
train: {{steps: {STEPS}, log_every: 10, ckpt_every: 4, keep_last: 2, zero_stage: 2}}
tracking: {{uri: "sqlite:///{tmp / 'mlflow.db'}", experiment: faults}}
""")
    finish(deepspeed_command(2, "--config", config))
    return config, [m["loss"] for m in read_metrics(tmp / "run")]


@pytest.mark.parametrize("trial", range(3))
def test_sigkill_at_a_random_moment_then_resume_gives_identical_losses(tmp_path, reference, trial):
    config, expected = reference
    run = tmp_path / "run"
    command = deepspeed_command(2, "--config", config, f"out_dir={run}")
    rng = random.Random(trial)
    proc = start(command)
    if trial == 0:  # kill while a checkpoint (not the first) is being written
        while not ((run / "checkpoints" / "latest").exists() and saving_now(run)) and proc.poll() is None:
            time.sleep(0.001)
        during_save = saving_now(run)
    else:  # kill at a random step after the first checkpoint
        target = rng.randint(5, STEPS - 5)
        while len(read_metrics(run)) < target and proc.poll() is None:
            time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(read_metrics(run))
    assert done < STEPS, "the kill must land before the end"
    if trial == 0:
        assert during_save, "the kill must land during a checkpoint save"
    latest = (run / "checkpoints" / "latest").read_text().strip()
    assert (run / "checkpoints" / latest / "trainer_state.json").exists()  # latest is always complete
    finish(command)
    assert [m["loss"] for m in read_metrics(run)] == expected
    assert not list((run / "checkpoints").glob("universal_*"))


@pytest.mark.parametrize("before, after", [(2, 1), (1, 2)])
def test_resume_on_another_world_size(tmp_path, text_shards, before, after):
    config = tmp_path / "config.yaml"
    config.write_text(f"""
out_dir: {tmp_path / 'run'}
data: {{path: {text_shards}, block_len: 32, batch_size: 8, shuffle_window: 2}}
model: {{name: gpt, n_layer: 2, n_head: 2, d_model: 64}}
optim: {{lr: 2.0e-3, min_lr: 2.0e-3, warmup_steps: 5}}
train: {{steps: 80, log_every: 10, ckpt_every: 40, zero_stage: 2}}
tracking: {{uri: "sqlite:///{tmp_path / 'mlflow.db'}", experiment: world}}
""")
    run = tmp_path / "run"
    proc = start(deepspeed_command(before, "--config", config))
    while not (run / "checkpoints" / "latest").exists() and proc.poll() is None:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    losses = [m["loss"] for m in read_metrics(run)]
    assert len(losses) >= 40
    result = finish(deepspeed_command(after, "--config", config))
    assert f"written by {before} ranks" in result.stderr
    resumed = [m["loss"] for m in read_metrics(run)]
    assert len(resumed) == 80 and resumed[:40] == losses[:40]
    # the loss goes on from where the checkpoint left it (a constant learning rate after warmup)
    before_mean, after_mean = sum(resumed[30:40]) / 10, sum(resumed[40:50]) / 10
    assert abs(after_mean - before_mean) / before_mean < 0.01, (before_mean, after_mean)
    state = json.loads((run / "checkpoints" / "step_00000080" / "trainer_state.json").read_text())
    assert state["world_size"] == after
    done = state["ranks"][0]["data"]["done"][0]  # the first (only) source's
    assert done["epoch"] >= 0  # the stream continued the interrupted epoch (see stream.continue_from)


def test_nonfinite_losses_skip_then_stop_with_a_usable_checkpoint(tmp_path, train_config):
    ok = finish([sys.executable, "-m", "pipeline.train", "--config", str(train_config), "train.steps=12",
                 "train.inject_nonfinite=[3]", f"out_dir={tmp_path / 'skip'}"])
    assert "non-finite loss, batch skipped (1 in a row" in ok.stderr
    assert len(read_metrics(tmp_path / "skip")) == 12
    bad = subprocess.run([sys.executable, "-m", "pipeline.train", "--config", str(train_config), "train.steps=30",
                          "train.max_nonfinite=3", "train.inject_nonfinite=[13,14,15]", f"out_dir={tmp_path / 'stop'}"],
                         env=ENV, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2
    assert "stopping: 3 non-finite losses in a row at step 13" in bad.stderr
    assert "step_00000010" in bad.stderr
    state = json.loads((tmp_path / "stop" / "checkpoints" / "step_00000010" / "trainer_state.json").read_text())
    arpipe("eval", "--model", tmp_path / "stop" / "checkpoints", "--data", state["data"],
           "--samples", 0, "--prompts", 0, "--new-run")
