"""The `deepspeed` launcher as DeepSpeed users run it: their `--deepspeed --deepspeed_config ds.json`
command line, and its multi-node path (a hostfile, pdsh, ssh) on two loopback "hosts"."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipeline.train.dist import free_port
from tests.conftest import ENV, REPO, deepspeed_command, read_metrics

pytestmark = pytest.mark.slow


def test_deepspeed_config_json_is_merged_and_checked(tmp_path, train_config):
    ds_json = tmp_path / "ds.json"
    ds_json.write_text(json.dumps({"zero_optimization": {"stage": 1, "reduce_bucket_size": 123456}}))
    subprocess.run(deepspeed_command(1, "--config", train_config, "train.steps=2", "train.zero_stage=1",
                                     "--deepspeed", "--deepspeed_config", ds_json),
                   env=ENV, check=True, capture_output=True, timeout=300)
    used = json.loads((tmp_path / "run" / "deepspeed.json").read_text())  # what DeepSpeed was given
    assert used["zero_optimization"] == {"stage": 1, "reduce_bucket_size": 123456}

    ds_json.write_text(json.dumps({"train_batch_size": 3}))
    result = subprocess.run([sys.executable, "-m", "pipeline.train", "--config", train_config,
                             f"--deepspeed_config={ds_json}", f"out_dir={tmp_path / 'refused'}"],
                            env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"arpipe: error: {ds_json}: train_batch_size=3 contradicts data.batch_size × train.grad_accum × "
        f"world size (= 4); set it there")


# --- several nodes: `deepspeed --hostfile` -> pdsh -> ssh -> one launcher per node
@pytest.fixture
def sshd(tmp_path):
    """A throwaway sshd on loopback, port chosen here, that accepts a key made for the test; the
    `ssh` on PATH (a wrapper: pdsh and DeepSpeed's own check call plain `ssh HOST`) uses its config.
    Skipped without sshd and pdsh, unless ARPIPE_REQUIRE_SSH=1 (CI) makes that a failure."""
    daemon, ssh = Path("/usr/sbin/sshd"), shutil.which("ssh")
    if not (daemon.exists() and ssh and shutil.which("pdsh")):
        if os.environ.get("ARPIPE_REQUIRE_SSH") == "1":
            pytest.fail("sshd, ssh or pdsh missing (apt-get install openssh-server pdsh)")
        pytest.skip("needs sshd, ssh and pdsh (apt-get install openssh-server pdsh)")
    keys = tmp_path / "ssh"
    keys.mkdir()
    for name in ("host", "user"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", keys / name], check=True)
    shutil.copy(keys / "user.pub", keys / "authorized_keys")
    port = free_port()
    (keys / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nListenAddress 127.0.0.2\nHostKey {keys / 'host'}\n"
        f"AuthorizedKeysFile {keys / 'authorized_keys'}\nPidFile {keys / 'sshd.pid'}\nStrictModes no\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nPermitRootLogin prohibit-password\n")
    (keys / "ssh_config").write_text(
        f"Host *\n  Port {port}\n  IdentityFile {keys / 'user'}\n  IdentitiesOnly yes\n  BatchMode yes\n"
        "  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n  LogLevel ERROR\n")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "ssh").write_text(f'#!/bin/sh\nexec {ssh} -F {keys / "ssh_config"} "$@"\n')
    (bin_dir / "ssh").chmod(0o755)
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege separation directory
    server = subprocess.Popen([daemon, "-D", "-e", "-f", keys / "sshd_config"], stderr=open(keys / "sshd.log", "w"))
    try:
        for _ in range(100):  # up to 10 s until both addresses accept
            if all(subprocess.run([bin_dir / "ssh", host, "true"], capture_output=True).returncode == 0
                   for host in ("127.0.0.1", "127.0.0.2")):
                break
            if server.poll() is not None:
                raise AssertionError(f"sshd exited: {(keys / 'sshd.log').read_text()}")
            time.sleep(0.1)
        yield {"PATH": f"{bin_dir}:{os.environ['PATH']}"}
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_deepspeed_launcher_over_ssh_on_two_hosts(tmp_path, train_config, sshd):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("127.0.0.1 slots=1\n127.0.0.2 slots=1\n")
    # what a rank needs beyond DeepSpeed's own exports (PYTHON*, MLFLOW*), as on a real cluster
    (tmp_path / ".deepspeed_env").write_text("OMP_NUM_THREADS=1\nDS_ACCELERATOR=cpu\nTOKENIZERS_PARALLELISM=false\n")
    run = tmp_path / "run"
    result = subprocess.run([REPO / "launch" / "deepspeed" / "train.sh", hostfile, "--config", train_config,
                             "train.steps=6", "train.log_every=2"],
                            env={**ENV, **sshd, "ARPIPE_PYTHON": sys.executable, "MASTER_ADDR": "127.0.0.1",
                                 "MASTER_PORT": str(free_port())},
                            cwd=tmp_path, capture_output=True, text=True, timeout=600)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-5000:]
    # pdsh prefixes each line with its host: one launcher ran behind each
    assert "127.0.0.1: " in log and "127.0.0.2: " in log
    state = json.loads((run / "checkpoints" / "step_00000006" / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and len(state["ranks"]) == 2
    metrics = read_metrics(run)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5, 6] and all(m["loss"] > 0 for m in metrics)
    assert (run / "export" / "model.safetensors").exists()
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")  # train_config's store
    assert client.get_run(state["run_id"]).data.tags["world_size"] == "2"
    assert [m.step for m in client.get_metric_history(state["run_id"], "train/loss_nats")] == [2, 4, 6]
