"""The `arpipe` command: shard, train, eval, sample, demo."""

import argparse
import sys
from pathlib import Path

from pipeline import ArpipeError
from pipeline.codecs import codec_classes


def _positive(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def _fraction(value: str) -> float:
    x = float(value)
    if not 0 <= x < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {x}")
    return x


def add_stage_options(p: argparse.ArgumentParser) -> None:
    """Options every `arpipe shard <modality>` shares."""
    p.add_argument("--input", nargs="+", required=True, metavar="PATH_OR_GLOB",
                   help="input files, directories or globs (** recurses)")
    p.add_argument("--out", required=True, type=Path, help="output directory for shards and manifest.json")
    p.add_argument("--workers", type=_positive, default=1, help="parallel processes on this machine (default 1)")
    p.add_argument("--task", type=int, help="run only task I (a Slurm array element), then stop")
    p.add_argument("--num-tasks", type=_positive, help="number of tasks the inputs are cut into "
                   "(default: --workers; fixed by the first run)")
    p.add_argument("--finalize", action="store_true", help="only merge the done tasks' results into manifest.json")
    p.add_argument("--val-fraction", type=_fraction, default=0.05, help="share of items in the val split (default 0.05)")
    p.add_argument("--chunk-mb", type=float, default=2.0, help="MB of tokens per WebDataset sample (default 2)")
    p.add_argument("--shard-mb", type=float, default=256.0, help="MB per tar shard (default 256)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="arpipe", description=__doc__.split("\n")[0].strip("`"),
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    shard = sub.add_parser("shard", help="turn raw data into token shards and a manifest")
    modality = shard.add_subparsers(dest="modality", required=True, metavar="MODALITY")
    for name, codec in codec_classes().items():
        stage = modality.add_parser(name, help=codec.help, description=codec.help)
        add_stage_options(stage)
        codec.add_arguments(stage)

    train = sub.add_parser("train", help="train a model with DeepSpeed (run under deepspeed, torchrun or srun)")
    train.add_argument("--config", required=True, help="YAML config (see configs/)")
    train.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. train.steps=100")
    train.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # passed by the deepspeed launcher

    ev = sub.add_parser("eval", help="exact NLL of a model on a split, samples, completions -> MLflow")
    ev.add_argument("--model", required=True, help="an export, a run's out_dir, or a checkpoint directory")
    ev.add_argument("--data", required=True, help="shard directory")
    ev.add_argument("--split", default="val")
    ev.add_argument("--batch-size", type=_positive, default=16)
    ev.add_argument("--samples", type=int, default=4, help="unconditional samples")
    ev.add_argument("--prompts", type=int, default=4, help="completions of validation items' starts")
    ev.add_argument("--prompt-len", type=_positive, default=32, help="tokens of each prompt")
    ev.add_argument("--temperature", type=float, default=1.0)
    ev.add_argument("--top-k", type=int)
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--new-run", action="store_true", help="log to a new MLflow run, not the training run")
    ev.add_argument("--tracking-uri", help="MLflow URI (default: the training run's)")
    ev.add_argument("--out", help="also write the results as JSON here")

    sample = sub.add_parser("sample", help="draw samples from an exported model")
    sample.add_argument("--model", required=True, help="an export, a run's out_dir, or a checkpoint directory")
    sample.add_argument("--out", help="directory for the sample files (default: a new temporary one)")
    sample.add_argument("-n", type=_positive, default=4, help="number of samples")
    sample.add_argument("--prompt", help="text the samples continue")
    sample.add_argument("--temperature", type=float, default=1.0)
    sample.add_argument("--top-k", type=int)
    sample.add_argument("--seed", type=int, default=0)

    demo = sub.add_parser("demo", help="shard -> train (2 DeepSpeed processes) -> eval on a bundled corpus")
    demo.add_argument("--out", type=Path, default=Path("runs/demo"))
    demo.add_argument("--config", type=Path, default=Path("configs/demo.yaml"))
    demo.add_argument("--steps", type=int, help="override train.steps of every leg (for a quick try)")
    demo.add_argument("--legs", nargs="+", help="run only these legs (default: all)")
    return parser


def shard(args) -> None:
    from pipeline.data.shards import run_stage
    from pipeline.data.sources import expand_inputs

    codec = codec_classes()[args.modality]
    settings = {"modality": args.modality, "val_fraction": args.val_fraction,
                "chunk_bytes": int(args.chunk_mb * 2**20), "shard_bytes": int(args.shard_mb * 2**20),
                **codec.shard_settings(args)}
    inputs = [] if args.finalize else expand_inputs(args.input)
    run_stage(args.out, settings, inputs, codec.maker(settings, args), workers=args.workers,
              num_tasks=args.num_tasks, task=args.task, finalize_only=args.finalize)


def run(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)
    from pipeline.log import setup_logging

    setup_logging()
    if args.command == "shard":
        shard(args)
    elif args.command == "train":
        from pipeline.config import load_config
        from pipeline.train.trainer import train

        train(load_config(args.config, args.overrides))
    elif args.command == "eval":
        from pipeline.eval.run import run_eval

        run_eval(args.model, args.data, split=args.split, batch_size=args.batch_size, samples=args.samples,
                 prompts=args.prompts, prompt_len=args.prompt_len, temperature=args.temperature,
                 top_k=args.top_k, seed=args.seed, new_run=args.new_run, tracking_uri=args.tracking_uri,
                 out=args.out)
    elif args.command == "sample":
        from pipeline.eval.samples import sample_text

        for path in sample_text(args.model, args.n, args.prompt, args.temperature, args.top_k, args.seed, args.out):
            print(path.read_text() if path.suffix == ".txt" else path)
    elif args.command == "demo":
        from pipeline.demo import demo

        demo(args.out, args.config, args.steps, args.legs)


def main(argv: list[str] | None = None) -> None:
    try:
        run(sys.argv[1:] if argv is None else argv)
    except ArpipeError as e:
        print(f"arpipe: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
    except BrokenPipeError:  # `arpipe sample … | head`
        sys.exit(0)
