"""`arpipe eval`: exact NLL of a model on a split (of one shard set, or each of several and all
together), optionally also with sliding windows; samples and completions; logged to MLflow."""

import json
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

from pipeline import ArpipeError
from pipeline.data.shards import Shards
from pipeline.eval.nll import evaluate_sources, headline
from pipeline.eval.samples import validation_items, write_samples
from pipeline.export import load_any
from pipeline.log import LOG, setup_logging
from pipeline.models import check_ordering
from pipeline.tracking import Tracker, run_name, source_tags, ui_command
from pipeline.train.dist import rank_env


def run_eval(model_path: str, data: str | list[str], *, split: str = "val", batch_size: int = 16,
             stride: int | None = None, samples: int = 4, prompts: int = 4, prompt_len: int | None = None,
             sample_length: int | None = None,
             temperature: float = 1.0, top_k: int | None = None, seed: int = 0, new_run: bool = False,
             tracking_uri: str | None = None, experiment: str | None = None, out: str | None = None) -> dict:
    """Logs into the model's training run, or into a new run with `new_run` or an `experiment`."""
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
    paths = [data] if isinstance(data, str) else list(data)  # several: a mixture's sources, each and together
    names = [Path(p).name for p in paths]
    sources = {name: Shards(path) for name, path in zip(names if len(set(names)) == len(names) else paths, paths)}
    for path, shards in zip(paths, sources.values()):
        check_ordering(model, shards.manifest["codec"], shards.dir)
        if shards.manifest["codec"] != codec.config():
            raise ArpipeError(f"{path} was tokenised with another codec than the model was trained on "
                              f"(compare codec in {shards.dir}/manifest.json)")
    shards = next(iter(sources.values()))  # samples and completions start from its items
    block_len = meta["shape"][0]  # sequences: the model's context; images: ignored by the codec
    step = meta.get("step", 0)
    LOG.info("eval: %s on %s/%s, %d ranks", model_path, " ".join(paths), split, world)
    result = evaluate_sources(model, sources, split, block_len, batch_size, rank=rank, world=world, stride=stride)
    result.update(step=step, split=split, model=str(model_path), data=data)
    if rank == 0:
        run_id = None if new_run or experiment else meta.get("run_id")
        trained = meta.get("run_name") or run_name(Path(model_path).name, meta["model"]["name"],
                                                   sum(p.numel() for p in model.parameters()), codec.modality)
        tracker = Tracker(tracking_uri or meta.get("tracking_uri"), experiment or "arpipe", run_id=run_id,
                          run_name=f"eval {split} · {trained}", tags=source_tags("arpipe eval"))
        for source in sources.values():
            tracker.log_shards(source, {split: "evaluation"})
        tracker.log_metrics({f"{split}/{k}": v for k, v in headline(result).items()}, step)
        with tempfile.TemporaryDirectory() as tmp:
            length = completion_prompt_len(codec, prompt_len, sample_length or codec.sequence_length(block_len))
            files = write_samples(model, codec, validation_items(shards, split, prompts, length), Path(tmp),
                                  samples=samples, temperature=temperature, top_k=top_k, seed=seed,
                                  prompt_len=length, length=sample_length, stride=stride)
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
        for name, figures in [("", result), *((f" {n}", r) for n, r in result.get("sources", {}).items())]:
            print(f"{split}{name}: " + ", ".join(f"{v:.4f} {k.replace('_per_', '/').replace('_', ' ')}"
                                                 for k, v in headline(figures).items() if "/" not in k)
                  + (f" (sliding: stride {stride} of {block_len})" if stride else ""))
    return result




def completion_prompt_len(codec, asked: int | None, sampled: int) -> int:
    """Variables given to completions: `asked` (--prompt-len), else the codec's default cut to
    half of what is sampled (an audio model's 125 ms can exceed a small model's context)."""
    if asked is None:
        return min(codec.default_prompt_len, sampled // 2)
    if asked >= sampled:
        raise ArpipeError(f"--prompt-len {asked} leaves nothing to sample: a completion is {sampled} variables "
                          f"in all (--sample-length, default: the model's context)")
    return asked
