"""`arpipe demo`: the whole path on data every machine has, no download.

Each leg shards its data, trains on 2 processes through the `deepspeed` launcher, evaluates
into the same MLflow run, and reports its headline metric:

  text   CPython's bundled documentation (`pydoc_data.topics`, as JSONL) plus the standard
         library's top-level modules (plain text, one document per file), ≈ 5 MB; GPT.
  audio  speech synthesised offline by Debian's `espeak-ng` where it is installed
         (`apt-get install espeak-ng`), otherwise melodies the demo generates; 2–3 minutes
         at 8 kHz; WaveNet.
  image  scikit-learn's 8×8 handwritten digits (1,797 images, 17 grey levels), shipped in
         pipeline/bundled/; a gated PixelCNN, samples and top-half completions as PNG grids.
"""

import json
import os
import random
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

from pipeline import ArpipeError
from pipeline.log import LOG
from pipeline.stages import run_shard
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


def train_and_eval(config: Path, shards: Path, run: Path, steps: int | None, overrides: list[str] = (),
                   **eval_options) -> dict:
    """A fresh training run on 2 processes through the deepspeed launcher, then `arpipe eval`.
    `overrides` are more `key=value` config overrides."""
    from pipeline.eval.run import run_eval

    shutil.rmtree(run, ignore_errors=True)  # the demo starts fresh; `arpipe train` itself would resume
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu",
           "PYTHONWARNINGS": "ignore::FutureWarning", "TOKENIZERS_PARALLELISM": "false"}
    overrides = [f"out_dir={run}", f"data.path={shards}", *overrides] + ([f"train.steps={steps}"] if steps else [])
    command = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--log_level", "warning",
               "--master_port", str(free_port()), "--module", "pipeline.train", "--config", str(config), *overrides]
    LOG.info("demo: training: %s", " ".join(command))
    subprocess.run(command, env=env, check=True)
    return run_eval(str(run), str(shards), out=str(run / "eval.json"), **eval_options)


TEXT_STRIDE = 64  # the final eval also scores sliding windows: each token with 64+ tokens of context


def text_leg(out: Path, configs: Path, steps: int | None) -> tuple[str, dict]:
    inputs = write_text_corpus(out / "corpus")
    shards = out / "shards"
    run_shard("text", ["--input", *inputs, "--out", str(shards), "--vocab-size", "4096",
                        "--workers", "2", "--chunk-mb", "0.25"])
    result = train_and_eval(configs / "demo.yaml", shards, out / "train", steps, samples=2, prompts=2,
                            stride=TEXT_STRIDE)
    return text_summary(result, shards), result


def text_summary(result: dict, shards: Path) -> str:
    """The text leg's figure, and what xz, bzip2 and gzip make of the same validation bytes."""
    from pipeline.data.shards import Shards
    from pipeline.eval.baselines import compressor_bits_per_byte, split_text

    compressors = compressor_bits_per_byte(split_text(Shards(shards), "val"))
    return (f"{result['bits_per_byte_sliding']:.3f} bits/byte in sliding windows (stride {TEXT_STRIDE}; "
            f"{result['bits_per_byte']:.3f} in blocks; {result['tokens']} tokens; a uniform byte code needs 8)\n"
            f"         the same text: " + ", ".join(f"{name} {bits:.3f}" for name, bits in compressors.items()))


def first_sentence(text: str) -> str | None:
    """The first sentence of a pydoc topic's first prose paragraph: headings (underlined with
    *** or ===) and grammar rules (::=) make poor speech."""
    for paragraph in text.split("\n\n"):
        line = " ".join(paragraph.split())
        if len(line) > 40 and line[0].isupper() and not any(m in line for m in ("::=", "**", "==", "--", ">>>")):
            return line.replace(": ", ". ").split(". ")[0][:160]
    return None


