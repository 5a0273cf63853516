"""Hugging Face in and out, with the real transformers and tokenizers libraries: export-hf keeps
every probability, HF checkpoints warm-start arpipe models, and tokenizers users bring shard."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from pipeline import ArpipeError
from pipeline.codecs.text import TextCodec
from pipeline.data.shards import Shards
from pipeline.export import load_export, save_export
from pipeline.hf import input_free_token, warm_start
from pipeline.log import LOG
from pipeline.models import build_model, model_config
from tests.conftest import ENV, arpipe

GPT = {"name": "gpt", "n_layer": 2, "n_head": 2, "d_model": 32}
LLAMA = {"name": "llama", "n_layer": 2, "n_head": 4, "n_kv_head": 2, "d_model": 32, "d_ff": 64}

# Run in a process where arpipe cannot be imported: the export must stand on transformers alone.
HF_SIDE = """
import json, sys
sys.modules["pipeline"] = None
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
job = json.load(open(sys.argv[1]))
model = AutoModelForCausalLM.from_pretrained(job["dir"]).eval()
tokenizer = AutoTokenizer.from_pretrained(job["dir"])
out = {"class": type(model).__name__, "bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id,
       "eos_token": tokenizer.eos_token, "encoded": [tokenizer(t)["input_ids"] for t in job["texts"]]}
out["decoded"] = [tokenizer.decode(ids, skip_special_tokens=True) for ids in out["encoded"]]
with torch.no_grad():
    out["logprobs"] = []
    for ids in job["score"]:  # BOS, then the tokens whose log-probabilities we want
        x = torch.tensor([ids])
        out["logprobs"].append(model(x[:, :-1]).logits.log_softmax(-1)[0].gather(1, x[0, 1:, None])[:, 0].tolist())
    torch.manual_seed(0)
    out["generated"] = model.generate(torch.tensor([[tokenizer.bos_token_id]]), max_new_tokens=20,
                                      do_sample=True, pad_token_id=tokenizer.eos_token_id).tolist()
