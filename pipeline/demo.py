"""`arpipe demo`: the whole path on a corpus every Python install carries, no download.

Corpus: CPython's bundled documentation (`pydoc_data.topics`, written as JSONL) plus the
top-level modules of the standard library (plain text, one document per file), ≈ 5 MB.
Shard -> train a small GPT on 2 processes through the `deepspeed` launcher -> evaluate -> MLflow.
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


def write_corpus(directory: Path) -> list[str]:
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


def demo(out: Path, config: Path, steps: int | None) -> None:
    if not config.exists():
        raise ArpipeError(f"{config} not found: run the demo from the repository root or pass --config")
    t0 = time.time()
    corpus, shards, run = out / "corpus", out / "shards", out / "train"
    LOG.info("demo: writing the corpus to %s", corpus)
    inputs = write_corpus(corpus)

    from pipeline.cli import run as cli

    cli(["shard", "text", "--input", *inputs, "--out", str(shards), "--vocab-size", "4096",
         "--workers", "2", "--chunk-mb", "0.25"])
    t_shard = time.time()
    shutil.rmtree(run, ignore_errors=True)  # the demo is a fresh run; `arpipe train` itself would resume

    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu",
           "PYTHONWARNINGS": "ignore::FutureWarning", "TOKENIZERS_PARALLELISM": "false"}
    overrides = [f"out_dir={run}", f"data.path={shards}"] + ([f"train.steps={steps}"] if steps else [])
    command = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--log_level", "warning",
               "--master_port", str(free_port()), "--module", "pipeline.train",
               "--config", str(config), *overrides]
    LOG.info("demo: training: %s", " ".join(command))
    subprocess.run(command, env=env, check=True)
    t_train = time.time()

    from pipeline.eval.run import run_eval

    result = run_eval(str(run), str(shards), samples=2, prompts=2, out=str(out / "eval.json"))
    t_end = time.time()
    print(f"\nDemo finished in {t_end - t0:.0f} s (shard {t_shard - t0:.0f} s, train {t_train - t_shard:.0f} s, "
          f"eval {t_end - t_train:.0f} s).")
    print(f"Validation: {result['bits_per_byte']:.3f} bits/byte ({result['bits_per_token']:.3f} bits/token, "
          f"{result['tokens']} tokens); a uniform byte code needs 8.")
    print(f"MLflow run {result['run_id']}: {result['run_url']}")
    print(f"See it with:\n  {result['ui']}")
