"""Samples of any length through `arpipe sample --length` and eval's write_samples: seconds of
audio as WAV from a WaveNet and from a GPT's sliding window, refusals for fixed shapes (which
conditionals a long sample draws from is tested in test_model_contract.py)."""

import numpy as np
import pytest
import soundfile as sf
import torch

from pipeline import ArpipeError
from pipeline.codecs.audio import AudioCodec
from pipeline.codecs.image import ImageCodec
from pipeline.eval.samples import sample_text, write_samples
from pipeline.export import save_export
from pipeline.models import build_model
from tests.conftest import arpipe

WAVENET = {"name": "wavenet", "stacks": 1, "layers_per_stack": 4, "residual_channels": 8, "gate_channels": 8,
           "skip_channels": 8}
GPT = {"name": "gpt", "n_layer": 1, "n_head": 2, "d_model": 16}
PIXELCNN = {"name": "pixelcnn", "n_layer": 1, "hidden": 4, "head": 4, "first_kernel": 3}


def export(directory, model_cfg, codec, shape):
    torch.manual_seed(0)
    model = build_model(model_cfg, codec.vocab_size, shape)
    return save_export(directory, dict(model.named_parameters()), model_cfg, codec.vocab_size, shape, codec.config(),
                       directory, {"step": 0})


def test_arpipe_sample_writes_seconds_of_audio_from_a_wavenet_trained_on_64_samples(tmp_path):
    path = export(tmp_path / "export", WAVENET, AudioCodec(2000), (64,))
    arpipe("sample", "--model", path, "-n", 2, "--length", 5000, "--out", tmp_path / "out")
    wavs = sorted((tmp_path / "out").glob("*.wav"))
    assert len(wavs) == 2
    for wav in wavs:
        info = sf.info(wav)
        assert info.samplerate == 2000 and info.frames == 5000  # 2.5 s
        assert np.abs(sf.read(wav)[0]).max() > 0


def test_a_gpt_sample_slides_its_window_and_keeps_the_prompt(tmp_path):
    codec = AudioCodec(8000)
    path = export(tmp_path / "export", GPT, codec, (32,))
    clip = tmp_path / "prompt.wav"
    sf.write(clip, np.sin(np.arange(40) / 3), 8000)  # a prompt longer than the context
    [wav] = sample_text(str(path), 1, str(clip), 1.0, None, 0, str(tmp_path / "out"), length=300, stride=8)
    audio, rate = sf.read(wav, dtype="float32")
    assert rate == 8000 and len(audio) == 300
    assert np.array_equal(codec.encode_wave(audio[:40]), codec.encode(str(clip)))  # the prompt, then 260 drawn


def test_eval_samples_and_completions_beyond_block_len(tmp_path):
    codec = AudioCodec(8000)
    path = export(tmp_path / "export", WAVENET, codec, (64,))
    from pipeline.export import load_export

    model, codec, _ = load_export(path)
    prompts = [np.arange(100) % 256, (np.arange(120) * 7) % 256]
    files = write_samples(model, codec, prompts, tmp_path / "samples", samples=1, temperature=1.0, top_k=None, seed=0,
                          prompt_len=50, length=500)
    assert sorted(f.name for f in files) == ["completions-00.wav", "completions-01.wav", "samples-00.wav"]
    assert all(sf.info(f).frames == 500 for f in files)
    completion, _ = sf.read(tmp_path / "samples" / "completions-00.wav", dtype="float32")
    assert np.array_equal(codec.encode_wave(completion[:50]), prompts[0][:50])


def test_fixed_shapes_refuse_a_length_and_a_prompt_must_be_shorter(tmp_path):
    image = export(tmp_path / "image", PIXELCNN, ImageCodec(4, 4, 1, 4), (1, 4, 4))
    result = arpipe("sample", "--model", image, "--length", 100, check=False)
    assert result.returncode == 2
    assert "PixelCNN samples exactly its shape (1, 4, 4) (16 variables), not 100; longer samples need a " \
           "sequence model" in result.stderr
    gpt_on_images = export(tmp_path / "gpt", GPT, ImageCodec(4, 4, 1, 4), (1, 4, 4))
    with pytest.raises(ArpipeError, match=r"GPT samples exactly its shape \(1, 4, 4\)"):
        sample_text(str(gpt_on_images), 1, None, 1.0, None, 0, str(tmp_path / "out"), length=32)
    audio = export(tmp_path / "audio", GPT, AudioCodec(8000), (32,))
    clip = tmp_path / "prompt.wav"
    sf.write(clip, np.zeros(50), 8000)
    with pytest.raises(ArpipeError, match=r"--prompt is 50 tokens; a sample is 40 in all \(--length\)"):
        sample_text(str(audio), 1, str(clip), 1.0, None, 0, str(tmp_path / "out"), length=40)
    with pytest.raises(ArpipeError, match=r"stride 33 must lie in 1\.\.32"):
        sample_text(str(audio), 1, None, 1.0, None, 0, str(tmp_path / "out"), length=40, stride=33)
