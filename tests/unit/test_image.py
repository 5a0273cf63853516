"""Images: orderings, the image codec and `arpipe shard image`, PixelCNN's causality and
receptive field, completions that keep their prefix, and the raster-only guard."""

import gzip
import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from pipeline import ArpipeError
from pipeline.codecs.image import ImageCodec, array_images
from pipeline.codecs.ordering import ORDERINGS, hilbert_xy, inverse, permutation, pixel_order
from pipeline.config import load_config
from pipeline.data.shards import Shards
from pipeline.eval.samples import write_samples
from pipeline.export import save_export
from pipeline.models import build_model, check_ordering
from pipeline.recipes import load_recipe, markdown_table
from tests.conftest import REPO, arpipe

DIGITS = REPO / "pipeline" / "bundled" / "digits.npz"
SHAPES = [(1, 1, 1), (1, 8, 8), (3, 5, 7), (1, 28, 28), (3, 2, 9), (1, 6, 1)]


def png_bytes(array: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt)
    return buf.getvalue()


def read_items(out) -> dict[str, np.ndarray]:
    """key -> tokens, over both splits of a shard directory."""
    shards, items = Shards(out), {}
    for split in ("train", "val"):
        for shard, entry in shards.chunks(split):
            tokens, offsets = shards.read_chunk(shard, entry["key"])
            meta = json.loads(shards.read(shard, entry["key"], "meta.json"))
            for item, a, b in zip(meta["items"], offsets[:-1], offsets[1:]):
                items[item["key"]] = tokens[a:b]
    return items


# --- orderings
@pytest.mark.parametrize("name", ORDERINGS)
@pytest.mark.parametrize("shape", SHAPES)
def test_orderings_are_permutations_that_round_trip(name, shape):
    C, H, W = shape
    perm = permutation(name, C, H, W)
    assert sorted(perm.tolist()) == list(range(C * H * W))
    x = np.random.default_rng(0).integers(0, 256, C * H * W)
    assert np.array_equal(x[perm][inverse(perm)], x)
    # R→G→B innermost: each pixel's channels are consecutive and in order
    by_pixel = perm.reshape(-1, C)
    assert np.array_equal(by_pixel - by_pixel[:, :1], np.tile(np.arange(C), (H * W, 1)))


def test_curves_visit_pixels_in_their_named_order():
    assert pixel_order("raster", 2, 3).tolist() == [0, 1, 2, 3, 4, 5]
    assert pixel_order("snake", 3, 3).tolist() == [0, 1, 2, 5, 4, 3, 6, 7, 8]
    assert pixel_order("column", 2, 3).tolist() == [0, 3, 1, 4, 2, 5]
    for n in (2, 4, 8, 16):  # a Hilbert curve steps to a 4-neighbour every time
        x, y = hilbert_xy(np.arange(n * n), n)
        assert len(set(zip(x.tolist(), y.tolist()))) == n * n
        assert np.all(np.abs(np.diff(x)) + np.abs(np.diff(y)) == 1)
    for H, W in [(8, 8), (28, 28), (6, 1)]:  # snake too, on any size
        order = pixel_order("snake", H, W)
        ys, xs = np.divmod(order, W)
        assert np.all(np.abs(np.diff(ys)) + np.abs(np.diff(xs)) == 1)
    with pytest.raises(ArpipeError, match="unknown ordering 'zigzag'"):
        pixel_order("zigzag", 2, 2)


# --- the codec
def test_levels_quantise_and_come_back():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    full = ImageCodec(5, 7, 3, 256, "hilbert")
    assert np.array_equal(full.to_pixels(full.tokens(pixels)[None])[0], pixels)  # 256 levels: lossless
    binary = ImageCodec(5, 7, 3, 2, "raster")
    assert np.array_equal(binary.tokens(pixels), (pixels >= 128).reshape(-1))  # 2 levels: threshold at 128
    # the shipped digits keep their 17 grey levels (0..16, stored scaled to 0-255) exactly
    with np.load(DIGITS) as archive:
        images = archive["images"]
    assert images.shape == (1797, 8, 8)
    digits = ImageCodec(8, 8, 1, 17, "snake")
    tokens = np.stack([digits.tokens(image[..., None]) for image in images])
    assert tokens.max() == 16 and np.array_equal(digits.to_pixels(tokens)[..., 0], images)


