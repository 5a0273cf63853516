"""The benchmark scripts still run: each at its toy size (--tiny), timing nothing that is asserted,
and never writing to benchmarks/RESULTS.md."""

import subprocess
import sys

import pytest

from tests.conftest import ENV, REPO

RESULTS = REPO / "benchmarks" / "RESULTS.md"
SCRIPTS = {  # script and the options that keep it to a few seconds
    "shard": ["--only", "text", "image"],
    "stream": ["--only", "image"],
    "trainer": [],
    "sampling": [],
    "eval": [],
    "gpu": ["--cases", "gpt-bare", "pixelcnn"],
    "compress": [],
    "loss_memory": [],
    "s3": [],
    "shakespeare": [],
}


@pytest.mark.parametrize("script", SCRIPTS)
def test_benchmark_runs_at_a_tiny_size(script, tmp_path):
    before = RESULTS.read_bytes() if RESULTS.exists() else None
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / f"{script}.py"), "--tiny", "--no-record",
                             "--work", str(tmp_path / "work"), "--results", str(tmp_path / "results.md"),
                             *SCRIPTS[script]], env=ENV, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert "| measurement |" in result.stdout  # the table
    assert not (tmp_path / "results.md").exists()
    assert (RESULTS.read_bytes() if RESULTS.exists() else None) == before


def test_gpu_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(REPO / "benchmarks" / "gpu.sh")], check=True)
