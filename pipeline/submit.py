"""`arpipe submit`: the chain shard -> train -> eval as Slurm jobs linked by --dependency=afterok.

The job scripts are launch/slurm/*.sbatch, usable by hand as well; this renders the sbatch
command lines from the config's `slurm` section (resources, array size) and submits them in
order, each waiting for the previous one to succeed. `--dry-run` prints them and the scripts.
"""

import shlex
import subprocess
import sys
from pathlib import Path

from pipeline import ArpipeError
from pipeline.config import Config, SlurmJob
from pipeline.data.storage import is_url, location

SCRIPTS = Path(__file__).resolve().parent.parent / "launch" / "slurm"


def _common(job: SlurmJob, cfg: Config, name: str, logs: Path, output: str = "%j") -> list[str]:
    options = [f"--job-name=arpipe-{name}", f"--output={logs}/{name}-{output}.out", *cfg.slurm.options, *job.options]
    if job.time:
        options.append(f"--time={job.time}")
    if job.partition:
        options.append(f"--partition={job.partition}")
    return options


def plan_jobs(cfg: Config, config_path: str, overrides: list[str], scripts: Path = SCRIPTS) -> list[tuple[str, list[str]]]:
    """(name, sbatch arguments without the dependency) for each job of the chain, in order."""
    slurm = cfg.slurm
    logs = Path(cfg.out_dir).absolute() / "slurm"
    data = location(cfg.data.path)
    jobs = []
    if slurm.shard:
        shard = slurm.shard
        stage = [shard.modality, "--input", *shard.inputs, "--out", data, *shard.args]
        first = 0
        if is_url(data):  # an object store has no lock for concurrent planners: task 0 plans alone first
            jobs.append(("shard-plan", [*_common(shard, cfg, "shard", logs, "%A_%a"), "--array=0",
                                        str(scripts / "shard.sbatch"), *stage]))
            first = 1
        if first < shard.tasks:
            array = f"--array={first}-{shard.tasks - 1}" + (f"%{shard.parallel}" if shard.parallel else "")
            jobs.append(("shard", [*_common(shard, cfg, "shard", logs, "%A_%a"), array, str(scripts / "shard.sbatch"),
                                   *stage]))
        jobs.append(("finalize", [*_common(shard, cfg, "finalize", logs), str(scripts / "shard.sbatch"), *stage]))
    train = slurm.train
    resources = [f"--nodes={train.nodes}", f"--signal={train.signal}"]
    if train.launcher == "srun":
        resources.append(f"--ntasks-per-node={train.tasks_per_node}")
        script = "train.sbatch"
    else:
        resources.append("--ntasks-per-node=1")
        script = "train-deepspeed.sbatch"
    if train.gpus_per_node:
        resources.append(f"--gpus-per-node={train.gpus_per_node}")
    jobs.append(("train", [*_common(train, cfg, "train", logs), *resources, str(scripts / script),
                           "--config", str(Path(config_path).absolute()), *overrides]))
    jobs.append(("eval", [*_common(slurm.eval, cfg, "eval", logs), f"--ntasks={slurm.eval.tasks}",
                          str(scripts / "eval.sbatch"), "--model", str(Path(cfg.out_dir).absolute()),
                          "--data", data, *slurm.eval.args]))
    return jobs


def submit(cfg: Config, config_path: str, overrides: list[str], dry_run: bool = False) -> dict[str, str]:
    if not SCRIPTS.is_dir():
        raise ArpipeError(f"{SCRIPTS} not found: `arpipe submit` runs from a checkout of arpipe")
    jobs = plan_jobs(cfg, config_path, overrides)
    # the jobs run the same interpreter (and so the same environment) as this command
    export = f"--export=ALL,ARPIPE_PYTHON={sys.executable}"
    if cfg.slurm.shard:  # the array's size, also for the parts of a split array (shard.sbatch)
        export += f",ARPIPE_NUM_TASKS={cfg.slurm.shard.tasks}"
    ids: dict[str, str] = {}
    previous = None
    for name, args in jobs:
        command = ["sbatch", "--parsable", export, *([f"--dependency=afterok:{previous}"] if previous else []), *args]
        if dry_run:
            previous = f"<{name} job id>"
            print(f"# {name}\n{shlex.join(command)}\n")
            continue
        (Path(cfg.out_dir) / "slurm").mkdir(parents=True, exist_ok=True)
        try:
            result = subprocess.run(command, capture_output=True, text=True, check=True, timeout=60)
        except FileNotFoundError:
            raise ArpipeError("sbatch not found: is this a Slurm login node? (try --dry-run)") from None
        except subprocess.CalledProcessError as e:
            raise ArpipeError(f"sbatch refused the {name} job: {e.stderr.strip()}") from None
        previous = ids[name] = result.stdout.strip().split(";")[0]
        print(f"{name}: job {previous}")
    if dry_run:
        for script in sorted({Path(a) for _, args in jobs for a in args if a.endswith(".sbatch")}):
            print(f"# ---- {script} ----\n{script.read_text()}")
    return ids
