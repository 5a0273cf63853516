"""`arpipe complete`: fill the missing part of an image by sampling p(missing | observed) exactly.

An autoregressive model gives that conditional exactly when the observed variables come first
in its ordering: then the missing ones are its later variables, sampled one at a time given
everything before them, and their NLL given the observed part is a sum of its conditionals.
Which models can:
  - any model, when the observed variables are a prefix of its ordering (the shards' ordering
    for GPT, PixelCNN, GRU, FVSBN, NADE: raster fills a bottom part, column a right part);
  - MADE with several orderings: a member whose ordering starts with the observed variables
    (its own conditional: an ensemble's mixture has none for a non-prefix);
  - MADE trained with `train_orderings: random`: masks for an ordering that puts the observed
    variables first, whatever they are.
Anything else is refused with what would work. Masks name the missing part: a PNG or image
(white = missing), a .npy of bools (H, W) or (H, W, C), or a pattern: left-half, right-half,
top-half, bottom-half, center-square, random-P% (P% of the pixels, seeded).
"""

import json
import math
import re
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pipeline import ArpipeError
from pipeline.log import LOG

PATTERNS = ("left-half", "right-half", "top-half", "bottom-half", "center-square", "random-P%")


def load_mask(spec: str, height: int, width: int, channels: int, seed: int = 0) -> np.ndarray:
    """(H, W, C) bool, True = missing, from a pattern name or a file."""
    mask = np.zeros((height, width), dtype=bool)
    if spec == "left-half":
        mask[:, : width // 2] = True
    elif spec == "right-half":
        mask[:, width // 2 :] = True
    elif spec == "top-half":
        mask[: height // 2] = True
    elif spec == "bottom-half":
        mask[height // 2 :] = True
    elif spec == "center-square":
        mask[height // 4 : height - height // 4, width // 4 : width - width // 4] = True
    elif match := re.fullmatch(r"random-(\d+(?:\.\d+)?)%", spec):
        fraction = float(match[1]) / 100
        if not 0 <= fraction <= 1:
            raise ArpipeError(f"--mask {spec}: the percentage must be in 0..100")
        mask.flat[np.random.default_rng(seed).permutation(mask.size)[: round(fraction * mask.size)]] = True
    else:
        mask = read_mask_file(Path(spec), height, width, channels)
    return np.broadcast_to(mask[..., None] if mask.ndim == 2 else mask, (height, width, channels)).copy()


def read_mask_file(path: Path, height: int, width: int, channels: int) -> np.ndarray:
    if not path.is_file():
        raise ArpipeError(f"--mask {path}: no such file, and not one of the patterns {', '.join(PATTERNS)}")
    if path.suffix.lower() == ".npy":
        mask = np.load(path, allow_pickle=False)
        if mask.shape not in ((height, width), (height, width, channels)):
            raise ArpipeError(f"--mask {path} has shape {mask.shape}; the model's images need "
                              f"({height}, {width}) or ({height}, {width}, {channels})")
        return mask.astype(bool)
    from PIL import Image

    try:
        image = Image.open(path).convert("L")
    except Exception as e:  # Pillow raises several types for bad data
        raise ArpipeError(f"--mask {path} is neither a .npy nor an image Pillow reads: {e}") from None
    if image.size != (width, height):  # a mask drawn on the input at its own size
        image = image.resize((width, height), Image.Resampling.NEAREST)
    return np.asarray(image) >= 128


def observed_first(model, missing: torch.Tensor) -> tuple[torch.Tensor | None, str]:
    """The ordering (over data positions) to complete in, and what it is; raises if the model
    cannot give p(missing | observed) exactly. `missing` is (D,) bool over the data row."""
    if model.orders_variables:
        found = model.ordering_with_first(~missing)
        if found is None:
            raise ArpipeError(
                f"cannot complete this mask exactly: none of this {type(model).__name__}'s {len(model.orderings)} "
                f"orderings puts the observed variables first. What would work: a MADE trained with "
                f"`train_orderings: random`, or a mask whose observed part starts one of its orderings")
        return found
    n = int((~missing).sum())
    if missing[:n].any():
        raise ArpipeError(
            f"cannot complete this mask exactly: {type(model).__name__} takes the variables in the shards' ordering "
            f"and the observed ones are not its first {n}. What would work: a mask whose missing part comes last "
            f"in that ordering (raster: bottom-half), a model trained on shards whose --ordering puts the observed "
            f"part first (column for right-half), or a MADE trained with `train_orderings: random` (any mask)")
    return None, "its own ordering (the observed variables are its first)"


@torch.no_grad()
def complete_rows(model, row: torch.Tensor, missing: torch.Tensor, n: int, generator=None) -> tuple:
    """n completions (n, D) of a data row (D,) whose `missing` positions are resampled from the
    model's exact conditional given the rest, the NLL in nats of the row's own missing values
    given the rest, and which ordering gave it."""
    model.eval()
    order, what = observed_first(model, missing)
    given = int((~missing).sum())
    with model.in_order(order) if order is not None else nullcontext():
        x = model.from_data(row[None])
        logits = model.to_sequence(model(x))[0]  # the conditionals in the ordering
        nll = F.cross_entropy(logits.float(), model.to_sequence(x)[0], reduction="none")[given:].sum().item()
        prefix = model.to_sequence(x)[:, :given].expand(n, -1)
        rows = model.to_data(model.sample(n, prefix=prefix, generator=generator))
    return rows, nll, what


def complete(model_path: str, input_path: str, mask_spec: str, *, samples: int = 4, seed: int = 0,
             out: str = "completions") -> dict:
    from pipeline.codecs.image import read_images
    from pipeline.export import load_any

    model, codec, _ = load_any(model_path)
    if codec.modality != "image":
        raise ArpipeError(f"arpipe complete fills images; {model_path} models {codec.modality} "
                          f"(`arpipe sample --prompt` continues text and sound)")
    path = Path(input_path)
    try:
        record = next(r for r in read_images(str(path), path.parent) if r.skip is None)  # takes path strings
    except (StopIteration, OSError, ValueError) as e:
        raise ArpipeError(f"--input {path}: no readable image ({e})") from None
    reference = codec.pixels(record.value)
    row = torch.from_numpy(codec.tokens(reference).astype(np.int64))
    mask = load_mask(mask_spec, codec.height, codec.width, codec.channels, seed)
    missing = torch.from_numpy(mask.reshape(-1)[codec.perm])
    if not missing.any():
        raise ArpipeError(f"--mask {mask_spec} hides nothing: there is nothing to complete")
    generator = torch.Generator().manual_seed(seed)
    rows, nll, what = complete_rows(model, row, missing, samples, generator)
    count = int(missing.sum())
    result = {"input": str(path), "mask": mask_spec, "ordering": what, "missing": count, "observed": len(row) - count,
              "nll_nats": nll, "nats_per_dim": nll / count, "bits_per_dim": nll / count / math.log(2)}
    directory = Path(out)
    directory.mkdir(parents=True, exist_ok=True)
    result["grid"] = str(write_grid(codec, row.numpy(), mask, rows.numpy(), directory / "complete.png"))
    (directory / "complete.json").write_text(json.dumps(result, indent=1))
    LOG.info("complete: %s given %d of %d sub-pixels, in %s", path, len(row) - count, len(row), what)
    print(f"NLL of the missing part given the observed part: {nll:.3f} nats over {count} sub-pixels = "
          f"{result['bits_per_dim']:.4f} bits/dim\n{samples} completions: {result['grid']}")
    return result


def write_grid(codec, row: np.ndarray, mask: np.ndarray, completions: np.ndarray, path: Path) -> Path:
    """One PNG row: the input with its missing part shown red, the completions, the original."""
    from PIL import Image

    images = codec.to_pixels(np.concatenate([row[None], completions, row[None]]))
    if codec.channels == 1:
        images = np.repeat(images, 3, axis=-1)
    shown = images[0].astype(np.float64)
    hidden = mask.any(-1)
    shown[hidden] = 0.35 * shown[hidden] + 0.65 * np.array([255.0, 0, 0])
    images[0] = shown.astype(np.uint8)
    scale = max(1, 64 // max(codec.height, codec.width))
    images = images.repeat(scale, 1).repeat(scale, 2)
    n, h, w, pad = len(images), images.shape[1], images.shape[2], 2
    grid = np.full((h + 2 * pad, n * (w + pad) + pad, 3), 128, dtype=np.uint8)
    for i, image in enumerate(images):
        grid[pad : pad + h, pad + i * (w + pad) : pad + i * (w + pad) + w] = image
    Image.fromarray(grid).save(path)
    return path
