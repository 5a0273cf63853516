"""The `arpipe` command: shard, train, eval, sample, demo."""

import argparse
import sys
from pathlib import Path

from pipeline import ArpipeError


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
    text = modality.add_parser("text", help="text (plain, JSONL, parquet) through a byte-level BPE tokenizer",
                               description="Shard text: plain text files are cut by --sample-by; "
                               "JSONL/parquet rows are documents (column --text-field).")
    add_stage_options(text)
    text.add_argument("--sample-by", choices=["document", "paragraph", "line"], default="document",
                      help="how plain text files are cut into documents (default: document = whole file)")
    text.add_argument("--text-field", default="text", help="column holding the text in JSONL/parquet (default text)")
    group = text.add_mutually_exclusive_group()
    group.add_argument("--vocab-size", type=_positive, default=8192, help="train a tokenizer of this size (default 8192)")
    group.add_argument("--tokenizer", help="use this tokenizer.json instead of training one")
    text.add_argument("--tokenizer-train-mb", type=float, default=500.0,
                      help="MB of training-split text the tokenizer is trained on (default 500)")

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
    sample.add_argument("--model", required=True)
    sample.add_argument("-n", type=_positive, default=4, help="number of samples")
    sample.add_argument("--prompt", help="text the samples continue")
    sample.add_argument("--temperature", type=float, default=1.0)
    sample.add_argument("--top-k", type=int)
    sample.add_argument("--seed", type=int, default=0)

    demo = sub.add_parser("demo", help="shard -> train (2 DeepSpeed processes) -> eval on a bundled corpus")
    demo.add_argument("--out", type=Path, default=Path("runs/demo"))
    demo.add_argument("--config", type=Path, default=Path("configs/demo.yaml"))
    demo.add_argument("--steps", type=int, help="override train.steps")
    return parser


def shard_text(args) -> None:
    from pipeline.codecs.text import TextCodec, text_codec_maker
    from pipeline.data.shards import run_stage
    from pipeline.data.sources import expand_inputs

    settings = {"modality": "text", "sample_by": args.sample_by, "text_field": args.text_field,
                "val_fraction": args.val_fraction, "chunk_bytes": int(args.chunk_mb * 2**20),
                "shard_bytes": int(args.shard_mb * 2**20)}
    if args.tokenizer:
        settings["tokenizer_sha256"] = TextCodec.load(args.tokenizer).sha256
    else:
        settings["vocab_size"] = args.vocab_size
    inputs = [] if args.finalize else expand_inputs(args.input)
    run_stage(args.out, settings, inputs, text_codec_maker(settings, args.tokenizer, int(args.tokenizer_train_mb * 1e6)),
              workers=args.workers, num_tasks=args.num_tasks, task=args.task, finalize_only=args.finalize)


def run(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)
    from pipeline.log import setup_logging

    setup_logging()
    if args.command == "shard":
        shard_text(args)
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

        print(sample_text(args.model, args.n, args.prompt, args.temperature, args.top_k, args.seed))
    elif args.command == "demo":
        from pipeline.demo import demo

        demo(args.out, args.config, args.steps)


def main(argv: list[str] | None = None) -> None:
    try:
        run(sys.argv[1:] if argv is None else argv)
    except ArpipeError as e:
        print(f"arpipe: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
