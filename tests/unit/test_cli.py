import argparse

import pytest

from pipeline import __version__
from pipeline.cli import build_parser
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


@pytest.mark.parametrize("command, shown", [
    ([], "--version"), (["shard", "text"], "tokenizer of this size (default: 8192)"),
    (["shard", "multi"], "a finished text shard set"), (["train"], "--deepspeed_config"),
    (["eval"], "the split to score: val or train (default: val)"), (["sample"], "(default: 1.0)"),
    (["demo"], "(default: runs/demo)"), (["compress"], "rows coded in parallel (recorded) (default: 16)"),
    (["decompress"], "the model it was compressed with"), (["complete"], "(default: completions)"),
])
def test_help(command, shown):
    result = arpipe(*command, "--help")
    assert "usage: arpipe" in result.stdout and shown in " ".join(result.stdout.split())


def test_version():
    assert arpipe("--version").stdout.strip() == f"arpipe {__version__}"


def commands(parser, path=("arpipe",)):
    """(command words, parser) of `arpipe` and every (sub-)command under it."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from commands(sub, (*path, name))


def test_every_option_has_help_and_its_default_shown_once():
    for path, parser in commands(build_parser()):
        text = "".join(parser.format_help().split())  # argparse wraps long lines, also at hyphens
        for action in parser._actions:
            if action.help == argparse.SUPPRESS or isinstance(action, (argparse._HelpAction, argparse._VersionAction,
                                                                               argparse._SubParsersAction)):
                continue
            where = f"{' '.join(path)} {'/'.join(action.option_strings) or action.dest}"
            assert action.help, f"{where} has no help"
            if action.default is not None and action.default is not False and action.help:
                assert "default" not in action.help, f"{where} states its default by hand: {action.help!r}"
                shown = f"{action.help.replace('%%', '%')} (default: {action.default})"  # argparse's % escape
                assert "".join(shown.split()) in text, where
