"""GPU training throughput and MFU of arpipe's trainer (run by benchmarks/gpu.sh on one GPU).

Each case runs `pipeline.train.trainer.train` in a fresh process (1 rank) on synthetic shards
written by the real shard writer (uniform random tokens: the cost of a step does not depend on
the data), and times the steps after a warm-up. The table (CASES, in the order they run):

  gpt-bare, llama-bare   the baseline: GPT-2 small (12 × 768, 50304-token vocabulary, 124M) and
                         configs/text-llama.yaml's Llama (121M: RoPE, RMSNorm, SwiGLU, 4 key/value
                         heads), 16 × 1024 tokens a step, in a plain PyTorch loop (bf16 autocast,
                         fused AdamW, clipping) with the trainer's loss, forward(x, loss=True)
                         (chunked fp32 cross-entropy, pipeline/models/loss.py); then, in the same
                         process, the loop with full fp32 logits: its step time and peak memory
  gpt, gpt-autocast,     the trainer on the same model and batches, ZeRO-1, precision bf16
  llama, llama-autocast  (DeepSpeed's bf16 weights + fp32 master) or bf16-autocast (fp32 weights,
                         autocast forward, the optimizer on fp32 directly); target: ≤ 1.05× the
                         plain loop's step
  llama-zero2/-zero3,    the 124M Llama with ZeRO-2, ZeRO-3, activation checkpointing
  llama-ckpt
  llama-350m(-ckpt),     the Llama at 350M and 1.3B parameters (1.3B: 8 × 1024 tokens a step;
  llama-1.3b(-zero3-ckpt)  with ZeRO-3 and activation checkpointing)
  wavenet, pixelcnn      configs/audio-wavenet.yaml's model (8 crops of 11262 samples) and
                         configs/image-pixelcnn.yaml's (32 images of 28×28 at 256 levels), with
                         the kernels that take their time (torch profiler, 3 steps)
  gpt-compile            GPT with train.compile (torch.compile through DeepSpeed)
  gpt-phases(-zero0/     (not run by default) diagnostics: DeepSpeed's forward, backward and step
  -noclip)               each synchronised and timed; with ZeRO-0; without gradient clipping

gpu.sh gives the whole table `--budget` seconds (450): a case that would start with less than
30 s left is not run and is listed as such, so the report is always written.

On the GPU, attention may only run as flash attention (torch.nn.attention.sdpa_kernel with
FLASH_ATTENTION alone): a GPT or Llama case that finishes used it.

MFU = tokens/s × FLOPs per token / the GPU's dense bf16 peak (989 TFLOP/s on H100 and H200 SXM,
pipeline.train.trainer.PEAK_FLOPS). FLOPs per token are the model's train_flops_per_variable():
for GPT 6·N + 12·L·d·T (N parameters without the position table, L layers, d width, T context:
forward 2·N + attention's QKᵀ and AV 4·L·d·T, backward twice the forward), the same formula
the trainer's train/mfu uses. Target: GPT MFU ≥ 40%.

    bash benchmarks/gpu.sh                   # on the GPU machine (see benchmarks/README.md)
    python benchmarks/gpu.py --tiny          # a CPU dry run of the same code at a tiny size
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import common
from common import Row

GPT124M = {"name": "gpt", "n_layer": 12, "n_head": 12, "d_model": 768}
LLAMA = {  # configs/text-llama.yaml's shape at three sizes (4 key/value heads per 12 or 16 or 32)
    "124M": {"name": "llama", "n_layer": 12, "n_head": 12, "n_kv_head": 4, "d_model": 768, "d_ff": 2304},
    "350M": {"name": "llama", "n_layer": 24, "n_head": 16, "n_kv_head": 4, "d_model": 1024, "d_ff": 2816},
    "1.3B": {"name": "llama", "n_layer": 24, "n_head": 32, "n_kv_head": 8, "d_model": 2048, "d_ff": 5632},
}
WAVENET = {"name": "wavenet", "stacks": 3, "layers_per_stack": 10, "residual_channels": 64, "gate_channels": 64,
           "skip_channels": 256}
PIXELCNN = {"name": "pixelcnn", "gated": True, "n_layer": 12, "hidden": 128, "kernel": 3, "first_kernel": 7,
            "head": 256}


def case(modality: str, model: dict, block_len: int, batch_size: int, *, steps: int = 30, warmup: int = 10,
         seconds: int = 120, zero: int = 1, precision: str = "bf16", checkpointing: bool = False,
         compile: bool = False, profile: bool = False) -> dict:
    """One row of the table: a model on its data shape and the trainer's settings (a `-bare`
    case runs the same model in a plain PyTorch loop instead). `profile`: also record the
    kernels that take the time (what limits a model far from the peak)."""
    return {"modality": modality, "model": model, "block_len": block_len, "batch_size": batch_size,
            "steps": steps, "warmup": warmup, "seconds": seconds, "profile": profile,
            "train": {"zero_stage": zero, "precision": precision, "activation_checkpointing": checkpointing,
                      "compile": compile}}


# In the order they run: when gpu.sh's time is short, the last cases are the ones left out.
CASES = {
    "gpt-bare": case("text", GPT124M, 1024, 16),
    "gpt": case("text", GPT124M, 1024, 16),
    "gpt-autocast": case("text", GPT124M, 1024, 16, precision="bf16-autocast"),
    "llama-bare": case("text", LLAMA["124M"], 1024, 16),
    "llama": case("text", LLAMA["124M"], 1024, 16),
    "llama-autocast": case("text", LLAMA["124M"], 1024, 16, precision="bf16-autocast"),
    "llama-zero2": case("text", LLAMA["124M"], 1024, 16, zero=2),
    "llama-zero3": case("text", LLAMA["124M"], 1024, 16, zero=3),
    "llama-ckpt": case("text", LLAMA["124M"], 1024, 16, checkpointing=True),
    "llama-350m": case("text", LLAMA["350M"], 1024, 16, steps=20, warmup=8),
    "llama-350m-ckpt": case("text", LLAMA["350M"], 1024, 16, steps=20, warmup=8, checkpointing=True),
    "llama-1.3b": case("text", LLAMA["1.3B"], 1024, 8, steps=16, warmup=6, seconds=150),
    "llama-1.3b-zero3-ckpt": case("text", LLAMA["1.3B"], 1024, 8, steps=16, warmup=6, seconds=150, zero=3,
                                  checkpointing=True),
    "wavenet": case("audio", WAVENET, 11262, 8, steps=30, profile=True),
    "pixelcnn": case("image", PIXELCNN, 0, 32, steps=30, profile=True),
    "gpt-compile": case("text", GPT124M, 1024, 16, steps=40, warmup=20, seconds=240, compile=True),
    # diagnostics, not run by default: DeepSpeed's phases synchronised and timed
    "gpt-phases": case("text", GPT124M, 1024, 16),
    "gpt-phases-zero0": case("text", GPT124M, 1024, 16, zero=0),
    "gpt-phases-noclip": case("text", GPT124M, 1024, 16),
}
DEFAULT = [name for name in CASES if "-phases" not in name]
TINY_MODELS = {"gpt": {"name": "gpt", "n_layer": 1, "n_head": 2, "d_model": 32},
               "llama": {"name": "llama", "n_layer": 1, "n_head": 2, "d_model": 32},
               "wavenet": {**WAVENET, "stacks": 1, "layers_per_stack": 3, "residual_channels": 8, "gate_channels": 8,
                           "skip_channels": 8},
               "pixelcnn": {**PIXELCNN, "n_layer": 1, "hidden": 8, "head": 8}}


def tiny(spec: dict) -> dict:
    """The same case at a size a CPU runs in seconds (`--tiny`: the code path, not the numbers)."""
    model = TINY_MODELS[spec["model"]["name"]]
    block_len = {"text": 32, "audio": 64, "image": 0}[spec["modality"]]
    return {**spec, "model": model, "block_len": block_len, "batch_size": 2, "steps": 6, "warmup": 2,
            "seconds": 300 if spec["train"]["compile"] else 120,
            "train": {**spec["train"], "precision": "fp32" if spec["train"]["precision"] == "bf16" else
                      spec["train"]["precision"]}}


TEXT_VOCAB = 50304


def text_codec(vocab_size: int):
    """A byte-level BPE codec with `vocab_size` ids (bytes, unused fillers, EOS): the shape of
    GPT-2's vocabulary without training a tokenizer on a corpus the GPU machine does not have."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from pipeline.codecs.text import EOS, TextCodec

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    vocab.update({f"<|unused{i}|>": i for i in range(len(vocab), vocab_size - 1)})
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([EOS])
    return TextCodec(tokenizer)