def test_bad_codec_settings_are_clear_errors(tmp_path):
    with pytest.raises(ArpipeError, match="levels must be in 2..256"):
        ImageCodec(8, 8, 1, 300)
    with pytest.raises(ArpipeError, match="channels must be 1"):
        ImageCodec(8, 8, 2, 256)
    result = arpipe("shard", "image", "--input", DIGITS, "--out", tmp_path / "o", "--levels", "1", check=False)
    assert result.returncode == 2 and result.stderr.strip() == "arpipe: error: --levels must be in 2..256, not 1"
    result = arpipe("shard", "image", "--input", DIGITS, "--out", tmp_path / "o", "--size", "8y8", check=False)
    assert result.returncode == 2 and "expected HxW such as 28x28, got '8y8'" in result.stderr


def test_sample_grid_shows_the_given_part(tmp_path):
    codec = ImageCodec(4, 6, 1, 256, "column")
    rows = np.random.default_rng(1).integers(0, 256, (3, 24))
    P = 12  # columns 0-2 given
    [path] = codec.write_samples(rows, tmp_path, "completions", prefix_len=P)
    grid = np.asarray(Image.open(path))
    scale, pad = 64 // 6, 2
    first = grid[pad : pad + 4 * scale, pad : pad + 6 * scale]
    red = np.all(first == (255, 0, 0), axis=-1)
    assert red.any() and red[:, : 3 * scale].all(axis=0).sum() == 1  # one red column, on the given side
    assert not red[:, 3 * scale :].any()
    expected = codec.to_pixels(rows)[0, :, :, 0]
    assert np.array_equal(first[::scale, ::scale, 0], expected)  # the top-left of each cell is untouched
    [plain] = codec.write_samples(rows, tmp_path, "samples")
    assert not np.all(np.asarray(Image.open(plain)) == (255, 0, 0), axis=-1).any()  # grey: no red without a prefix


