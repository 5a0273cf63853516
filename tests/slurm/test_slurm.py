"""Against a real Slurm cluster (`.ci/run` starts one with `launch/local-slurm.sh start --nodes 2`):
array sharding, 2-node training, the `arpipe submit` chain, preemption with requeue.

Without a reachable 2-node cluster these tests skip, unless ARPIPE_REQUIRE_SLURM=1 (CI) makes
that a failure."""

import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest

from tests.conftest import ENV, REPO, deepspeed_command, read_metrics
from tests.unit.test_shards import digest

pytestmark = pytest.mark.slow
SCRIPTS = REPO / "launch" / "slurm"
JOB_ENV = {**ENV, "ARPIPE_PYTHON": sys.executable}


def cluster_nodes() -> int:
    if not shutil.which("sinfo"):
        return 0
    result = subprocess.run(["sinfo", "-h", "-o", "%D %T"], capture_output=True, text=True)
    return sum(int(n) for n, state in (line.split() for line in result.stdout.splitlines()) if state == "idle")


@pytest.fixture(scope="module", autouse=True)
def slurm():
    if cluster_nodes() < 2:
        if os.environ.get("ARPIPE_REQUIRE_SLURM") == "1":
            pytest.fail("no idle 2-node Slurm cluster (launch/local-slurm.sh start --nodes 2)")
        pytest.skip("no idle 2-node Slurm cluster; start one with launch/local-slurm.sh start --nodes 2")


def sbatch(*args, cwd) -> str:
    result = subprocess.run(["sbatch", "--parsable", *map(str, args)], env=JOB_ENV, cwd=cwd,
                            capture_output=True, text=True, check=True)
    return result.stdout.strip().split(";")[0]


def job_records(job: str) -> list[dict]:
    """scontrol's records of a job (one per array element), as dicts."""
    out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True).stdout
    return [dict(re.findall(r"(\w+)=(\S*)", line)) for line in out.splitlines() if line.strip()]


