"""`arpipe shard MODALITY`: its options and running it, for the CLI, the demo and recipes.

It lives below the CLI so that the demo and recipes, which shard too, never import the CLI
that calls them.
"""

import argparse
from pathlib import Path

from pipeline import ArpipeError
from pipeline.codecs import Codec, codec_classes


def positive(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def fraction(value: str) -> float:
    x = float(value)
    if not 0 <= x < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {x}")
    return x


def local_path(value: str) -> str:
    if "://" in value:
        raise argparse.ArgumentTypeError(f"{value} is a URL; object storage holds shards only (shard --out, "
                                         f"eval --data, data.path): give a local or shared file system path")
    return value


def add_shard_options(p: argparse.ArgumentParser, codec: type[Codec]) -> None:
    """The options every `arpipe shard MODALITY` of raw inputs shares, then the codec's own."""
    if codec.reads_raw_inputs:  # `shard multi` joins finished shard sets: its options are all its own
        p.add_argument("--input", nargs="+", required=True, metavar="PATH_OR_GLOB",
                       type=lambda value: value if value.startswith("hf://") else local_path(value),
                       help="input files, directories or globs (** recurses); hf://USER/NAME for a Hugging Face "
                            "dataset in the local cache, hf://DIR for a local one in the Hub's layout; a "
                            "directory written by save_to_disk is read as a dataset")
        p.add_argument("--out", required=True, help="output directory for shards and manifest.json, or an object "
                       "store URL (s3://bucket/prefix; AWS_ENDPOINT_URL and credentials from the environment)")
        p.add_argument("--workers", type=positive, default=1, help="parallel processes on this machine")
        p.add_argument("--task", type=int, help="run only task I (a Slurm array element), then stop")
        p.add_argument("--num-tasks", type=positive, help="number of tasks the inputs are cut into "
                       "(default: --workers; fixed by the first run)")
        p.add_argument("--finalize", action="store_true", help="only merge the done tasks' results into manifest.json")
        p.add_argument("--val-fraction", type=fraction, default=0.05, help="share of items in the val split")
        p.add_argument("--chunk-mb", type=float, default=2.0, help="MB of tokens per WebDataset sample")
        p.add_argument("--shard-mb", type=float, default=256.0, help="MB per tar shard")
        hf = p.add_argument_group("Hugging Face datasets (--input hf://… or a save_to_disk directory)")
        hf.add_argument("--hf-split", nargs="+", default=["train"], metavar="SPLIT",
                        help="the dataset splits to read; arpipe makes its own train/val split")
        hf.add_argument("--hf-config", metavar="NAME", help="the dataset's configuration (subset), if it has several")
        hf.add_argument("--hf-revision", metavar="REV", help="a commit, branch or tag of a Hub dataset (default: the "
                        "latest cached)")
    codec.add_arguments(p)


def shard(modality: str, args: argparse.Namespace) -> None:
    """Run the shard stage `args` (parsed by a parser with add_shard_options) describes."""
    from pipeline.data.shards import run_stage
    from pipeline.data.sources import expand_inputs
    from pipeline.data.storage import is_url

    codec = codec_classes()[modality]
    if not codec.reads_raw_inputs:
        from pipeline.data.multi_shards import shard_multi

        shard_multi({"text": args.text, "image": args.image, "audio": args.audio}, args.out,
                    int(args.chunk_mb * 2**20), int(args.shard_mb * 2**20))
        return
    settings = {"modality": modality, "val_fraction": args.val_fraction,
                "chunk_bytes": int(args.chunk_mb * 2**20), "shard_bytes": int(args.shard_mb * 2**20),
                **codec.shard_settings(args)}
    inputs = [] if args.finalize else expand_inputs(args.input, args.hf_split, args.hf_config, args.hf_revision)
    stage, out = run_stage, Path(args.out)
    if is_url(args.out):
        from pipeline.data.remote_stage import run_remote_stage  # imports fsspec and s3fs: only for s3://

        stage, out = run_remote_stage, args.out
    stage(out, settings, inputs, codec.maker(settings, args), workers=args.workers,
          num_tasks=args.num_tasks, task=args.task, finalize_only=args.finalize)


def run_shard(modality: str, argv: list[str]) -> None:
    """`arpipe shard MODALITY ARGV…` in this process."""
    codecs = codec_classes()
    if modality not in codecs:
        raise ArpipeError(f"unknown modality {modality!r}; known: {sorted(codecs)}")
    parser = argparse.ArgumentParser(prog=f"arpipe shard {modality}")
    add_shard_options(parser, codecs[modality])
    shard(modality, parser.parse_args(argv))