# --- `arpipe shard image`
def test_shard_reads_every_input_type_and_counts_corrupt_images(tmp_path):
    inputs = tmp_path / "in"
    (inputs / "folder").mkdir(parents=True)
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (16, 12), dtype=np.uint8)
    ramp = np.repeat(np.arange(0, 256, 16, dtype=np.uint8)[:, None], 12, 1)  # 16×12, row y is 16·y
    (inputs / "folder" / "grey.png").write_bytes(png_bytes(ramp))
    (inputs / "folder" / "colour.jpg").write_bytes(png_bytes(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8), "JPEG"))
    (inputs / "folder" / "rgba.png").write_bytes(png_bytes(rng.integers(0, 256, (8, 8, 4), dtype=np.uint8)))
    (inputs / "folder" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(200)))
    (inputs / "folder" / "truncated.jpg").write_bytes(png_bytes(grey, "JPEG")[:300])
    (inputs / "folder" / "notes.txt").write_text("not an image")
    cells = [{"bytes": png_bytes(grey[:8, :8]), "path": None}, {"bytes": b"garbage", "path": None},
             {"bytes": png_bytes(grey[8:, 4:]), "path": None}]
    rows = pa.Table.from_pylist([{"image": c, "label": i} for i, c in enumerate(cells)])
    pq.write_table(rows, inputs / "rows.parquet")
    idx = rng.integers(0, 256, (4, 8, 8), dtype=np.uint8)
    header = bytes([0, 0, 0x08, 3]) + np.array(idx.shape, ">i4").tobytes()
    (inputs / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(header + idx.tobytes()))
    (inputs / "labels-idx1-ubyte").write_bytes(bytes([0, 0, 0x08, 1]) + np.array([4], ">i4").tobytes() + bytes(4))
    np.savez(inputs / "arrays.npz", images=rng.random((5, 8, 8)), labels=np.arange(5))

    out = tmp_path / "shards"
    arpipe("shard", "image", "--input", inputs, "--out", out, "--size", "8x8", "--channels", "1", "--levels", "16",
           "--ordering", "snake", "--val-fraction", "0.3", "--workers", "2")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["codec"] == {"modality": "image", "vocab_size": 16, "height": 8, "width": 8, "channels": 1,
                                 "levels": 16, "ordering": "snake"}
    skipped = {f["input"]: f["reason"] for f in manifest["skipped"]["files"]}
    assert sorted(skipped) == ["folder/corrupt.png", "folder/notes.txt", "folder/truncated.jpg", "labels-idx1-ubyte"]
    assert "truncated" in skipped["folder/truncated.jpg"].lower() and "got shape (4,)" in skipped["labels-idx1-ubyte"]
    assert skipped["folder/notes.txt"] == f"UnidentifiedImageError: cannot identify image file " \
                                          f"{str(inputs / 'folder' / 'notes.txt')!r}"
    assert manifest["skipped"]["items"] == {"undecodable image": 1}
    assert manifest["skipped"]["examples"] == {"undecodable image": ["rows.parquet:1"]}
    items = read_items(out)
    assert sorted(items) == sorted(["folder/grey.png:0", "folder/colour.jpg:0", "folder/rgba.png:0", "rows.parquet:0",
                                    "rows.parquet:2", *(f"train-images-idx3-ubyte.gz:{i}" for i in range(4)),
                                    *(f"arrays.npz:{i}" for i in range(5))])
    assert manifest["splits"]["train"]["items"] + manifest["splits"]["val"]["items"] == 14
    assert all(len(t) == 64 and t.max() < 16 for t in items.values())
    snake = permutation("snake", 1, 8, 8)
    assert np.array_equal(items["train-images-idx3-ubyte.gz:2"], (idx[2].reshape(-1) // 16)[snake])
    assert np.array_equal(items["rows.parquet:0"], (grey[:8, :8].reshape(-1) // 16)[snake])
    # the 16×12 ramp is centre-cropped to its middle 12 rows (2..13), not squashed: output row k
    # averages source rows 2+1.5k .. 3.5+1.5k, about 16·(2.25+1.5k)
    ramp8 = Shards(out).codec.to_pixels(items["folder/grey.png:0"][None])[0, :, :, 0].astype(int)
    assert np.all(ramp8 == ramp8[:, :1])
    assert np.abs(ramp8[:, 0] - 16 * (2.25 + 1.5 * np.arange(8))).max() <= 17  # one level of 16


def test_shard_takes_size_and_channels_from_the_first_image(tmp_path):
    out = tmp_path / "digits"
    arpipe("shard", "image", "--input", DIGITS, "--out", out, "--levels", "17")
    codec = Shards(out).codec
    assert (codec.height, codec.width, codec.channels, codec.ordering) == (8, 8, 1, "raster")
    assert codec.sequence_length(999) == 64 and codec.model_shape(999) == (1, 8, 8)
    items = read_items(out)
    assert len(items) == 1797 and "digits.npz:1796" in items


def test_idx_reader_checks_the_header(tmp_path):
    bad = tmp_path / "x-idx3-ubyte"
    bad.write_bytes(bytes([0, 0, 0x08, 3]) + np.array([2, 4, 4], ">i4").tobytes() + bytes(31))
    with pytest.raises(ValueError, match=r"holds 31 values, its header says \(2, 4, 4\)"):
        list(array_images(bad))


# --- PixelCNN
def input_gradients(model, output) -> torch.Tensor:
    """|d logits / d input| of one output sub-pixel (an index into the model's (C, H, W)), summed
    over 8 random images so that a ReLU that happens to be off for one image does not hide a
    dependency; shape (C, H, W)."""
    torch.manual_seed(1)
    u = (torch.randint(0, model.vocab_size, (8, *model.shape)).float() * (2 / (model.vocab_size - 1)) - 1)
    u.requires_grad_()
    logits = model.scaled_logits(u)[(slice(None), *output)]  # (8, vocab); images are independent
    (grad,) = torch.autograd.grad((logits @ torch.randn(logits.shape[-1])).sum(), u)
    return grad.abs().sum(0)


def dependencies(model) -> list[set[int]]:
    """For each sub-pixel i in the model's ordering, the sub-pixels j its conditional depends on."""
    C, H, W = model.shape
    deps = []
    for i in range(model.num_vars):
        (y, x), c = divmod(i // C, W), i % C  # raster, channel innermost
        grad = input_gradients(model, (c, y, x))
        deps.append(set(model.to_sequence(grad[None])[0].nonzero().flatten().tolist()))
    return deps


def pixelcnn(shape, gated, n_layer, vocab=4, hidden=6):
    torch.manual_seed(0)
    return build_model({"name": "pixelcnn", "gated": gated, "n_layer": n_layer, "hidden": hidden, "head": hidden,
                        "first_kernel": 3}, vocab, shape)


@pytest.mark.parametrize("shape", [(1, 4, 5), (3, 3, 4)])
def test_gated_pixelcnn_sees_every_earlier_subpixel_and_nothing_later(shape):
    """Causality by gradients, and no blind spot: with 4 layers of 3×3 the receptive field
    covers these images, so each conditional depends on exactly the earlier sub-pixels
    (colour: G on R of its own pixel, B on R and G)."""
    model = pixelcnn(shape, gated=True, n_layer=3)
    for i, deps in enumerate(dependencies(model)):
        earlier = set(range(i))
        assert deps == earlier, f"sub-pixel {i}: missing {sorted(earlier - deps)}, later {sorted(deps - earlier)}"


def test_plain_pixelcnn_is_causal_but_has_the_blind_spot():
    """Stacked masked convolutions miss pixels up and to the right; the gated stacks do not."""
    shape, W = (1, 4, 5), 5
    plain = dependencies(pixelcnn(shape, gated=False, n_layer=3))
    gated = dependencies(pixelcnn(shape, gated=True, n_layer=3))
    for i, deps in enumerate(plain):
        assert deps <= set(range(i)), f"sub-pixel {i} sees later ones: {sorted(deps - set(range(i)))}"
    target = 2 * W + 1  # pixel (2, 1)
    neighbours = {2 * W, 1 * W, 1 * W + 1, 1 * W + 2}  # left, up-left, up, up-right
    assert neighbours <= plain[target]
    blind = 1 * W + 3  # (1, 3): one row up, two columns right
    assert blind not in plain[target] and blind in gated[target]


def test_gated_receptive_field_matches_the_config_comment():
    """configs/image-pixelcnn.yaml promises 16 rows up and 15 columns each side for a 7×7 first
    layer and 12 more: check the edges of that window by gradients."""
    torch.manual_seed(0)
    model = build_model({"name": "pixelcnn", "n_layer": 12, "hidden": 8, "head": 8}, 4, (1, 20, 33))
    seen = input_gradients(model, (0, 18, 16))[0] != 0
    rows, cols = seen.any(1).nonzero().flatten(), seen.any(0).nonzero().flatten()
    assert (rows.min().item(), rows.max().item()) == (18 - 16, 18)
    assert (cols.min().item(), cols.max().item()) == (16 - 15, 16 + 15)
    assert not seen[18, 16:].any()


def test_pixelcnn_rejects_what_it_cannot_model():
    with pytest.raises(ArpipeError, match=r"needs image data of shape \(channels, height, width\)"):
        build_model({"name": "pixelcnn"}, 256, (64,))
    with pytest.raises(ArpipeError, match="must be divisible by the 3 image channels"):
        build_model({"name": "pixelcnn", "hidden": 64, "head": 64}, 256, (3, 8, 8))


@pytest.mark.parametrize("model_cfg, ordering", [
    ({"name": "pixelcnn", "n_layer": 1, "hidden": 6, "head": 6}, "raster"),
    ({"name": "gpt", "n_layer": 1, "n_head": 2, "d_model": 16}, "hilbert"),
    ({"name": "gru", "n_layer": 1, "d_model": 16}, "snake"),
])
def test_completions_keep_the_given_prefix(tmp_path, model_cfg, ordering):
    """Through eval's sampling path: rows come back in the data's ordering with the prompt
    untouched, and the PNG shows the given pixels as they were."""
    codec = ImageCodec(4, 4, 3, 8, ordering)
    torch.manual_seed(0)
    model = build_model(model_cfg, codec.vocab_size, codec.model_shape(0)).eval()
    prompts = [np.random.default_rng(i).integers(0, 8, codec.default_prompt_len) for i in range(3)]
    [grid] = write_samples(model, codec, prompts, tmp_path, samples=0, temperature=1.0, top_k=None, seed=0)
    rows = model.to_sequence(model.sample(3, prefix=torch.from_numpy(np.stack(prompts)),
                                          generator=torch.Generator().manual_seed(0)))
    assert torch.equal(rows[:, :24], torch.from_numpy(np.stack(prompts)))
    shown = np.asarray(Image.open(grid))
    scale, pad = 64 // 4, 2
    image = shown[pad : pad + 4 * scale : scale, pad : pad + 4 * scale : scale]  # each cell's top-left
    given = np.zeros(48, bool)
    given[codec.perm[:24]] = True
    given = given.reshape(4, 4, 3).all(-1)
    full = np.zeros(48, np.int64)
    full[:24] = prompts[0]  # the rest is sampled: compare only the given pixels
    expected = codec.to_pixels(full[None])[0]
    top_left_red = np.all(image == (255, 0, 0), axis=-1)  # the boundary line may cover a cell's corner
    assert np.array_equal(image[given & ~top_left_red], expected[given & ~top_left_red])


def test_models_that_implement_an_ordering_refuse_other_data(tmp_path):
    raster, snake = ImageCodec(8, 8, 1, 17, "raster").config(), ImageCodec(8, 8, 1, 17, "snake").config()
    pixel = build_model({"name": "pixelcnn", "n_layer": 1, "hidden": 4, "head": 4}, 17, (1, 8, 8))
    check_ordering(pixel, raster, "x")
    with pytest.raises(ArpipeError, match="PixelCNN needs raster-ordered data, but x holds snake data"):
        check_ordering(pixel, snake, "x")
    check_ordering(build_model({"name": "gpt", "n_layer": 1, "n_head": 1, "d_model": 8}, 17, (1, 8, 8)), snake, "x")

    shards = tmp_path / "snake"
    arpipe("shard", "image", "--input", DIGITS, "--out", shards, "--levels", "17", "--ordering", "snake")
    export = save_export(tmp_path / "export", {k: v for k, v in pixel.state_dict().items()},
                         {"name": "pixelcnn", "n_layer": 1, "hidden": 4, "head": 4}, 17, (1, 8, 8),
                         raster, shards, {"step": 0})
    train = ["train", "--config", "configs/demo-image.yaml", f"data.path={shards}", f"out_dir={tmp_path / 'r'}"]
    for command in (["eval", "--model", export, "--data", shards], train):
        result = arpipe(*command, check=False)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1, result.stderr
        assert lines[0].startswith("arpipe: error: PixelCNN needs raster-ordered data")
        assert "holds snake data; reshard with --ordering raster" in lines[0]


# --- configs and the recipe
@pytest.mark.parametrize("name", ["demo-image", "image-pixelcnn", "image-gpt"])
def test_image_configs_build_their_models(name):
    cfg = load_config(REPO / "configs" / f"{name}.yaml")
    model = build_model(cfg.model, 17, (1, 8, 8))
    assert model.num_vars == 64


def test_orderings_recipe_is_valid_and_tables_rank_variants(tmp_path):
    recipe = load_recipe(REPO / "configs" / "image-orderings.yaml")
    assert set(recipe.variants) == set(ORDERINGS) and recipe.metric == "bits_per_dim"
    load_config(REPO / recipe.config, recipe.overrides)
    rows = [{"variant": "a", "bits_per_dim": 2.5, "shard": ["--ordering", "a"], "overrides": [], "seconds": 3},
            {"variant": "b", "bits_per_dim": 2.25, "shard": [], "overrides": ["model.name=gru"], "seconds": 4}]
    table = markdown_table(recipe, rows)
    assert "| a | 2.5000 | +0.2500 | --ordering a |  | 3 |" in table
    assert "| b | 2.2500 | +0.0000 |  | model.name=gru | 4 |" in table
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmetric: bits_per_dim\nshard: {modality: image}\nconfig: c.yaml\nvariants: {only: {}}\n")
    with pytest.raises(ArpipeError, match="bad.yaml: variants: Dictionary should have at least 2 items"):
        load_recipe(bad)


@pytest.mark.parametrize("command", [["shard", "image"], ["recipe"]])
def test_help(command):
    assert "usage: arpipe" in arpipe(*command, "--help").stdout
