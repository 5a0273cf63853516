"""The `arpipe` command: shard, train, eval, sample, submit, recipe, demo."""

import argparse
import os
import sys
from pathlib import Path

from pipeline import ArpipeError, __version__
from pipeline.codecs import codec_classes
from pipeline.stages import add_shard_options, positive, shard


PREEMPTED = 75  # EX_TEMPFAIL: the trainer checkpointed on SIGTERM/SIGUSR1; job scripts requeue on it


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" to an option's help where there is a default to show (not for
    flags, and not for options without one, whose help says what happens then)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """`arpipe` and every (sub-)command under it (add_subparsers makes its parsers of this class)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


def add_sampling_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--temperature", type=float, default=1.0,
                   help="divides the logits when sampling: below 1 sharper, above 1 flatter, 0 greedy "
                        "(likelihoods always use 1)")
    p.add_argument("--top-k", type=int, help="sample only among the K most likely values (default, or 0: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the samples' random draws")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="arpipe", description=__doc__.split("\n")[0].strip("`"))
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    shard = sub.add_parser("shard", help="turn raw data into token shards and a manifest")
    modality = shard.add_subparsers(dest="modality", required=True, metavar="MODALITY")
    for name, codec in codec_classes().items():
        add_shard_options(modality.add_parser(name, help=codec.help, description=codec.help), codec)

    train = sub.add_parser("train", help="train a model with DeepSpeed (run under deepspeed, torchrun or srun)")
    train.add_argument("--config", required=True, help="YAML config (see configs/)")
    train.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. train.steps=100")
    train.add_argument("--deepspeed_config", "--deepspeed-config", metavar="JSON",
                       help="a DeepSpeed JSON config, merged over the YAML's deepspeed: section (KEY=VALUE "
                            "overrides still win); batch sizes, clipping, precision and ZeRO stage must agree "
                            "with the YAML's")
    train.add_argument("--deepspeed", action="store_true",
                       help="accepted as in DeepSpeed's examples; arpipe always trains with DeepSpeed")
    train.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # passed by the deepspeed launcher

    ev = sub.add_parser("eval", help="exact NLL of a model on a split, samples, completions -> MLflow")
    ev.add_argument("--model", required=True, help="an export, a run's out_dir, or a checkpoint directory")
    ev.add_argument("--data", required=True, help="shard directory")
    ev.add_argument("--split", default="val", help="the split to score: val or train")
    ev.add_argument("--batch-size", type=positive, default=16,
                    help="blocks per forward pass on each rank (speed and memory only: the result is the same)")
    ev.add_argument("--samples", type=int, default=4, help="unconditional samples")
    ev.add_argument("--prompts", type=int, default=4, help="completions of validation items' starts")
    ev.add_argument("--prompt-len", type=positive,
                    help="variables given to each completion (default: the codec's: 32 tokens, half an image)")
    add_sampling_options(ev)
    ev.add_argument("--new-run", action="store_true", help="log to a new MLflow run, not the training run")
    ev.add_argument("--tracking-uri", help="MLflow URI (default: the training run's)")
    ev.add_argument("--out", help="also write the results as JSON here")

    sample = sub.add_parser("sample", help="draw samples from an exported model")
    sample.add_argument("--model", required=True, help="an export, a run's out_dir, or a checkpoint directory")
    sample.add_argument("--out", help="directory for the sample files (default: a new temporary one)")
    sample.add_argument("-n", type=positive, default=4, help="number of samples")
    sample.add_argument("--prompt", help="what the samples continue: text, or for audio models a sound file")
    add_sampling_options(sample)

    server = sub.add_parser("mlflow-server", help="an MLflow tracking server (sqlite + local artifacts) for runs",
                            description="Start an MLflow tracking server on a sqlite store with local "
                            "artifacts; point runs at it with MLFLOW_TRACKING_URI=http://HOST:PORT.")
    server.add_argument("--store", type=Path, default=Path("mlruns"),
                        help="directory of mlflow.db and artifacts/ (mlruns: the embedded store runs use)")
    server.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1: this machine only)")
    server.add_argument("--port", type=int, default=5000, help="port to listen on")
    server.add_argument("--workers", type=positive, default=1, help="server worker processes")

    mlimport = sub.add_parser("mlflow-import", help="send metrics a run could not deliver to MLflow")
    mlimport.add_argument("file", type=Path, help="a run's mlflow-unsent.jsonl")
    mlimport.add_argument("--tracking-uri", help="default: $MLFLOW_TRACKING_URI, else the embedded store")

    submit = sub.add_parser("submit", help="submit shard -> train -> eval as dependent Slurm jobs",
                            description="Submit the chain shard -> train -> eval to Slurm (afterok "
                            "dependencies) from the config's `slurm` section.")
    submit.add_argument("--config", required=True, help="YAML config with a `slurm` section (see configs/)")
    submit.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, passed to training too")
    submit.add_argument("--dry-run", action="store_true", help="print the sbatch commands and scripts, submit nothing")

    recipe = sub.add_parser("recipe", help="compare variants (orderings, models, …): shard, train, eval each, "
                            "log a table to MLflow", description="Run a recipe (see configs/image-orderings.yaml): "
                            "for each variant shard, train on 2 DeepSpeed processes and evaluate, then log the "
                            "recipe's metric per variant as a table in a parent MLflow run.")
    recipe.add_argument("recipe", type=Path, help="recipe YAML")
    recipe.add_argument("--out", type=Path, help="output directory (default runs/<recipe name>)")
    recipe.add_argument("--steps", type=positive, help="override train.steps of every variant (for a quick try)")
    recipe.add_argument("--variants", nargs="+", help="run only these variants (default: all)")

    demo = sub.add_parser("demo", help="shard -> train (2 DeepSpeed processes) -> eval on bundled text, audio "
                                       "and images")
    demo.add_argument("--out", type=Path, default=Path("runs/demo"),
                      help="where shards and runs go")
    demo.add_argument("--config", type=Path, default=Path("configs/demo.yaml"),
                      help="the text leg's config; the other legs' (demo-audio.yaml, demo-image.yaml) are "
                           "read from its folder")
    demo.add_argument("--steps", type=int, help="override train.steps of every leg (for a quick try)")
    demo.add_argument("--legs", nargs="+", choices=["text", "audio", "image"],
                      help="run only these legs (default: all)")
    return parser


def run(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)
    from pipeline.log import setup_logging
    from pipeline.train.dist import leave_together

    setup_logging()
    if args.command == "shard":
        shard(args.modality, args)
    elif args.command == "train":
        from pipeline.config import load_config
        from pipeline.train.trainer import train

        stopped = train(load_config(args.config, args.overrides, args.deepspeed_config)).get("stopped")
        # under a job script (which requeues) every rank exits 0, else srun would kill the slower ones
        exit_code = PREEMPTED if stopped and not os.environ.get("ARPIPE_PREEMPT_MARKER") else 0
        leave_together(exit_code)
        if exit_code:
            sys.exit(exit_code)
    elif args.command == "eval":
        from pipeline.eval.run import run_eval

        run_eval(args.model, args.data, split=args.split, batch_size=args.batch_size, samples=args.samples,
                 prompts=args.prompts, prompt_len=args.prompt_len, temperature=args.temperature,
                 top_k=args.top_k, seed=args.seed, new_run=args.new_run, tracking_uri=args.tracking_uri,
                 out=args.out)
        leave_together()
    elif args.command == "sample":
        from pipeline.eval.samples import sample_text

        for path in sample_text(args.model, args.n, args.prompt, args.temperature, args.top_k, args.seed, args.out):
            print(path.read_text() if path.suffix == ".txt" else path)
    elif args.command == "mlflow-server":
        from pipeline.tracking import serve

        serve(args.store, args.host, args.port, args.workers)
    elif args.command == "mlflow-import":
        from pipeline.tracking import import_metrics

        print(f"sent {import_metrics(args.file, args.tracking_uri)} metrics")
    elif args.command == "submit":
        from pipeline.config import load_config
        from pipeline.submit import submit

        submit(load_config(args.config, args.overrides), args.config, args.overrides, args.dry_run)
    elif args.command == "recipe":
        from pipeline.recipes import run_recipe

        run_recipe(args.recipe, args.out, args.steps, args.variants)
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
