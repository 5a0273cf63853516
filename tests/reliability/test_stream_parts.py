"""No rank waits for data for ever: a split of fewer chunks (and documents) than ranks × workers
trains on every rank, and a split too small for them is refused on every rank at start-up."""

import subprocess
import sys

import pytest

from pipeline.train.dist import free_port
from tests.conftest import ENV, arpipe, deepspeed_command, read_metrics

pytestmark = pytest.mark.slow


def shard(tmp_path, name, documents: list[str]):
    (tmp_path / name).mkdir()
    for i, text in enumerate(documents):
        (tmp_path / name / f"{i}.txt").write_text(text)
    out = tmp_path / f"{name}-shards"
    arpipe("shard", "text", "--input", tmp_path / name, "--out", out, "--vocab-size", 300, "--val-fraction", 0.01)
    return out


def test_fewer_documents_than_ranks_times_workers(tmp_path):
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    few = shard(tmp_path, "few", [topics[t] for t in ("class", "for", "with", "try")])  # one chunk, 4 documents
    small = shard(tmp_path, "small", ["hi", "yo"])
    config = tmp_path / "config.yaml"
    config.write_text(f"""
out_dir: {tmp_path / 'run'}
data: {{path: {few}, block_len: 32, batch_size: 4, num_workers: 3}}
model: {{name: gpt, n_layer: 1, n_head: 2, d_model: 16}}
train: {{steps: 6, log_every: 2, ckpt_every: 6}}
tracking: {{uri: "sqlite:///{tmp_path / 'mlflow.db'}", experiment: parts}}
""")
    # 2 ranks × 3 workers = 6 parts: the old stream gave parts 4 and 5 no document and hung rank 1
    trained = subprocess.run(deepspeed_command(2, "--config", config), env=ENV, capture_output=True, text=True,
                             timeout=600)
    assert trained.returncode == 0, trained.stderr[-4000:]
    assert len(read_metrics(tmp_path / "run")) == 6
    # each rank a process of its own (as srun starts them): both must leave by themselves, saying why
    port = str(free_port())
    ranks = [subprocess.Popen([sys.executable, "-m", "pipeline.train", "--config", str(config), f"data.path={small}",
                               f"out_dir={tmp_path / 'refused'}"],
                              env={**ENV, "SLURM_PROCID": str(r), "SLURM_NTASKS": "2", "SLURM_LOCALID": str(r),
                                   "SLURM_JOB_NODELIST": "127.0.0.1", "MASTER_PORT": port},
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for r in range(2)]
    for rank in ranks:
        _, stderr = rank.communicate(timeout=600)
        assert rank.returncode == 2, stderr[-4000:]
        assert ("the train split (1 chunks, 2 items, 2 tokens) cannot give each of 6 stream parts "
                "(ranks × data.num_workers) a token per epoch; use fewer data.num_workers or ranks") in stderr