print(json.dumps(out))
"""


def hf_side(tmp_path, directory, texts, score) -> dict:
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"dir": str(directory), "texts": texts, "score": score}))
    (tmp_path / "hf_side.py").write_text(HF_SIDE)
    result = subprocess.run([sys.executable, tmp_path / "hf_side.py", job], env=ENV, cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.splitlines()[-1])


def random_export(directory, shards_dir, cfg=GPT, block_len=64, seed=0):
    """An arpipe export of a GPT whose every weight (the start vector too) is random and far from
    its initialisation, so a mapping that drops or misplaces anything shows."""
    shards = Shards(shards_dir)
    torch.manual_seed(seed)
    model = build_model(cfg, shards.codec.vocab_size, (block_len,))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    state = {k: v.detach() for k, v in model.named_parameters()}
    return save_export(directory, state, model_config(cfg).model_dump(), shards.codec.vocab_size, (block_len,),
                       shards.manifest["codec"], shards.meta_dir, {"step": 0, "data": shards.dir})


def val_documents(shards_dir, n=8) -> list[np.ndarray]:
    shards, docs = Shards(shards_dir), []
    for shard, entry in shards.chunks("val"):
        tokens, offsets = shards.read_chunk(shard, entry["key"])
        docs += [tokens[a:b].astype(np.int64) for a, b in zip(offsets[:-1], offsets[1:])]
    return docs[:n]


@pytest.mark.parametrize("cfg, architecture, bos_token", [
    (GPT, "GPT2LMHeadModel", "<|endoftext|>"),  # BOS = EOS, the start vector in position 0's embedding
    ({**LLAMA, "tie_embeddings": True}, "LlamaForCausalLM", "ÿ"),  # byte 0xFF, which UTF-8 never holds
])
def test_export_hf_keeps_every_probability(tmp_path, text_shards, cfg, architecture, bos_token):
    block_len = 256
    export = random_export(tmp_path / "export", text_shards, cfg=cfg, block_len=block_len)
    out = tmp_path / "hf"
    arpipe("export-hf", "--model", export, "--out", out)
    model, codec, _ = load_export(export)
    eos, bos = codec.eos_id, codec.tokenizer.token_to_id(bos_token)
    docs = val_documents(text_shards)
    # a document with its EOS where it fits; the first block_len tokens of a longer one
    targets = [np.append(d, eos)[:block_len] for d in docs]
    assert any(t[-1] == eos for t in targets) and any(t[-1] != eos for t in targets)
    texts = [codec.decode(d) for d in docs] + ["A <|endoftext|> inside text is text, as in the shards; so is ÿ."]
    hf = hf_side(tmp_path, out, texts, [[bos, *t.tolist()] for t in targets])

    assert hf["class"] == architecture
    assert hf["bos"] == bos and hf["eos"] == eos and hf["eos_token"] == "<|endoftext|>"
    for text, ids, back in zip(texts, hf["encoded"], hf["decoded"]):
        assert ids == [bos, *codec.encode(text).tolist()]  # BOS first, then exactly arpipe's tokens
        assert back == text
    x = torch.zeros(len(targets), block_len, dtype=torch.long)
    for i, t in enumerate(targets):
        x[i, : len(t)] = torch.from_numpy(t)
    with torch.no_grad():
        ours = -model.token_nll(x)
    for i, (t, theirs) in enumerate(zip(targets, hf["logprobs"])):
        assert len(theirs) == len(t)
        np.testing.assert_allclose(theirs, ours[i, : len(t)].numpy(), atol=1e-4, rtol=0)
    generated = hf["generated"][0]
    assert len(generated) == 21 and generated[0] == bos and max(generated) < codec.vocab_size

    # and back: the HF directory's tokenizer shards the same tokens, its weights warm-start arpipe's model
    assert TextCodec.load(out).tokenizer.get_vocab() == codec.tokenizer.get_vocab()
    assert TextCodec.load(out).eos_token == "<|endoftext|>"
    again, settings, _ = fresh(text_shards, cfg, block_len=block_len)
    warm_start(again, settings, out, codec)
    with torch.no_grad():
        torch.testing.assert_close(-again.eval().token_nll(x), ours, rtol=0, atol=1e-5)


def test_export_hf_refuses_what_transformers_cannot_carry(tmp_path, text_shards):
    export = random_export(tmp_path / "export", text_shards, cfg={"name": "gru", "n_layer": 1, "d_model": 16})
    result = arpipe("export-hf", "--model", export, "--out", tmp_path / "hf", check=False)
    assert result.returncode == 2
    assert "text GPT and Llama models only" in result.stderr and "arpipe eval" in result.stderr
    assert not (tmp_path / "hf").exists()


# --- warm starts -----------------------------------------------------------------------------

def fresh(shards_dir, cfg=GPT, block_len=64):
    shards = Shards(shards_dir)
    torch.manual_seed(1)
    return build_model(cfg, shards.codec.vocab_size, (block_len,)), model_config(cfg).model_dump(), shards.codec


def test_init_from_an_arpipe_export_copies_every_weight(tmp_path, text_shards):
    export = random_export(tmp_path / "export", text_shards, block_len=128)
    source, _, _ = load_export(export)
    model, cfg, codec = fresh(text_shards, block_len=64)  # a shorter context takes the first positions
    warm_start(model, cfg, export, codec)
    for name, p in model.state_dict().items():
        expected = source.state_dict()[name]
        torch.testing.assert_close(p, expected[:64] if name == "wpe.weight" else expected, rtol=0, atol=0)


def test_init_from_a_transformers_gpt2(tmp_path, text_shards):
    """A GPT-2 saved by transformers (random weights, a small config, its own BOS token): arpipe's
    start vector becomes the BOS embedding, and the model computes what HF computes after BOS."""
    from transformers import GPT2Config, GPT2LMHeadModel

    codec = Shards(text_shards).codec
    bos = codec.tokenizer.token_to_id("Ġthe") or 300  # any token can be a BOS
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=codec.vocab_size, n_positions=128, n_embd=32, n_layer=2, n_head=2,
                                    activation_function="gelu", bos_token_id=bos, eos_token_id=codec.eos_id)).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    hf.save_pretrained(tmp_path / "gpt2")
    model, cfg, _ = fresh(text_shards, block_len=64)
    warm_start(model, cfg, tmp_path / "gpt2", codec)
    x = torch.from_numpy(np.stack([d[:64] for d in val_documents(text_shards, 3)]))
    with torch.no_grad():
        theirs = hf(torch.cat([torch.full((3, 1), bos), x[:, :-1]], 1)).logits.log_softmax(-1)
        ours = model.eval()(x).log_softmax(-1)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)


@pytest.mark.parametrize("tied", [True, False])
def test_init_from_a_transformers_llama(tmp_path, text_shards, tied):
    from transformers import LlamaConfig, LlamaForCausalLM

    codec = Shards(text_shards).codec
    bos = 300
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=codec.vocab_size, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
                                      tie_word_embeddings=tied, bos_token_id=bos, eos_token_id=codec.eos_id)).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    hf.save_pretrained(tmp_path / "llama")
    settings = {**LLAMA, "rope_theta": 500000.0, "norm_eps": 1e-6, "tie_embeddings": tied}
    model, cfg, _ = fresh(text_shards, {**settings, "n_kv_head": None})
    with pytest.raises(ArpipeError, match=r"set model.n_kv_head=2$"):  # None means 4 heads here
        warm_start(model, cfg, tmp_path / "llama", codec)
    model, cfg, _ = fresh(text_shards, settings)
    warm_start(model, cfg, tmp_path / "llama", codec)
    x = torch.from_numpy(np.stack([d[:64] for d in val_documents(text_shards, 3)]))
    with torch.no_grad():
        theirs = hf(torch.cat([torch.full((3, 1), bos), x[:, :-1]], 1)).logits.log_softmax(-1)
        ours = model.eval()(x).log_softmax(-1)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)


def test_llama_bos_is_a_token_arpipe_never_reads(tmp_path, corpus):
    """The tokenizer's own BOS where its post-processor adds one, else byte 0xFF."""
    texts = [p.read_text() for p in sorted(corpus.glob("*.txt"))]
    llama3_like(tmp_path / "3", texts)
    assert input_free_token(TextCodec.load(tmp_path / "3")) == ("<|begin_of_text|>", 0)
    llama2_like(tmp_path / "2", texts)
    assert input_free_token(TextCodec.load(tmp_path / "2")) == ("<s>", 1)
    arpipes = TextCodec.train(texts, 400)
    assert input_free_token(arpipes) == ("ÿ", arpipes.tokenizer.token_to_id("ÿ"))
    assert input_free_token(arpipes)[1] not in arpipes.encode("".join(texts) + "ÿ Ÿ ÿÿ")


