"""A shard stage killed with SIGKILL at a random moment and re-run holds exactly the samples of
a clean run: no duplicates, no gaps, no temporary files, a whole manifest."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import ENV, arpipe, write_corpus
from tests.unit.test_shards import digest

TASKS = 24


@pytest.fixture(scope="module")
def clean(tmp_path_factory, text_shards):
    tmp = tmp_path_factory.mktemp("shard-faults")
    src = write_corpus(tmp / "in", documents=79)
    common = ["--input", src, "--tokenizer", text_shards / "tokenizer.json", "--num-tasks", TASKS, "--chunk-mb", 0.01]
    arpipe("shard", "text", *common, "--out", tmp / "clean")
    return common, tmp / "clean"


@pytest.mark.parametrize("trial", range(3))
def test_killed_shard_run_resumes_without_duplicates_or_gaps(tmp_path, clean, trial):
    common, clean_out = clean
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "pipeline", "shard", "text", *map(str, common), "--out", str(out), "--workers", "2"]
    proc = subprocess.Popen(command, env=ENV, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    target = random.Random(trial).randint(1, TASKS - 4)  # tasks done when the kill lands
    deadline = time.time() + 120
    while len(list(out.glob("_tasks/*.json"))) < target and time.time() < deadline and proc.poll() is None:
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(list(out.glob("_tasks/*.json")))
    assert 0 < done < TASKS, f"the kill should land mid-run, {done} of {TASKS} tasks were done"
    assert not (out / "manifest.json").exists()
    arpipe("shard", "text", *common, "--out", out, "--workers", 2)
    assert digest(out) == digest(clean_out)
    assert not list(out.rglob("*.tmp"))
    resumed = json.loads((out / "manifest.json").read_text())
    expected = json.loads((clean_out / "manifest.json").read_text())
    assert [e["sha256"] for e in resumed["shards"]] == [e["sha256"] for e in expected["shards"]]
    assert resumed["splits"] == expected["splits"]
