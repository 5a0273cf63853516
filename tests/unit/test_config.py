import json
import re

import pytest

from pipeline import ArpipeError
from pipeline.config import load_config, parse_overrides
from pipeline.train.ds_config import deepspeed_config

GOOD = "out_dir: o\ndata: {path: d}\ntrain: {steps: 5}\n"


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_defaults_and_overrides(tmp_path):
    cfg = load_config(write(tmp_path, GOOD), ["train.steps=7", "model.n_layer=3", "optim.betas=[0.9, 0.99]"])
    assert cfg.train.steps == 7 and cfg.model["n_layer"] == 3 and cfg.model["d_model"] == 384
    assert cfg.optim.betas == (0.9, 0.99)


@pytest.mark.parametrize("text, overrides, message", [
    (GOOD + "trian: {}\n", [], r"c.yaml: trian: Extra inputs are not permitted"),
    (GOOD.replace("steps: 5", "stepz: 5"), [], r"c.yaml: train.stepz: Extra inputs"),
    (GOOD.replace("steps: 5", "steps: many"), [], r"c.yaml: train.steps: Input should be a valid integer"),
    (GOOD, ["train.steps=many"], r"command line: train.steps: Input should be a valid integer"),
    (GOOD, ["train.zero_stage=4"], r"command line: train.zero_stage: Input should be 0, 1, 2 or 3"),
    (GOOD + "model: {name: gpt, heads: 2}\n", [], r"c.yaml: model.heads: Extra inputs"),
    (GOOD + "model: {name: lstm}\n", [], r"c.yaml: model.name 'lstm' is not one of"),
    ("out_dir: o\n", [], r"c.yaml: data: Field required"),
    ("out_dir: [o\n", [], r"c.yaml: invalid YAML"),
    ("- a\n", [], r"expected a mapping"),
    (GOOD, ["train.steps"], r"override 'train.steps' is not of the form"),
])
def test_bad_config_names_key_and_source(tmp_path, text, overrides, message):
    with pytest.raises(ArpipeError, match=message):
        load_config(write(tmp_path, text), overrides)


def test_missing_file(tmp_path):
    with pytest.raises(ArpipeError, match="cannot read config"):
        load_config(tmp_path / "nope.yaml")


def test_parse_overrides_nests_and_types():
    assert parse_overrides(["a.b=1", "a.c=x", "d=null"]) == {"a": {"b": 1, "c": "x"}, "d": None}


def test_deepspeed_section_is_derived_and_checked(tmp_path):
    cfg = load_config(write(tmp_path, GOOD + "data: {path: d, batch_size: 4}\ntrain: {grad_accum: 2, zero_stage: 3}\n"
                                     "deepspeed: {zero_optimization: {overlap_comm: true}}\n"))
    ds = deepspeed_config(cfg, world=2)
    assert ds["train_batch_size"] == 16 and ds["zero_optimization"] == {"stage": 3, "overlap_comm": True}
    for bad in ("deepspeed: {train_batch_size: 3}", "deepspeed: {optimizer: {type: Adam}}",
                "deepspeed: {zero_optimization: {stage: 1}}", "deepspeed: {bf16: {enabled: true}}"):
        with pytest.raises(ArpipeError, match="deepspeed"):
            deepspeed_config(load_config(write(tmp_path, GOOD + bad + "\n")), world=1)


def test_deepspeed_json_is_merged_and_checked_naming_the_file(tmp_path):
    """`--deepspeed_config ds.json`: over the YAML's deepspeed: section, under command-line overrides."""
    config = write(tmp_path, GOOD + "deepspeed: {zero_optimization: {overlap_comm: true}, steps_per_print: 5}\n")
    ds_json = tmp_path / "ds.json"
    ds_json.write_text(json.dumps({"zero_optimization": {"stage": 0, "reduce_bucket_size": 1000},
                                   "steps_per_print": 7, "wall_clock_breakdown": True,
                                   "train_micro_batch_size_per_gpu": 16}))
    ds = deepspeed_config(load_config(config, ["deepspeed.steps_per_print=9"], ds_json), world=1)
    assert ds["zero_optimization"] == {"stage": 0, "overlap_comm": True, "reduce_bucket_size": 1000}
    assert ds["wall_clock_breakdown"] is True and ds["steps_per_print"] == 9
    for bad, message in [({"train_batch_size": 3}, "train_batch_size=3 contradicts data.batch_size"),
                         ({"zero_optimization": {"stage": 2}},
                          "zero_optimization.stage=2 contradicts train.zero_stage"),
                         ({"bf16": {"enabled": True}}, "bf16.enabled=True contradicts train.precision"),
                         ({"optimizer": {"type": "Adam"}}, "optimizer is not supported")]:
        ds_json.write_text(json.dumps(bad))
        with pytest.raises(ArpipeError, match=f"^{re.escape(f'{ds_json}: {message}')}"):
            deepspeed_config(load_config(config, [], ds_json), world=1)


@pytest.mark.parametrize("text, message", [("{", "invalid JSON"), ("[1]", "expected a JSON object"),
                                           (None, "cannot read --deepspeed_config")])
def test_bad_deepspeed_json_names_the_file(tmp_path, text, message):
    ds_json = tmp_path / "ds.json"
    if text is not None:
        ds_json.write_text(text)
    with pytest.raises(ArpipeError, match=message) as error:
        load_config(write(tmp_path, GOOD), [], ds_json)
    assert str(ds_json) in str(error.value)