def save_gpt2(directory, vocab_size, **config):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(vocab_size=vocab_size, n_positions=64, n_embd=32, n_layer=2, n_head=2, bos_token_id=0,
                               **config)).save_pretrained(directory)


def test_init_from_gpt2s_tanh_gelu_warns(tmp_path, text_shards, monkeypatch):
    model, cfg, codec = fresh(text_shards)
    save_gpt2(tmp_path / "gpt2", codec.vocab_size)  # GPT2Config's default activation: gelu_new
    warnings = []
    monkeypatch.setattr(LOG, "warning", lambda message, *args: warnings.append(message % args))
    warm_start(model, cfg, tmp_path / "gpt2", codec)
    assert len(warnings) == 1 and "activation gelu_new is approximated by arpipe's exact GELU" in warnings[0]


def test_init_from_refuses_an_untied_gpt2(tmp_path, text_shards):
    model, cfg, codec = fresh(text_shards)
    save_gpt2(tmp_path / "gpt2", codec.vocab_size, activation_function="gelu", tie_word_embeddings=False)
    with pytest.raises(ArpipeError, match="has an output head apart from its embeddings; arpipe's GPT ties them"):
        warm_start(model, cfg, tmp_path / "gpt2", codec)


@pytest.mark.parametrize("change, message", [
    ({"cfg": {**GPT, "n_layer": 3}}, r"is a gpt model with other settings .*: set model.n_layer=2"),
    ({"block_len": 256}, r"has 128 positions, fewer than data.block_len 256: set data.block_len=128 or less"),
])
def test_init_from_checks_the_shape(tmp_path, text_shards, change, message):
    export = random_export(tmp_path / "export", text_shards, block_len=128)
    model, cfg, codec = fresh(text_shards, **change)
    with pytest.raises(ArpipeError, match=message):
        warm_start(model, cfg, export, codec)


