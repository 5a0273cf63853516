"""Our config -> DeepSpeed's JSON config.

Batch sizes, clipping, precision and the ZeRO stage are derived from `data`, `train` and `optim`,
so they always agree; the YAML `deepspeed:` section is merged over the result for everything
else (offload, bucket sizes, communication settings) and may not contradict the derived keys.
"""

from pipeline import ArpipeError
from pipeline.config import Config, merge


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
    user = cfg.deepspeed
    owner = {
        "train_micro_batch_size_per_gpu": "data.batch_size",
        "gradient_accumulation_steps": "train.grad_accum",
        "train_batch_size": "data.batch_size × train.grad_accum × world size",
        "gradient_clipping": "optim.grad_clip",
    }
    for key, ours in owner.items():
        if key in user and user[key] != derived[key]:
            raise ArpipeError(f"deepspeed.{key}={user[key]} contradicts {ours} (= {derived[key]}); set it there")
    if user.get("zero_optimization", {}).get("stage", cfg.train.zero_stage) != cfg.train.zero_stage:
        raise ArpipeError("deepspeed.zero_optimization.stage contradicts train.zero_stage; set it there")
    for key in ("fp16", "optimizer", "scheduler"):
        if key in user:
            raise ArpipeError(f"deepspeed.{key} is not supported: arpipe sets precision from train.precision "
                              f"and builds AdamW with its schedule from optim.*")
    ds = merge(derived, user)
    zero = ds["zero_optimization"]
    if zero.get("offload_optimizer") or zero.get("offload_param"):
        ds["zero_force_ds_cpu_optimizer"] = False  # we pass torch AdamW (bitwise resume, no JIT build)
    return ds
