"""nanoGPT's Shakespeare recipes through arpipe, on bytes: the README's commands (shard
tinyshakespeare byte-level, train configs/shakespeare-char-{cpu,gpu}.yaml through the deepspeed
launcher, `arpipe eval`), then the validation bits/byte next to nanoGPT's published validation
loss and next to xz -9e, bzip2 -9 and gzip -9 on the same validation bytes.

    python benchmarks/shakespeare.py --recipe cpu    # 2 CPU processes: ≈ 10 min on 2 quiet cores
    python benchmarks/shakespeare.py --recipe gpu    # 1 GPU: 5000 steps of 64 × 256 bytes

The text is cut into paragraphs (speeches) and 10% of them go to val by a hash of their key;
nanoGPT takes the file's last 10% instead (README "Recipes" explains what that changes).
"""

import json
import math
import os
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import common
from common import REPO, Row

URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
PUBLISHED = {"cpu": 1.88, "gpu": 1.4697}  # nanoGPT's README: validation loss, nats per character
PROCESSES = {"cpu": 2, "gpu": 1}  # what the configs' per-rank batch sizes are written for
SHARD_OPTIONS = ["--sample-by", "paragraph", "--val-fraction", "0.1", "--vocab-size", "257"]
TINY = ["train.steps=4", "train.eval_every=2", "model.n_layer=1", "data.batch_size=2", "data.block_len=32"]


def run(command: list, env: dict, log: Path) -> float:
    """Run a command to completion, its output to `log`; its children's CPU seconds (user + sys)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(log, "w") as out:
        done = subprocess.run([str(c) for c in command], env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    if done.returncode:
        sys.exit(f"{' '.join(map(str, command))} failed ({done.returncode}); the end of {log}:\n"
                 + log.read_text()[-3000:])
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime


def tiny_text(work: Path) -> Path:
    """A few paragraphs of CPython's pydoc topics: enough to check the script runs."""
    import pydoc_data.topics

    path = work / "tiny.txt"
    path.write_text("\n\n".join(t for _, t in sorted(pydoc_data.topics.topics.items())[:40]))
    return path


def main(argv=None):
    p = common.parser(__doc__.split("\n\n")[0])
    p.add_argument("--recipe", choices=sorted(PUBLISHED), default="cpu",
                   help="configs/shakespeare-char-RECIPE.yaml (default cpu)")
    p.add_argument("--data", type=Path, default=common.SHARED_DATA / "tinyshakespeare.txt",
                   help=f"tinyshakespeare's input.txt (download: {URL})")
    args = p.parse_args(argv)
    work = common.work_dir(args)
    data = tiny_text(work) if args.tiny else args.data
    if not data.exists():
        sys.exit(f"{data} not found: download it with `curl -o tinyshakespeare.txt {URL}` and pass --data")
    gpu = args.recipe == "gpu" and not args.tiny
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false"}
    if not gpu:
        env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    arpipe = [sys.executable, "-m", "pipeline"]

    shards = work / f"shards-{data.stem}"
    if not (shards / "manifest.json").exists():
        run([*arpipe, "shard", "text", "--input", data, "--out", shards, *SHARD_OPTIONS], env, work / "shard.log")
    config = REPO / "configs" / f"shakespeare-char-{args.recipe}.yaml"
    out = work / f"run-{args.recipe}"
    shutil.rmtree(out, ignore_errors=True)
    processes = 1 if args.tiny else PROCESSES[args.recipe]
    train = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", processes, "--log_level", "warning",
             "--module", "pipeline.train", "--config", config, f"out_dir={out}", f"data.path={shards}",
             f"tracking.uri=sqlite:///{work / 'mlflow.db'}", *(TINY if args.tiny else [])]
    start = time.perf_counter()
    cpu_seconds = run(train, env, log := work / f"train-{args.recipe}.log")
    wall = time.perf_counter() - start
    periodic = [(int(s), float(b)) for s, b in re.findall(r"step (\d+): val .*bits_per_byte=([\d.]+)", log.read_text())]
    run([*arpipe, "eval", "--model", out, "--data", shards, "--out", out / "eval.json", "--samples", 2,
         "--prompts", 2], env, work / f"eval-{args.recipe}.log")
    result = json.loads((out / "eval.json").read_text())

    sys.path.insert(0, str(REPO))
    from pipeline.data.shards import Shards
    from pipeline.eval.baselines import compressor_bits_per_byte, split_text

    val = Shards(shards)
    text, paragraphs = split_text(val, "val"), val.manifest["splits"]["val"]["items"]
    bpb, published = result["bits_per_byte"], PUBLISHED[args.recipe] / math.log(2)
    nano = f"nanoGPT {PUBLISHED[args.recipe]} nats/char = {published:.3f} bits/byte"
    block_len = json.loads((out / "export" / "model.json").read_text())["shape"][0]
    rows = [Row(f"{args.recipe} recipe: val bits/byte, blocks of {block_len} bytes from empty context (as nanoGPT "
                f"estimates it)", f"{bpb:.4f} ({bpb * math.log(2):.4f} nats/byte)", nano, bpb / published, 1.02,
                at_most=True)]
    best_step, best = min(periodic, key=lambda sb: sb[1], default=(None, None))
    if best is not None:
        rows.append(Row(f"{args.recipe} recipe: best of the evaluations during training (nanoGPT reports its best)",
                        f"{best:.4f} at step {best_step}", nano, best / published, 1.02, at_most=True))
    for name, figure in compressor_bits_per_byte(text).items():
        rows.append(Row(f"{name} on the same val bytes", f"{figure:.4f} bits/byte", f"arpipe {bpb:.4f}", figure / bpb))
    notes = [f"data: {data.name} cut into paragraphs (`{' '.join(SHARD_OPTIONS)}`); val = {len(text)} bytes of "
             f"{paragraphs} paragraphs, each followed by an EOS token the model is charged for "
             f"(it stands in for the blank line, whose 2 bytes are not counted); bits/byte = all bits / those bytes",
             f"training: {processes} process{'es' if processes > 1 else ''} ({'GPU' if gpu else 'CPU'}), "
             f"{wall:.0f} s wall, {cpu_seconds:.0f} s CPU (user + sys of the launcher and its ranks)",
             "ratio: arpipe's bits/byte over nanoGPT's (≤ 1.02 counts as reproduced), a compressor's over arpipe's"]
    if args.tiny:
        print(f"tiny run: {bpb:.3f} bits/byte (meaningless at this size)")
    common.report(f"nanoGPT's Shakespeare {args.recipe} recipe (benchmarks/shakespeare.py)", rows, args, notes,
                  how="one training run", device="one GPU" if gpu else "")


if __name__ == "__main__":
    main()
