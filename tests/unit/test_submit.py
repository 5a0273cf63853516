"""`arpipe submit`'s sbatch command lines (the chain itself runs in tests/slurm/)."""

import pytest

from pipeline.config import load_config
from pipeline.submit import plan_jobs


@pytest.mark.parametrize("slurm, overrides, cpus", [
    ("{}", [], "--cpus-per-task=3"),  # one rank and its 2 DataLoader workers
    ("{launcher: deepspeed, gpus_per_node: 8}", [], "--cpus-per-task=24"),  # the node's 8 ranks in one task
    ("{launcher: deepspeed}", ["data.num_workers=0"], "--cpus-per-task=1"),  # CPU ranks: one per node
    ("{cpus_per_rank: 6, tasks_per_node: 4}", [], "--cpus-per-task=6"),
])
def test_training_job_asks_for_the_cpus_of_its_ranks_and_workers(tmp_path, slurm, overrides, cpus):
    config = tmp_path / "c.yaml"
    config.write_text(f"out_dir: {tmp_path / 'run'}\ndata: {{path: shards, num_workers: 2}}\n"
                      f"slurm: {{train: {slurm}}}\n")
    jobs = dict(plan_jobs(load_config(config, overrides), str(config), overrides))
    assert [a for a in jobs["train"] if a.startswith("--cpus-per-task")] == [cpus]