def write_speech(directory: Path) -> None:
    """Sentences of CPython's docs spoken by espeak-ng at varied speeds and pitches (22 kHz WAV)."""
    import pydoc_data.topics

    rng = random.Random(0)
    sentences = [s for _, text in sorted(pydoc_data.topics.topics.items()) if (s := first_sentence(text))]
    for i, sentence in enumerate(sentences[::3]):  # every third topic: ≈ 2.5 minutes of speech
        subprocess.run(["espeak-ng", "-w", str(directory / f"speech-{i:03d}.wav"), "-s", str(rng.randint(140, 200)),
                        "-p", str(rng.randint(25, 75)), sentence], check=True, capture_output=True)


def write_melodies(directory: Path, count: int = 48, seconds: float = 4.0, rate: int = 22050) -> None:
    """Random pentatonic melodies: notes of three harmonics with a 5 ms attack and an exponential
    decay, in stereo WAV and FLAC at 22.05 kHz, so sharding mixes down and resamples as with real audio."""
    import numpy as np
    import soundfile as sf

    rng = np.random.default_rng(0)
    scale = 220 * 2 ** (np.array([0, 2, 4, 7, 9, 12, 14, 16]) / 12)  # A major pentatonic, two octaves
    for i in range(count):
        wave, pos = np.zeros(int(seconds * rate)), 0
        while pos < len(wave):
            t = np.arange(int(rng.choice([0.125, 0.25, 0.5]) * rate)) / rate
            f = rng.choice(scale)
            note = sum(a * np.sin(2 * np.pi * k * f * t) for k, a in ((1, 1.0), (2, 0.4), (3, 0.2)))
            note *= np.minimum(t / 0.005, 1) * np.exp(-t / rng.uniform(0.08, 0.4))
            wave[pos : pos + len(t)] = note[: len(wave) - pos]
            pos += len(t)
        wave *= 0.6 / np.abs(wave).max()
        stereo = np.stack([wave, rng.uniform(0.6, 1.0) * wave], 1).astype(np.float32)
        sf.write(directory / f"melody-{i:03d}.{'flac' if i % 2 else 'wav'}", stereo, rate)


def audio_leg(out: Path, configs: Path, steps: int | None) -> tuple[str, dict]:
    from pipeline.config import load_config

    corpus = out / "corpus"
    shutil.rmtree(corpus, ignore_errors=True)
    corpus.mkdir(parents=True)
    if shutil.which("espeak-ng"):
        write_speech(corpus)
        what = "espeak-ng speech"
    else:
        LOG.info("demo: espeak-ng is not installed (apt-get install espeak-ng): using generated melodies")
        write_melodies(corpus)
        what = "generated melodies"
    shards = out / "shards"
    run_shard("audio", ["--input", str(corpus), "--out", str(shards), "--sample-rate", "8000",
                         "--clip-seconds", "2", "--workers", "2", "--chunk-mb", "0.25", "--val-fraction", "0.1"])
    config = configs / "demo-audio.yaml"
    half = load_config(config).data.block_len // 2  # completions continue the first half of a clip
    # 2-second samples (block_len is 1024 samples, 0.13 s): WaveNet's queues run on past it
    result = train_and_eval(config, shards, out / "train", steps, samples=2, prompts=2, prompt_len=half,
                            sample_length=2 * 8000)
    return (f"{result['bits_per_sample']:.3f} bits/sample ({result['nats_per_sample']:.3f} nats/sample over "
            f"{result['samples']} samples of {what}; a uniform 256-level code needs 8)"), result


DIGITS = Path(__file__).parent / "bundled" / "digits.npz"


def image_leg(out: Path, configs: Path, steps: int | None) -> tuple[str, dict]:
    import math

    shards = out / "shards"
    # --levels 17: the digits' own 17 grey levels (stored scaled to 0-255), recovered exactly
    run_shard("image", ["--input", str(DIGITS), "--out", str(shards), "--levels", "17", "--val-fraction", "0.1"])
    result = train_and_eval(configs / "demo-image.yaml", shards, out / "train", steps, samples=16, prompts=8)
    return (f"{result['bits_per_dim']:.3f} bits/dim ({result['nats_per_dim']:.3f} nats/dim over {result['dims']} "
            f"sub-pixels of 8×8 digits; a uniform 17-level code needs {math.log2(17):.2f})"), result


LEGS = {"text": text_leg, "audio": audio_leg, "image": image_leg}


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
