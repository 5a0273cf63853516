"""`arpipe demo`: the whole path on data every machine has, no download.

Each leg shards its data, trains on 2 processes through the `deepspeed` launcher, evaluates
into the same MLflow run, and reports its headline metric:

  text   CPython's bundled documentation (`pydoc_data.topics`, as JSONL) plus the standard
         library's top-level modules (plain text, one document per file), ≈ 5 MB; GPT.
"""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

from pipeline import ArpipeError
from pipeline.log import LOG
from pipeline.train.dist import free_port


def write_text_corpus(directory: Path) -> list[str]:
    import pydoc_data.topics

    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "pydoc_topics.jsonl", "w") as f:
        for name, text in sorted(pydoc_data.topics.topics.items()):
            f.write(json.dumps({"id": name, "text": text}) + "\n")
    stdlib = directory / "stdlib"
    stdlib.mkdir(exist_ok=True)
    for source in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        shutil.copy(source, stdlib / source.name)
    return [str(directory / "pydoc_topics.jsonl"), str(stdlib)]


def train_and_eval(config: Path, shards: Path, run: Path, steps: int | None, **eval_options) -> dict:
    """A fresh training run on 2 processes through the deepspeed launcher, then `arpipe eval`."""
    from pipeline.eval.run import run_eval

    shutil.rmtree(run, ignore_errors=True)  # the demo starts fresh; `arpipe train` itself would resume
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu",
           "PYTHONWARNINGS": "ignore::FutureWarning", "TOKENIZERS_PARALLELISM": "false"}
    overrides = [f"out_dir={run}", f"data.path={shards}"] + ([f"train.steps={steps}"] if steps else [])
    command = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--log_level", "warning",
               "--master_port", str(free_port()), "--module", "pipeline.train", "--config", str(config), *overrides]
    LOG.info("demo: training: %s", " ".join(command))
    subprocess.run(command, env=env, check=True)
    return run_eval(str(run), str(shards), out=str(run / "eval.json"), **eval_options)


def text_leg(out: Path, configs: Path, steps: int | None) -> tuple[str, dict]:
    from pipeline.cli import run as cli

    inputs = write_text_corpus(out / "corpus")
    shards = out / "shards"
    cli(["shard", "text", "--input", *inputs, "--out", str(shards), "--vocab-size", "4096",
         "--workers", "2", "--chunk-mb", "0.25"])
    result = train_and_eval(configs / "demo.yaml", shards, out / "train", steps, samples=2, prompts=2)
    return (f"{result['bits_per_byte']:.3f} bits/byte ({result['bits_per_token']:.3f} bits/token over "
            f"{result['tokens']} tokens; a uniform byte code needs 8)"), result


LEGS = {"text": text_leg}


def demo(out: Path, config: Path, steps: int | None, legs: list[str] | None = None) -> None:
    configs = config.parent
    if not config.exists():
        raise ArpipeError(f"{config} not found: run the demo from the repository root or pass --config")
    results = []
    t0 = time.time()
    for name in legs or LEGS:
        start = time.time()
        LOG.info("demo: %s leg", name)
        summary, result = LEGS[name](out / name, configs, steps)
        results.append((name, summary, result, time.time() - start))
    print(f"\nDemo finished in {time.time() - t0:.0f} s.")
    for name, summary, result, seconds in results:
        print(f"  {name:6s} validation: {summary}  [{seconds:.0f} s]\n"
              f"         MLflow run {result['run_id']}: {result['run_url']}")
    print(f"See the runs with:\n  {results[-1][2]['ui']}")
