"""The trainer's small parts that need no processes: seeding, skippable updates, log lines."""

import logging

import torch

from pipeline.log import LOG, Progress
from pipeline.train.trainer import allow_skipping_updates, lr_at, seed_rank
from pipeline.config import validate


def draws(seed, rank, step=0):
    seed_rank(seed, rank, step)
    return torch.rand(4).tolist()


def test_each_rank_and_restart_step_draws_its_own_stream():
    assert draws(0, 0) == draws(0, 0)
    assert len({tuple(draws(0, r)) for r in range(4)}) == 4
    assert draws(0, 1) != draws(1, 1) and draws(0, 1, step=0) != draws(0, 1, step=100)


def test_skipped_updates_change_nothing_and_schedulers_still_wrap_the_step():
    param = torch.nn.Parameter(torch.ones(3))
    optimizer = allow_skipping_updates(torch.optim.AdamW([param], lr=0.1))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (s + 1))
    param.grad = torch.ones(3)
    optimizer.apply_updates = False
    optimizer.step()
    assert param.tolist() == [1.0, 1.0, 1.0] and not optimizer.state
    optimizer.apply_updates = True
    optimizer.step()
    scheduler.step()
    assert param.tolist() != [1.0, 1.0, 1.0] and optimizer.state[param]["step"] == 1
    assert optimizer.param_groups[0]["lr"] == 0.05


def test_the_schedule_warms_up_then_decays_to_min_lr():
    cfg = validate({"out_dir": "x", "data": {"path": "x"}, "optim": {"lr": 1.0, "min_lr": 0.1, "warmup_steps": 10},
                    "train": {"steps": 110}}, "test")
    assert lr_at(0, cfg) == 0.1 and lr_at(9, cfg) == 1.0
    assert lr_at(60, cfg) == 0.55 and lr_at(110, cfg) == 0.1


def test_progress_writes_lines_where_no_terminal_is(caplog):
    LOG.propagate = True  # let caplog see the package logger
    try:
        with caplog.at_level(logging.INFO, logger="arpipe"):
            progress = Progress(10, "eval", unit="batch", line_every=0)
            for _ in range(10):
                progress.update()
            progress.close()
    finally:
        LOG.propagate = False
    assert progress.bar is None  # pytest captures stderr: not a terminal
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("eval: 1/10 batch (") and "ETA" in lines[0]
    assert lines[-1].startswith("eval: 10/10 batch")


def test_progress_without_lines_leaves_the_log_to_its_caller(caplog):
    LOG.propagate = True
    try:
        with caplog.at_level(logging.INFO, logger="arpipe"):
            progress = Progress(10, "train", unit="step", line_every=None)
            for _ in range(10):
                progress.update()
            progress.close()
    finally:
        LOG.propagate = False
    assert progress.bar is None and not caplog.records