def wait(job: str, timeout: float = 300, until=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL")) -> list[dict]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        records = job_records(job)
        if records and all(r["JobState"] in until for r in records):
            return records
        time.sleep(0.3)
    raise AssertionError(f"job {job} did not finish in {timeout} s: {job_records(job)}")


def test_array_shard_job_equals_a_one_process_run(tmp_path, corpus, text_shards):
    stage = ["text", "--input", corpus, "--out", tmp_path / "shards", "--vocab-size", 512,
             "--val-fraction", 0.15, "--chunk-mb", 0.02]
    array = sbatch("--array=0-3", f"--output={tmp_path}/shard-%A_%a.out", SCRIPTS / "shard.sbatch", *stage, cwd=tmp_path)
    final = sbatch(f"--dependency=afterok:{array}", f"--output={tmp_path}/finalize-%j.out",
                   SCRIPTS / "shard.sbatch", *stage, cwd=tmp_path)
    records = wait(array) + wait(final)
    assert len(records) == 5 and {r["JobState"] for r in records} == {"COMPLETED"}
    assert len(list((tmp_path / "shards" / "_tasks").glob("*.json"))) == 4
    assert digest(tmp_path / "shards") == digest(text_shards)  # the tokenizer trained once, identically


def test_submit_chain_shard_train_on_two_nodes_eval(tmp_path, corpus):
    config = tmp_path / "chain.yaml"
    config.write_text(f"""
out_dir: {tmp_path / 'run'}
data: {{path: {tmp_path / 'shards'}, block_len: 32, batch_size: 4, num_workers: 1}}
model: {{name: gpt, n_layer: 2, n_head: 2, d_model: 32}}
optim: {{lr: 3.0e-3, warmup_steps: 5}}
train: {{steps: 40, zero_stage: 2, ckpt_every: 20}}
tracking: {{uri: "sqlite:///{tmp_path / 'mlflow.db'}", experiment: chain}}
slurm:
  shard: {{modality: text, inputs: [{corpus}], args: [--vocab-size, "300", --chunk-mb, "0.02"], tasks: 4}}
  train: {{nodes: 2, tasks_per_node: 1}}
  eval: {{args: [--out, {tmp_path / 'eval.json'}, --samples, "1", --prompts, "1"]}}
""")
    result = subprocess.run([sys.executable, "-m", "pipeline", "submit", "--config", config], env=ENV, cwd=tmp_path,
                            capture_output=True, text=True, check=True)
    ids = dict(re.findall(r"^(\w+): job (\d+)$", result.stdout, re.M))
    assert list(ids) == ["shard", "finalize", "train", "eval"]
    records = {name: wait(job, timeout=400) for name, job in ids.items()}
    for name, recs in records.items():
        assert {r["JobState"] for r in recs} == {"COMPLETED"}, (name, recs, list((tmp_path / "run" / "slurm").iterdir()))
    # each job started only after the one before it ended
    order = [records["shard"], records["finalize"], records["train"], records["eval"]]
    for before, after in zip(order, order[1:]):
        assert max(r["EndTime"] for r in before) <= min(r["StartTime"] for r in after)
    train = records["train"][0]
    assert train["NumNodes"] == "2" and train["NodeList"] == "n[1-2]"
    assert train["MinCPUsNode"] == "2"  # one rank and its DataLoader worker per node
    state = json.loads((tmp_path / "run" / "checkpoints" / "step_00000040" / "trainer_state.json").read_text())
    assert state["world_size"] == 2
    evaluation = json.loads((tmp_path / "eval.json").read_text())
    # a uniform code over the 300 tokens needs 8.23 bits/token; these 40 steps reached 6.27
    assert evaluation["step"] == 40 and 0 < evaluation["bits_per_token"] < 6.9


def test_usr1_checkpoints_requeues_and_finishes_like_an_uninterrupted_run(tmp_path, train_config):
    common = ["--config", train_config, "train.zero_stage=2", "train.steps=300", "train.ckpt_every=1000",
              "train.log_every=50"]
    reference = tmp_path / "reference"
    subprocess.run(deepspeed_command(2, *common, f"out_dir={reference}"), env=ENV, check=True, capture_output=True)
    expected = [m["loss"] for m in read_metrics(reference)]

    run = tmp_path / "preempted"
    # --cpus-per-task=1: the script asks for 3 (a rank and 2 DataLoader workers), more than these nodes have
    job = sbatch("--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1", f"--output={tmp_path}/train-%j.out",
                 SCRIPTS / "train.sbatch",
                 *common, f"out_dir={run}", cwd=tmp_path)
    deadline = time.time() + 120
    while len(read_metrics(run)) < 20 and time.time() < deadline:
        time.sleep(0.1)
    subprocess.run(["scancel", "--signal=USR1", job], check=True)
    # the trainer checkpoints and exits 75; the script requeues; skip Slurm's 120 s requeue hold
    deadline = time.time() + 120
    while time.time() < deadline:
        record = job_records(job)[0]
        if record["JobState"] == "PENDING" and record.get("Restarts") == "1":
            # slurmd refuses a credential issued in the same second as the requeue revoked the old
            # one ("Job credential revoked"), so the restart must come at least a second later
            time.sleep(2)
            subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True)
            break
        time.sleep(0.2)
    else:
        raise AssertionError(f"job {job} was not requeued: {job_records(job)}")
    record = wait(job, timeout=300)[0]
    log = (tmp_path / f"train-{job}.out").read_text()
    assert record["JobState"] == "COMPLETED" and record["Restarts"] == "1", log[-3000:]
    assert "requeueing job" in log and "resumed from" in log
    assert [m["loss"] for m in read_metrics(run)] == expected  # the same run, step for step


def test_deepspeed_launcher_per_node_under_slurm(tmp_path, train_config):
    job = sbatch("--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1", f"--output={tmp_path}/ds-%j.out",
                 SCRIPTS / "train-deepspeed.sbatch", "--config", train_config, "train.steps=8",
                 f"out_dir={tmp_path / 'run'}", cwd=tmp_path)
    record = wait(job)[0]
    assert record["JobState"] == "COMPLETED", (tmp_path / f"ds-{job}.out").read_text()[-3000:]
    state = json.loads((tmp_path / "run" / "checkpoints" / "step_00000008" / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and not list(tmp_path.glob(".hostfile-*"))
