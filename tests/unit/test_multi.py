"""One model over text, images and audio (pipeline/codecs/multi.py): the shard set re-maps
finished ones without losing an item, eval scores each modality apart with every variable
counted once, and samples come back in each modality's own form."""

import json
import math

import numpy as np
import pytest
import soundfile as sf
import torch

from pipeline import ArpipeError
from pipeline.cli import run as cli
from pipeline.codecs.multi import MultiCodec
from pipeline.data.shards import Shards
from pipeline.eval.nll import evaluate_nll
from pipeline.models import build_model

DIGITS = "pipeline/bundled/digits.npz"


@pytest.fixture(scope="module")
def sources(tmp_path_factory, corpus):
    root = tmp_path_factory.mktemp("sources")
    cli(["shard", "text", "--input", str(corpus), "--out", str(root / "text"), "--vocab-size", "300",
         "--val-fraction", "0.2", "--chunk-mb", "0.01"])
    cli(["shard", "image", "--input", DIGITS, "--out", str(root / "image"), "--levels", "4", "--val-fraction", "0.1"])
    (root / "wav").mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        sf.write(root / "wav" / f"tone{i}.wav", 0.5 * np.sin(np.arange(4000) * rng.uniform(0.05, 0.3)), 8000)
    cli(["shard", "audio", "--input", str(root / "wav"), "--out", str(root / "audio"), "--sample-rate", "8000",
         "--clip-seconds", "0.1", "--val-fraction", "0.3"])
    return root


@pytest.fixture(scope="module")
def multi(sources):
    out = sources / "multi"
    cli(["shard", "multi", "--text", str(sources / "text"), "--image", str(sources / "image"),
         "--audio", str(sources / "audio"), "--out", str(out), "--chunk-mb", "0.02"])
    return out


def items(shards: Shards, split: str):
    for shard, entry in shards.chunks(split):
        tokens, offsets = shards.read_chunk(shard, entry["key"])
        meta = json.loads(shards.read(shard, entry["key"], "meta.json"))["items"]
        for a, b, m in zip(offsets[:-1], offsets[1:], meta):
            yield tokens[a:b].astype(np.int64), m


def test_every_item_keeps_its_split_key_bytes_and_tokens_in_its_own_range(sources, multi):
    joint = Shards(multi)
    codec = joint.codec
    assert codec.vocab_size == 4 + 300 + 4 + 256
    for split in ("train", "val"):
        mapped = {m["key"]: (tokens, m) for tokens, m in items(joint, split)}
        count = 0
        for name in ("text", "image", "audio"):
            source = Shards(sources / name)
            for tokens, meta in items(source, split):
                joined, joined_meta = mapped[meta["key"]]
                assert joined_meta == {**meta, "modality": name}
                assert np.array_equal(joined, codec.item(name, tokens))
                assert joined[0] == codec.opener(name) and codec.split_items(joined) == [(name, tokens.tolist())]
                count += 1
        assert count == len(mapped) == joint.manifest["splits"][split]["items"]
        assert joint.manifest["splits"][split]["bytes"] == Shards(sources / "text").manifest["splits"][split]["bytes"]
    kinds = [m["modality"] for _, m in items(joint, "train")][:60]  # interleaved, not one modality after another
    assert len(set(kinds)) == 3


def test_an_end_token_belongs_to_the_item_it_ends_also_across_rows():
    from pipeline.codecs.audio import AudioCodec
    from pipeline.codecs.image import ImageCodec

    codec = MultiCodec({"image": ImageCodec(1, 2, 1, 4), "audio": AudioCodec(8000)})  # ids: 0 end, 1, 2, 3-6, 7-
    rows = torch.tensor([[1, 3, 4, 0, 2, 7], [8, 0, 1, 5, 6, 0], [0, 1, 3, 3, 0, 2]])
    before = torch.tensor([0, 7, 0])  # the last tokens of the rows before (the second row's: row 0's audio)
    assert codec.token_parts(rows, before).tolist() == [[0, 0, 0, 0, 1, 1], [1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 1]]


