"""Audio: the μ-law codec, sharding real sound files (good and corrupt), WaveNet's receptive field
and fast generation, and every sequence family learning a pure tone."""

import io
import json
import math

import numpy as np
import pytest
import soundfile as sf
import torch

from pipeline import ArpipeError
from pipeline.cli import run as cli
from pipeline.codecs.audio import AudioCodec, decode_audio, mu_law_decode, mu_law_encode
from pipeline.data.shards import Shards
from pipeline.data.stream import eval_blocks
from pipeline.models import build_model


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, which only fight over CI's 2 shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tone(seconds: float, rate: int, freq: float = 440.0, amplitude: float = 0.5, phase: float = 0.0) -> np.ndarray:
    t = np.arange(round(seconds * rate)) / rate
    return (amplitude * np.sin(2 * np.pi * freq * t + phase)).astype(np.float32)


def shard_items(out) -> dict[str, tuple[np.ndarray, dict]]:
    """key -> (tokens, meta) of every item in a shard directory."""
    shards, items = Shards(out), {}
    for split in ("train", "val"):
        for shard, entry in shards.chunks(split):
            tokens, offsets = shards.read_chunk(shard, entry["key"])
            meta = json.loads(shards.read(shard, entry["key"], "meta.json"))["items"]
            items.update({m["key"]: (tokens[a:b], m) for m, a, b in zip(meta, offsets[:-1], offsets[1:])})
    return items


def test_mu_law_round_trip_is_within_one_quantisation_step():
    levels = mu_law_decode(np.arange(256))
    assert np.array_equal(mu_law_encode(levels), np.arange(256))  # every level decodes and re-encodes to itself
    x = np.linspace(-1, 1, 200_001)
    q = mu_law_encode(x).astype(np.int64)
    assert q.min() == 0 and q.max() == 255 and np.all(np.diff(q) >= 0) and len(np.unique(q)) == 256
    steps = np.diff(levels)  # the width of each quantisation interval, tiny near 0, wide near ±1
    local = np.maximum(steps[np.clip(q - 1, 0, 254)], steps[np.clip(q, 0, 254)])
    assert np.all(np.abs(mu_law_decode(q) - x) <= local)
    assert steps[127] < 2e-4 < 0.02 < steps[0]  # logarithmic: fine near silence, coarse near full scale
    assert mu_law_encode(np.array([-3.0, 3.0])).tolist() == [0, 255]  # out-of-range input clips


