"""Run configuration: YAML validated by pydantic, with dotted `key=value` overrides.

Every section forbids unknown keys, so a typo is an error that names the key and where it came
from (the file or the command line), never a silently ignored setting.
"""

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from pipeline import ArpipeError


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataConfig(Section):
    path: str  # a shard directory (the --out of `arpipe shard`)
    block_len: int = 256  # variables per training sequence (text: tokens)
    batch_size: int = 16  # sequences per micro-batch per rank
    shuffle_window: int = 8  # chunks whose items are shuffled together
    num_workers: int = 0  # DataLoader worker processes per rank


class OptimConfig(Section):
    lr: float = 3e-4
    min_lr: float = 3e-5  # the cosine decays to this
    warmup_steps: int = 100
    weight_decay: float = 0.1  # on matrices only, not on norms, biases or the start vector
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0


class TrainConfig(Section):
    steps: int = 1000  # optimizer steps
    grad_accum: int = 1
    zero_stage: Literal[0, 1, 2, 3] = 0
    # bf16: DeepSpeed's bf16 weights with fp32 master weights in its optimizer wrapper;
    # bf16-autocast: fp32 weights, forward under torch.autocast(bfloat16), the optimizer on fp32
    # directly (DeepSpeed's torch_autocast) — the plain PyTorch recipe (benchmarks/gpu.py compares)
    precision: Literal["fp32", "bf16", "bf16-autocast"] = "fp32"
    compile: bool = False  # torch.compile the model through DeepSpeed (engine.compile()); for GPUs
    activation_checkpointing: bool = False  # recompute each block's activations in the backward pass (less memory)
    log_every: int = 10
    ckpt_every: int = 200
    keep_last: int = 3  # checkpoints kept on disk
    eval_every: int = 0  # validation NLL every N steps, and always at the end (0: only at the end)
    max_nonfinite: int = 5  # steps in a row with a non-finite loss before the run stops (each is skipped)
    # debug: [rank, batch] pairs (batch = 1-based count that rank drew) whose loss becomes NaN
    inject_nonfinite: list[tuple[int, int]] = []
    # starting weights of a fresh run (a resumed run continues from its checkpoint): an arpipe export,
    # run or checkpoint, or an HF GPT-2 or Llama directory; the optimizer and the step start fresh
    init_from: str | None = None


class TrackingConfig(Section):
    uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///mlruns/mlflow.db
    experiment: str = "arpipe"
    run_name: str | None = None
    flush_every: float = 10.0  # seconds between metric batches sent by the background thread
    close_timeout: float = 30.0  # at the end, wait this long for an unreachable server, then write a file


class EvalConfig(Section):
    batch_size: int = 16
    max_chunks: int | None = None  # limit for the periodic evaluation during training
    samples: int = 4  # unconditional samples
    prompts: int = 4  # completions of the starts of validation items
    prompt_len: int = 32
    temperature: float = 1.0
    top_k: int | None = None


class SlurmJob(Section):
    time: str | None = None  # --time, e.g. "04:00:00"
    partition: str | None = None
    options: list[str] = []  # any other sbatch options, e.g. ["--qos=high"]


class SlurmShard(SlurmJob):
    """The shard stage as a job array; `arpipe shard <modality> --input … --out data.path <args>`."""
    modality: str = "text"
    inputs: list[str]
    args: list[str] = []  # more `arpipe shard` options, e.g. ["--vocab-size", "50257"]
    tasks: int = 16  # array size: the inputs are cut into this many tasks
    parallel: int | None = None  # at most this many array elements at once (--array=…%N)


class SlurmTrain(SlurmJob):
    nodes: int = 1
    tasks_per_node: int = 1  # ranks per node: one per GPU
    gpus_per_node: int = 0
    launcher: Literal["srun", "deepspeed"] = "srun"  # srun per rank, or the deepspeed launcher per node
    signal: str = "USR1@300"  # checkpoint and requeue this long before the time limit


class SlurmEval(SlurmJob):
    tasks: int = 1
    args: list[str] = []  # more `arpipe eval` options


class SlurmConfig(Section):
    """For `arpipe submit`: the chain shard -> train -> eval as dependent Slurm jobs."""
    options: list[str] = []  # sbatch options for every job, e.g. ["--account=proj"]
    shard: SlurmShard | None = None  # None: data.path already holds shards
    train: SlurmTrain = SlurmTrain()
    eval: SlurmEval = SlurmEval()


class Config(Section):
    out_dir: str  # checkpoints, export, metrics: a path every rank shares (data.path may be s3://)
    seed: int = 0
    data: DataConfig
    model: dict = {}  # `name` picks the family (default gpt); the family's Config checks the rest
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    tracking: TrackingConfig = TrackingConfig()
    eval: EvalConfig = EvalConfig()
    deepspeed: dict = {}  # passed through to DeepSpeed over the config derived from the above
    slurm: SlurmConfig = SlurmConfig()

    @field_validator("out_dir")
    @classmethod
    def _on_a_file_system(cls, value: str) -> str:
        if "://" in value:  # checkpoints rename `latest` atomically and DeepSpeed writes local files
            raise ValueError(f"{value} is a URL: object storage holds shards (data.path), while checkpoints and "
                             f"exports need a local or shared file system path")
        return value


def parse_overrides(overrides: list[str]) -> dict:
    """['train.steps=10', 'model.n_layer=2'] -> nested dict; values are parsed as YAML."""
    nested: dict = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ArpipeError(f"override {item!r} is not of the form section.key=value")
        node = nested
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ArpipeError(f"override {item!r} conflicts with another override")
        node[leaf] = yaml.safe_load(value)
    return nested


def merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_config(path: str | Path, overrides: list[str] = ()) -> Config:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except OSError as e:
        raise ArpipeError(f"cannot read config {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ArpipeError(f"{path}: invalid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise ArpipeError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    from_cli = parse_overrides(list(overrides))
    return validate(merge(raw, from_cli), str(path), from_cli)


def validate(raw: dict, source: str, from_cli: dict = {}) -> Config:
    def where(loc) -> str:
        node = from_cli
        for part in loc:
            if not isinstance(node, dict) or part not in node:
                return source
            node = node[part]
        return "command line"

    def fail(e: ValidationError, prefix=()):
        err = e.errors()[0]
        loc = prefix + tuple(str(p) for p in err["loc"])
        more = f" (and {e.error_count() - 1} more)" if e.error_count() > 1 else ""
        raise ArpipeError(f"{where(loc)}: {'.'.join(loc)}: {err['msg']}{more}") from None

    try:
        config = Config.model_validate(raw)
    except ValidationError as e:
        fail(e)
    from pipeline.models import model_config

    try:
        config.model = model_config({"name": "gpt", **config.model}).model_dump()
    except ValidationError as e:
        fail(e, ("model",))
    except ArpipeError as e:
        raise ArpipeError(f"{where(('model', 'name'))}: {e}") from None
    return config
