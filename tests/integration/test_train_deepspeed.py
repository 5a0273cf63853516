"""Real multi-process DeepSpeed on CPU/gloo: launchers, ZeRO stages, kill and resume, eval."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from mlflow.tracking import MlflowClient

from pipeline.train.dist import free_port
from tests.conftest import ENV, REPO, arpipe, deepspeed_command, read_metrics

pytestmark = pytest.mark.slow
STEPS = 60


def run(command, **kwargs):
    result = subprocess.run(command, env=kwargs.pop("env", ENV), capture_output=True, text=True, timeout=600, **kwargs)
    assert result.returncode == 0, f"{command} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return result


@pytest.mark.parametrize("stage", [2, 3])
def test_killed_run_resumes_with_identical_losses(tmp_path, train_config, stage):
    common = ["--config", train_config, f"train.zero_stage={stage}", f"train.steps={STEPS}", "train.ckpt_every=30",
              "train.log_every=1", "tracking.flush_every=0.1"]
    reference = tmp_path / "reference"
    run(deepspeed_command(2, *common, f"out_dir={reference}"))
    expected = [m["loss"] for m in read_metrics(reference)]
    assert len(expected) == STEPS

    killed = tmp_path / "killed"
    proc = subprocess.Popen(deepspeed_command(2, *common, f"out_dir={killed}"), env=ENV, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")

    def sent_steps() -> list[int]:
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
        run_ids = [r.info.run_id for r in runs if r.info.run_id != reference_run]
        return [m.step for m in client.get_metric_history(run_ids[0], "train/loss_nats")] if run_ids else []

    reference_run = json.loads((reference / "export" / "model.json").read_text())["run_id"]
    deadline = time.time() + 300
    # kill once MLflow holds metrics of a step after the first checkpoint (30): the resumed run
    # computes them again and must not log them twice. Metrics of every step and 30 steps between
    # checkpoints leave the kill a window of 29 steps (with 5 it once landed on the next checkpoint)
    while max(sent_steps(), default=0) <= 30 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    latest = int((killed / "checkpoints" / "latest").read_text().strip().split("_")[1])
    assert max(sent_steps()) > latest >= 30, "the kill must land after metrics past a checkpoint were sent"

    run(deepspeed_command(2, *common, f"out_dir={killed}"))
    assert [m["loss"] for m in read_metrics(killed)] == expected  # bitwise: the same floats

    # one MLflow run across the kill, holding the whole loss curve
    state = json.loads((killed / "checkpoints" / "step_00000060" / "trainer_state.json").read_text())
    run_info = client.get_run(state["run_id"])
    assert run_info.info.status == "FINISHED" and run_info.data.params["train.zero_stage"] == str(stage)
    history = sorted(client.get_metric_history(state["run_id"], "train/loss_nats"), key=lambda m: m.step)
    assert [m.step for m in history] == list(range(1, STEPS + 1))  # each step once, none twice
    assert [m.value for m in history] == expected
    assert json.loads((killed / "export" / "model.json").read_text())["run_id"] == state["run_id"]


def test_launchers_agree_and_eval_is_world_size_independent(tmp_path, train_config):
    """deepspeed, torchrun and Slurm-style env variables train the same run; eval on 1 and 2
    processes counts the same tokens and the same total NLL, in blocks and sliding windows."""
    common = ["--config", train_config, "train.zero_stage=2", "train.steps=40"]
    run(deepspeed_command(2, *common, f"out_dir={tmp_path / 'ds'}"))
    run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
         str(free_port()), "-m", "pipeline.train", *map(str, common),
         f"out_dir={tmp_path / 'torchrun'}"])
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, "-m", "pipeline.train", *map(str, common), f"out_dir={tmp_path / 'srun'}"],
                              env={**ENV, "SLURM_PROCID": str(r), "SLURM_NTASKS": "2", "SLURM_LOCALID": str(r),
                                   "SLURM_JOB_NODELIST": "127.0.0.1", "MASTER_PORT": port},
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for r in range(2)]
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read()[-3000:]
    losses = {name: [m["loss"] for m in read_metrics(tmp_path / name)] for name in ("ds", "torchrun", "srun")}
    assert len(losses["ds"]) == 40 and losses["ds"] == losses["torchrun"] == losses["srun"]
    # each rank draws its own random numbers (dropout masks, MADE's orderings), from a seeded stream
    ranks = json.loads((tmp_path / "ds" / "checkpoints" / "step_00000040" / "trainer_state.json").read_text())["ranks"]
    assert ranks[0]["rng"] != ranks[1]["rng"]

    data = json.loads((tmp_path / "ds" / "export" / "model.json").read_text())["data"]
    one = tmp_path / "eval1.json"
    arpipe("eval", "--model", tmp_path / "ds", "--data", data, "--out", one, "--samples", 1, "--prompts", 1,
           "--stride", 8)
    two = tmp_path / "eval2.json"
    run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
         str(free_port()), "-m", "pipeline", "eval", "--model",
         str(tmp_path / "ds"), "--data", data, "--out", str(two), "--samples", "0", "--prompts", "0", "--stride", "8"])
    r1, r2 = json.loads(one.read_text()), json.loads(two.read_text())
    assert r1["tokens"] == r2["tokens"] > 0
    assert r1["nats"] == pytest.approx(r2["nats"], rel=1e-6)
    assert r1["nats_sliding"] == pytest.approx(r2["nats_sliding"], rel=1e-6) and r1["nats_sliding"] != r1["nats"]
    # a uniform code over the 512 tokens needs 9 bits/token; these 40 steps reached 7.81
    assert 0 < r1["bits_per_token"] < 8.2
    # eval landed in the training run
    client = MlflowClient(r1["tracking_uri"])
    metrics = client.get_run(r1["run_id"]).data.metrics
    assert metrics["val/bits_per_byte"] == pytest.approx(r1["bits_per_byte"])
    assert "train/loss_nats" in metrics
    artifacts = [a.path for a in client.list_artifacts(r1["run_id"], "samples/val-step00000040")]
    assert artifacts == ["samples/val-step00000040/completions.txt", "samples/val-step00000040/samples.txt"]


def test_deepspeed_launcher_multinode_script_without_ssh(tmp_path, train_config):
    """launch/deepspeed/train.sh as two "nodes" on this host: one launcher per node rank."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    env = {**ENV, "ARPIPE_PYTHON": sys.executable, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    script = [str(REPO / "launch" / "deepspeed" / "train.sh"), str(hostfile), "--config", str(train_config),
              "train.steps=8", f"out_dir={tmp_path / 'run'}"]
    nodes = [subprocess.Popen(script, env={**env, "NODE_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(2)]
    for node in nodes:
        output = node.communicate(timeout=300)[0]
        assert node.returncode == 0, output[-3000:]
    state = json.loads((tmp_path / "run" / "checkpoints" / "step_00000008" / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and len(read_metrics(tmp_path / "run")) == 8
