"""Rank environment for every launcher.

`deepspeed` and `torchrun` set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT. `srun`
sets only SLURM_* variables and DeepSpeed does not read them (it falls back to MPI discovery
and fails without mpi4py), so we map them. A plain `python -m pipeline.train` is one process.

`python -m pipeline.train.dist` prints "ADDRESS PORT" of the Slurm allocation's master, for job
scripts that start another launcher per node.
"""

import os
import re
import socket
import subprocess


def first_host(nodelist: str) -> str:
    """The first host of a Slurm node list such as 'gpu[007-009,012],cpu1' -> 'gpu007'."""
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not match:
        return nodelist
    prefix, ranges = match.groups()
    return prefix + ranges.split(",")[0].split("-")[0] if ranges else prefix


def node_address(host: str) -> str:
    """The address Slurm knows for a node (NodeAddr): node names need not resolve in DNS."""
    try:
        out = subprocess.run(["scontrol", "show", "node", host], capture_output=True, text=True, timeout=10).stdout
        match = re.search(r"NodeAddr=(\S+)", out)
        return match.group(1) if match else host
    except (OSError, subprocess.TimeoutExpired):
        return host


def slurm_master() -> tuple[str, str]:
    """MASTER_ADDR and MASTER_PORT for a Slurm job: the first node's address, and a port derived
    from the job id (and array task) so jobs sharing a node do not collide."""
    env = os.environ
    nodelist = env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", "127.0.0.1"))
    port = 20000 + (int(env.get("SLURM_JOB_ID", "0")) * 7 + int(env.get("SLURM_ARRAY_TASK_ID", "0"))) % 20000
    return env.get("MASTER_ADDR") or node_address(first_host(nodelist)), env.get("MASTER_PORT") or str(port)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env() -> tuple[int, int, int]:
    """Fill in the rendezvous variables if a launcher left them out; returns (rank, world, local rank)."""
    env = os.environ
    if "RANK" not in env and "SLURM_PROCID" in env:
        env["RANK"] = env["SLURM_PROCID"]
        env["WORLD_SIZE"] = env.get("SLURM_NTASKS", "1")
        env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
        env["MASTER_ADDR"], env["MASTER_PORT"] = slurm_master()
    if "RANK" not in env:
        env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", str(free_port()))
    env.setdefault("LOCAL_RANK", "0")
    return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"])


def leave_together(exit_code: int = 0) -> None:
    """End a distributed command: wait for every rank, close the process groups and exit the
    process at once with `exit_code`. Returns only in a single-process run.

    Why not a plain return: a rank leaving while a peer still works (rank 0 logging to MLflow,
    say) pulls gloo's connections from under it, and a normal interpreter exit destroys
    collective handles still held by DeepSpeed after Python is half torn down, which aborts the
    process now and then ("terminate called without an active exception", SIGABRT) after all its
    work is done. Everything a command writes is closed before this call; logs are flushed here."""
    import logging
    import sys

    import torch.distributed as dist

    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return
    dist.barrier()
    dist.destroy_process_group()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)


if __name__ == "__main__":
    print(*slurm_master())
