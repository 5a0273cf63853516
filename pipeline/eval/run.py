"""`arpipe eval`: exact NLL of a model on a split, samples and completions, logged to MLflow."""

import json
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

from pipeline import ArpipeError
from pipeline.data.shards import Shards
from pipeline.eval.nll import evaluate_nll, headline
from pipeline.eval.samples import validation_items, write_samples
from pipeline.export import load_any
from pipeline.log import LOG, setup_logging
from pipeline.models import check_ordering
from pipeline.tracking import Tracker, ui_command
from pipeline.train.dist import rank_env


def run_eval(model_path: str, data: str, *, split: str = "val", batch_size: int = 16,
             samples: int = 4, prompts: int = 4, prompt_len: int | None = None, temperature: float = 1.0,
             top_k: int | None = None, seed: int = 0, new_run: bool = False,
             tracking_uri: str | None = None, experiment: str = "arpipe", out: str | None = None) -> dict:
    rank, world, local_rank = rank_env()
    setup_logging(rank)
    device = torch.device("cpu")
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    model, codec, meta = load_any(model_path)
    model.to(device)
    shards = Shards(data)
    check_ordering(model, shards.manifest["codec"], shards.dir)
    if shards.manifest["codec"] != codec.config():
        raise ArpipeError(f"{data} was tokenised with another codec than the model was trained on "
                          f"(compare codec in {shards.dir}/manifest.json)")
    block_len = meta["shape"][0]  # sequences: the model's context; images: ignored by the codec
    step = meta.get("step", 0)
    LOG.info("eval: %s on %s/%s, %d ranks", model_path, data, split, world)
    result = evaluate_nll(model, shards, split, block_len, batch_size, rank=rank, world=world)
    result.update(step=step, split=split, model=str(model_path), data=str(data))
    if rank == 0:
        run_id = None if new_run else meta.get("run_id")
        tracker = Tracker(tracking_uri or meta.get("tracking_uri"), experiment, run_id=run_id,
                          run_name=None if run_id else f"eval-{Path(model_path).name}")
        tracker.log_metrics({f"{split}/{k}": v for k, v in headline(result).items()}, step)
        with tempfile.TemporaryDirectory() as tmp:
            length = prompt_len or codec.default_prompt_len
            files = write_samples(model, codec, validation_items(shards, split, prompts, length), Path(tmp),
                                  samples=samples, temperature=temperature, top_k=top_k, seed=seed,
                                  prompt_len=length)
            for path in files:
                tracker.log_artifact(path, f"samples/{split}-step{step:08d}")
                if path.suffix == ".txt":
                    print(path.read_text())
        result.update(run_id=tracker.run_id, tracking_uri=tracker.uri, run_url=tracker.url,
                      ui=ui_command(tracker.uri), artifacts=[p.name for p in files])
        tracker.close()
        if out:
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            Path(out).write_text(json.dumps(result, indent=1))
        print(f"{split}: " + ", ".join(f"{v:.4f} {k.replace('_per_', '/').replace('_', ' ')}"
                                       for k, v in headline(result).items()))
    return result


