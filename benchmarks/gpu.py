"""GPU training throughput and MFU of arpipe's trainer (run by benchmarks/gpu.sh on one GPU).

Each case runs `pipeline.train.trainer.train` in a fresh process (1 rank, ZeRO-1, bf16) on
synthetic shards written by the real shard writer (uniform random tokens: the cost of a step does
not depend on the data), and times the steps after a warm-up:

  gpt, gpt-compile   GPT-2 small: 12 layers × 768, 12 heads, 50304-token vocabulary (GPT-2's
                     50257 rounded up to a multiple of 64) = 124M parameters, 16 × 1024 tokens
                     a step; without and with `train.compile` (torch.compile through DeepSpeed)
  gpt-bare           the baseline: the same GPT and batches in a plain PyTorch loop (bf16
                     autocast, fused AdamW, clipping) with the trainer's loss, forward(x, loss=True)
                     (chunked fp32 cross-entropy, pipeline/models/loss.py); trainer step ≤ 1.10× its
                     step is the target. Then, in the same process, the same loop with the loss
                     before it (fp32 logits of the whole batch): its step time and peak memory
  llama, llama-bare  configs/text-llama.yaml's model (121M: RoPE, RMSNorm, SwiGLU, 4 key/value
                     heads), as gpt and gpt-bare
  wavenet            configs/audio-wavenet.yaml's model, 8 crops of 11262 samples
  pixelcnn           configs/image-pixelcnn.yaml's model, 32 images of 28×28 at 256 levels
  gpt-phases         (not run by default) diagnostics: the trainer with DeepSpeed's forward,
  gpt-phases-zero0   backward and step each synchronised and timed; with ZeRO-0; without
  gpt-phases-noclip  gradient clipping

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
LLAMA124M = {"name": "llama", "n_layer": 12, "n_head": 12, "n_kv_head": 4, "d_model": 768, "d_ff": 2304}
WAVENET = {"name": "wavenet", "stacks": 3, "layers_per_stack": 10, "residual_channels": 64, "gate_channels": 64,
           "skip_channels": 256}
PIXELCNN = {"name": "pixelcnn", "gated": True, "n_layer": 12, "hidden": 128, "kernel": 3, "first_kernel": 7,
            "head": 256}
# name: (modality, model, block_len, batch_size, compile, steps, warm-up steps, seconds allowed)
CASES = {
    "gpt": ("text", GPT124M, 1024, 16, False, 50, 15, 150),
    "gpt-compile": ("text", GPT124M, 1024, 16, True, 50, 20, 240),
    "llama": ("text", LLAMA124M, 1024, 16, False, 50, 15, 150),
    "wavenet": ("audio", WAVENET, 11262, 8, False, 40, 10, 120),
    "pixelcnn": ("image", PIXELCNN, 0, 32, False, 40, 10, 120),
}
TINY = {
    "gpt": ("text", {"name": "gpt", "n_layer": 1, "n_head": 2, "d_model": 32}, 32, 2, False, 6, 2, 120),
    "gpt-compile": ("text", {"name": "gpt", "n_layer": 1, "n_head": 2, "d_model": 32}, 32, 2, True, 6, 3, 300),
    "llama": ("text", {"name": "llama", "n_layer": 1, "n_head": 2, "d_model": 32}, 32, 2, False, 6, 2, 120),
    "wavenet": ("audio", {**WAVENET, "stacks": 1, "layers_per_stack": 3, "residual_channels": 8, "gate_channels": 8,
                          "skip_channels": 8}, 64, 2, False, 6, 2, 120),
    "pixelcnn": ("image", {**PIXELCNN, "n_layer": 1, "hidden": 8, "head": 8}, 0, 2, False, 6, 2, 120),
}
CASES["gpt-bare"] = CASES["gpt"]  # the same GPT as a plain PyTorch loop (see run_bare)
CASES["llama-bare"], TINY["llama-bare"] = CASES["llama"], TINY["llama"]
# diagnostics: the trainer with its DeepSpeed phases timed, also with ZeRO-0 and without clipping
CASES["gpt-phases"] = CASES["gpt-phases-zero0"] = CASES["gpt-phases-noclip"] = CASES["gpt"]
TINY["gpt-bare"] = TINY["gpt-phases"] = TINY["gpt-phases-zero0"] = TINY["gpt-phases-noclip"] = TINY["gpt"]
VARIANTS = {"gpt-phases-zero0": {"train": {"zero_stage": 0}}, "gpt-phases-noclip": {"optim": {"grad_clip": 0.0}}}
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


def run_case(name: str, work: Path, tiny: bool, no_tracking: bool = False) -> dict:
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

    modality, model, block_len, batch_size, compile_, steps, warmup, _ = (TINY if tiny else CASES)[name]
    shards = Shards(synthetic_shards(work / f"shards-{modality}", modality, tiny))
    cuda = torch.cuda.is_available()
    out = work / "runs" / f"{name}-{time.time_ns()}"
    cfg = validate({
        "out_dir": str(out), "seed": 0,
        "data": {"path": str(shards.dir), "block_len": block_len, "batch_size": batch_size, "num_workers": 0},
        "model": model,
        "optim": {"lr": 3e-4, "warmup_steps": 10},
        "train": {"steps": steps, "zero_stage": 1, "precision": "bf16" if cuda else "fp32", "compile": compile_,
                  "log_every": 10, "ckpt_every": 10**6},
        "tracking": {"uri": f"sqlite:///{work / 'mlflow.db'}", "experiment": "bench-gpu"},
    }, "benchmarks/gpu.py")
    notes = []
    if no_tracking or importlib.util.find_spec("mlflow") is None:  # e.g. not carried to the GPU machine
        arpipe_trainer.Tracker = NoTracker
        notes.append("MLflow tracking off")
    if name in VARIANTS:
        from pipeline.config import merge

        cfg = validate(merge(cfg.model_dump(), VARIANTS[name]), "benchmarks/gpu.py")
        notes.append(f"{VARIANTS[name]}")
    phases = time_engine_phases(warmup) if "-phases" in name else None
    with attention_kernels(cuda):
        stamps, losses = run_trainer(cfg)
    if cuda:
        notes.append("flash attention only")
    if phases:
        count = max(1, len(stamps) - warmup)
        notes.append("synchronised DeepSpeed phases (the rest is the trainer's own code and its syncs): "
                     + ", ".join(f"{k} {v / count * 1e3:.1f} ms" for k, v in phases.items() if k != "calls"))
    times = sorted(step_times(stamps, warmup))
    step = times[len(times) // 2]
    net = build_model(cfg.model, shards.codec.vocab_size, shards.codec.model_shape(block_len))
    variables = batch_size * net.num_vars
    flops = net.train_flops_per_variable()
    peak = arpipe_trainer.gpu_peak_flops(cfg.train.precision)
    result = {"case": name, "device": torch.cuda.get_device_name() if cuda else "cpu",
              "parameters": sum(p.numel() for p in net.parameters()), "step_s": step,
              "step_s_p10": times[len(times) // 10], "step_s_p90": times[len(times) * 9 // 10],
              "variables_per_step": variables, "tokens_per_s": variables / step, "flops_per_token": flops,
              "tflops": variables * flops / step / 1e12, "mfu": variables * flops / step / peak if peak else None,
              "peak_tflops": peak / 1e12 if peak else None, "final_loss": losses[-1], "notes": notes,
              "max_memory_gb": torch.cuda.max_memory_allocated() / 1e9 if cuda else None}
    return result


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


def run_bare(name: str, work: Path, tiny: bool) -> dict:
    """The baseline for the trainer on a GPU: the same model and batches in a plain PyTorch loop
    with the trainer's loss; for models with a vocabulary head also the fp32-logits loss, after
    it in the same process, for its step time and peak memory."""
    import torch

    from pipeline.data.shards import Shards
    from pipeline.data.stream import Batches, TokenStream
    from pipeline.models import build_model
    from pipeline.models.loss import VocabHead
    from pipeline.train.trainer import gpu_peak_flops, param_groups

    modality, model_cfg, block_len, batch_size, _, steps, warmup, _ = (TINY if tiny else CASES)[name]
    shards = Shards(synthetic_shards(work / f"shards-{modality}", modality, tiny))
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
    p.add_argument("--cases", nargs="+", choices=list(CASES), default=["gpt", "gpt-bare", "gpt-compile", "llama", "llama-bare", "wavenet", "pixelcnn"])
    p.add_argument("--run", choices=list(CASES), help=argparse.SUPPRESS)
    p.add_argument("--no-tracking", action="store_true", help="no MLflow (the default where mlflow is not installed)")
    args = p.parse_args(argv)
    if args.tiny:
        args.repeats = 1
    work = args.work or common.REPO / "runs" / "bench-gpu"
    work.mkdir(parents=True, exist_ok=True)
    if args.run:  # the child process of one case
        result = run_bare(args.run, work, args.tiny) if args.run.endswith("-bare") else \
            run_case(args.run, work, args.tiny, args.no_tracking)
        print("RESULT " + json.dumps(result), flush=True)
        return None
    results, failed = [], []
    for name in args.cases:
        limit = (TINY if args.tiny else CASES)[name][-1]
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
        if model in by_case and f"{model}-bare" in by_case:
            t, b = by_case[model]["step_s"], by_case[f"{model}-bare"]["step_s"]
            rows.append(Row(f"{model}: trainer step vs the plain PyTorch loop", f"{t * 1e3:.1f} ms",
                            f"{model}-bare {b * 1e3:.1f} ms", t / b, 1.10, at_most=True))
        bare = by_case.get(f"{model}-bare", {})
        if "logits_loss" in bare and bare["max_memory_gb"]:
            old = bare["logits_loss"]
            rows.append(Row(f"{model}-bare: peak GPU memory, chunked loss vs fp32 logits", f"{bare['max_memory_gb']:.1f} GB",
                            f"{old['max_memory_gb']:.1f} GB", bare["max_memory_gb"] / old["max_memory_gb"]))
            rows.append(Row(f"{model}-bare: step, chunked loss vs fp32 logits", f"{bare['step_s'] * 1e3:.1f} ms",
                            f"{old['step_s'] * 1e3:.1f} ms", bare["step_s"] / old["step_s"]))
    if results and results[0].get("device"):
        notes.append(f"device: {results[0]['device']}; ratio = MFU (model FLOPs / s over the bf16 dense peak)")
    notes += [f"{name}: failed (see the output above)" for name in failed]
    common.report("GPU training throughput (benchmarks/gpu.py)", rows, args, notes,
                  how="per case: the median step after the warm-up steps of one run",
                  device=results[0]["device"] if results else "")
    return rows


if __name__ == "__main__":
    main()
