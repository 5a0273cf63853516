"""The training loop: DeepSpeed ZeRO 0–3 on any launcher, exact resume, MLflow on rank 0.

One optimizer step = `train.grad_accum` micro-batches per rank. Every step all-reduces one
small tensor (loss sum, a non-finite flag, a stop request) so all ranks agree on skipping a bad
step and on stopping for a signal at the same step.
"""

import hashlib
import json
import math
import os
import signal
import subprocess
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from tqdm import tqdm

from pipeline import ArpipeError, __version__
from pipeline.config import Config
from pipeline.data.shards import Shards
from pipeline.data.stream import Batches, TokenStream
from pipeline.export import full_fp32_state, save_export
from pipeline.log import LOG, setup_logging
from pipeline.models import build_model, check_ordering
from pipeline.tracking import Tracker, ui_command
from pipeline.train.checkpoint import Checkpoints, rng_state, set_rng_state
from pipeline.train.dist import rank_env
from pipeline.train.ds_config import deepspeed_config


def lr_at(step: int, cfg: Config) -> float:
    """Linear warmup to optim.lr, then cosine decay to optim.min_lr at train.steps."""
    o, total = cfg.optim, cfg.train.steps
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    progress = min(1.0, (step - o.warmup_steps) / max(1, total - o.warmup_steps))
    return o.min_lr + 0.5 * (o.lr - o.min_lr) * (1 + math.cos(math.pi * progress))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices (linear and embedding weights) only; never norms, biases or vectors."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": other, "weight_decay": 0.0}]


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).parent).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


# Dense peak FLOP/s per GPU for bf16 (and TF32 for fp32), by name, for the MFU estimate.
PEAK_FLOPS = {"H200": (989e12, 494e12), "H100": (989e12, 494e12), "A100": (312e12, 156e12),
              "L40S": (362e12, 183e12), "A10": (125e12, 62.5e12), "L4": (121e12, 60e12)}


def gpu_peak_flops(precision: str) -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, (bf16, tf32) in PEAK_FLOPS.items():
        if key in name:
            return bf16 if precision == "bf16" else tf32
    return None


class StopRequest:
    """SIGTERM / SIGUSR1 (Slurm preemption, `--signal=USR1@N`): checkpoint at the next step, exit."""

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.requested = True


