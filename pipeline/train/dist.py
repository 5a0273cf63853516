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

from pipeline import ArpipeError


def expand_hostlist(nodelist: str) -> list[str]:
    """Slurm's compressed host list, expanded as `scontrol show hostnames` does: 'gpu[007-008,012],
    rack[1-2]_n[01-02]' -> gpu007 gpu008 gpu012 rack1_n01 rack1_n02 rack2_n01 rack2_n02 (a range keeps
    its first number's zero padding; text after a bracket, '-ib', stays)."""
    hosts = []
    for item in re.findall(r"(?:[^,\[]|\[[^\]]*\])+", nodelist.strip()):  # commas outside brackets
        names = [""]
        for i, part in enumerate(re.split(r"\[([^\]]*)\]", item)):  # text, ranges, text, …
            if i % 2 == 0:
                names = [name + part for name in names]
                continue
            numbers = []
            for span in part.split(","):
                first, _, last = span.partition("-")
                if not first.isdigit() or not (last or first).isdigit():
                    raise ArpipeError(f"cannot read the Slurm node list {nodelist!r} (range [{part}])")
                numbers += [str(n).zfill(len(first)) for n in range(int(first), int(last or first) + 1)]
            names = [name + number for name in names for number in numbers]
        hosts += names
    return hosts


def slurm_hosts(nodelist: str) -> list[str]:
    """The hosts of a Slurm node list from `scontrol show hostnames`; our own expansion where
    scontrol is missing or refuses the list."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             timeout=10)
        if out.returncode == 0 and out.stdout.split():
            return out.stdout.split()
    except (OSError, subprocess.TimeoutExpired):
        pass
    return expand_hostlist(nodelist)


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
    return env.get("MASTER_ADDR") or node_address(slurm_hosts(nodelist)[0]), env.get("MASTER_PORT") or str(port)


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
