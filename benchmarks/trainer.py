"""Trainer overhead: a step of arpipe's trainer (`pipeline.train.trainer.train`: DeepSpeed engine,
1 process, ZeRO-0, fp32, MLflow tracking, metrics file, progress bar) against a bare PyTorch
loop with the same model, initial weights, batches (the same TokenStream), AdamW, clipping and
learning-rate schedule, in the same process on one CPU thread.

Per-step time is the interval between consecutive batch draws, median over the steady-state
steps (start-up, the first steps, the final checkpoint and export excluded). Two sizes: a GPT
whose step is mostly arithmetic, and a tiny one where per-step Python overhead is most of it.
Target: trainer ≤ 1.10× the bare loop's step time.

    python benchmarks/trainer.py [--repeats 3] [--work DIR]
"""

import os
import statistics
import time
from pathlib import Path

import common
from common import Row

SIZES = {  # name: (model, block_len, batch_size, steps, warm-up steps excluded)
    "GPT 4 layers × 256 (5.3M parameters), 8 × 256 tokens": (
        {"name": "gpt", "n_layer": 4, "n_head": 4, "d_model": 256}, 256, 8, 24, 6),
    "GPT 2 layers × 64 (0.6M parameters), 4 × 64 tokens": (
        {"name": "gpt", "n_layer": 2, "n_head": 2, "d_model": 64}, 64, 4, 150, 20),
}
TINY = {"GPT tiny": ({"name": "gpt", "n_layer": 1, "n_head": 2, "d_model": 32}, 32, 2, 8, 2)}


def config(shards: Path, out: Path, model: dict, block_len: int, batch_size: int, steps: int):
    from pipeline.config import validate

    return validate({
        "out_dir": str(out), "seed": 0,
        "data": {"path": str(shards), "block_len": block_len, "batch_size": batch_size},
        "model": model,
        "optim": {"lr": 1e-3, "warmup_steps": 5},
        "train": {"steps": steps, "zero_stage": 0, "precision": "fp32", "log_every": 10, "ckpt_every": 10**6},
        "tracking": {"uri": f"sqlite:///{out.parent / 'mlflow.db'}", "experiment": "bench-trainer"},
    }, "benchmarks/trainer.py")


def step_times(stamps: list[float], warmup: int) -> list[float]:
    return [b - a for a, b in zip(stamps[warmup:], stamps[warmup + 1 :])]


def run_trainer(cfg, on_batch=None) -> tuple[list[float], list[float]]:
    """The real trainer; returns batch-draw times and the per-step losses it wrote. `on_batch`
    is called before each batch is drawn (a profiler's step)."""
    import json

    from pipeline.train import trainer

    stamps = []

    class TimedBatches(trainer.Batches):
        def __next__(self):
            stamps.append(time.perf_counter())
            if on_batch:
                on_batch()
            return super().__next__()

    original, trainer.Batches = trainer.Batches, TimedBatches
    try:
        trainer.train(cfg)
    finally:
        trainer.Batches = original
    losses = [json.loads(line)["loss"] for line in (Path(cfg.out_dir) / "metrics.jsonl").read_text().splitlines()]
    return stamps, losses


def run_bare(cfg) -> tuple[list[float], list[float]]:
    """The same training as a plain PyTorch loop."""
    import torch

    from pipeline.data.shards import Shards
    from pipeline.data.stream import Batches, TokenStream
    from pipeline.models import build_model
    from pipeline.train.trainer import lr_at, param_groups

    shards = Shards(cfg.data.path)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, shards.codec.vocab_size, shards.codec.model_shape(cfg.data.block_len))
    optimizer = torch.optim.AdamW(param_groups(model, cfg.optim.weight_decay), lr=cfg.optim.lr,
                                  betas=cfg.optim.betas, eps=cfg.optim.eps)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(s, cfg) / cfg.optim.lr)
    batches = Batches(TokenStream(shards, "train", cfg.data.block_len, cfg.data.batch_size, seed=cfg.seed,
                                  shuffle_window=cfg.data.shuffle_window, shuffle_rows=cfg.data.shuffle_rows))
    model.train()
    stamps, losses = [], []
    for _ in range(cfg.train.steps):
        stamps.append(time.perf_counter())
        loss = model(model.from_data(next(batches)), loss=True)  # the trainer's loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    return stamps, losses


def main(argv=None):
    p = common.parser(__doc__.split("\n\n")[0])
    args = p.parse_args(argv)
    sizes = TINY if args.tiny else SIZES
    if args.tiny:
        args.repeats = 1
    common.single_core()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ["PYTHONWARNINGS"] = "ignore"
    import warnings

    import torch

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    from shard import shakespeare
    from stream import text_shards

    work = common.work_dir(args)
    source, what = shakespeare(work, args.tiny)
    shards = text_shards(work, source, "paragraph", 1)
    rows, notes = [], []
    for name, (model, block_len, batch_size, steps, warmup) in sizes.items():
        medians = {"trainer": [], "bare": []}
        for r in range(args.repeats):  # interleaved
            for variant, fn in (("trainer", run_trainer), ("bare", run_bare)):
                cfg = config(shards, work / "runs" / f"{variant}-{len(rows)}-{r}", model, block_len, batch_size, steps)
                stamps, losses = fn(cfg)
                medians[variant].append(statistics.median(step_times(stamps, warmup)))
                if variant == "trainer":
                    trainer_losses = losses
            drift = max(abs(a - b) for a, b in zip(trainer_losses, losses))
        t, b = statistics.median(medians["trainer"]), statistics.median(medians["bare"])
        rows.append(Row(f"trainer step, {name}", f"{t * 1e3:.1f} ms", f"bare PyTorch loop {b * 1e3:.1f} ms",
                        t / b, 1.10, at_most=True))
        notes.append(f"{name}: largest per-step loss difference between trainer and bare loop over {steps} "
                     f"steps: {drift:.2e} nats (same model, data and optimizer)")
    from pipeline.data.shards import Shards

    notes.append(f"ratio = trainer step time / bare step time; data: {what} paragraphs, "
                 f"{Shards(shards).codec.vocab_size}-token BPE")
    common.report("Trainer overhead (benchmarks/trainer.py)", rows, args, notes)
    return rows


if __name__ == "__main__":
    main()
