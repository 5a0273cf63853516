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
import contextlib
import io
import json
import os
import pickle
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist

from pipeline import ArpipeError
from pipeline.log import LOG


def refusal(path: Path, error: Exception) -> str:
    """Why a checkpoint file is not loaded, with what torch's weights-only unpickler found in it."""
    lines = str(error).splitlines() or [type(error).__name__]
    found = next((line.split("error:", 1)[1] for line in lines if "WeightsUnpickler error:" in line), lines[0])
    return (f"refusing to load checkpoint file {path}: it holds objects other than tensors and plain data "
            f"({found.strip().split('. ')[0][:200]})")


@contextmanager
def safe_torch_load():
    """Every torch.load inside runs with weights_only=True: DeepSpeed reads its own checkpoint
    files with weights_only=False, which would run any code a tampered file carries. Only the
    three plain data classes DeepSpeed stores are allowed besides tensors and containers; a file
    with anything else is an ArpipeError naming it."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    original = torch.load

    def load(f, *args, **kwargs):
        kwargs["weights_only"] = True
        try:
            return original(f, *args, **kwargs)
        except pickle.UnpicklingError as e:
            raise ArpipeError(refusal(f, e)) from None

    with torch.serialization.safe_globals([LossScaler, ZeroStageEnum, fragment_address]):
        torch.load = load
        try:
            yield
        finally:
            torch.load = original


def check_files(directory: Path) -> None:
    """Unpickle every torch file of a checkpoint as safe_torch_load does, with the tensors
    memory-mapped rather than read (cheap): a tampered file is refused before DeepSpeed reads any
    of them, so every rank can stop together instead of failing inside a collective load."""
    with safe_torch_load():
        for path in sorted(directory.rglob("*.pt")):
            try:
                torch.load(path, map_location="cpu", mmap=True)
            except (RuntimeError, OSError, EOFError) as e:  # e.g. not torch's zip format: not DeepSpeed's
                raise ArpipeError(f"refusing to load checkpoint file {path}: {str(e).splitlines()[0][:200]}") from None


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

    def saved_state(self) -> dict | None:
        """The latest complete checkpoint's trainer state (readable before DeepSpeed starts)."""
        tag = self.latest()
        return json.loads((self.dir / tag / "trainer_state.json").read_text()) if tag else None

    def load(self, engine, universal: bool = False) -> dict | None:
        """Restore the latest complete checkpoint into `engine`; its trainer state, or None.

        `universal`: the checkpoint's ZeRO partitions are for another world size; rank 0
        converts it to DeepSpeed's universal format first (the engine was initialised with
        checkpoint.load_universal)."""
        tag = self.latest()
        if tag is None:
            return None
        refused = [None]
        if self.rank == 0:
            for stale in self.tags():  # a save killed before `latest` moved
                if stale > tag:
                    shutil.rmtree(self.dir / stale, ignore_errors=True)
            try:
                check_files(self.dir / tag)
                if universal:
                    to_universal(self.dir / tag, self.dir / f"universal_{tag}")
            except ArpipeError as e:
                refused = [str(e)]
        dist.broadcast_object_list(refused, src=0)  # every rank stops with the same message
        if refused[0]:
            raise ArpipeError(refused[0])
        with safe_torch_load():
            engine.load_checkpoint(str(self.dir), tag=f"universal_{tag}" if universal else tag)
        dist.barrier()
        if universal and self.rank == 0:
            shutil.rmtree(self.dir / f"universal_{tag}", ignore_errors=True)
        state = json.loads((self.dir / tag / "trainer_state.json").read_text())
        LOG.info("resumed from %s (step %d%s)", self.dir / tag, state["step"],
                 f", written by {state['world_size']} ranks" if universal else "")
        return state


def to_universal(source: Path, target: Path) -> None:
    """DeepSpeed's ds_to_universal, in-process so its loads go through safe_torch_load."""
    import sys

    from deepspeed.checkpoint import ds_to_universal

    LOG.info("converting %s to a universal checkpoint for another world size", source)
    shutil.rmtree(target, ignore_errors=True)
    argv = sys.argv
    sys.argv = ["ds_to_universal", "--input_folder", str(source), "--output_folder", str(target),
                "--num_extract_workers", "1", "--num_merge_workers", "1", "--inject_missing_state"]
    try:
        args = ds_to_universal.parse_arguments()
    finally:
        sys.argv = argv
    with safe_torch_load(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        ds_to_universal.main(args)  # quiet: its progress bars and banners would fill the job log
