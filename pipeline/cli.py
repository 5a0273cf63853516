"""The `arpipe` command: shard, train, eval, sample, submit, recipe, demo."""

import argparse
import os
import sys
from pathlib import Path

from pipeline import ArpipeError
from pipeline.codecs import codec_classes


PREEMPTED = 75  # EX_TEMPFAIL: the trainer checkpointed on SIGTERM/SIGUSR1; job scripts requeue on it


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


def _local(value: str) -> str:
    if "://" in value:
        raise argparse.ArgumentTypeError(f"{value} is a URL; object storage holds shards only (shard --out, "
                                         f"eval --data, data.path): give a local or shared file system path")
    return value


def add_stage_options(p: argparse.ArgumentParser) -> None:
    """Options every `arpipe shard <modality>` shares."""
    p.add_argument("--input", nargs="+", required=True, metavar="PATH_OR_GLOB", type=_local,
                   help="input files, directories or globs (** recurses)")
    p.add_argument("--out", required=True, help="output directory for shards and manifest.json, or an object "
                   "store URL (s3://bucket/prefix; AWS_ENDPOINT_URL and credentials from the environment)")
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
        if codec.reads_raw_inputs:
            add_stage_options(stage)
        codec.add_arguments(stage)

    train = sub.add_parser("train", help="train a model with DeepSpeed (run under deepspeed, torchrun or srun)")
    train.add_argument("--config", required=True, help="YAML config (see configs/)")
    train.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. train.steps=100")
    train.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # passed by the deepspeed launcher

    ev = sub.add_parser("eval", help="exact NLL of a model on a split, samples, completions -> MLflow")
    ev.add_argument("--model", required=True, type=_local, help="an export, a run's out_dir, or a checkpoint directory")
    ev.add_argument("--data", required=True, help="shard directory, or its s3://bucket/prefix")
    ev.add_argument("--split", default="val")
    ev.add_argument("--batch-size", type=_positive, default=16)
    ev.add_argument("--samples", type=int, default=4, help="unconditional samples")
    ev.add_argument("--prompts", type=int, default=4, help="completions of validation items' starts")
    ev.add_argument("--prompt-len", type=_positive,
                    help="variables given to each completion (default: the codec's: 32 tokens, half an image)")
    ev.add_argument("--temperature", type=float, default=1.0)
    ev.add_argument("--top-k", type=int)
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--new-run", action="store_true", help="log to a new MLflow run, not the training run")
    ev.add_argument("--tracking-uri", help="MLflow URI (default: the training run's)")
    ev.add_argument("--out", type=_local, help="also write the results as JSON here")

    sample = sub.add_parser("sample", help="draw samples from an exported model")
    sample.add_argument("--model", required=True, type=_local,
                        help="an export, a run's out_dir, or a checkpoint directory")
    sample.add_argument("--out", type=_local, help="directory for the sample files (default: a new temporary one)")
    sample.add_argument("-n", type=_positive, default=4, help="number of samples")
    sample.add_argument("--prompt", help="what the samples continue: text, or for audio models a sound file")
    sample.add_argument("--modality", choices=["text", "image", "audio"],
                        help="a multimodal model's items of this modality (opened with its token), each "
                             "rendered as .txt, PNG or WAV")
    sample.add_argument("--length", type=_positive,
                        help="variables per sample (tokens, audio samples), prompt included (default: the "
                             "model's block_len); beyond it GPT and Llama slide their context window (--stride), "
                             "WaveNet and GRU run on, image and classic models refuse")
    sample.add_argument("--stride", type=_positive,
                        help="for --length beyond a GPT's or Llama's context: the window moves on this many "
                             "variables when full, so each sees at least block_len - stride before it, the "
                             "conditionals `arpipe eval --stride` scores (default: block_len // 2)")
    sample.add_argument("--temperature", type=float, default=1.0, help="softmax temperature; 0 is greedy")
    sample.add_argument("--top-k", type=int, help="draw from the k most likely values only")
    sample.add_argument("--seed", type=int, default=0, help="seed of the sampling generator")

    export_hf = sub.add_parser("export-hf", help="write a text GPT or Llama as a Hugging Face transformers directory",
                               description="Write a text GPT or Llama as a transformers GPT2LMHeadModel or "
                               "LlamaForCausalLM directory with its tokenizer (AutoModelForCausalLM / "
                               "AutoTokenizer.from_pretrained load it). The BOS the tokenizer puts first carries "
                               "the model's start vector and no token is added, so every probability is arpipe's.")
    export_hf.add_argument("--model", required=True, help="an export, a run's out_dir, or a checkpoint directory")
    export_hf.add_argument("--out", required=True, type=Path, help="directory for the transformers files")

    comp = sub.add_parser("compress", help="compress files losslessly with a model's exact conditionals",
                          description="Range-code files with a model's conditionals: text (any bytes), images "
                          "(pixel-exact at 256 levels), audio (its μ-law stream). Decompress with the same model, "
                          "versions and kind of machine (the file records them).")
    comp.add_argument("--model", required=True, help="an export, a run's out_dir, or a checkpoint directory")
    comp.add_argument("--input", nargs="+", required=True, metavar="PATH_OR_GLOB", help="files, directories or globs")
    comp.add_argument("--out", required=True, help="the compressed file to write")
    comp.add_argument("--batch", type=_positive, default=16, help="rows coded in parallel (recorded; default 16)")
    comp.add_argument("--stride", type=_positive,
                      help="variables coded per context window beyond the model's length (default: half of it)")
    comp.add_argument("--threads", type=_positive, default=1,
                      help="torch threads (recorded: decompression uses the same; default 1)")
    comp.add_argument("--segment", type=_positive, default=16384,
                      help="code items longer than this many variables in pieces, each from an empty context, "
                           "in parallel rows: faster for a few long files, a little larger (default 16384)")

    decomp = sub.add_parser("decompress", help="restore the files of an `arpipe compress` file")
    decomp.add_argument("file", help="the compressed file")
    decomp.add_argument("--model", required=True, help="the model it was compressed with")
    decomp.add_argument("--out", required=True, help="directory for the restored files")

    fill = sub.add_parser("complete", help="fill the missing part of an image from p(missing | observed), exactly",
                          description="Sample the missing part of an image from the model's exact conditional given "
                          "the observed part (models whose ordering can put the observed part first; others are "
                          "refused with what would work), report its NLL, write a PNG grid and complete.json.")
    fill.add_argument("--model", required=True, help="an export, a run's out_dir, or a checkpoint directory")
    fill.add_argument("--input", required=True, help="the image (PNG, JPEG, … or the first of an .npz/.npy array)")
    fill.add_argument("--mask", required=True, help="the missing part: a PNG (white = missing), a .npy of bools, or "
                      "left-half, right-half, top-half, bottom-half, center-square, random-P%% (e.g. random-50%%)")
    fill.add_argument("-n", "--samples", type=_positive, default=4, help="completions to draw")
    fill.add_argument("--seed", type=int, default=0, help="seeds the completions and random-P%% masks")
    fill.add_argument("--out", default="completions", help="directory for complete.png and complete.json")

    server = sub.add_parser("mlflow-server", help="an MLflow tracking server (sqlite + local artifacts) for runs",
                            description="Start an MLflow tracking server on a sqlite store with local "
                            "artifacts; point runs at it with MLFLOW_TRACKING_URI=http://HOST:PORT.")
    server.add_argument("--store", type=Path, default=Path("mlruns"),
                        help="directory of mlflow.db and artifacts/ (default mlruns: the embedded store runs use)")
    server.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    server.add_argument("--port", type=int, default=5000)
    server.add_argument("--workers", type=_positive, default=1)

    mlimport = sub.add_parser("mlflow-import", help="send metrics a run could not deliver to MLflow")
    mlimport.add_argument("file", type=Path, help="a run's mlflow-unsent.jsonl")
    mlimport.add_argument("--tracking-uri", help="default: $MLFLOW_TRACKING_URI, else the embedded store")

    submit = sub.add_parser("submit", help="submit shard -> train -> eval as dependent Slurm jobs",
                            description="Submit the chain shard -> train -> eval to Slurm (afterok "
                            "dependencies) from the config's `slurm` section.")
    submit.add_argument("--config", required=True)
    submit.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, passed to training too")
    submit.add_argument("--dry-run", action="store_true", help="print the sbatch commands and scripts, submit nothing")

    recipe = sub.add_parser("recipe", help="compare variants (orderings, models, …): shard, train, eval each, "
                            "log a table to MLflow", description="Run a recipe (see configs/image-orderings.yaml): "
                            "for each variant shard, train on 2 DeepSpeed processes and evaluate, then log the "
                            "recipe's metric per variant as a table in a parent MLflow run.")
    recipe.add_argument("recipe", type=Path, help="recipe YAML")
    recipe.add_argument("--out", type=Path, help="output directory (default runs/<recipe name>)")
    recipe.add_argument("--steps", type=_positive, help="override train.steps of every variant (for a quick try)")
    recipe.add_argument("--variants", nargs="+", help="run only these variants (default: all)")

    demo = sub.add_parser("demo", help="shard -> train (2 DeepSpeed processes) -> eval on bundled text, audio "
                                       "and images")
    demo.add_argument("--out", type=Path, default=Path("runs/demo"),
                      help="where shards and runs go (default: %(default)s)")
    demo.add_argument("--config", type=Path, default=Path("configs/demo.yaml"),
                      help="the text leg's config; the other legs' (demo-audio.yaml, demo-image.yaml) are "
                           "read from its folder (default: %(default)s)")
    demo.add_argument("--steps", type=int, help="override train.steps of every leg (for a quick try)")
    demo.add_argument("--legs", nargs="+", choices=["text", "audio", "image"],
                      help="run only these legs (default: all)")
    return parser


