"""Peak memory of the training loss of a vocabulary head: the fp32 cross-entropy of the whole
batch's logits (the loss before `forward(x, loss=True)`) against the chunked loss of
pipeline/models/loss.py, forward and backward, for GPT-124M's head: 4 × 1024 rows of 768
features, a 50304-token vocabulary, fp32 on CPU.

Each variant runs in a fresh process; the figure is its peak resident memory (ru_maxrss) above
what it held once the rows, the weight and the targets were made, so it counts what the loss
and its backward pass add (logits, softmax, gradients, the weight's gradient). The GPU figure
(torch.cuda.max_memory_allocated, bf16) comes from benchmarks/gpu.py's plain loop.

    python benchmarks/loss_memory.py
"""

import argparse
import json
import resource
import subprocess
import sys

import common
from common import Row

SHAPE = {"rows": 4 * 1024, "d_model": 768, "vocab": 50304}
TINY = {"rows": 64, "d_model": 16, "vocab": 512}


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def measure(variant: str, rows: int, d_model: int, vocab: int) -> dict:
    """In this process: the loss and its gradients; peak memory above the inputs."""
    import torch
    import torch.nn.functional as F

    from pipeline.models.loss import VocabHead

    def loss_of(head, h, targets):
        return F.cross_entropy(head(h).float(), targets) if variant == "logits" else head(h, targets)

    torch.manual_seed(0)
    loss_of(VocabHead(d_model, 8), torch.randn(2, d_model, requires_grad=True), torch.zeros(2, dtype=torch.long)) \
        .backward()  # loads the kernels' code before the measurement
    head = VocabHead(d_model, vocab)
    h = torch.randn(rows, d_model, requires_grad=True)
    targets = torch.randint(0, vocab, (rows,))
    before = peak_mb()
    loss = loss_of(head, h, targets)
    loss.backward()
    return {"variant": variant, "added_mb": peak_mb() - before, "loss": loss.item(),
            "grad_norm": head.weight.grad.norm().item()}


def main(argv=None):
    p = common.parser(__doc__.split("\n\n")[0])
    p.add_argument("--run", choices=["logits", "chunked"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    shape = TINY if args.tiny else SHAPE
    if args.run:  # the child process of one variant
        common.single_core()
        print("RESULT " + json.dumps(measure(args.run, **shape)), flush=True)
        return None
    results = {}
    for variant in ("logits", "chunked"):
        command = [sys.executable, __file__, "--run", variant] + (["--tiny"] if args.tiny else [])
        out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        results[variant] = json.loads(next(line[7:] for line in out.splitlines() if line.startswith("RESULT ")))
    old, new = results["logits"], results["chunked"]
    logits_mb = shape["rows"] * shape["vocab"] * 4 / 2**20
    rows = [Row(f"loss + backward of a {shape['d_model']} → {shape['vocab']} head over {shape['rows']} rows, fp32, "
                "peak memory added: chunked vs fp32 logits", f"{new['added_mb']:.0f} MB", f"{old['added_mb']:.0f} MB",
                new["added_mb"] / old["added_mb"])]
    notes = [f"the fp32 logits alone are {logits_mb:.0f} MB; the weight's gradient "
             f"{shape['vocab'] * shape['d_model'] * 4 / 2**20:.0f} MB is in both",
             f"same loss: {new['loss']:.7f} vs {old['loss']:.7f} nats; weight-gradient norm {new['grad_norm']:.7f} vs "
             f"{old['grad_norm']:.7f}",
             "GPU (bf16): pending — benchmarks/gpu.py's gpt-bare and llama-bare rows measure it on the GPU machine"]
    common.report("Training-loss memory (benchmarks/loss_memory.py)", rows, args, notes,
                  how="one fresh process per variant: peak RSS above the inputs")
    return rows


if __name__ == "__main__":
    main()
