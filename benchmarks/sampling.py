"""Sampling: each model's fast path against the full recompute (one forward pass over the whole
sequence per new variable, `sample(cached=False)`), drawing the same number of variables in the
same process on one CPU thread. Untrained models with random weights: the cost of a step does
not depend on the weights.

  GPT       KV cache vs full recompute, 512 new tokens (target ≥ 10×)
  WaveNet   per-layer activation queues ("Fast WaveNet") vs full recompute, receptive field 1024,
            one receptive field of new samples (target ≥ 20×), at the widths of
            configs/audio-wavenet.yaml (64 residual and gate, 256 skip channels) and of the demo's
            small model (32, 32, 64); and the demo's model itself (2 stacks of 8, receptive field
            511, 1024 samples; no target, the figure the audio issue asks for)
  PixelCNN  images/s (sampling is a full pass per sub-pixel by design); the demo's model on
            8×8 digits, 1 and 16 images at a time

    python benchmarks/sampling.py [--repeats 3]
"""

import torch

import common
from common import Row, median_times


def model(family: str, shape: tuple, vocab: int, **cfg):
    from pipeline.models import build_model

    torch.manual_seed(0)
    m = build_model({"name": family, **cfg}, vocab, shape)
    m.eval()
    return m


def draw(m, n: int, cached: bool):
    return lambda: m.sample(n, cached=cached, generator=torch.Generator().manual_seed(0))


def speedup(name: str, m, n: int, repeats: int, target: float, unit: str) -> Row:
    fast, slow = draw(m, n, True), draw(m, n, False)
    same = (fast() == slow()).float().mean().item()  # 1.0 unless float rounding flipped a draw
    t = median_times({"fast": fast, "slow": slow}, repeats)
    new = n * m.num_vars
    return Row(name, f"{new / t['fast']:.0f} {unit}/s", f"full recompute {new / t['slow']:.0f} {unit}/s"
               + ("" if same == 1 else f" ({same:.1%} of variables equal)"), t["slow"] / t["fast"], target)


def main(argv=None):
    p = common.parser(__doc__.split("\n\n")[0])
    args = common.parse(p, argv)
    common.single_core()
    torch.set_num_threads(1)
    T = 32 if args.tiny else 512
    layers = 5 if args.tiny else 10
    rows = []
    gpt = model("gpt", (T,), 256, n_layer=2, n_head=4, d_model=128)
    for n in (1, 8):
        rows.append(speedup(f"GPT 2 × 128, KV cache vs recompute, {T} new tokens, batch {n}", gpt, n, args.repeats,
                            10, "tok"))
    # widths of configs/audio-wavenet.yaml and of the demo's small model, one stack of 10 layers
    for (res, skip), batches in (((64, 256), (1,)), ((32, 64), (1, 4))):
        wavenet = model("wavenet", (2**layers,), 256, stacks=1, layers_per_stack=layers, residual_channels=res,
                        gate_channels=res, skip_channels=skip)
        for n in batches:
            rows.append(speedup(f"WaveNet 1 × {layers} layers, {res}/{res}/{skip} channels (receptive field "
                                f"{wavenet.receptive_field}), fast vs recompute, {2**layers} samples, batch {n}",
                                wavenet, n, args.repeats, 20, "samples"))
    # the demo's own model (configs/demo-audio.yaml: 2 stacks of 8, receptive field 511), 1024-sample clips
    demo_layers = 3 if args.tiny else 8
    wavenet = model("wavenet", (4 * 2**demo_layers,), 256, stacks=2, layers_per_stack=demo_layers,
                    residual_channels=32, gate_channels=32, skip_channels=64)
    for n in (1, 4):
        rows.append(speedup(f"WaveNet, the demo's model: 2 × {demo_layers} layers, 32/32/64 channels (receptive field "
                            f"{wavenet.receptive_field}), fast vs recompute, {wavenet.num_vars} samples, batch {n}",
                            wavenet, n, args.repeats, None, "samples"))
    pixelcnn = model("pixelcnn", (1, 8, 8), 17, n_layer=4 if not args.tiny else 1, hidden=32, kernel=3,
                     first_kernel=5, head=64)
    t = median_times({n: draw(pixelcnn, n, True) for n in (1, 16)}, args.repeats)
    for n in (1, 16):
        rows.append(Row(f"PixelCNN (the demo's: gated, 4 layers × 32), 8×8 digits, 17 levels, batch {n}",
                        f"{n / t[n]:.2f} images/s", "batch 1" if n > 1 else "",
                        t[1] / t[n] * n if n > 1 else None))
    common.report("Sampling (benchmarks/sampling.py)", rows, args,
                  ["ratio: recompute time / fast time for the same samples (same seed; identical unless noted); for PixelCNN, "
                   "images/s at batch 16 over batch 1", "one thread, untrained models (random weights)"])
    return rows


if __name__ == "__main__":
    main()
