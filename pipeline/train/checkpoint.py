"""Checkpoints: DeepSpeed's engine state plus ours, saved so a kill at any moment is harmless.

OUT/checkpoints/step_00000100/  DeepSpeed's files (model, ZeRO partitions, optimizer, schedule)
                                + trainer_state.json (step, every rank's data-stream position and
                                RNG state, MLflow run id, world size)
OUT/checkpoints/latest          the tag of the newest *complete* checkpoint

Every rank writes its part, all ranks meet at a barrier, and only then rank 0 replaces `latest`
atomically (write a temp file, rename). A save killed half-way leaves `latest` on the previous
checkpoint; resuming deletes such leftovers. `latest` has DeepSpeed's own format, so
DeepSpeed's tools (zero_to_fp32, ds_to_universal) read these directories as they are.
"""

import base64
import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from pipeline.log import LOG


def rng_state() -> str:
    return base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()


def set_rng_state(state: str) -> None:
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state)), dtype=torch.uint8))


class Checkpoints:
    def __init__(self, directory: Path, rank: int, keep_last: int):
        self.dir, self.rank, self.keep_last = Path(directory), rank, keep_last

    def latest(self) -> str | None:
        path = self.dir / "latest"
        return path.read_text().strip() if path.exists() else None

    def tags(self) -> list[str]:
        return sorted(p.name for p in self.dir.glob("step_*") if p.is_dir())

    def save(self, engine, step: int, rank_state: dict, shared_state: dict) -> str:
        """Collective: every rank calls it. rank_state is this rank's, shared_state rank 0's."""
        tag = f"step_{step:08d}"
        engine.save_checkpoint(str(self.dir), tag=tag, save_latest=False)
        states = [None] * dist.get_world_size()
        dist.all_gather_object(states, rank_state)
        if self.rank == 0:
            state = {**shared_state, "step": step, "world_size": len(states), "ranks": states}
            (self.dir / tag / "trainer_state.json").write_text(json.dumps(state))
        dist.barrier()  # every rank's files are on disk before `latest` moves
        if self.rank == 0:
            tmp = self.dir / "latest.tmp"
            tmp.write_text(tag)
            os.replace(tmp, self.dir / "latest")
            for old in self.tags()[: -self.keep_last or None]:
                if old != tag:
                    shutil.rmtree(self.dir / old, ignore_errors=True)
            LOG.info("checkpoint %s saved", self.dir / tag)
        dist.barrier()
        return tag

    def load(self, engine) -> dict | None:
        """Restore the latest complete checkpoint into `engine`; its trainer state, or None."""
        tag = self.latest()
        if tag is None:
            return None
        if self.rank == 0:
            for stale in self.tags():  # a save killed before `latest` moved
                if stale > tag:
                    shutil.rmtree(self.dir / stale, ignore_errors=True)
        dist.barrier()
        engine.load_checkpoint(str(self.dir), tag=tag)
        state = json.loads((self.dir / tag / "trainer_state.json").read_text())
        LOG.info("resumed from %s (step %d)", self.dir / tag, state["step"])
        return state
