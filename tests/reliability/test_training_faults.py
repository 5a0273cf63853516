"""Training survives SIGKILL anywhere, resumes on another world size, and handles non-finite losses."""

import json
import math
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from pipeline.data.shards import Shards
from pipeline.data.stream import TokenStream
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
    assert len(resumed) == 80
    # the loss goes on from where the checkpoint left it (a constant learning rate after warmup)
    before_mean, after_mean = sum(resumed[30:40]) / 10, sum(resumed[40:50]) / 10
    assert abs(after_mean - before_mean) / before_mean < 0.01, (before_mean, after_mean)
    state = json.loads((run / "checkpoints" / "step_00000080" / "trainer_state.json").read_text())
    assert state["world_size"] == after
    # the new ranks' stream continued the interrupted epoch from every old rank's position in
    # the checkpoint it resumed from (which chunks that skips: tests/unit/test_stream.py)
    saved = json.loads((run / "checkpoints" / "step_00000040" / "trainer_state.json").read_text())["ranks"]
    expected = TokenStream(Shards(text_shards), "train", 32, 8, seed=0, world=after, shuffle_window=2)
    expected.continue_from([r["data"] for r in saved])
    assert len(saved) == before
    done = expected.sources[0].done  # the only source's
    assert state["ranks"][0]["data"]["done"] == [done] and done["epoch"] == 0


def test_a_nonfinite_loss_on_one_rank_skips_the_step_on_every_rank(tmp_path, train_config):
    """Rank 1 alone sees a NaN loss at its 3rd batch: both ranks drop that step's update (a rank
    that applied it would average in NaN gradients and train on NaN weights) and redo the step on
    the next batches, with the learning-rate schedule where it was."""
    common = ["--config", train_config, "train.steps=12", "train.zero_stage=2"]
    reference = tmp_path / "reference"
    finish(deepspeed_command(2, *common, f"out_dir={reference}"))
    skip = tmp_path / "skip"
    ok = finish(deepspeed_command(2, *common, "train.inject_nonfinite=[[1,3]]", f"out_dir={skip}"))
    assert "step 3: non-finite loss, step skipped on every rank (1 in a row" in ok.stderr
    # not a terminal: rank 0 alone writes a line per log_every (5) steps and at the end
    lines = [line for line in ok.stderr.splitlines() if "step 5/12: loss" in line or "step 12/12: loss" in line]
    assert len(lines) == 2 and "[arpipe rank 0]" in lines[0] and " nats (" in lines[0] and "ETA" in lines[0], lines
    assert "train: 12/12 step" not in ok.stderr  # the step lines are the log: no progress line repeats them
    expected, got = read_metrics(reference), read_metrics(skip)
    assert len(got) == 12 and all(math.isfinite(m["loss"]) for m in got)
    assert [m["loss"] for m in got[:2]] == [m["loss"] for m in expected[:2]]
    assert got[2]["loss"] != expected[2]["loss"]  # step 3 was trained on the next batches
    assert [m["lr"] for m in got] == [m["lr"] for m in expected]  # the schedule did not move on
    state = json.loads((skip / "checkpoints" / "step_00000012" / "trainer_state.json").read_text())
    assert [r["data"]["consumed"] for r in state["ranks"]] == [13, 13]  # one step's batches dropped on both


def test_nonfinite_losses_in_a_row_stop_with_a_usable_checkpoint(tmp_path, train_config):
    bad = subprocess.run([sys.executable, "-m", "pipeline.train", "--config", str(train_config), "train.steps=30",
                          "train.max_nonfinite=3", "train.inject_nonfinite=[[0,13],[0,14],[0,15]]",
                          f"out_dir={tmp_path / 'stop'}"], env=ENV, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2
    assert "stopping: 3 non-finite losses in a row at step 13" in bad.stderr
    assert "step_00000010" in bad.stderr
    state = json.loads((tmp_path / "stop" / "checkpoints" / "step_00000010" / "trainer_state.json").read_text())
    arpipe("eval", "--model", tmp_path / "stop" / "checkpoints", "--data", state["data"],
           "--samples", 0, "--prompts", 0, "--new-run")