def test_init_from_checks_the_vocabulary(tmp_path, text_shards, corpus):
    export = random_export(tmp_path / "export", text_shards)
    other = tmp_path / "other"  # the same corpus with another tokenizer: 600 tokens, then 512 other ones
    arpipe("shard", "text", "--input", corpus, "--out", other, "--vocab-size", 600)
    model, cfg, codec = fresh(other)
    with pytest.raises(ArpipeError, match=rf"has a vocabulary of 512 tokens, but the shards in data.path have 600: "
                                          rf"shard the text with --tokenizer {export}/tokenizer.json"):
        warm_start(model, cfg, export, codec)
    texts = [p.read_text()[::-1] for p in sorted(corpus.glob("*.txt"))]  # reversed text: other merges
    shuffled = TextCodec.train(texts, 512)
    assert shuffled.vocab_size == 512
    model, cfg, _ = fresh(text_shards)
    with pytest.raises(ArpipeError, match="have 512 tokens each, but not the same ones"):
        warm_start(model, cfg, export, shuffled)


# --- tokenizers users bring ------------------------------------------------------------------

def byte_level(texts, specials, vocab_size=400) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    return tokenizer


def llama3_like(directory, texts):
    """Llama-3's shape: byte-level BPE, <|begin_of_text|> added by the post-processor,
    <|end_of_text|> named in tokenizer_config.json."""
    tokenizer = byte_level(texts, ["<|begin_of_text|>", "<|end_of_text|>"])
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", 0)])
    directory.mkdir()
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>",
         "tokenizer_class": "PreTrainedTokenizerFast"}))
    return tokenizer


