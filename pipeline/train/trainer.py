"""The training loop: DeepSpeed ZeRO 0–3 on any launcher, exact resume, MLflow on rank 0.

`train(cfg)` builds a `Trainer` and runs it. The parts, in the order a run meets them:

  Trainer.__init__   distributed start, shards, model, DeepSpeed engine, data stream, resume
                     from the latest checkpoint, MLflow run (rank 0)
  Trainer.run        the loop: train_step, log, periodic eval and checkpoints, signal stop
  Trainer.train_step one optimizer step = `train.grad_accum` micro-batches per rank
  Trainer.finish     final checkpoint, eval and export

The loop never waits for the device inside an optimizer step: each micro-batch adds its loss
and a non-finite flag to a device tensor, and once per optimizer step one all-reduce of that
tensor (with the stop request) overlaps the last backward pass; its one read-back decides, on
every rank alike, whether the update is applied or the whole step is skipped (a non-finite loss
on any rank) and whether to stop for a signal.
"""

import json
import math
import os
import signal
import time
import types
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import yaml

from pipeline import ArpipeError, __version__
from pipeline.config import Config
from pipeline.data.shards import Shards
from pipeline.data.stream import Batches, TokenStream
from pipeline.eval.nll import check_stride, evaluate_sources, headline
from pipeline.export import full_fp32_state, save_export
from pipeline.log import LOG, Progress, duration, setup_logging
from pipeline.models import build_model, check_ordering
from pipeline.tracking import SystemMetrics, Tracker, run_name, source_tags, ui_command
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


def seed_rank(seed: int, rank: int, step: int = 0) -> None:
    """Seed this rank's torch RNG (dropout, MADE's orderings) with a stream of its own: ranks
    that drew the same numbers would all drop the same units. A run started at `step` with no
    saved RNG state for this rank (a new world size) gets its own stream too."""
    torch.manual_seed(int(np.random.SeedSequence([seed, rank, step]).generate_state(1)[0]))


