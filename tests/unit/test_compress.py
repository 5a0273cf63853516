"""Lossless compression with a model's conditionals (pipeline/compress.py): byte-identical round
trips through the real CLI, file size = the model's exact NLL, and damage or a different model
refused with a clear error."""

import math

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from pipeline import ArpipeError
from pipeline.codecs.audio import AudioCodec, mu_law_decode
from pipeline.codecs.image import ImageCodec
from pipeline.codecs.text import TextCodec
from pipeline.compress import (Settings, compress, decompress, encode_items, read_container,
                               write_container)
from pipeline.export import save_export
from pipeline.models import build_model
from tests.conftest import arpipe


def export(directory, cfg, codec, shape, codec_dir=None, scale=1.0, seed=0):
    """A random model as `arpipe train` exports it; `scale` sharpens its conditionals."""
    torch.manual_seed(seed)
    model = build_model(cfg, codec.vocab_size, shape)
    state = {k: v.detach() * scale for k, v in model.named_parameters()}
    return save_export(directory, state, cfg, codec.vocab_size, shape, codec.config(), codec_dir or directory, {})


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    import pydoc_data.topics

    directory = tmp_path_factory.mktemp("text-model")
    codec = TextCodec.train(list(pydoc_data.topics.topics.values())[:40], 300)
    codec.save(directory)
    return export(directory / "export", {"name": "gpt", "n_layer": 2, "n_head": 2, "d_model": 32}, codec, (16,),
                  codec_dir=directory, scale=3.0)


TEXTS = {
    "prose.txt": "The quick brown fox jumps over the lazy dog. " * 6,  # beyond block_len: the context slides
    "unicode.txt": "naïve café — 日本語 ✓ <|endoftext|> stays text\n",
    "short.txt": "x",
    "empty.txt": "",
}


def test_text_files_come_back_byte_identical_through_the_cli(tmp_path, text_model):
    """Five files, three of them over the model's 16-token context, one not UTF-8 at all, coded
    4 rows at a time and decoded one variable at a time in a fresh process."""
    inputs = tmp_path / "in"
    (inputs / "sub").mkdir(parents=True)
    for name, text in TEXTS.items():
        (inputs / name).write_text(text)
    (inputs / "sub" / "binary.bin").write_bytes(bytes(range(256)) + b"ok \xff\xfe\xc3(\xed\xa0\x80 end")
    arpipe("compress", "--model", text_model, "--input", inputs, "--out", tmp_path / "all.arpz", "--batch", 4)
    arpipe("decompress", tmp_path / "all.arpz", "--model", text_model, "--out", tmp_path / "out")
    for path in inputs.rglob("*"):
        if path.is_file():
            assert (tmp_path / "out" / path.relative_to(inputs)).read_bytes() == path.read_bytes(), path.name


def sliding_nll(model, x: torch.Tensor, window: int, stride: int) -> float:
    """Nats of x under windows of `window` variables moved by `stride`, by full passes: each
    window scores the variables no earlier window scored (a short window is padded at its end,
    which no conditional before the padding sees)."""
    def window_nll(piece):
        padded = torch.zeros(1, window, dtype=torch.long)
        padded[0, : len(piece)] = piece
        return model.token_nll(padded)[0, : len(piece)]

    nll = window_nll(x[:window]).sum().item()
    start = stride
    while start + window - stride < len(x):
        nll += window_nll(x[start : start + window])[window - stride :].sum().item()
        start += stride
    return nll


@pytest.mark.parametrize("length", [12, 61])
def test_file_size_is_the_models_exact_nll(tmp_path, text_model, length):
    """One document within the context (12 tokens) and one that slides it (61 tokens, stride 4):
    the payload is within 1% of the NLL of the same conditionals computed by full passes."""
    from pipeline.export import load_any

    model, codec, _ = load_any(text_model)
    tokens = codec.encode(TEXTS["prose.txt"])[:length].astype(np.int64)
    assert len(tokens) == length
    payload, stats = encode_items(model, [tokens], Settings(batch=1, stride=4, window=16, segment=10**6))
    nll_bits = sliding_nll(model, torch.from_numpy(tokens), 16, 4) / math.log(2)
    assert stats["model_bits"] == pytest.approx(nll_bits, rel=1e-4)
    assert abs(8 * len(payload) - nll_bits) <= 0.01 * nll_bits + 64, (8 * len(payload), nll_bits)