def llama2_like(directory, texts):
    """Llama-2 / Mistral's shape: sentencepiece BPE (▁ for spaces, byte fallback), <s> added by
    the post-processor, </s> named in special_tokens_map.json as an AddedToken entry."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                           decoders.Strip(" ", 1, 0)])
    tokenizer.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)],
        show_progress=False))
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    directory.mkdir()
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": {"content": "<s>", "special": True}, "eos_token": {"content": "</s>", "special": True}}))
    return tokenizer


@pytest.mark.parametrize("make, eos", [(llama3_like, "<|end_of_text|>"), (llama2_like, "</s>")])
def test_shard_with_an_hf_tokenizer_directory(tmp_path, corpus, make, eos):
    files = sorted(corpus.glob("*.txt"))
    tokenizer = make(tmp_path / "tok", [p.read_text() for p in files])
    out = tmp_path / "shards"
    arpipe("shard", "text", "--input", corpus, "--out", out, "--tokenizer", tmp_path / "tok", "--val-fraction", 0.2)
    shards = Shards(out)
    assert shards.manifest["codec"]["eos_token"] == eos
    assert shards.codec.eos_id == shards.manifest["codec"]["eos_id"] == tokenizer.token_to_id(eos)
    seen = 0
    for split in ("train", "val"):
        for shard, entry in shards.chunks(split):
            tokens, offsets = shards.read_chunk(shard, entry["key"])
            meta = json.loads(shards.read(shard, entry["key"], "meta.json"))
            for item, a, b in zip(meta["items"], offsets[:-1], offsets[1:]):
                text = (corpus / item["key"].removesuffix(":0")).read_text()
                with_bos = tokenizer.encode(text).ids
                assert with_bos[0] != tokens[a]  # the tokenizer's own post-processor adds a BOS ...
                assert tokens[a:b].tolist() == with_bos[1:]  # ... which arpipe leaves out
                assert shards.codec.decode(tokens[a:b]) == text
                seen += 1
    assert seen == len(files)


def test_eos_token_option_names_the_end_of_document(tmp_path, corpus):
    texts = [p.read_text() for p in sorted(corpus.glob("*.txt"))]
    byte_level(texts, ["<pad>", "<eod>"]).save(str(tmp_path / "tokenizer.json"))  # no config, no <|endoftext|>
    result = arpipe("shard", "text", "--input", corpus, "--out", tmp_path / "a", "--tokenizer",
                    tmp_path / "tokenizer.json", check=False)
    assert result.returncode == 2
    assert "has no <|endoftext|> token: name its end-of-document token with --eos-token" in result.stderr
    assert "<eod>, <pad>" in result.stderr
    arpipe("shard", "text", "--input", corpus, "--out", tmp_path / "b", "--tokenizer", tmp_path / "tokenizer.json",
           "--eos-token", "<eod>")
    shards = Shards(tmp_path / "b")
    assert shards.manifest["codec"]["eos_token"] == "<eod>" and shards.codec.eos_id == 1
    result = arpipe("shard", "text", "--input", corpus, "--out", tmp_path / "c", "--eos-token", "<eod>", check=False)
    assert result.returncode == 2 and "--eos-token needs --tokenizer" in result.stderr


def test_eos_token_must_be_a_special_token(tmp_path, corpus):
    tokenizer = byte_level([p.read_text() for p in sorted(corpus.glob("*.txt"))], ["<|endoftext|>"])
    with pytest.raises(ArpipeError, match="Ġthe is not a special token of the tokenizer, so text could produce it"):
        TextCodec(tokenizer, "Ġthe")


@pytest.mark.parametrize("change, first_difference", [
    # NFKC folds the ligature and the superscript
    ({"normalizer": normalizers.NFKC()}, "😀 ﬁx² <b>&am' decodes as 'μέγα 中文 😀 fix2 <b>&a'"),
    ({"decoder": None}, "' Hello WOR' decodes as 'Ġ H e l lo'"),  # no decoder: byte-level symbols joined by spaces
])
def test_lossy_tokenizers_are_refused(corpus, change, first_difference):
    tokenizer = byte_level([p.read_text() for p in sorted(corpus.glob("*.txt"))], ["<|endoftext|>"])
    for key, value in change.items():
        setattr(tokenizer, key, value)
    with pytest.raises(ArpipeError, match="tokenizer is not lossless") as error:
        TextCodec(tokenizer)
    assert first_difference in str(error.value)


def test_a_tokenizer_that_is_not_lossless_is_refused(tmp_path, corpus):
    tokenizer = byte_level([p.read_text() for p in sorted(corpus.glob("*.txt"))], ["<|endoftext|>"])
    tokenizer.normalizer = normalizers.Lowercase()  # BERT-style: "Hello" comes back as "hello"
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    result = arpipe("shard", "text", "--input", corpus, "--out", tmp_path / "out", "--tokenizer",
                    tmp_path / "tokenizer.json", check=False)
    assert result.returncode == 2
    assert "tokenizer is not lossless: ' Hello WORL' decodes as ' hello worl'" in result.stderr
