"""Exact evaluation: `evaluate_nll` with sliding windows (`arpipe eval --stride 32`: the block
figure and the sliding one) against blocks alone (`arpipe eval`), on the demo's validation text
with the demo's GPT (configs/demo.yaml: 4 layers × 128, block_len 128), one CPU thread. The
windows are batched, so the sliding pass costs block_len / stride times the block pass's model
work: the target is ≤ 1.1 × (1 + 128/32) = 5.5× the block figure's time. Untrained model: the
cost does not depend on the weights.

    python benchmarks/eval.py [--repeats 3] [--work DIR]
"""

import time

import yaml

import common
from common import REPO, Row, median_times


def demo_shards(work, tiny: bool):
    """The demo's text shards (`arpipe demo`'s text leg), made once in --work."""
    from pipeline.cli import run as cli
    from pipeline.demo import write_text_corpus

    out = work / ("tiny-shards" if tiny else "demo-shards")
    if not (out / "manifest.json").exists():
        inputs = write_text_corpus(work / "corpus")
        if tiny:  # 8 of the stdlib's modules: a tokenizer of 300 tokens, a few seconds
            inputs = [str(p) for p in sorted((work / "corpus" / "stdlib").glob("*.py"))[:8]]
        cli(["shard", "text", "--input", *inputs, "--out", str(out), "--vocab-size", "300" if tiny else "4096",
             "--workers", "2", "--chunk-mb", "0.25", *(["--val-fraction", "0.3"] if tiny else [])])
    return out


def main(argv=None):
    p = common.parser(__doc__.split("\n\n")[0])
    args = common.parse(p, argv)
    common.single_core()
    import torch

    from pipeline.data.shards import Shards
    from pipeline.eval.nll import evaluate_nll
    from pipeline.models import build_model

    torch.set_num_threads(1)
    shards = Shards(demo_shards(common.work_dir(args), args.tiny))
    demo = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    T, stride = demo["data"]["block_len"], 32
    torch.manual_seed(0)
    model = build_model({**demo["model"], **({"n_layer": 1} if args.tiny else {})}, shards.codec.vocab_size, (T,))
    model.eval()
    results, cpu = {}, {None: [], stride: []}

    def variant(s):
        def run():
            start = time.process_time()
            results[s] = evaluate_nll(model, shards, "val", T, 16, stride=s)
            cpu[s].append(time.process_time() - start)
        return run

    t = median_times({"blocks": variant(None), "sliding": variant(stride)}, args.repeats)
    r = results[stride]
    assert r["nats"] == results[None]["nats"]  # the block figure does not change with --stride
    what = f"{r['bytes'] / 1e3:.0f} kB of validation text, {r['tokens']} tokens"
    rows = [Row(f"eval --stride {stride} (block and sliding figures), GPT 4 × 128, block_len {T}: {what}",
                f"{t['sliding']:.1f} s, {min(cpu[stride]):.1f} s of CPU "
                f"({common.rate(r['tokens'], t['sliding'], 'tok')})",
                f"blocks alone {t['blocks']:.1f} s, {min(cpu[None]):.1f} s of CPU "
                f"({common.rate(r['tokens'], t['blocks'], 'tok')})",
                t["sliding"] / t["blocks"], 1.1 * (1 + T / stride), at_most=True)]
    common.report("Sliding-window evaluation (benchmarks/eval.py)", rows, args,
                  [f"ratio: time of evaluate_nll with stride {stride} / without; one thread, batch 16, an untrained "
                   f"model (random weights); CPU: the least process time of the runs (wall time grows with the "
                   f"machine's load)",
                   f"bits/byte of this untrained model: blocks {r['bits_per_byte']:.3f}, sliding "
                   f"{r['bits_per_byte_sliding']:.3f}"])
    return rows


if __name__ == "__main__":
    main()