def synthetic_shards(out: Path, modality: str, tiny: bool) -> Path:
    """Random tokens through the real ShardWriter, done-marker and manifest."""
    import numpy as np

    from pipeline.codecs.audio import AudioCodec
    from pipeline.codecs.image import ImageCodec
    from pipeline.data.shards import SPLITS, ShardWriter, finalize, prepare, write_json_atomic

    if (out / "manifest.json").exists():
        return out
    codec = {"text": lambda: text_codec(TEXT_VOCAB), "audio": lambda: AudioCodec(16000),
             "image": lambda: ImageCodec(28, 28, 1, 256)}[modality]()

    def make(inputs, root, directory):
        if modality == "text":
            codec.save(directory)
        return codec

    settings = {"modality": modality, "val_fraction": 0.01, "chunk_bytes": 2 << 20, "shard_bytes": 256 << 20,
                "synthetic": True}
    plan = prepare(out, settings, [out / "synthetic"], 1, make)
    writers = {s: ShardWriter(out, s, 0, codec.token_dtype, settings["chunk_bytes"], settings["shard_bytes"])
               for s in SPLITS}
    rng = np.random.default_rng(0)
    items, length = {"text": (2000, 1000), "audio": (32, 160000), "image": (10000, 784)}[modality]
    if tiny:
        items = min(items, 200) if modality != "audio" else 4
        length = min(length, 2000)
    for i in range(items):
        n = int(rng.integers(length // 2, 2 * length)) if modality == "text" else length
        tokens = rng.integers(0, codec.vocab_size - (modality == "text"), n).astype(codec.token_dtype)
        writers["val" if i % 50 == 49 else "train"].add(tokens, {"key": f"synthetic:{i}", "bytes": n})
    marker = {"task": 0, "shards": [e for s in SPLITS for e in writers[s].close()], "skipped_files": [],
              "skipped_items": {}, "skipped_examples": {}}
    plan.marker(0).parent.mkdir(exist_ok=True)
    write_json_atomic(plan.marker(0), marker)
    finalize(out)
    return out


class NoTracker:
    """Stands in for pipeline.tracking.Tracker where MLflow is not installed: every call does nothing."""
    run_id, uri = None, "none"

    def __init__(self, *args, **kwargs):
        pass

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def time_engine_phases(warmup: int) -> dict:
    """Wrap DeepSpeedEngine.forward/backward/step with a synchronisation and a timer each (after
    `warmup` steps): a diagnostic run (it removes the overlap of CPU and GPU at those points)."""
    import deepspeed
    import torch

    engine = deepspeed.runtime.engine.DeepSpeedEngine
    phases = {"forward": 0.0, "backward": 0.0, "step": 0.0, "calls": 0}

    def wrap(name, fn):
        def timed(self, *args, **kwargs):
            if phases["calls"] < 3 * warmup:
                phases["calls"] += 1
                return fn(self, *args, **kwargs)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            start = time.perf_counter()
            out = fn(self, *args, **kwargs)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            phases[name] += time.perf_counter() - start
            return out
        return timed

    for name in ("forward", "backward", "step"):
        setattr(engine, name, wrap(name, getattr(engine, name)))
    return phases


def run_case(name: str, work: Path, tiny_size: bool, no_tracking: bool = False) -> dict:
    """One training run in this process; returns its numbers."""
    import importlib.util

    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from pipeline.config import validate
    from pipeline.data.shards import Shards
    from pipeline.models import build_model
    from pipeline.train import trainer as arpipe_trainer
    from trainer import run_trainer, step_times  # benchmarks/trainer.py

    spec = tiny(CASES[name]) if tiny_size else CASES[name]
    shards = Shards(synthetic_shards(work / f"shards-{spec['modality']}", spec["modality"], tiny_size))
    cuda = torch.cuda.is_available()
    out = work / "runs" / f"{name}-{time.time_ns()}"
    cfg = validate({
        "out_dir": str(out), "seed": 0,
        "data": {"path": shards.dir, "block_len": spec["block_len"], "batch_size": spec["batch_size"],
                 "num_workers": 0},
        "model": spec["model"],
        "optim": {"lr": 3e-4, "warmup_steps": 10, "grad_clip": 0.0 if name.endswith("-noclip") else 1.0},
        "train": {"steps": spec["steps"], **spec["train"], "log_every": 10, "ckpt_every": 10**6},
        "tracking": {"uri": f"sqlite:///{work / 'mlflow.db'}", "experiment": "bench-gpu"},
    }, "benchmarks/gpu.py")
    notes = [", ".join(f"{k} {v}" for k, v in spec["train"].items() if v or k == "zero_stage")]
    if no_tracking or importlib.util.find_spec("mlflow") is None:  # e.g. not carried to the GPU machine
        arpipe_trainer.Tracker = NoTracker
        notes.append("MLflow tracking off")
    phases = time_engine_phases(spec["warmup"]) if "-phases" in name else None
    profiler = kernel_profile(spec["warmup"]) if spec["profile"] and cuda else None
    with attention_kernels(cuda):
        stamps, losses = run_trainer(cfg, on_batch=profiler.step if profiler else None)
    if profiler:
        profiler.stop()
        notes.append("time by kernel over 3 steps: " + top_kernels(profiler))
    if cuda and spec["modality"] == "text":
        notes.append("flash attention only")
    if phases:
        count = max(1, len(stamps) - spec["warmup"])
        notes.append("synchronised DeepSpeed phases (the rest is the trainer's own code and its syncs): "
                     + ", ".join(f"{k} {v / count * 1e3:.1f} ms" for k, v in phases.items() if k != "calls"))
    times = sorted(step_times(stamps, spec["warmup"]))
    step = times[len(times) // 2]
    net = build_model(cfg.model, shards.codec.vocab_size, shards.codec.model_shape(spec["block_len"]))
    variables = spec["batch_size"] * net.num_vars
    flops = net.train_flops_per_variable()
    peak = arpipe_trainer.gpu_peak_flops("bf16")
    return {"case": name, "device": torch.cuda.get_device_name() if cuda else "cpu", "train": spec["train"],
            "parameters": sum(p.numel() for p in net.parameters()), "step_s": step,
            "step_s_p10": times[len(times) // 10], "step_s_p90": times[len(times) * 9 // 10],
            "variables_per_step": variables, "tokens_per_s": variables / step, "flops_per_token": flops,
            "tflops": variables * flops / step / 1e12, "mfu": variables * flops / step / peak if peak else None,
            "peak_tflops": peak / 1e12 if peak else None, "final_loss": losses[-1], "notes": notes,
            "max_memory_gb": torch.cuda.max_memory_allocated() / 1e9 if cuda else None}


def kernel_profile(warmup: int):
    """A torch profiler over 3 steps after the warm-up, stepped once per batch drawn."""
    from torch.profiler import ProfilerActivity, profile, schedule

    profiler = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA],
                       schedule=schedule(wait=warmup, warmup=2, active=3, repeat=1))
    profiler.start()
    return profiler


def top_kernels(profiler, count: int = 6) -> str:
    """The GPU kernels that took most of the device time, with their share."""
    events = [e for e in profiler.key_averages() if e.self_device_time_total > 0]
    total = sum(e.self_device_time_total for e in events) or 1
    events.sort(key=lambda e: e.self_device_time_total, reverse=True)
    return ", ".join(f"{e.key[:60]} {e.self_device_time_total / total:.0%}" for e in events[:count])


def attention_kernels(cuda: bool):
    """On a GPU, attention may run only as flash attention: SDPA raises where flash cannot run
    (dtype, head size, a mask), so a case that finishes used it. Elsewhere: no restriction."""
    import contextlib

    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION]) if cuda else contextlib.nullcontext()