def write_inputs(directory):
    """Good files in three formats and rates, an HF-style parquet, and four kinds of damage."""
    directory.mkdir()
    sf.write(directory / "good.wav", tone(1.0, 16000), 16000, subtype="PCM_16")
    left = tone(2.5, 44100, 300.0)
    sf.write(directory / "stereo.flac", np.stack([left, np.zeros_like(left)], 1), 44100)  # mono mix halves it
    sf.write(directory / "clip.ogg", tone(1.0, 22050, 220.0), 22050)
    good = (directory / "good.wav").read_bytes()
    (directory / "truncated.wav").write_bytes(good[: len(good) // 2])
    (directory / "noise.wav").write_bytes(np.random.default_rng(0).bytes(4000))
    (directory / "empty.wav").write_bytes(b"")
    lying = bytearray(good)  # a header promising ten times the audio the file holds
    data = lying.index(b"data")
    lying[data + 4 : data + 8] = (10 * (len(good) - data - 8)).to_bytes(4, "little")
    (directory / "lying.wav").write_bytes(bytes(lying))
    import datasets

    buffer = io.BytesIO()
    sf.write(buffer, tone(0.5, 8000), 8000, format="WAV")
    rows = datasets.Dataset.from_dict({"audio": [{"bytes": buffer.getvalue(), "path": "a.wav"},
                                                 {"bytes": b"not audio at all", "path": "b.wav"}]})
    rows.cast_column("audio", datasets.Audio(decode=False)).to_parquet(str(directory / "rows.parquet"))
    (directory / "metadata.csv").write_text("file_name,text\ngood.wav,a tone\n")  # audiofolder metadata


@pytest.fixture(scope="module")
def audio_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("audio")
    write_inputs(root / "in")
    cli(["shard", "audio", "--input", str(root / "in"), "--out", str(root / "shards"), "--clip-seconds", "1",
         "--val-fraction", "0.5", "--workers", "2"])
    return root / "shards"


def test_corrupt_files_are_counted_and_skipped(audio_shards):
    manifest = json.loads((audio_shards / "manifest.json").read_text())
    reasons = {f["input"]: f["reason"] for f in manifest["skipped"]["files"]}
    assert set(reasons) == {"truncated.wav", "noise.wav", "empty.wav", "lying.wav"}
    assert reasons["truncated.wav"].startswith("TruncatedAudio: the header declares")
    assert reasons["lying.wav"] == "TruncatedAudio: the header declares 320000 bytes where the file holds 32000"
    assert "Format not recognised" in reasons["noise.wav"] and reasons["empty.wav"] == "empty file"
    assert manifest["skipped"]["items"] == {"undecodable": 1}
    assert manifest["skipped"]["examples"] == {"undecodable": ["rows.parquet:1"]}


def test_good_audio_is_mono_resampled_clipped_and_mu_law(audio_shards):
    manifest = json.loads((audio_shards / "manifest.json").read_text())
    assert manifest["codec"] == {"modality": "audio", "vocab_size": 256, "sample_rate": 16000, "mu": 255}
    assert manifest["settings"]["clip_seconds"] == 1.0
    items = shard_items(audio_shards)
    assert sorted(items) == ["clip.ogg:0", "good.wav:0", "rows.parquet:0", "stereo.flac:0", "stereo.flac:1",
                             "stereo.flac:2"]
    sizes = {key: (meta["samples"], meta["seconds"]) for key, (_, meta) in items.items()}
    assert sizes["stereo.flac:0"] == (16000, 1.0) and sizes["stereo.flac:2"] == (8000, 0.5)
    assert sizes["clip.ogg:0"] == (16000, 1.0) and sizes["rows.parquet:0"] == (8000, 0.5)
    tokens, _ = items["good.wav:0"]
    assert tokens.dtype == np.uint8
    np.testing.assert_allclose(mu_law_decode(tokens), tone(1.0, 16000), atol=0.02)  # 16-bit PCM, then μ-law
    stereo = mu_law_decode(np.concatenate([items[f"stereo.flac:{i}"][0] for i in range(3)]))
    assert len(stereo) == 40000
    np.testing.assert_allclose(stereo[100:-100], tone(2.5, 16000, 300.0, amplitude=0.25)[100:-100], atol=0.01)


def test_eval_blocks_score_every_audio_sample_once_in_order(audio_shards):
    """The scored samples, in order, are the split's clips end to end: none missing, none twice,
    none moved; for consecutive blocks and for sliding windows, on 1 and 2 ranks."""
    shards = Shards(audio_shards)
    splits = shards.manifest["splits"]
    for split in ("train", "val"):
        chunks = shards.chunks(split)
        for world, stride in [(1, None), (2, None), (1, 700), (2, 1000)]:
            for rank in range(world):
                expected = np.concatenate([shards.read_chunk(shard, entry["key"])[0]
                                           for shard, entry in chunks[rank::world]])
                scored = [x[mask] for x, mask in eval_blocks(shards, split, 3000, 4, rank=rank, world=world,
                                                             stride=stride)]
                assert torch.cat(scored).tolist() == expected.tolist()
        assert splits[split]["tokens"] > 0
    assert sum(meta["samples"] for _, meta in shard_items(audio_shards).values()) == \
        splits["train"]["tokens"] + splits["val"]["tokens"]


def test_resampling_is_band_limited(tmp_path):
    """To 8 kHz, a 1 kHz tone stays and a 7.5 kHz one (above the new Nyquist frequency) goes,
    where dropping samples would fold it to an audible 500 Hz alias."""
    rate = 48000
    sf.write(tmp_path / "two.wav", tone(1.0, rate, 1000.0, 0.3) + tone(1.0, rate, 7500.0, 0.3), rate, subtype="FLOAT")
    wave = decode_audio(tmp_path / "two.wav", 8000)  # what the shard stage μ-law quantises
    spectrum = np.abs(np.fft.rfft(wave)) / (len(wave) / 2)  # 1 Hz bins: amplitude per Hz
    assert len(wave) == 8000
    assert spectrum[1000] == pytest.approx(0.3, abs=0.01)
    assert spectrum[500] < 1e-3  # the alias decimation would leave here
    naive = np.abs(np.fft.rfft(tone(1.0, rate, 7500.0, 0.3)[::6])) / 4000
    assert naive[500] > 0.25  # ...as it does without the low-pass filter


def test_write_samples_are_16bit_wavs_at_the_codec_rate(tmp_path):
    codec = AudioCodec(sample_rate=8000)
    rows = np.stack([codec.encode_wave(tone(0.25, 8000, f)) for f in (300.0, 500.0)])
    paths = codec.write_samples(rows, tmp_path, "completions", prefix_len=100)
    assert [p.name for p in paths] == ["completions-00.wav", "completions-01.wav"]
    for path, row in zip(paths, rows):
        info = sf.info(path)
        assert (info.samplerate, info.channels, info.frames, info.subtype) == (8000, 1, 2000, "PCM_16")
        assert np.array_equal(codec.encode(str(path)), row)  # a written clip can be a sampling prompt


def test_clips_with_nan_or_infinite_samples_are_skipped_and_huge_finite_ones_kept(tmp_path):
    """Float WAVs can hold NaN and ±inf (μ-law of NaN is garbage): such a clip is a counted skip,
    the file's other clips stay. Huge finite samples overflow a float32 sum, the stage's quick
    test, and are still kept (clipped to full scale)."""
    rate = 8000
    wave = tone(3.0, rate)  # three clips of a second
    nan, inf, huge = wave.copy(), wave.copy(), np.float32(3e38) * np.sign(wave)
    nan[rate + 5] = np.nan  # in the second clip
    inf[2 * rate + 7] = -np.inf  # in the third
    (tmp_path / "in").mkdir()
    for name, samples in {"nan": nan, "inf": inf, "huge": huge}.items():
        sf.write(tmp_path / "in" / f"{name}.wav", samples, rate, subtype="FLOAT")
    cli(["shard", "audio", "--input", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--sample-rate", "8000",
         "--clip-seconds", "1"])
    skipped = json.loads((tmp_path / "out" / "manifest.json").read_text())["skipped"]
    assert skipped["items"] == {"non-finite samples": 2}
    assert sorted(skipped["examples"]["non-finite samples"]) == ["inf.wav:2", "nan.wav:1"]
    items = shard_items(tmp_path / "out")
    assert sorted(items) == ["huge.wav:0", "huge.wav:1", "huge.wav:2", "inf.wav:0", "inf.wav:1", "nan.wav:0", "nan.wav:2"]
    assert set(np.unique(np.concatenate([items[f"huge.wav:{i}"][0] for i in range(3)]))) == {0, 128, 255}


def test_eval_completions_fit_a_context_shorter_than_the_codecs_prompt(audio_shards, tmp_path):
    """The audio codec gives completions 125 ms (2000 samples at 16 kHz); a model of 32 samples'
    context gets half its context instead (this crashed `arpipe recipe configs/multimodal.yaml`),
    and a --prompt-len that leaves nothing to sample is a clear error."""
    from pipeline.eval.run import run_eval
    from pipeline.export import save_export

    codec = Shards(audio_shards).codec
    assert codec.default_prompt_len == 2000
    cfg = {"name": "gpt", "n_layer": 1, "n_head": 2, "d_model": 16}
    model = build_model(cfg, codec.vocab_size, (32,))
    export = save_export(tmp_path / "export", dict(model.named_parameters()), cfg, codec.vocab_size, (32,),
                         codec.config(), tmp_path / "export", {"step": 0})
    options = {"samples": 0, "prompts": 1, "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "t"}
    result = run_eval(str(export), str(audio_shards), **options)
    assert result["artifacts"] == ["completions-00.wav"]
    with pytest.raises(ArpipeError, match=r"--prompt-len 32 leaves nothing to sample: a completion is 32 variables"):
        run_eval(str(export), str(audio_shards), prompt_len=32, **options)


@pytest.mark.parametrize("options, message", [
    (["--mu", "300"], "mu must be in 1..255"),
    (["--clip-seconds", "0"], "--clip-seconds must be positive"),
    (["--sample-rate", "0"], "sample rate must be positive"),
])
def test_bad_shard_options_are_clear_errors(tmp_path, options, message):
    sf.write(tmp_path / "a.wav", tone(0.1, 8000), 8000)
    with pytest.raises(ArpipeError, match=message):
        cli(["shard", "audio", "--input", str(tmp_path / "a.wav"), "--out", str(tmp_path / "o"), *options])


def wavenet(stacks: int, layers: int, length: int, channels: int = 8):
    cfg = {"name": "wavenet", "stacks": stacks, "layers_per_stack": layers, "residual_channels": channels,
           "gate_channels": channels, "skip_channels": 2 * channels}
    return build_model(cfg, 256, (length,)).eval()


@pytest.mark.parametrize("stacks, layers", [(1, 1), (1, 4), (2, 3), (3, 2)])
def test_receptive_field_formula_is_what_the_model_sees(stacks, layers):
    torch.manual_seed(0)
    field = stacks * (2**layers - 1) + 1
    model = wavenet(stacks, layers, field + 8)
    assert model.receptive_field == field and model.summary() == {"receptive_field": field}
    x = torch.randint(0, 256, (1, model.num_vars))
    with torch.no_grad():
        base = model(x)[0]
        for j in (0, 5):
            y = x.clone()
            y[0, j] = (y[0, j] + 1) % 256
            changed = ((model(y)[0] - base).abs().amax(-1) > 0).nonzero().flatten().tolist()
            assert changed == list(range(j + 1, min(j + 1 + field, model.num_vars)))  # x_j reaches exactly R ahead


def test_fast_generation_equals_naive_generation_token_for_token():
    torch.manual_seed(0)
    model = wavenet(2, 8, 600)  # receptive field 511: every queue wraps long before the end
    assert model.receptive_field == 511
    prefix = torch.from_numpy(AudioCodec().encode_wave(tone(0.01, 16000)).astype(np.int64))  # 160 samples
    for options in ({}, {"prefix": prefix, "temperature": 0.8, "top_k": 50}):
        fast = model.sample(2, generator=torch.Generator().manual_seed(5), **options)
        naive = model.sample(2, generator=torch.Generator().manual_seed(5), cached=False, **options)
        assert torch.equal(fast, naive)
        assert len(fast.unique()) > 20  # real draws, not a degenerate constant
    assert torch.equal(fast[:, :160], prefix.expand(2, -1))


@pytest.mark.parametrize("cfg", [
    {"name": "wavenet", "stacks": 1, "layers_per_stack": 5, "residual_channels": 16, "gate_channels": 16,
     "skip_channels": 32},
    {"name": "gru", "n_layer": 1, "d_model": 64},
    {"name": "gpt", "n_layer": 2, "n_head": 2, "d_model": 32},
], ids=lambda cfg: cfg["name"])
def test_every_sequence_family_learns_a_pure_tone(cfg):
    """A 440 Hz tone at 8 kHz is predictable from its last few samples: 200 steps of plain torch
    bring the NLL from about 8 bits/sample (uniform) far below it (to about 0.5-1)."""
    torch.manual_seed(0)
    codec, length = AudioCodec(sample_rate=8000), 128
    rng = np.random.default_rng(0)

    def batch(n):  # crops of tones at random phases
        return torch.from_numpy(np.stack([codec.encode_wave(tone(length / 8000, 8000, phase=p))
                                          for p in rng.uniform(0, 2 * np.pi, n)]).astype(np.int64))

    model = build_model(cfg, codec.vocab_size, (length,))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    held_out = batch(16)
    with torch.no_grad():
        before = model.token_nll(held_out).mean().item() / math.log(2)
    for _ in range(200):
        loss = model.token_nll(batch(16)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        after = model.token_nll(held_out).mean().item() / math.log(2)
    assert before > 7 and after < 2, f"{before:.2f} -> {after:.2f} bits/sample"


def test_mu_law_is_the_float32_formula_bit_for_bit():
    """mu_law_encode takes the sign by a bitwise or, not np.copysign: the levels are exactly
    those of the formula, for every magnitude, ±0, ±inf, subnormals and out-of-range samples."""
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_normal(200_000) * 10.0 ** rng.integers(-40, 3, 200_000),
                        [0.0, -0.0, np.inf, -np.inf, 1e-45, -1e-45, 1.0, -1.0, 1.0000001, -1.0000001]]).astype(np.float32)
    for mu in (255, 127, 15, 1):
        y = np.minimum(np.abs(x), np.float32(1)) * np.float32(mu)
        y = np.log1p(y) * np.float32(mu / 2 / np.log1p(mu))
        reference = np.rint(np.copysign(y, x) + np.float32(mu / 2)).astype(np.uint8)
        assert np.array_equal(mu_law_encode(x, mu), reference), mu
        scratch = x.copy()
        assert np.array_equal(mu_law_encode(scratch, mu, overwrite_input=True), reference), mu
        assert np.array_equal(scratch.view(np.uint32), x.view(np.uint32) & np.uint32(0x80000000))


def test_block_by_block_decoding_equals_decoding_the_whole_file_at_once(tmp_path):
    """decode_audio reads 2^18 frames at a time through soxr's streaming resampler; its samples are
    the one-shot resampling of the whole file's channel mean, to the bit."""
    import soxr

    from pipeline.codecs.audio import BLOCK_FRAMES, mix_to_mono

    rng = np.random.default_rng(0)
    stereo = np.stack([tone(30.0, 22050, 440.0), tone(30.0, 22050, 661.0)], 1) + rng.normal(0, 0.01, (661500, 2))
    assert len(stereo) > 2 * BLOCK_FRAMES
    sf.write(tmp_path / "a.flac", stereo, 22050, subtype="PCM_16")
    whole, rate = sf.read(tmp_path / "a.flac", dtype="float32", always_2d=True)
    expected = soxr.resample(mix_to_mono(whole), rate, 16000, quality="HQ")
    assert np.array_equal(decode_audio(str(tmp_path / "a.flac"), 16000), expected)


@pytest.mark.parametrize("channels", [1, 2, 3, 4, 6])
def test_16_bit_pcm_read_as_integers_gives_the_float_samples_to_the_bit(tmp_path, channels):
    """decode_blocks reads PCM_16 files as int16 and mixes in integers (pcm16_to_mono); the mono
    samples equal mix_to_mono of libsndfile's own float32 reading, bit for bit, extremes included."""
    from pipeline.codecs.audio import decode_blocks, mix_to_mono

    rng = np.random.default_rng(channels)
    samples = rng.integers(-32768, 32768, (50_000, channels), dtype=np.int16)
    samples[:4] = [[-32768] * channels, [32767] * channels, [-1] * channels, [1] * channels]
    for name in ("a.wav", "a.flac"):
        sf.write(tmp_path / name, samples, 22050, subtype="PCM_16")
        floats, _ = sf.read(tmp_path / name, dtype="float32", always_2d=True)
        with sf.SoundFile(tmp_path / name) as f:
            assert f.subtype == "PCM_16"  # the integer path is taken
        mono = np.concatenate(list(decode_blocks(str(tmp_path / name), 22050)))  # no resampling
        assert np.array_equal(mono.view(np.uint32), mix_to_mono(floats).view(np.uint32)), name
