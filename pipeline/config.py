"""Run configuration: YAML validated by pydantic, with dotted `key=value` overrides.

Every section forbids unknown keys, so a typo is an error that names the key and where it came
from (the file or the command line), never a silently ignored setting.
"""

import json
import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from pipeline import ArpipeError


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MixtureSource(Section):
    path: str  # a shard directory
    weight: float = Field(gt=0)  # its share of the training rows (the weights are normalised to sum to 1)
    name: str | None = None  # in metrics (val/NAME/bits_per_byte); default: the directory's name


class DataConfig(Section):
    path: str | None = None  # a shard directory (the --out of `arpipe shard`), or else:
    mixture: list[MixtureSource] = []  # shard directories with one codec, mixed by weight (pipeline/data/stream.py)
    block_len: int = 256  # variables per training sequence (text: tokens)
    batch_size: int = 16  # sequences per micro-batch per rank
    shuffle_window: int = 8  # chunks whose items are shuffled together
    shuffle_rows: bool = True  # text: also the blocks packed from a window, so a batch is not one document's
    num_workers: int = 0  # DataLoader worker processes per rank

    @model_validator(mode="after")
    def _one_source(self):
        if (self.path is None) == (not self.mixture):
            raise ValueError("give either data.path or data.mixture")
        names = [name for name, _, _ in self.sources()]
        if self.mixture and (len(set(names)) < len(names) or not all(re.fullmatch(r"[\w.-]+", n) for n in names)):
            raise ValueError(f"data.mixture: source names {names} must differ and be letters, digits, '_', '-', "
                             f"'.' (metric names): set `name` on the sources")
        return self

    def sources(self) -> list[tuple[str, str, float]]:
        """(name, path, weight) of each shard directory trained on: data.path alone, or the mixture."""
        if self.path is not None:
            return [(Path(self.path).name, self.path, 1.0)]
        return [(s.name or Path(s.path).name, s.path, s.weight) for s in self.mixture]


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
    run_name: str | None = None  # None: "<config file name> · <model> <size> · <modality>"
    register_as: str | None = None  # also register the exported model under this name in MLflow's model registry
    flush_every: float = 10.0  # seconds between metric batches sent by the background thread
    close_timeout: float = 30.0  # at the end, wait this long for an unreachable server, then write a file


class EvalConfig(Section):
    batch_size: int = 16
    max_chunks: int | None = None  # limit for the periodic evaluation during training
    stride: int | None = None  # also score with sliding windows of this stride (see `arpipe eval --stride`)
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
    cpus_per_rank: int | None = None  # CPUs for each rank and its DataLoader workers; None: 1 + data.num_workers
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
    _path: str = PrivateAttr("")  # the YAML file it was read from: names the MLflow run

    @property
    def path(self) -> str:
        return self._path
    # (path, JSON) of `--deepspeed_config`, merged into `deepspeed`: its errors name the file
    _deepspeed_json: tuple[str, dict] | None = PrivateAttr(None)

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


def read_deepspeed_json(path: str | Path) -> dict:
    try:
        ds = json.loads(Path(path).read_text())
    except OSError as e:
        raise ArpipeError(f"cannot read --deepspeed_config {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise ArpipeError(f"--deepspeed_config {path}: invalid JSON: {e}") from None
    if not isinstance(ds, dict):
        raise ArpipeError(f"--deepspeed_config {path}: expected a JSON object, got {type(ds).__name__}")
    return ds


def load_config(path: str | Path, overrides: list[str] = (), deepspeed_json: str | Path | None = None) -> Config:
    """The YAML at `path`, then the DeepSpeed JSON config `deepspeed_json` (`--deepspeed_config`)
    merged over its `deepspeed:` section, then the command line's `key=value` overrides."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except OSError as e:
        raise ArpipeError(f"cannot read config {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ArpipeError(f"{path}: invalid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise ArpipeError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    if deepspeed_json:
        ds = read_deepspeed_json(deepspeed_json)
        raw = merge(raw, {"deepspeed": ds})
    from_cli = parse_overrides(list(overrides))
    config = validate(merge(raw, from_cli), str(path), from_cli)
    config._path = str(path)
    if deepspeed_json:
        config._deepspeed_json = (str(deepspeed_json), ds)
    return config


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
