import pytest

from tests.conftest import arpipe


@pytest.mark.parametrize("args, message", [
    (["shard", "text", "--input", "/nonexistent/*.txt", "--out", "x"], "--input '/nonexistent/*.txt' matches no file"),
    (["train", "--config", "/nonexistent.yaml"], "cannot read config /nonexistent.yaml"),
    (["eval", "--model", "/nonexistent", "--data", "/nonexistent"], "/nonexistent is neither an export nor"),
    (["train", "--config", "configs/demo.yaml", "train.stepz=3"], "command line: train.stepz: Extra inputs"),
    (["train", "--config", "configs/demo.yaml", "data.path=/nonexistent"], "/nonexistent/manifest.json not found"),
    (["decompress", "README.md", "--model", "/nonexistent", "--out", "x"], "README.md is not an arpipe compressed file"),
    (["shard", "multi", "--out", "/tmp/arpipe-never"], "needs at least one of --text, --image, --audio"),
])
def test_bad_input_is_one_clear_line(args, message):
    result = arpipe(*args, check=False)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("arpipe: error: "), result.stderr
    assert message in lines[0]


def test_bad_option_value_says_which(tmp_path):
    result = arpipe("shard", "text", "--input", "x", "--out", tmp_path, "--workers", "0", check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].endswith("argument --workers: must be at least 1, got 0")


def test_task_needs_num_tasks(tmp_path, corpus):
    result = arpipe("shard", "text", "--input", corpus, "--out", tmp_path / "o", "--task", "0", check=False)
    assert result.returncode == 2 and "--task needs --num-tasks" in result.stderr


@pytest.mark.parametrize("command", [[], ["shard", "text"], ["shard", "multi"], ["train"], ["eval"], ["sample"],
                                     ["demo"], ["compress"], ["decompress"], ["complete"]])
def test_help(command):
    result = arpipe(*command, "--help")
    assert "usage: arpipe" in result.stdout
