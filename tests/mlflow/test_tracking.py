"""The pieces of pipeline/tracking.py that need no server: names, tags, node ids, and a node's
own client when MLflow cannot be reached."""

import socket

import pytest

from pipeline.log import LOG
from pipeline.tracking import SystemMetrics, Tracker, node_id, run_name, source_tags
from pipeline.train.dist import free_port


def test_run_names_give_config_model_size_and_modality():
    assert run_name("demo", "gpt", 931_264, "text") == "demo · gpt 931K · text"
    assert run_name("demo-audio", "wavenet", 153_000, "audio") == "demo-audio · wavenet 153K · audio"
    assert run_name("text-gpt", "gpt", 124_439_808, "text") == "text-gpt · gpt 124M · text"
    assert run_name("big", "gpt", 1_234_000_000, "text") == "big · gpt 1.23B · text"
    assert run_name("tiny", "fvsbn", 640, "image") == "tiny · fvsbn 640 · image"


def test_source_tags_say_where_a_run_comes_from(monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    tags = source_tags("configs/demo.yaml")
    assert tags["mlflow.source.name"] == "configs/demo.yaml" and tags["mlflow.source.type"] == "LOCAL"
    assert tags["mlflow.user"] and len(tags["mlflow.source.git.commit"]) == 40 and tags["command"]
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    assert source_tags("configs/demo.yaml")["mlflow.source.type"] == "JOB"


@pytest.mark.parametrize("env, expected", [
    ({}, "node0-{host}"),
    ({"GROUP_RANK": "1"}, "node1-{host}"),  # torchrun
    ({"CROSS_RANK": "2"}, "node2-{host}"),  # the deepspeed launcher
    ({"SLURM_NODEID": "3", "SLURMD_NODENAME": "gpu007", "GROUP_RANK": "0"}, "node3-gpu007"),
])
def test_node_ids_are_unique_per_node(monkeypatch, env, expected):
    for key in ("SLURM_NODEID", "SLURMD_NODENAME", "GROUP_RANK", "CROSS_RANK"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert node_id() == expected.format(host=socket.gethostname().split(".")[0])


def test_another_nodes_system_metrics_never_fail_training(tmp_path, monkeypatch):
    """Rank 0 created the run; if another node then cannot reach MLflow, it warns and logs nothing."""
    warnings = []
    monkeypatch.setattr(LOG, "warning", lambda message, *args: warnings.append(message % args))
    unreachable = f"http://127.0.0.1:{free_port()}"
    rank1 = Tracker(unreachable, "x", active=False, fallback=tmp_path / "mlflow-unsent.jsonl")
    system = SystemMetrics(rank1, run_id="0123456789abcdef")
    assert not system.tracker.active and system.thread is None
    assert [w for w in warnings if f"MLflow at {unreachable} is unreachable" in w], warnings
    system.close()
    assert not list(tmp_path.iterdir())