def test_images_come_back_pixel_identical(tmp_path):
    codec = ImageCodec(4, 5, 1, 256)
    model = export(tmp_path / "model", {"name": "pixelcnn", "n_layer": 1, "hidden": 4, "head": 4, "first_kernel": 3},
                   codec, (1, 4, 5))
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 4, 5), dtype=np.uint8)
    for i, image in enumerate(images):
        Image.fromarray(image).save(tmp_path / f"img{i}.png")
    compress(str(model), [str(tmp_path / "img*.png")], str(tmp_path / "img.arpz"), batch=2)
    decompress(str(tmp_path / "img.arpz"), str(model), str(tmp_path / "out"))
    for i, image in enumerate(images):
        assert np.array_equal(np.asarray(Image.open(tmp_path / "out" / f"img{i}.png")), image)


def test_audio_comes_back_as_its_mu_law_stream(tmp_path):
    """A WaveNet codes 3000 samples through its queues (no window); the output WAV is the μ-law
    stream, here byte-identical to an input that was already one."""
    codec = AudioCodec(8000)
    model = export(tmp_path / "model", {"name": "wavenet", "stacks": 1, "layers_per_stack": 3, "residual_channels": 4,
                                        "gate_channels": 4, "skip_channels": 8}, codec, (64,))
    levels = (128 + 60 * np.sin(np.arange(3000) / 7)).astype(np.int64)
    sf.write(tmp_path / "clip.wav", mu_law_decode(levels).astype(np.float32), 8000, subtype="PCM_16")
    compress(str(model), [str(tmp_path / "clip.wav")], str(tmp_path / "clip.arpz"))
    assert read_container(tmp_path / "clip.arpz")[0]["window"] is None
    decompress(str(tmp_path / "clip.arpz"), str(model), str(tmp_path / "out"))
    assert (tmp_path / "out" / "clip.wav").read_bytes() == (tmp_path / "clip.wav").read_bytes()


def flip(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_another_model_damage_or_another_environment_is_refused(tmp_path, text_model):
    import shutil

    (tmp_path / "a.txt").write_text(TEXTS["prose.txt"])
    compress(str(text_model), [str(tmp_path / "a.txt")], str(tmp_path / "a.arpz"))
    model = shutil.copytree(text_model, tmp_path / "model")
    flip(model / "model.safetensors", -1)  # one bit of one weight
    with pytest.raises(ArpipeError, match="compressed with another model"):
        decompress(str(tmp_path / "a.arpz"), str(model), str(tmp_path / "out"))
    for offset, message in ((20, "header is damaged"), (-3, "compressed data is damaged")):
        damaged = tmp_path / f"damaged{offset}.arpz"
        shutil.copy(tmp_path / "a.arpz", damaged)
        flip(damaged, offset)
        with pytest.raises(ArpipeError, match=message):
            decompress(str(damaged), str(text_model), str(tmp_path / "out"))
    header, payload = read_container(tmp_path / "a.arpz")
    header["env"]["torch"] = "1.0.0"
    write_container(tmp_path / "moved.arpz", header, payload)
    with pytest.raises(ArpipeError, match="torch: file '1.0.0'"):
        decompress(str(tmp_path / "moved.arpz"), str(text_model), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_a_model_with_its_own_ordering_codes_in_it():
    """MADE in a random ordering: the coded conditionals are its own, so the bits are its exact
    log-likelihood of each image, and the images come back in the data's layout."""
    from pipeline.compress import decode_items

    torch.manual_seed(0)
    model = build_model({"name": "made", "hidden": [16], "data_order_first": False, "seed": 2}, 4, (1, 3, 3)).eval()
    images = [np.random.default_rng(i).integers(0, 4, 9) for i in range(5)]
    settings = Settings(batch=2, stride=9, window=9, segment=10**6)
    payload, stats = encode_items(model, images, settings)
    nll_bits = -model.log_prob(torch.tensor(np.stack(images)).view(5, 1, 3, 3)).sum().item() / math.log(2)
    assert stats["model_bits"] == pytest.approx(nll_bits, rel=1e-4)
    assert all(np.array_equal(a, b) for a, b in zip(decode_items(model, payload, [9] * 5, settings), images))