def train(cfg: Config) -> dict:
    rank, world, _ = rank_env()
    setup_logging(rank)
    import deepspeed

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # a minutes-long JIT build we don't need
    deepspeed.init_distributed(verbose=False)
    stop = StopRequest()

    shards = Shards(cfg.data.path)
    codec = shards.codec
    shape = codec.model_shape(cfg.data.block_len)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, codec.vocab_size, shape)
    check_ordering(model, shards.manifest["codec"], shards.dir)
    n_params = sum(p.numel() for p in model.parameters())
    # torch's AdamW (no JIT build, bitwise resume); the fused CUDA kernel on GPUs, where the
    # per-tensor loop made the optimizer step dominate a 124M GPT's step (benchmarks/RESULTS.md)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.optim.weight_decay), lr=cfg.optim.lr,
                                  betas=cfg.optim.betas, eps=cfg.optim.eps, fused=torch.cuda.is_available() or None)
    ds_config = deepspeed_config(cfg, world)
    out = Path(cfg.out_dir)
    checkpoints = Checkpoints(out / "checkpoints", rank, cfg.train.keep_last)
    saved = checkpoints.saved_state()
    # ZeRO partitions are per rank: another world size loads through a universal checkpoint
    universal = bool(saved) and saved["world_size"] != world and cfg.train.zero_stage > 0
    if universal:
        ds_config["checkpoint"] = {"load_universal": True}
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, config=ds_config,
        # the schedule is a pure function of the step; LambdaLR keeps it in DeepSpeed's checkpoint
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, cfg) / cfg.optim.lr))
    if cfg.train.compile:  # the first steps compile the forward and backward graphs
        engine.compile()

    batches = Batches(TokenStream(shards, "train", cfg.data.block_len, cfg.data.batch_size, seed=cfg.seed,
                                  rank=rank, world=world, num_workers=cfg.data.num_workers,
                                  shuffle_window=cfg.data.shuffle_window))
    state = checkpoints.load(engine, universal)
    step, run_id = 0, None
    if state:
        step, run_id = state["step"], state["run_id"]
        batches.load_state_dict([r["data"] for r in state["ranks"]], rank)
        if state["world_size"] == world:
            set_rng_state(state["ranks"][rank]["rng"])
        else:  # new ranks: a fresh, distinct stream (only dropout draws from it)
            torch.manual_seed(cfg.seed + 1000 * step + rank)

    tracker = Tracker(cfg.tracking.uri, cfg.tracking.experiment, run_id=run_id,
                      run_name=cfg.tracking.run_name or out.name, active=rank == 0,
                      fallback=out / "mlflow-unsent.jsonl", flush_every=cfg.tracking.flush_every,
                      close_timeout=cfg.tracking.close_timeout)
    metrics_file = out / "metrics.jsonl"
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(), sort_keys=False))
        (out / "deepspeed.json").write_text(json.dumps(ds_config, indent=1))
        _truncate_metrics(metrics_file, step)
        if not state:
            tracker.log_params(cfg.model_dump())
            tracker.log_artifact(out / "config.yaml")
            tracker.log_artifact(out / "deepspeed.json")
            tracker.log_artifact(shards.dir / "manifest.json")
        tracker.set_tags({"world_size": world, "arpipe_version": __version__, "git_commit": git_commit(),
                          "zero_stage": cfg.train.zero_stage, "precision": cfg.train.precision,
                          "parameters": n_params, "modality": codec.modality, "data": str(shards.dir),
                          "nodes": os.environ.get("SLURM_JOB_NODELIST", os.uname().nodename),
                          "tokenizer_sha256": shards.manifest["codec"].get("tokenizer_sha256", ""),
                          "manifest_sha256": hashlib.sha256((shards.dir / "manifest.json").read_bytes()).hexdigest(),
                          "codec": json.dumps(shards.manifest["codec"]), "deepspeed_config": json.dumps(ds_config),
                          **model.summary()})
        LOG.info("model %s: %.2fM parameters, shape %s, vocab %d%s; %d ranks, ZeRO-%d, %s; MLflow run %s",
                 cfg.model["name"], n_params / 1e6, shape, codec.vocab_size,
                 "".join(f", {k} {v}" for k, v in model.summary().items()), world, cfg.train.zero_stage,
                 cfg.train.precision, tracker.run_id)

    tokens_per_step = cfg.data.batch_size * model.num_vars * cfg.train.grad_accum * world
    peak = gpu_peak_flops(cfg.train.precision)
    shared = {"run_id": tracker.run_id, "model": cfg.model, "vocab_size": codec.vocab_size,
              "shape": list(shape), "data": str(shards.dir), "config": cfg.model_dump()}

    def save(at: int):
        tracker.flush()  # first, so metrics up to a checkpoint are as durable as the checkpoint
        rank_state = {"data": batches.state_dict(), "rng": rng_state()}
        checkpoints.save(engine, at, rank_state, {**shared, "run_id": tracker.run_id})

    bar = tqdm(total=cfg.train.steps, initial=step, desc="train", disable=rank != 0 or None, dynamic_ncols=True)
    nonfinite, stopped = 0, False  # non-finite losses in a row
    window_start, window_steps = time.perf_counter(), 0
    engine.train()
    while step < cfg.train.steps:
        loss_sum, stop_flag, micro = 0.0, 0.0, 0
        while micro < cfg.train.grad_accum:
            x = next(batches).to(engine.device, non_blocking=True)  # (batch, variables in the data's ordering)
            inputs = model.from_data(x)
            logits = model.to_sequence(engine(inputs))  # (batch, variables in the model's ordering, vocab)
            loss = F.cross_entropy(logits.float().flatten(0, 1), model.to_sequence(inputs).flatten())
            if batches.consumed in cfg.train.inject_nonfinite:
                loss = loss * float("nan")
            finite = bool(torch.isfinite(loss))
            flags = torch.tensor([loss.item() if finite else 0.0, float(not finite), float(stop.requested)],
                                 dtype=torch.float64, device=engine.device)  # NCCL reduces device tensors
            dist.all_reduce(flags)
            if flags[1] > 0:  # any rank saw a non-finite loss: no rank learns from this micro-batch
                nonfinite += 1
                LOG.warning("step %d: non-finite loss, batch skipped (%d in a row, limit %d)",
                            step + 1, nonfinite, cfg.train.max_nonfinite)
                if nonfinite >= cfg.train.max_nonfinite:
                    tracker.close("FAILED")
                    raise ArpipeError(
                        f"stopping: {nonfinite} non-finite losses in a row at step {step + 1}; the last good "
                        f"checkpoint is {checkpoints.latest() or 'none'} (lower optim.lr or check the data, "
                        f"then resume)")
                continue
            nonfinite = 0
            engine.backward(loss)
            engine.step()
            loss_sum += flags[0].item()
            stop_flag = max(stop_flag, flags[2].item())
            micro += 1
        step += 1
        window_steps += 1
        loss_value = loss_sum / (cfg.train.grad_accum * world)
        bar.update(1)
        if step % cfg.train.log_every == 0 or step == cfg.train.steps:
            elapsed = time.perf_counter() - window_start
            grad_norm = engine.get_global_grad_norm()
            metrics = {"train/loss_nats": loss_value, "train/loss_bits": loss_value / math.log(2),
                       "train/lr": scheduler.get_last_lr()[0],
                       "train/grad_norm": float(grad_norm) if grad_norm is not None else None,
                       "train/tokens_per_s": window_steps * tokens_per_step / elapsed,
                       "train/samples_per_s": window_steps * tokens_per_step / model.num_vars / elapsed}
            if peak:  # model FLOPs utilisation, GPUs only
                metrics["train/mfu"] = metrics["train/tokens_per_s"] * model.train_flops_per_variable() / (peak * world)
            tracker.log_metrics(metrics, step)
            bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{metrics['train/tokens_per_s']:.0f}")
            window_start, window_steps = time.perf_counter(), 0
        if rank == 0:
            with open(metrics_file, "a") as f:
                f.write(json.dumps({"step": step, "loss": loss_value, "lr": scheduler.get_last_lr()[0]}) + "\n")
        if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < cfg.train.steps:
            _evaluate(engine, shards, cfg, rank, world, tracker, step)
        if step % cfg.train.ckpt_every == 0 and step < cfg.train.steps:
            save(step)
        if stop_flag > 0:  # a rank got SIGTERM/SIGUSR1: save and leave; the requeued job resumes
            LOG.warning("stop requested by signal: checkpointing at step %d and exiting", step)
            save(step)
            stopped = True
            break
    bar.close()
    if stopped:
        tracker.close("KILLED")
        marker = os.environ.get("ARPIPE_PREEMPT_MARKER")  # set by launch/slurm/train*.sbatch
        if marker and rank == 0:
            Path(marker).write_text(f"{step}\n")
        dist.barrier()  # leave together: an early exit would make srun kill the others
        return {"step": step, "stopped": True}

    if checkpoints.latest() != f"step_{step:08d}":
        save(step)
    final = _evaluate(engine, shards, cfg, rank, world, tracker, step) if cfg.train.eval_every else {}
    state_dict = full_fp32_state(engine.module)
    if rank == 0:
        export = save_export(out / "export", state_dict, cfg.model, codec.vocab_size, shape,
                             shards.manifest["codec"], shards.dir,
                             {"step": step, "run_id": tracker.run_id, "tracking_uri": tracker.uri,
                              "data": str(shards.dir.absolute()), "block_len": cfg.data.block_len})
        LOG.info("exported %s; MLflow: %s", export, ui_command(tracker.uri))
        tracker.close("FINISHED")
    dist.barrier()
    return {"step": step, "run_id": tracker.run_id, **final}


def _evaluate(engine, shards, cfg, rank, world, tracker, step) -> dict:
    from pipeline.eval.nll import evaluate_nll, headline

    engine.eval()
    result = evaluate_nll(engine.module, shards, "val", cfg.data.block_len, cfg.eval.batch_size,
                          rank=rank, world=world, max_chunks=cfg.eval.max_chunks)
    engine.train()
    tracker.log_metrics({f"val/{k}": v for k, v in headline(result).items()}, step)
    LOG.info("step %d: val %s", step, " ".join(f"{k}={v:.4f}" for k, v in headline(result).items()))
    return result


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop per-step records after the checkpoint we resume from: they are about to be redone."""
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in lines))
