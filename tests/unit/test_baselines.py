"""The compressors' figures the demo and the recipes print next to a model's bits/byte: the
same as the command-line tools give, on exactly the bytes eval counts."""

import json
import lzma
import shutil
import subprocess

import pytest

from pipeline.data.shards import Shards
from pipeline.eval.baselines import compressor_bits_per_byte, split_text

TOOLS = {"xz -9e": 0.0, "bzip2 -9": 0.0, "gzip -9": 0.002}  # command -> allowed relative difference in size


def source_text(shards: Shards, corpus, split: str = "val") -> bytes:
    """A split's documents read from the corpus files its items' keys name (one document per file)."""
    text = b""
    for shard, entry in shards.chunks(split):
        for item in json.loads(shards.read(shard, entry["key"], "meta.json"))["items"]:
            path, _, index = item["key"].rpartition(":")
            assert index == "0"
            text += (corpus / path).read_bytes()
    return text


def test_split_text_is_the_source_text_of_the_split(text_shards, corpus):
    shards = Shards(text_shards)
    expected = source_text(shards, corpus)
    assert len(expected) > 1000
    assert split_text(shards, "val") == expected


@pytest.mark.parametrize("command", TOOLS)
def test_figures_agree_with_the_command_line_tool(command, text_shards):
    if not shutil.which(command.split()[0]):
        pytest.skip(f"{command.split()[0]} is not installed")
    data = split_text(Shards(text_shards), "val")
    tool = len(subprocess.run([*command.split(), "-c"], input=data, capture_output=True, check=True).stdout)
    ours = compressor_bits_per_byte(data)[command] * len(data) / 8
    assert abs(ours - tool) <= TOOLS[command] * tool, (command, ours, tool)


def test_demo_summary_shows_the_compressors_on_the_validation_text(text_shards, corpus):
    from pipeline.demo import text_summary

    text = source_text(Shards(text_shards), corpus)
    xz = 8 * len(lzma.compress(text, preset=9 | lzma.PRESET_EXTREME)) / len(text)
    line = text_summary({"bits_per_byte_sliding": 1.4, "bits_per_byte": 1.5, "tokens": 100}, text_shards)
    assert line.startswith("1.400 bits/byte in sliding windows (stride 64; 1.500 in blocks; 100 tokens")
    assert f"the same text: xz -9e {xz:.3f}, bzip2 -9 " in line