def allow_skipping_updates(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Let the trainer turn DeepSpeed's update at the end of a step into a no-op: with
    `optimizer.apply_updates = False`, every call of its step() (ZeRO-3 calls it once per
    parameter sub-group) changes nothing, while DeepSpeed still clears the step's gradients.
    An instance attribute rather than a subclass: DeepSpeed's ZeRO accepts torch's AdamW by type."""
    step = optimizer.step
    optimizer.apply_updates = True

    def gated_step(self, *args, **kwargs):
        return step(*args, **kwargs) if self.apply_updates else None

    optimizer.step = types.MethodType(gated_step, optimizer)  # a method: LR schedulers wrap `step.__func__`
    return optimizer


def start_deepspeed():
    import deepspeed

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # a minutes-long JIT build we don't need
    deepspeed.init_distributed(verbose=False)
    return deepspeed


def train(cfg: Config) -> dict:
    return Trainer(cfg).run()


class Trainer:
    """One training run of `cfg` on this rank (see the module docstring for the parts)."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.rank, self.world, local_rank = rank_env()
        setup_logging(self.rank)
        deepspeed = start_deepspeed()
        self.stop = StopRequest()
        self.out = Path(cfg.out_dir)
        self.sources = {name: Shards(path) for name, path, _ in cfg.data.sources()}  # data.path or data.mixture
        self.shards = next(iter(self.sources.values()))  # its codec is every source's (TokenStream checks)
        self.codec = self.shards.codec
        self.shape = self.codec.model_shape(cfg.data.block_len)

        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        self.model = build_model(cfg.model, self.codec.vocab_size, self.shape)
        check_ordering(self.model, self.shards.manifest["codec"], self.shards.dir)
        check_stride(self.model, self.codec, cfg.data.block_len, cfg.eval.stride)
        self.model.set_activation_checkpointing(cfg.train.activation_checkpointing)  # models: per block
        seed_rank(cfg.seed, self.rank)
        # torch's AdamW (no JIT build, bitwise resume); the fused CUDA kernel on GPUs, where the
        # per-tensor loop made the optimizer step dominate a 124M GPT's step (benchmarks/RESULTS.md)
        self.optimizer = allow_skipping_updates(torch.optim.AdamW(
            param_groups(self.model, cfg.optim.weight_decay), lr=cfg.optim.lr, betas=cfg.optim.betas,
            eps=cfg.optim.eps, fused=torch.cuda.is_available() or None))
        self.ds_config = deepspeed_config(cfg, self.world)
        self.checkpoints = Checkpoints(self.out / "checkpoints", self.rank, cfg.train.keep_last)
        saved = self.checkpoints.saved_state()
        if cfg.train.init_from and not saved:  # a resumed run continues from its checkpoint instead
            from pipeline.hf import warm_start

            warm_start(self.model, cfg.model, cfg.train.init_from, self.codec)
        # ZeRO partitions are per rank: another world size loads through a universal checkpoint
        universal = bool(saved) and saved["world_size"] != self.world and cfg.train.zero_stage > 0
        if universal:
            self.ds_config["checkpoint"] = {"load_universal": True}
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=self.model, optimizer=self.optimizer, config=self.ds_config,
            # the schedule is a pure function of the step; LambdaLR keeps it in DeepSpeed's checkpoint
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, cfg) / cfg.optim.lr))
        if cfg.train.compile:  # the first steps compile the forward and backward graphs
            self.engine.compile()

        self.batches = Batches(TokenStream(list(self.sources.values()), "train", cfg.data.block_len,
                                           cfg.data.batch_size, weights=[w for _, _, w in cfg.data.sources()],
                                           seed=cfg.seed, rank=self.rank, world=self.world,
                                           num_workers=cfg.data.num_workers, shuffle_window=cfg.data.shuffle_window,
                                           shuffle_rows=cfg.data.shuffle_rows))
        self.resumed = self._resume(universal)
        self.tracker = self._start_tracking()
        run_id = [self.tracker.run_id]  # for the other nodes' system metrics
        dist.broadcast_object_list(run_id, src=0)
        self.system = SystemMetrics(self.tracker, run_id[0]) if local_rank == 0 else None
        self.tokens_per_step = cfg.data.batch_size * self.model.num_vars * cfg.train.grad_accum * self.world
        self.peak_flops = gpu_peak_flops(cfg.train.precision)

    def _resume(self, universal: bool) -> dict | None:
        """Load the latest checkpoint, if any: engine, stream position, RNG; sets self.step."""
        state = self.checkpoints.load(self.engine, universal)
        self.step, self.run_id = (state["step"], state["run_id"]) if state else (0, None)
        if state:
            self.batches.load_state_dict([r["data"] for r in state["ranks"]], self.rank)
            if state["world_size"] == self.world:
                set_rng_state(state["ranks"][self.rank]["rng"])
            else:  # another world size: each rank a fresh stream of its own
                seed_rank(self.cfg.seed, self.rank, self.step)
        return state

    def _start_tracking(self) -> Tracker:
        """The MLflow run (rank 0; a resumed run continues its own), the run's files in out_dir."""
        cfg, shards = self.cfg, self.shards
        n_params = sum(p.numel() for p in self.model.parameters())
        self.label = Path(cfg.path).stem if cfg.path else self.out.name  # the config's name
        tracker = Tracker(cfg.tracking.uri, cfg.tracking.experiment, run_id=self.run_id, active=self.rank == 0,
                          run_name=cfg.tracking.run_name or run_name(self.label, cfg.model["name"], n_params,
                                                                     self.codec.modality),
                          tags=source_tags(cfg.path or self.out.name) if self.rank == 0 else None,
                          fallback=self.out / "mlflow-unsent.jsonl", flush_every=cfg.tracking.flush_every,
                          close_timeout=cfg.tracking.close_timeout)
        # a killed run may have sent metrics past the checkpoint it resumes from: they are logged
        # once (the resumed run recomputes the same losses bitwise), never twice
        self.logged_through = tracker.last_step("train/loss_nats") if self.resumed else 0
        if self.rank != 0:
            return tracker
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(), sort_keys=False))
        (self.out / "deepspeed.json").write_text(json.dumps(self.ds_config, indent=1))
        _truncate_metrics(self.out / "metrics.jsonl", self.step)
        if not self.resumed:
            tracker.log_params(cfg.model_dump())
            tracker.log_artifact(self.out / "config.yaml")
            tracker.log_artifact(self.out / "deepspeed.json")
            for name, source in self.sources.items():  # a mixture's manifests under data/NAME
                tracker.log_artifact(source.meta_dir / "manifest.json",
                                     f"data/{name}" if len(self.sources) > 1 else None)
                tracker.log_shards(source, {"train": "training", "val": "validation"})
        summary = self.model.summary()
        tracker.set_tags({"world_size": self.world, "arpipe_version": __version__,
                          "zero_stage": cfg.train.zero_stage, "precision": cfg.train.precision,
                          "parameters": n_params, "modality": self.codec.modality,
                          "data": " ".join(s.dir for s in self.sources.values()),
                          "nodes": os.environ.get("SLURM_JOB_NODELIST", os.uname().nodename),
                          "tokenizer_sha256": shards.manifest["codec"].get("tokenizer_sha256", ""),
                          "manifest_sha256": shards.manifest_sha256,
                          "codec": json.dumps(shards.manifest["codec"]),
                          "deepspeed_config": json.dumps(self.ds_config), **summary})
        LOG.info("model %s: %.2fM parameters, shape %s, vocab %d%s; %d ranks, ZeRO-%d, %s; MLflow run %s",
                 cfg.model["name"], n_params / 1e6, self.shape, self.codec.vocab_size,
                 "".join(f", {k} {v}" for k, v in summary.items()), self.world, cfg.train.zero_stage,
                 cfg.train.precision, tracker.run_id)
        return tracker

    def run(self) -> dict:
        cfg = self.cfg
        # a bar on a terminal; in a Slurm .out file or a pipe, log() writes a line per log_every steps
        self.progress = Progress(cfg.train.steps, "train", unit="step", initial=self.step, active=self.rank == 0,
                                 line_every=None)
        self.nonfinite = 0  # skipped steps in a row
        self.window_start, self.window_steps = time.perf_counter(), 0
        self.run_start, self.run_first_step = time.perf_counter(), self.step
        self.engine.train()
        while self.step < cfg.train.steps:
            loss, stop = self.train_step()
            if loss is None:  # skipped: the same step again, on new batches
                continue
            self.step += 1
            self.progress.update(1)
            self.log(loss)
            if cfg.train.eval_every and self.step % cfg.train.eval_every == 0 and self.step < cfg.train.steps:
                self.evaluate()
            if self.step % cfg.train.ckpt_every == 0 and self.step < cfg.train.steps:
                self.save()
            if stop:  # a rank got SIGTERM/SIGUSR1: save and leave; the requeued job resumes
                self.progress.close()
                return self.leave_for_signal()
        self.progress.close()
        return self.finish()

    def train_step(self) -> tuple[float | None, bool]:
        """One optimizer step of `train.grad_accum` micro-batches per rank. Returns the mean loss
        over ranks and micro-batches (None if the step was skipped because a loss was not
        finite on some rank) and whether a rank was asked to stop."""
        cfg, engine, model = self.cfg, self.engine, self.model
        sums = torch.zeros(2, dtype=torch.float64, device=engine.device)  # finite loss sum, non-finite count
        for micro in range(cfg.train.grad_accum):
            x = next(self.batches).to(engine.device, non_blocking=True)  # (batch, variables in the data's ordering)
            inputs = model.from_data(x)
            # the mean NLL through the engine (ZeRO-3 gathers in module hooks); models/base.py's
            # forward(x, loss=True): no fp32 logits of the whole batch for vocabulary heads
            loss = engine(inputs, loss=True)
            if (self.rank, self.batches.consumed) in cfg.train.inject_nonfinite:
                loss = loss * float("nan")
            bad = ~torch.isfinite(loss.detach())
            sums += torch.stack([torch.where(bad, 0.0, loss.detach()).double(), bad.double()])
            if micro == cfg.train.grad_accum - 1:  # the step's one reduction, overlapping the last backward
                flags = torch.cat([sums, torch.tensor([float(self.stop.requested)], dtype=torch.float64)
                                   .to(engine.device, non_blocking=True)])
                reduced = dist.all_reduce(flags, async_op=True)
            engine.backward(loss)
            if micro < cfg.train.grad_accum - 1:
                engine.step()  # accumulates; DeepSpeed updates only at the step's last micro-batch
        reduced.wait()
        loss_sum, nonfinite, stop = flags.tolist()  # the step's one read-back
        self.optimizer.apply_updates = nonfinite == 0
        engine.step()
        self.optimizer.apply_updates = True
        if nonfinite:
            self._skipped_step()
            return None, stop > 0
        self.nonfinite = 0
        return loss_sum / (cfg.train.grad_accum * self.world), stop > 0

    def _skipped_step(self) -> None:
        """A step whose update was not applied: put the schedule back a step, count, maybe stop."""
        if self.engine.was_step_applied():  # DeepSpeed stepped the schedule for the update we dropped
            scheduler = self.scheduler
            scheduler.last_epoch -= 1
            scheduler._last_lr = [base * lr_at(scheduler.last_epoch, self.cfg) / self.cfg.optim.lr
                                  for base in scheduler.base_lrs]
            for group, lr in zip(self.optimizer.param_groups, scheduler._last_lr):
                group["lr"] = lr
        self.nonfinite += 1
        LOG.warning("step %d: non-finite loss, step skipped on every rank (%d in a row, limit %d)",
                    self.step + 1, self.nonfinite, self.cfg.train.max_nonfinite)
        if self.nonfinite >= self.cfg.train.max_nonfinite:
            self.tracker.close("FAILED")
            raise ArpipeError(
                f"stopping: {self.nonfinite} non-finite losses in a row at step {self.step + 1}; the last good "
                f"checkpoint is {self.checkpoints.latest() or 'none'} (lower optim.lr or check the data, "
                f"then resume)")

    def log(self, loss: float) -> None:
        """Every train.log_every steps: metrics to MLflow, and a line to the log where no progress
        bar shows (a batch job's .out file); every step: OUT/metrics.jsonl."""
        cfg, step = self.cfg, self.step
        self.window_steps += 1
        if step % cfg.train.log_every == 0 or step == cfg.train.steps:
            now = time.perf_counter()
            grad_norm = self.engine.get_global_grad_norm()
            tokens_per_s = self.window_steps * self.tokens_per_step / (now - self.window_start)
            metrics = {"train/loss_nats": loss, "train/loss_bits": loss / math.log(2),
                       "train/lr": self.scheduler.get_last_lr()[0],
                       "train/grad_norm": float(grad_norm) if grad_norm is not None else None,
                       "train/tokens_per_s": tokens_per_s, "train/samples_per_s": tokens_per_s / self.model.num_vars}
            if self.peak_flops:  # model FLOPs utilisation, GPUs only
                metrics["train/mfu"] = tokens_per_s * self.model.train_flops_per_variable() / (self.peak_flops * self.world)
            self._track(metrics)
            if self.progress.bar is not None:
                self.progress.bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_s:.0f}")
            else:
                per_step = (now - self.run_start) / (step - self.run_first_step)
                mfu = f", MFU {metrics['train/mfu']:.1%}" if "train/mfu" in metrics else ""
                LOG.info("step %d/%d: loss %.4f nats (%.4f bits), lr %.3g, %.0f tokens/s%s, ETA %s", step,
                         cfg.train.steps, loss, loss / math.log(2), metrics["train/lr"], tokens_per_s, mfu,
                         duration(per_step * (cfg.train.steps - step)))
            self.window_start, self.window_steps = now, 0
        if self.rank == 0:
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": step, "loss": loss, "lr": self.scheduler.get_last_lr()[0]}) + "\n")

    def _track(self, metrics: dict) -> None:
        if self.step > self.logged_through:
            self.tracker.log_metrics(metrics, self.step)

    def save(self) -> None:
        """A checkpoint of this step (collective)."""
        self.tracker.flush()  # first, so metrics up to a checkpoint are as durable as the checkpoint
        rank_state = {"data": self.batches.state_dict(), "rng": rng_state()}
        shared = {"run_id": self.tracker.run_id, "model": self.cfg.model, "vocab_size": self.codec.vocab_size,
                  "shape": list(self.shape), "data": self.shards.dir, "config": self.cfg.model_dump()}
        self.checkpoints.save(self.engine, self.step, rank_state, shared)

    def evaluate(self) -> dict:
        """Exact validation NLL (collective), logged at this step."""
        self.engine.eval()
        result = evaluate_sources(self.engine.module, self.sources, "val", self.cfg.data.block_len,
                                  self.cfg.eval.batch_size, rank=self.rank, world=self.world,
                                  max_chunks=self.cfg.eval.max_chunks, stride=self.cfg.eval.stride)
        self.engine.train()
        self._track({f"val/{k}": v for k, v in headline(result).items()})
        LOG.info("step %d: val %s", self.step, " ".join(f"{k}={v:.4f}" for k, v in headline(result).items()))
        return result

    def leave_for_signal(self) -> dict:
        LOG.warning("stop requested by signal: checkpointing at step %d and exiting", self.step)
        self.save()
        if self.system:
            self.system.close()
        self.tracker.close("KILLED")
        marker = os.environ.get("ARPIPE_PREEMPT_MARKER")  # set by launch/slurm/train*.sbatch
        if marker and self.rank == 0:
            Path(marker).write_text(f"{self.step}\n")
        dist.barrier()  # leave together: an early exit would make srun kill the others
        return {"step": self.step, "stopped": True}

    def finish(self) -> dict:
        """The last checkpoint, the final evaluation and the consolidated fp32 export."""
        cfg = self.cfg
        if self.checkpoints.latest() != f"step_{self.step:08d}":
            self.save()
        final = self.evaluate()  # also with train.eval_every 0: the run ends with its validation figure
        state_dict = full_fp32_state(self.engine.module)
        if self.system:
            self.system.close()
        if self.rank == 0:
            export = save_export(self.out / "export", state_dict, cfg.model, self.codec.vocab_size, self.shape,
                                 self.shards.manifest["codec"], self.shards.meta_dir,
                                 {"step": self.step, "run_id": self.tracker.run_id, "run_name": self.tracker.run_name,
                                  "tracking_uri": self.tracker.uri, "data": self.shards.dir,
                                  "block_len": cfg.data.block_len})
            self.tracker.log_model(export, f"{self.label}-{cfg.model['name']}", self.step, cfg.tracking.register_as)
            LOG.info("exported %s; MLflow: %s", export, ui_command(self.tracker.uri))
            self.tracker.close("FINISHED")
        dist.barrier()
        return {"step": self.step, "run_id": self.tracker.run_id, **final}


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop per-step records after the checkpoint we resume from: they are about to be redone."""
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in lines))
