"""The `deepspeed` launcher as DeepSpeed users run it: their `--deepspeed --deepspeed_config ds.json`
command line."""

import json
import subprocess
import sys

import pytest

from tests.conftest import ENV, deepspeed_command

pytestmark = pytest.mark.slow


def test_deepspeed_config_json_is_merged_and_checked(tmp_path, train_config):
    ds_json = tmp_path / "ds.json"
    ds_json.write_text(json.dumps({"zero_optimization": {"stage": 1, "reduce_bucket_size": 123456}}))
    subprocess.run(deepspeed_command(1, "--config", train_config, "train.steps=2", "train.zero_stage=1",
                                     "--deepspeed", "--deepspeed_config", ds_json),
                   env=ENV, check=True, capture_output=True, timeout=300)
    used = json.loads((tmp_path / "run" / "deepspeed.json").read_text())  # what DeepSpeed was given
    assert used["zero_optimization"] == {"stage": 1, "reduce_bucket_size": 123456}

    ds_json.write_text(json.dumps({"train_batch_size": 3}))
    result = subprocess.run([sys.executable, "-m", "pipeline.train", "--config", train_config,
                             f"--deepspeed_config={ds_json}", f"out_dir={tmp_path / 'refused'}"],
                            env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"arpipe: error: {ds_json}: train_batch_size=3 contradicts data.batch_size × train.grad_accum × "
        f"world size (= 4); set it there")
