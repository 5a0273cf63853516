"""Golden losses: the training loop's per-step losses on a fixed tiny run, recorded from the
loop as it was before its rewrite for GPUs (one all-reduce per optimizer step instead of per
micro-batch), so a change to the loop that changes what it computes fails here. The data are
read as that loop read them (`shuffle_rows: false`: the block shuffle came later).

Regenerate only for a deliberate change of what training computes:
  ARPIPE_WRITE_GOLDEN=1 python -m pytest tests/integration/test_golden_losses.py
"""

import json
import os
import sys

import pytest

from tests.conftest import REPO, arpipe, read_metrics

GOLDEN = REPO / "tests" / "golden" / "gpt-tiny-losses.json"
pytestmark = pytest.mark.slow


def test_losses_equal_the_recorded_loop(tmp_path, text_shards):
    config = tmp_path / "config.yaml"
    config.write_text(f"""
out_dir: {tmp_path / 'run'}
data: {{path: {text_shards}, block_len: 32, batch_size: 4, shuffle_rows: false}}
model: {{name: gpt, n_layer: 2, n_head: 2, d_model: 32}}
optim: {{lr: 3.0e-3, warmup_steps: 5}}
train: {{steps: 16, grad_accum: 2, log_every: 4, ckpt_every: 1000}}
tracking: {{uri: "sqlite:///{tmp_path / 'mlflow.db'}", experiment: golden}}
""")
    arpipe("train", "--config", config)
    losses = [m["loss"] for m in read_metrics(tmp_path / "run")]
    if os.environ.get("ARPIPE_WRITE_GOLDEN"):
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps({"python": sys.version.split()[0], "losses": losses}, indent=1) + "\n")
    golden = json.loads(GOLDEN.read_text())["losses"]
    assert len(losses) == len(golden) == 16
    # not bitwise: another CPU's kernels may round differently; a changed loop moves losses by far more
    assert losses == pytest.approx(golden, abs=2e-5), list(zip(losses, golden))


def test_bf16_autocast_trains_like_fp32(tmp_path, train_config):
    """precision bf16-autocast (fp32 weights, bf16 forward, the optimizer on fp32 directly) runs
    through DeepSpeed's torch_autocast and follows the fp32 run to within bf16 rounding."""
    losses = {}
    for precision in ("fp32", "bf16-autocast"):
        arpipe("train", "--config", train_config, "train.steps=8", f"train.precision={precision}",
               f"out_dir={tmp_path / precision}")
        losses[precision] = [m["loss"] for m in read_metrics(tmp_path / precision)]
    assert losses["fp32"] != losses["bf16-autocast"]  # bf16 did run
    assert losses["bf16-autocast"] == pytest.approx(losses["fp32"], abs=0.05)