def shard(args) -> None:
    from pipeline.data.remote_stage import run_remote_stage
    from pipeline.data.shards import run_stage
    from pipeline.data.sources import expand_inputs
    from pipeline.data.storage import is_url

    codec = codec_classes()[args.modality]
    if not codec.reads_raw_inputs:
        from pipeline.codecs.multi import shard_multi

        shard_multi({"text": args.text, "image": args.image, "audio": args.audio}, args.out,
                    int(args.chunk_mb * 2**20), int(args.shard_mb * 2**20))
        return
    settings = {"modality": args.modality, "val_fraction": args.val_fraction,
                "chunk_bytes": int(args.chunk_mb * 2**20), "shard_bytes": int(args.shard_mb * 2**20),
                **codec.shard_settings(args)}
    inputs = [] if args.finalize else expand_inputs(args.input)
    stage, out = (run_remote_stage, args.out) if is_url(args.out) else (run_stage, Path(args.out))
    stage(out, settings, inputs, codec.maker(settings, args), workers=args.workers,
          num_tasks=args.num_tasks, task=args.task, finalize_only=args.finalize)


def run(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)
    from pipeline.log import setup_logging
    from pipeline.train.dist import leave_together

    setup_logging()
    if args.command == "shard":
        shard(args)
    elif args.command == "train":
        from pipeline.config import load_config
        from pipeline.train.trainer import train

        stopped = train(load_config(args.config, args.overrides)).get("stopped")
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

        for path in sample_text(args.model, args.n, args.prompt, args.temperature, args.top_k, args.seed, args.out,
                                args.length, args.stride, args.modality):
            print(path.read_text() if path.suffix == ".txt" else path)
    elif args.command == "compress":
        from pipeline.compress import compress

        compress(args.model, args.input, args.out, batch=args.batch, stride=args.stride, threads=args.threads,
                 segment=args.segment)
    elif args.command == "decompress":
        from pipeline.compress import decompress

        for path in decompress(args.file, args.model, args.out):
            print(path)
    elif args.command == "complete":
        from pipeline.complete import complete

        complete(args.model, args.input, args.mask, samples=args.samples, seed=args.seed, out=args.out)
    elif args.command == "export-hf":
        from pipeline.hf import export_hf

        print(export_hf(args.model, args.out))
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
