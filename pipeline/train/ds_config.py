"""Our config -> DeepSpeed's JSON config.

Batch sizes, clipping, precision and the ZeRO stage are derived from `data`, `train` and `optim`,
so they always agree; the YAML `deepspeed:` section (with a `--deepspeed_config` JSON file merged
over it) is merged over the result for everything else (offload, bucket sizes, communication
settings) and may not contradict the derived keys.
"""

from pipeline import ArpipeError
from pipeline.config import Config, merge

# derived key (dotted) -> where it is set
OWNERS = {
    "train_micro_batch_size_per_gpu": "data.batch_size",
    "gradient_accumulation_steps": "train.grad_accum",
    "train_batch_size": "data.batch_size × train.grad_accum × world size",
    "gradient_clipping": "optim.grad_clip",
    "zero_optimization.stage": "train.zero_stage",
    "bf16.enabled": "train.precision",
    "torch_autocast.enabled": "train.precision",
}
UNSUPPORTED = ("fp16", "optimizer", "scheduler")
MISSING = object()


def lookup(section: dict, dotted: str):
    for part in dotted.split("."):
        section = section.get(part, MISSING) if isinstance(section, dict) else MISSING
    return section


def check(user: dict, derived: dict, name) -> None:
    """Refuse keys of `user` that contradict `derived` or that arpipe sets itself; `name(key)` says
    where a key was written (the YAML section or the JSON file)."""
    for key, owner in OWNERS.items():
        value = lookup(user, key)
        if value is not MISSING and value != lookup(derived, key):
            raise ArpipeError(f"{name(key)}={value} contradicts {owner} (= {lookup(derived, key)}); set it there")
    for key in UNSUPPORTED:
        if key in user:
            raise ArpipeError(f"{name(key)} is not supported: arpipe sets precision from train.precision "
                              f"and builds AdamW with its schedule from optim.*")


def deepspeed_config(cfg: Config, world: int) -> dict:
    derived = {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": cfg.train.grad_accum,
        "train_batch_size": cfg.data.batch_size * cfg.train.grad_accum * world,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {"stage": cfg.train.zero_stage},
        "bf16": {"enabled": cfg.train.precision == "bf16"},
        "torch_autocast": {"enabled": cfg.train.precision == "bf16-autocast", "dtype": "bfloat16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if cfg._deepspeed_json:  # first, so a key from the file is blamed on the file
        path, from_file = cfg._deepspeed_json
        check(from_file, derived, lambda key: f"{path}: {key}")
    check(cfg.deepspeed, derived, lambda key: f"deepspeed.{key}")
    ds = merge(derived, cfg.deepspeed)
    zero = ds["zero_optimization"]
    if zero.get("offload_optimizer") or zero.get("offload_param"):
        ds["zero_force_ds_cpu_optimizer"] = False  # we pass torch AdamW (bitwise resume, no JIT build)
    return ds
