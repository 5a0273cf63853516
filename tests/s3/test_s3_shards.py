"""Shards in object storage, against a real S3 API on 127.0.0.1: the stage writes them there with
completeness marked by objects, survives SIGKILL, and the reader makes one GET per chunk."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tarfile
import time

import fsspec
import pytest

from pipeline import ArpipeError
from pipeline.data.shards import Shards
from pipeline.data.stream import Batches, TokenStream
from pipeline.train.dist import free_port
from tests.conftest import arpipe, write_corpus
from tests.s3.conftest import BUCKET
from tests.unit.test_shards import digest


def shard_args(corpus, tokenizer, *more) -> list:
    return ["shard", "text", "--input", corpus, "--tokenizer", tokenizer, "--val-fraction", 0.15,
            "--chunk-mb", 0.01, *more]


def objects(prefix: str) -> set[str]:
    fs = fsspec.filesystem("s3")
    fs.invalidate_cache()
    return {p[len(f"{BUCKET}/{prefix}/"):] for p in fs.find(f"{BUCKET}/{prefix}")}


@pytest.fixture(scope="module")
def remote(s3, tmp_path_factory, corpus, text_shards):
    """The corpus sharded to S3 and, with the same options, to a local directory."""
    local = tmp_path_factory.mktemp("s3-local") / "text"
    args = shard_args(corpus, text_shards / "tokenizer.json", "--num-tasks", 3)
    arpipe(*args, "--out", local)
    arpipe(*args, "--out", s3.url("text"), env=s3.process_env)
    return s3.url("text"), local


def test_shards_on_s3_equal_a_local_run_and_are_marked_by_objects(remote):
    url, local = remote
    expected = json.loads((local / "manifest.json").read_text())
    manifest = Shards(url).manifest
    assert manifest["shards"] == expected["shards"]  # paths, sha256s, chunks and member ranges
    assert manifest["splits"] == expected["splits"] and manifest["codec"] == expected["codec"]
    named = {e["path"] for e in manifest["shards"]}
    markers = {f"_tasks/task-{t:05d}.json" for t in range(3)}
    assert objects("text") == named | markers | {"plan.json", "tokenizer.json", "manifest.json"}
    assert digest(url) == digest(local)


def test_manifest_records_each_members_byte_range(remote):
    _, local = remote
    manifest = json.loads((local / "manifest.json").read_text())
    for entry in manifest["shards"]:
        with tarfile.open(local / entry["path"]) as tar:
            members = {m.name: [m.offset_data, m.size] for m in tar.getmembers()}
        for chunk in entry["chunks"]:
            assert {f"{chunk['key']}.{ext}": r for ext, r in chunk["members"].items()} == \
                {n: r for n, r in members.items() if n.startswith(chunk["key"] + ".")}


def test_reader_makes_one_get_per_chunk(s3, remote, tmp_path, monkeypatch):
    url, _ = remote
    monkeypatch.setenv("ARPIPE_CACHE", str(tmp_path / "cache"))
    since = s3.mark()
    shards = Shards(url)
    chunks = shards.chunks("train") + shards.chunks("val")
    for shard, entry in chunks:
        shards.read_chunk(shard, entry["key"])
    assert shards.codec.vocab_size == 512 and Shards(url).codec.vocab_size == 512
    requests = s3.requests(since)
    prefix = f"/{BUCKET}/text/"
    gets = [path[len(prefix):] for method, path in requests if method == "GET" and path.startswith(prefix)]
    tars = [name for name in gets if name.endswith(".tar")]
    assert len(tars) == len(chunks) > 10  # tokens and offsets in one ranged GET, no tar header walk
    assert sorted(tars) == sorted(shard for shard, _ in chunks)
    # the manifest once per Shards; the tokenizer once (the second Shards finds it in the cache)
    assert sorted(n for n in gets if not n.endswith(".tar")) == ["manifest.json", "manifest.json", "tokenizer.json"]
    # and nothing else (no HEAD for sizes) but one listing of the directory, to find the codec's files
    others = [(method, path) for method, path in requests if not path.startswith(prefix)]
    assert len(others) == 1 and "list-type" in others[0][1] and len(requests) == len(gets) + 1


def test_old_manifest_without_member_ranges_reads_through_the_tar_index(s3, remote, tmp_path):
    url, local = remote
    old = tmp_path / "old"
    shutil.copytree(local, old)
    manifest = json.loads((old / "manifest.json").read_text())
    for entry in manifest["shards"]:
        for chunk in entry["chunks"]:
            del chunk["members"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    fsspec.filesystem("s3").put(str(old), f"{BUCKET}/old-format", recursive=True)
    assert digest(old) == digest(s3.url("old-format")) == digest(local)


def test_stream_from_s3_equals_local_with_forked_workers(remote):
    """Two DataLoader workers (forked) each open their own connection and read what local disk gives."""
    url, local = remote

    def first_batches(where):
        batches = Batches(TokenStream(Shards(where), "train", 32, 4, seed=0, num_workers=2, shuffle_window=2))
        return [next(batches) for _ in range(12)], batches.state_dict()

    (remote_batches, remote_state), (local_batches, local_state) = first_batches(url), first_batches(local)
    assert all((a == b).all() for a, b in zip(remote_batches, local_batches))
    assert remote_state == local_state


def test_array_tasks_on_s3_then_finalize_equal_a_whole_run(s3, remote, corpus, text_shards):
    """A Slurm array on a store: task 0 plans (and runs), the others run, --finalize merges."""
    url, local = remote
    args = shard_args(corpus, text_shards / "tokenizer.json", "--num-tasks", 3)
    for task in (0, 2, 1):
        arpipe(*args, "--task", task, "--out", s3.url("array"), env=s3.process_env)
    assert "manifest.json" not in objects("array")
    arpipe(*args, "--finalize", "--out", s3.url("array"), env=s3.process_env)
    assert Shards(s3.url("array")).manifest["shards"] == json.loads((local / "manifest.json").read_text())["shards"]


def test_missing_shards_and_unplanned_array_tasks_are_clear_errors(s3, corpus, text_shards):
    with pytest.raises(ArpipeError, match="manifest.json not found"):
        Shards(s3.url("nothing-here"))
    result = arpipe(*shard_args(corpus, text_shards / "tokenizer.json", "--task", 1, "--num-tasks", 4),
                    "--out", s3.url("unplanned"), env=s3.process_env, check=False)
    assert result.returncode == 2 and "plan.json not found" in result.stderr
    assert objects("unplanned") == set()
    nobody = {**s3.process_env, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}"}  # nothing listens
    result = arpipe(*shard_args(corpus, text_shards / "tokenizer.json"), "--out", s3.url("x"), env=nobody, check=False)
    assert result.returncode == 2 and "AWS_ENDPOINT_URL" in result.stderr and "Traceback" not in result.stderr


TASKS = 24


@pytest.mark.slow
def test_killed_stage_on_s3_finishes_only_the_missing_tasks(s3, tmp_path, text_shards):
    corpus = write_corpus(tmp_path / "in", documents=79)
    args = shard_args(corpus, text_shards / "tokenizer.json", "--num-tasks", TASKS)
    arpipe(*args, "--out", tmp_path / "clean")
    for attempt in range(3):  # a listing of the store can take longer than the rest of the run on a busy
        prefix = f"killed-{attempt}"  # machine, and a kill after the last task tests nothing: try again
        url = s3.url(prefix)
        proc = subprocess.Popen([sys.executable, "-m", "pipeline", *map(str, args), "--out", url, "--workers", "2"],
                                env=s3.process_env, start_new_session=True, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        target = random.Random(attempt).randint(2, TASKS - 6)  # markers on the store when the kill lands
        deadline = time.time() + 180
        while len([o for o in objects(prefix) if o.startswith("_tasks/")]) < target and time.time() < deadline \
                and proc.poll() is None:
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        done = {o for o in objects(prefix) if o.startswith("_tasks/")}
        if len(done) < TASKS:
            break
    assert 0 < len(done) < TASKS, f"the kill should land mid-run, {len(done)} of {TASKS} tasks were done"
    assert "manifest.json" not in objects(prefix)
    unfinished = min(t for t in range(TASKS) if f"_tasks/task-{t:05d}.json" not in done)
    # what a killed attempt may leave: a tar of an unfinished task that a re-run would not write
    stray = f"{BUCKET}/{prefix}/train/train-{unfinished:05d}-000099.tar"
    fsspec.filesystem("s3").pipe_file(stray, b"partial")

    since = s3.mark()
    arpipe(*args, "--out", url, "--workers", 2, env=s3.process_env)
    puts = [path for method, path in s3.requests(since) if method == "PUT" and "/_tasks/" in path]
    assert len(puts) == TASKS - len(done)  # only the missing tasks ran
    assert not {p.rsplit("/", 1)[-1] for p in puts} & {d.rsplit("/", 1)[-1] for d in done}
    resumed, clean = Shards(url).manifest, json.loads((tmp_path / "clean" / "manifest.json").read_text())
    assert [e["sha256"] for e in resumed["shards"]] == [e["sha256"] for e in clean["shards"]]
    assert resumed["splits"] == clean["splits"]
    markers = {f"_tasks/task-{t:05d}.json" for t in range(TASKS)}
    assert objects(prefix) == {e["path"] for e in resumed["shards"]} | markers | \
        {"plan.json", "tokenizer.json", "manifest.json"}  # no stray objects, no duplicates


def test_submit_plans_an_s3_stage_with_task_0_before_the_array(tmp_path):
    from pipeline.config import validate
    from pipeline.submit import plan_jobs

    cfg = validate({"out_dir": str(tmp_path / "run"), "data": {"path": "s3://bucket/text"},
                    "slurm": {"shard": {"inputs": ["corpus"], "tasks": 4}}}, "test")
    jobs = dict(plan_jobs(cfg, "config.yaml", []))
    assert list(jobs) == ["shard-plan", "shard", "finalize", "train", "eval"]
    assert "--array=0" in jobs["shard-plan"] and "--array=1-3" in jobs["shard"]
    assert all(args[args.index("--out") + 1] == "s3://bucket/text" for name, args in jobs.items() if "shard" in name)
    assert jobs["eval"][jobs["eval"].index("--data") + 1] == "s3://bucket/text"  # never through pathlib


def test_checkpoints_exports_and_models_refuse_urls(tmp_path):
    from pipeline.config import validate

    with pytest.raises(ArpipeError, match="out_dir: .*URL.*file system"):
        validate({"out_dir": "s3://bucket/run", "data": {"path": "s3://bucket/text"}}, "test.yaml")
    for args in (["eval", "--model", "s3://bucket/run", "--data", "s3://bucket/text"],
                 ["sample", "--model", str(tmp_path), "--out", "s3://bucket/samples"]):
        result = arpipe(*args, check=False)
        assert result.returncode == 2 and "is a URL; object storage holds shards only" in result.stderr
