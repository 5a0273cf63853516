"""Shared fixtures: a small real corpus, its shards, and helpers that start real processes."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.train.dist import free_port

REPO = Path(__file__).resolve().parent.parent

# Every process the tests start: one thread each (2-core CI), CPU DeepSpeed, quiet warnings.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false",
       "PYTHONWARNINGS": "ignore::FutureWarning,ignore::DeprecationWarning", "PYTHONPATH": str(REPO)}


def write_corpus(directory: Path, documents: int = 60) -> Path:
    """Real English and reStructuredText: CPython's pydoc topics, one file per topic."""
    import pydoc_data.topics

    directory.mkdir(parents=True, exist_ok=True)
    for name, text in sorted(pydoc_data.topics.topics.items())[:documents]:
        (directory / f"{name}.txt").write_text(text)
    return directory


def arpipe(*args, check=True, **kwargs) -> subprocess.CompletedProcess:
    """Run the real CLI in a fresh process."""
    result = subprocess.run([sys.executable, "-m", "pipeline", *map(str, args)], env=kwargs.pop("env", ENV),
                            cwd=kwargs.pop("cwd", REPO),
                            capture_output=True, text=True, timeout=kwargs.pop("timeout", 600), **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(f"arpipe {' '.join(map(str, args))} failed ({result.returncode}):\n"
                             f"{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


def deepspeed_command(nproc: int, *args) -> list[str]:
    """`deepspeed --num_gpus N --module pipeline.train ARGS`, the launcher users run."""
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc), "--log_level", "warning",
            "--master_port", str(free_port()), "--module", "pipeline.train", *map(str, args)]


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="session")
def text_shards(tmp_path_factory, corpus) -> Path:
    """Shards of the corpus: 512-token BPE, small chunks so ranks and workers have several each."""
    out = tmp_path_factory.mktemp("shards") / "text"
    arpipe("shard", "text", "--input", corpus, "--out", out, "--vocab-size", 512, "--workers", 2,
           "--val-fraction", 0.15, "--chunk-mb", 0.02)
    return out


@pytest.fixture
def train_config(tmp_path, text_shards) -> Path:
    """A tiny GPT config on text_shards; tests override keys on the command line."""
    path = tmp_path / "config.yaml"
    path.write_text(f"""
out_dir: {tmp_path / 'run'}
data: {{path: {text_shards}, block_len: 32, batch_size: 4}}
model: {{name: gpt, n_layer: 2, n_head: 2, d_model: 32}}
optim: {{lr: 3.0e-3, warmup_steps: 5}}
train: {{steps: 20, log_every: 5, ckpt_every: 10}}
tracking: {{uri: "sqlite:///{tmp_path / 'mlflow.db'}", experiment: test}}
""")
    return path


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst
