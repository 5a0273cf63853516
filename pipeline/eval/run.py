"""`arpipe eval`: exact NLL of a model on a split, samples and completions, logged to MLflow."""

import json
from pathlib import Path

import torch.distributed as dist

from pipeline import ArpipeError
from pipeline.data.shards import Shards
from pipeline.eval.nll import evaluate_nll
from pipeline.eval.samples import sample_report, validation_prompts
from pipeline.export import load_any
from pipeline.log import LOG, setup_logging
from pipeline.tracking import Tracker, ui_command
from pipeline.train.dist import rank_env


def run_eval(model_path: str, data: str, *, split: str = "val", batch_size: int = 16,
             samples: int = 4, prompts: int = 4, prompt_len: int = 32, temperature: float = 1.0,
             top_k: int | None = None, seed: int = 0, new_run: bool = False,
             tracking_uri: str | None = None, experiment: str = "arpipe", out: str | None = None) -> dict:
    rank, world, _ = rank_env()
    setup_logging(rank)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")
    model, codec, meta = load_any(model_path)
    shards = Shards(data)
    if shards.manifest["codec"] != codec.config():
        raise ArpipeError(f"{data} was tokenised with another codec than the model was trained on "
                          f"(compare codec in {shards.dir / 'manifest.json'})")
    block_len = meta["shape"][0] if len(meta["shape"]) == 1 else None
    step = meta.get("step", 0)
    LOG.info("eval: %s on %s/%s, %d ranks", model_path, data, split, world)
    result = evaluate_nll(model, shards, split, block_len, batch_size, rank=rank, world=world)
    result.update(step=step, split=split, model=str(model_path), data=str(data))
    if rank == 0:
        report = sample_report(model, codec, validation_prompts(shards, split, prompts, prompt_len),
                               samples=samples, temperature=temperature, top_k=top_k, seed=seed)
        run_id = None if new_run else meta.get("run_id")
        tracker = Tracker(tracking_uri or meta.get("tracking_uri"), experiment, run_id=run_id,
                          run_name=None if run_id else f"eval-{Path(model_path).name}")
        tracker.log_metrics({f"{split}/{k}": result[k] for k in ("nats_per_token", "bits_per_token", "bits_per_byte")
                             if k in result}, step)
        tracker.log_text(report, f"samples/{split}-step{step:08d}.txt")
        result.update(run_id=tracker.run_id, tracking_uri=tracker.uri, run_url=tracker.url,
                      ui=ui_command(tracker.uri))
        tracker.close()
        if out:
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            Path(out).write_text(json.dumps(result, indent=1))
        print(report)
        print(f"{split}: {result['tokens']} tokens, {result['nats_per_token']:.4f} nats/token, "
              f"{result['bits_per_token']:.4f} bits/token"
              + (f", {result['bits_per_byte']:.4f} bits/byte" if "bits_per_byte" in result else ""))
    return result