def plain_loop(model, optimizer, batches, steps: int, warmup: int, lean: bool, device: str) -> dict:
    """Training steps in plain PyTorch (bf16 autocast on GPUs, clipping, fused AdamW, one
    loss.item() per step), timed like the trainer; the last 10 steps synchronise between phases.
    lean: the loss is forward(x, loss=True), as the trainer's (chunked fp32 for vocabulary heads);
    else the fp32 cross-entropy of the whole batch's logits, the loss before it."""
    import torch
    import torch.nn.functional as F

    from trainer import step_times  # benchmarks/trainer.py

    cuda = device == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    stamps, phases = [], {"data": 0.0, "forward": 0.0, "backward": 0.0, "optimizer": 0.0}

    def mark(phase, since):
        if cuda:
            torch.cuda.synchronize()
        now = time.perf_counter()
        phases[phase] += now - since
        return now

    with attention_kernels(cuda):
        for step in range(steps + 10):
            timed = step >= steps
            t = stamps.append(time.perf_counter()) or stamps[-1]
            x = next(batches).to(device, non_blocking=True)
            t = mark("data", t) if timed else t
            with torch.autocast(device, dtype=torch.bfloat16, enabled=cuda):
                if lean:
                    loss = model(x, loss=True)
                else:
                    logits = model(x)
            if not lean:
                loss = F.cross_entropy(logits.float().flatten(0, 1), x.flatten())
            t = mark("forward", t) if timed else t
            loss.backward()
            t = mark("backward", t) if timed else t
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            loss.item()
            t = mark("optimizer", t) if timed else t
    times = sorted(step_times(stamps[: steps + 1], warmup))
    return {"step_s": times[len(times) // 2], "step_s_p10": times[len(times) // 10],
            "step_s_p90": times[len(times) * 9 // 10], "final_loss": loss.item(),
            "phases": ", ".join(f"{k} {v / 10 * 1e3:.1f} ms" for k, v in phases.items()),
            "max_memory_gb": torch.cuda.max_memory_allocated() / 1e9 if cuda else None}


def run_bare(name: str, work: Path, tiny_size: bool) -> dict:
    """The baseline for the trainer on a GPU: the same model and batches in a plain PyTorch loop
    with the trainer's loss; for models with a vocabulary head also the fp32-logits loss, after
    it in the same process, for its step time and peak memory."""
    import torch

    from pipeline.data.shards import Shards
    from pipeline.data.stream import Batches, TokenStream
    from pipeline.models import build_model
    from pipeline.models.loss import VocabHead
    from pipeline.train.trainer import gpu_peak_flops, param_groups

    spec = tiny(CASES[name]) if tiny_size else CASES[name]
    modality, model_cfg, block_len, batch_size = spec["modality"], spec["model"], spec["block_len"], spec["batch_size"]
    steps, warmup = spec["steps"], spec["warmup"]
    shards = Shards(synthetic_shards(work / f"shards-{modality}", modality, tiny_size))
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    torch.manual_seed(0)
    model = build_model(model_cfg, shards.codec.vocab_size, shards.codec.model_shape(block_len)).to(device)
    optimizer = torch.optim.AdamW(param_groups(model, 0.1), lr=3e-4, betas=(0.9, 0.95), fused=cuda)
    batches = Batches(TokenStream(shards, "train", block_len, batch_size, seed=0))
    lean = plain_loop(model, optimizer, batches, steps, warmup, True, device)
    step = lean["step_s"]
    variables, flops = batch_size * model.num_vars, model.train_flops_per_variable()
    peak = gpu_peak_flops("bf16")
    notes = [f"plain PyTorch loop, bf16 autocast, fused AdamW{', flash attention only' if cuda else ''}; "
             f"synchronised phases: {lean['phases']}"]
    result = {"case": name, "device": torch.cuda.get_device_name() if cuda else "cpu",
              "parameters": sum(p.numel() for p in model.parameters()), "variables_per_step": variables,
              "tokens_per_s": variables / step, "flops_per_token": flops, "tflops": variables * flops / step / 1e12,
              "mfu": variables * flops / step / peak if peak else None, "peak_tflops": peak / 1e12 if peak else None,
              "notes": notes, **{k: v for k, v in lean.items() if k != "phases"}}
    if any(isinstance(m, VocabHead) for m in model.modules()):
        logits = plain_loop(model, optimizer, batches, steps, warmup, False, device)
        result["logits_loss"] = logits
        notes.append(f"with the fp32-logits loss instead: step {logits['step_s'] * 1e3:.1f} ms, "
                     f"peak memory {logits['max_memory_gb'] or 0:.1f} GB, synchronised phases: {logits['phases']}")
    return result


def main(argv=None):
    p = common.parser(__doc__.split("\n\n")[0])
    p.add_argument("--cases", nargs="+", choices=list(CASES), default=DEFAULT)
    p.add_argument("--budget", type=float, default=450, help="seconds for all cases: the ones that would start "
                   "after it are left out (and listed)")
    p.add_argument("--run", choices=list(CASES), help=argparse.SUPPRESS)
    p.add_argument("--no-tracking", action="store_true", help="no MLflow (the default where mlflow is not installed)")
    args = common.parse(p, argv)
    work = args.work or common.REPO / "runs" / "bench-gpu"
    work.mkdir(parents=True, exist_ok=True)
    if args.run:  # the child process of one case
        result = run_bare(args.run, work, args.tiny) if args.run.endswith("-bare") else \
            run_case(args.run, work, args.tiny, args.no_tracking)
        print("RESULT " + json.dumps(result), flush=True)
        return None
    results, failed, left_out = [], [], []
    started = time.time()
    for name in args.cases:
        remaining = args.budget - (time.time() - started)
        if remaining < 30 and not args.tiny:  # every case needs its start-up: report what we have in time
            left_out.append(name)
            continue
        limit = (tiny(CASES[name]) if args.tiny else CASES[name])["seconds"]
        limit = limit if args.tiny else min(limit, remaining)
        command = [sys.executable, __file__, "--run", name, "--work", str(work)] + (["--tiny"] if args.tiny else []) \
            + (["--no-tracking"] if args.no_tracking else [])
        start = time.time()
        try:
            proc = subprocess.run(command, capture_output=True, text=True, timeout=limit)
            found = [line[7:] for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            if proc.returncode or not found:
                raise RuntimeError(f"exit {proc.returncode}: {(proc.stderr or proc.stdout)[-2500:]}")
            results.append(json.loads(found[-1]))
            print(f"{name}: {time.time() - start:.0f} s: {found[-1]}", flush=True)
        except (subprocess.TimeoutExpired, RuntimeError) as e:
            failed.append(name)
            print(f"{name}: FAILED after {time.time() - start:.0f} s: {e}", flush=True)
    rows, notes = [], []
    for r in results:
        unit = {"gpt": "tok", "llama": "tok", "wavenet": "samples", "pixelcnn": "sub-pixels"}[r["case"].split("-")[0]]
        target = 0.40 if r["case"].startswith(("gpt", "llama")) and not args.tiny else None
        mfu = f", MFU {r['mfu']:.1%}" if r["mfu"] is not None else ""
        rows.append(Row(f"{r['case']} ({r['parameters'] / 1e6:.1f}M parameters, {r['variables_per_step']} {unit}/step)",
                        f"{common.rate(r['tokens_per_s'], 1, unit)}, {r['tflops']:.1f} TFLOP/s{mfu}",
                        f"peak {r['peak_tflops']:.0f} TFLOP/s" if r["peak_tflops"] else "",
                        r["mfu"], target))
        notes.append(f"{r['case']}: step {r['step_s'] * 1e3:.1f} ms (p10 {r['step_s_p10'] * 1e3:.1f}, "
                     f"p90 {r['step_s_p90'] * 1e3:.1f}), {r['flops_per_token'] / 1e6:.1f} MFLOP per "
                     f"{unit[:-1] if unit.endswith('s') else unit}, peak memory {r['max_memory_gb'] or 0:.1f} GB"
                     + "".join(f"; {n}" for n in r["notes"]))
    by_case = {r["case"]: r for r in results}
    for model in ("gpt", "llama"):
        bare = by_case.get(f"{model}-bare")
        if not bare:
            continue
        for r in results:  # the trainer at the plain loop's model size and batch
            if r["case"].startswith(model) and not r["case"].endswith("-bare") \
                    and r["variables_per_step"] == bare["variables_per_step"] and r["parameters"] == bare["parameters"]:
                like_bare = r["train"]["zero_stage"] <= 1 and not r["train"]["activation_checkpointing"]
                rows.append(Row(f"{r['case']}: trainer step vs the plain PyTorch loop", f"{r['step_s'] * 1e3:.1f} ms",
                                f"{model}-bare {bare['step_s'] * 1e3:.1f} ms", r["step_s"] / bare["step_s"],
                                1.05 if like_bare else None, at_most=True))
        if "logits_loss" in bare and bare["max_memory_gb"]:
            old = bare["logits_loss"]
            rows.append(Row(f"{model}-bare: peak GPU memory, chunked loss vs fp32 logits", f"{bare['max_memory_gb']:.1f} GB",
                            f"{old['max_memory_gb']:.1f} GB", bare["max_memory_gb"] / old["max_memory_gb"]))
            rows.append(Row(f"{model}-bare: step, chunked loss vs fp32 logits", f"{bare['step_s'] * 1e3:.1f} ms",
                            f"{old['step_s'] * 1e3:.1f} ms", bare["step_s"] / old["step_s"]))
    if results and results[0].get("device"):
        notes.append(f"device: {results[0]['device']}; ratio = MFU (model FLOPs / s over the bf16 dense peak)")
    notes += [f"{name}: failed (see the output above)" for name in failed]
    notes += [f"{name}: not run (out of --budget {args.budget:.0f} s)" for name in left_out]
    common.report("GPU training throughput (benchmarks/gpu.py)", rows, args, notes,
                  how="per case: the median step after the warm-up steps of one run",
                  device=results[0]["device"] if results else "")
    return rows


if __name__ == "__main__":
    main()