def test_eval_scores_each_modality_and_every_variable_once(multi):
    shards = Shards(multi)
    torch.manual_seed(0)
    model = build_model({"name": "gpt", "n_layer": 1, "n_head": 2, "d_model": 16}, shards.codec.vocab_size, (32,))
    result = evaluate_nll(model, shards, "val", 32, 8)
    nats = {name: result[f"nats_per_{unit}"] * result[f"{unit}s_{name}"]
            for name, unit in (("text", "byte"), ("image", "dim"), ("audio", "sample"))}
    assert sum(nats.values()) == pytest.approx(result["nats"], rel=1e-9)
    val = {name: [t for t, m in items(Shards(multi), "val") if m["modality"] == name] for name in nats}
    assert result["dims_image"] == 64 * len(val["image"]) == sum(len(t) - 1 for t in val["image"])
    assert result["samples_audio"] == sum(len(t) - 1 for t in val["audio"])
    assert result["bytes_text"] == shards.manifest["splits"]["val"]["bytes"]
    assert all(result[f"items_{name}"] == len(val[name]) for name in nats)
    assert result["tokens"] == sum(len(t) + 1 for tokens in val.values() for t in tokens)  # with <end> each
    assert all(0 < result[f"marker_bits_per_item_{name}"] < 40 for name in nats)


def test_samples_of_a_modality_render_in_its_own_form(tmp_path, multi):
    from pipeline.eval.samples import sample_text
    from pipeline.export import save_export

    shards = Shards(multi)
    codec = shards.codec
    torch.manual_seed(0)
    cfg = {"name": "gpt", "n_layer": 1, "n_head": 2, "d_model": 16}
    model = build_model(cfg, codec.vocab_size, (80,))
    state = {k: v.detach() for k, v in model.named_parameters()}
    export = save_export(tmp_path / "export", state, cfg, codec.vocab_size, (80,), codec.config(), shards.meta_dir, {})
    files = sample_text(str(export), 2, None, 1.0, None, 0, str(tmp_path / "image"), modality="image")
    assert files[0].name.startswith("samples-image") and files[0].suffix == ".png"
    files = sample_text(str(export), 2, None, 1.0, None, 0, str(tmp_path / "audio"), modality="audio")
    assert [f.suffix for f in files if f.name.startswith("samples-audio")] == [".wav", ".wav"]
    files = sample_text(str(export), 1, "def main(", 1.0, None, 0, str(tmp_path / "text"))
    assert files[0].read_text().split("\n")[2].startswith("def main(")
    with pytest.raises(ArpipeError, match="knows text, image, audio"):
        sample_text(str(export), 1, None, 1.0, None, 0, str(tmp_path / "x"), modality="video")


def test_the_multimodal_recipe_compares_each_modality_in_its_own_column():
    from pipeline.config import load_config
    from pipeline.recipes import load_recipe, markdown_table
    from tests.conftest import REPO

    recipe = load_recipe(REPO / "configs" / "multimodal.yaml")
    assert recipe.metrics == ["bits_per_byte", "bits_per_dim", "bits_per_sample"] and recipe.shard.modality == "multi"
    assert {v.data for v in recipe.variants.values()} == {None, *recipe.shard.args[1::2]}
    load_config(REPO / recipe.config, recipe.overrides)
    rows = [{"variant": "joint", "bits_per_byte": 2.5, "bits_per_dim": 1.5, "bits_per_sample": 3.0, "shard": [],
             "overrides": [], "seconds": 9},
            {"variant": "text", "bits_per_byte": 2.25, "shard": ["shards", "t"], "overrides": [], "seconds": 4}]
    table = markdown_table(recipe, rows)
    assert "| joint | 2.5000 | 1.5000 | 3.0000 |  |  | 9 |" in table
    assert "| text | 2.2500 | — | — | shards t |  | 4 |" in table


@pytest.mark.slow
def test_one_gpt_trains_on_the_joint_shards_through_the_trainer_and_evaluates_each_modality(tmp_path, multi):
    from tests.conftest import arpipe

    config = tmp_path / "joint.yaml"
    config.write_text(f"""
out_dir: {tmp_path / 'run'}
data: {{path: {multi}, block_len: 48, batch_size: 4}}
model: {{name: gpt, n_layer: 1, n_head: 2, d_model: 16}}
train: {{steps: 4, log_every: 2, ckpt_every: 4}}
tracking: {{uri: "sqlite:///{tmp_path / 'mlflow.db'}", experiment: test}}
""")
    arpipe("train", "--config", config)
    arpipe("eval", "--model", tmp_path / "run", "--data", multi, "--out", tmp_path / "eval.json", "--prompts", 2)
    result = json.loads((tmp_path / "eval.json").read_text())
    for key in ("bits_per_byte", "bits_per_dim", "bits_per_sample", "bits_per_token", "marker_bits_per_item_image"):
        assert math.isfinite(result[key]) and result[key] > 0, key
    assert any(name.startswith("completions-") for name in result["artifacts"])
