"""Nothing arpipe loads can run code: checkpoints and exports are read without unpickling
arbitrary objects, shards without pickles or paths outside their directory, and the tracking
server listens on loopback unless told otherwise."""

import io
import json
import shutil
import tarfile

import numpy as np
import pytest
import torch

from pipeline import ArpipeError
from pipeline.cli import build_parser
from pipeline.data.shards import Shards
from tests.conftest import arpipe


class Payload:
    """Unpickling this would create the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, text_shards):
    """A finished single-process run (ZeRO-0: its checkpoint is one torch file) with an export."""
    tmp = tmp_path_factory.mktemp("safety")
    config = tmp / "config.yaml"
    config.write_text(f"""
out_dir: {tmp / 'run'}
data: {{path: {text_shards}, block_len: 32, batch_size: 4}}
model: {{name: gpt, n_layer: 1, n_head: 2, d_model: 32}}
train: {{steps: 4, ckpt_every: 2}}
tracking: {{uri: "sqlite:///{tmp / 'mlflow.db'}"}}
""")
    arpipe("train", "--config", config)
    return config, tmp / "run"


def test_a_tampered_checkpoint_is_refused_not_executed(tmp_path, trained):
    config, run = trained
    copy = shutil.copytree(run, tmp_path / "run")
    marker = tmp_path / "pwned"
    states = copy / "checkpoints" / "step_00000004" / "mp_rank_00_model_states.pt"
    torch.save({"module": Payload(marker)}, states)
    resume = arpipe("train", "--config", config, f"out_dir={copy}", "train.steps=6", check=False)
    assert resume.returncode == 2 and "refusing to load checkpoint" in resume.stderr
    evaluate = arpipe("eval", "--model", copy / "checkpoints", "--data", json.loads(
        (copy / "export" / "model.json").read_text())["data"], check=False)
    assert evaluate.returncode == 2 and "refusing to load checkpoint" in evaluate.stderr
    assert not marker.exists()


def test_a_tampered_export_is_refused(tmp_path, trained):
    _, run = trained
    export = shutil.copytree(run / "export", tmp_path / "export")
    marker = tmp_path / "pwned"
    torch.save(Payload(marker), export / "model.safetensors")
    result = arpipe("sample", "--model", export, check=False)
    assert result.returncode == 2 and "cannot load" in result.stderr
    assert not marker.exists()


def rewrite_first_chunk(directory, member_name=None, tokens=None):
    """Rebuild the first train shard with one member renamed or its tokens replaced."""
    manifest = json.loads((directory / "manifest.json").read_text())
    entry = next(e for e in manifest["shards"] if e["split"] == "train")
    path = directory / entry["path"]
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(path, "w") as tar:
        for i, (m, data) in enumerate(members):
            if i == 0 and member_name:
                m.name = member_name
            if i == 0 and tokens is not None:
                data = tokens
                m.size = len(data)
            tar.addfile(m, io.BytesIO(data))
    with tarfile.open(path) as tar:  # where the manifest says each member's bytes are
        ranges = {m.name: [m.offset_data, m.size] for m in tar.getmembers()}
    for chunk in entry["chunks"]:
        chunk["members"] = {ext: ranges.get(f"{chunk['key']}.{ext}", r) for ext, r in chunk["members"].items()}
    (directory / "manifest.json").write_text(json.dumps(manifest))
    return entry


@pytest.mark.parametrize("name", ["/etc/evil.tokens.npy", "../../evil.tokens.npy"])
def test_shard_members_outside_the_directory_are_refused(tmp_path, text_shards, name):
    copy = shutil.copytree(text_shards, tmp_path / "shards")
    entry = rewrite_first_chunk(copy, member_name=name)
    with pytest.raises(ArpipeError, match="refusing member"):
        Shards(copy).read_chunk(entry["path"], entry["chunks"][0]["key"])


def test_pickled_arrays_in_a_shard_are_refused(tmp_path, text_shards):
    copy = shutil.copytree(text_shards, tmp_path / "shards")
    buffer = io.BytesIO()
    np.save(buffer, np.array([Payload(tmp_path / "pwned")], dtype=object), allow_pickle=True)
    entry = rewrite_first_chunk(copy, tokens=buffer.getvalue())
    with pytest.raises(ArpipeError, match="cannot read chunk"):
        Shards(copy).read_chunk(entry["path"], entry["chunks"][0]["key"])
    assert not (tmp_path / "pwned").exists()


def test_tracking_server_binds_loopback_by_default():
    assert build_parser().parse_args(["mlflow-server"]).host == "127.0.0.1"
