"""Hugging Face in and out: arpipe's text GPT as a `transformers` GPT-2 checkpoint
(`arpipe export-hf`), and arpipe or HF checkpoints as the starting weights of a run
(`train.init_from`).

The start vector. arpipe's GPT conditions its first token on a learned start vector, not on a
BOS token; a transformers causal LM needs a token at position 0. The export makes the
end-of-document token the BOS, as GPT-2 itself does (`<|endoftext|>` begins and ends text), and
folds the start vector into position 0's embedding:

    wpe'[0] = wpe[0] + start_vector - wte[eos]

so at position 0 the HF model's input wte[eos] + wpe'[0] is arpipe's start_vector + wpe[0], and
nothing else changes. No row is added to the vocabulary, so the tied head keeps its V logits and
every probability is arpipe's. (A new BOS row would add a BOS logit to every softmax, and neither
GPT2LMHeadModel nor LlamaForCausalLM has an output bias that could pin it at -inf.) BOS is never
a target: a text's likelihood is the sum over the tokens after it.

Reading back, position 0's input of any HF GPT-2 — ours or not — is wte[bos] + wpe[0], so the
start vector becomes the embedding of the BOS token (the tokenizer's bos_token, else config.json's
bos_token_id) and wpe is kept: the same function, whichever model the checkpoint came from.

Only safetensors are read (no pickles); transformers is needed to write an export, not to read one.
"""

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tokenizers import Tokenizer, processors

from pipeline import ArpipeError
from pipeline.codecs.text import TextCodec, configured_token
from pipeline.export import load_any
from pipeline.log import LOG
from pipeline.models import ARModel, model_config
from pipeline.models.gpt import GPT


def gpt2_names(n_layer: int) -> list[tuple[str, str, bool]]:
    """(arpipe parameter, GPT2LMHeadModel parameter, transposed): GPT-2's Conv1D stores (in, out)."""
    names = [("wte.weight", "transformer.wte.weight", False), ("wpe.weight", "transformer.wpe.weight", False),
             ("ln_f.weight", "transformer.ln_f.weight", False), ("ln_f.bias", "transformer.ln_f.bias", False)]
    for i in range(n_layer):
        a, h = f"blocks.{i}.", f"transformer.h.{i}."
        for ours, theirs, transposed in [("ln1", "ln_1", False), ("ln2", "ln_2", False),
                                         ("attn.qkv", "attn.c_attn", True), ("attn.proj", "attn.c_proj", True),
                                         ("mlp.0", "mlp.c_fc", True), ("mlp.2", "mlp.c_proj", True)]:
            names.append((a + ours + ".weight", h + theirs + ".weight", transposed))
            names.append((a + ours + ".bias", h + theirs + ".bias", False))
    return names


def export_hf(model_path: str | Path, out: str | Path) -> Path:
    """Write a transformers directory (config.json, generation_config.json, model.safetensors,
    tokenizer.json, tokenizer_config.json) for an arpipe text GPT: an export, run or checkpoint."""
    from transformers import GenerationConfig, GPT2Config

    model, codec, meta = load_any(model_path)
    if not isinstance(model, GPT) or not isinstance(codec, TextCodec):
        raise ArpipeError(f"{model_path} holds a {meta['model']['name']} model of {codec.modality}; export-hf carries "
                          f"text GPT models only (transformers has no architecture for the others): use it with "
                          f"`arpipe eval` and `arpipe sample`, or read its model.safetensors directly")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = {name: param.detach() for name, param in model.state_dict().items()}
    eos = codec.eos_id
    hf = {theirs: (state[ours].T if transposed else state[ours]).contiguous()
          for ours, theirs, transposed in gpt2_names(model.cfg.n_layer)}
    hf["transformer.wpe.weight"] = hf["transformer.wpe.weight"].clone()
    hf["transformer.wpe.weight"][0] += state["start_vector"] - state["wte.weight"][eos]
    save_file(hf, str(out / "model.safetensors"), metadata={"format": "pt"})

    c = model.cfg
    config = GPT2Config(vocab_size=model.vocab_size, n_positions=model.context, n_embd=c.d_model, n_layer=c.n_layer,
                        n_head=c.n_head, n_inner=4 * c.d_model, activation_function="gelu",  # exact erf GELU
                        resid_pdrop=c.dropout, embd_pdrop=c.dropout, attn_pdrop=c.dropout, layer_norm_epsilon=1e-5,
                        bos_token_id=eos, eos_token_id=eos, tie_word_embeddings=True,
                        architectures=["GPT2LMHeadModel"])
    config.save_pretrained(out)
    GenerationConfig.from_model_config(config).save_pretrained(out)

    # The tokenizer puts BOS first by itself (post-processor, add_bos_token) and, like arpipe,
    # encodes special-token strings inside text as text (split_special_tokens) and decodes
    # without touching spaces, so HF sees exactly the tokens arpipe trained and evaluated on.
    tokenizer = Tokenizer.from_str(codec.tokenizer.to_str())
    name = codec.eos_token
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{name}:0 $A:0", pair=f"{name}:0 $A:0 {name}:1 $B:1", special_tokens=[(name, eos)])
    tokenizer.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": name, "eos_token": name, "add_bos_token": True,
        "add_eos_token": False, "split_special_tokens": True, "clean_up_tokenization_spaces": False,
        "model_max_length": model.context}, indent=1))
    LOG.info("export-hf: %s -> %s (GPT2LMHeadModel, %d positions, BOS = EOS = %s)", model_path, out,
             model.context, name)
    return out


def warm_start(model: ARModel, model_cfg: dict, path: str | Path, codec) -> None:
    """`train.init_from`: copy the weights of an arpipe export/run/checkpoint or an HF GPT-2
    directory into a freshly built `model`. Family, hyperparameters and vocabulary (its size and,
    for text, its tokens) must match the run's; GPT may use fewer positions than the source has."""
    path = Path(path)
    if not path.exists():
        raise ArpipeError(f"train.init_from {path} does not exist")
    if (path / "config.json").is_file():
        source_cfg, vocab_size, state = read_hf(path)
        tokenizer_file = path / "tokenizer.json" if (path / "tokenizer.json").is_file() else None
        theirs = Tokenizer.from_file(str(tokenizer_file)) if tokenizer_file else None
    else:
        source, source_codec, meta = load_any(path)
        source_cfg, vocab_size, state = meta["model"], meta["vocab_size"], source.state_dict()
        theirs = getattr(source_codec, "tokenizer", None)
        tokenizer_file = next((p for p in (path / "tokenizer.json", path / "export" / "tokenizer.json",
                                           Path(meta.get("data", path)) / "tokenizer.json") if p.is_file()), None)

    changes = [f"model.{k}={v}" for k, v in source_cfg.items() if k != "dropout" and model_cfg.get(k) != v]
    if changes:
        raise ArpipeError(f"train.init_from {path} is a {source_cfg['name']} model with other settings than "
                          f"the config's model section: set {' '.join(changes)}")
    ours = getattr(codec, "tokenizer", None)
    fix = ("shard the data with the codec settings that model was trained on" if ours is None else
           f"shard the text with --tokenizer {tokenizer_file}" if tokenizer_file else
           "shard the text with the model's own tokenizer (--tokenizer)")
    if vocab_size != model.vocab_size:
        raise ArpipeError(f"train.init_from {path} has a vocabulary of {vocab_size} tokens, but the shards in "
                          f"data.path have {model.vocab_size}: {fix}")
    if theirs is not None and ours is not None and theirs.get_vocab() != ours.get_vocab():
        raise ArpipeError(f"train.init_from {path} and the shards in data.path have {vocab_size} tokens each, but "
                          f"not the same ones: {fix}")

    target = model.state_dict()
    for name, tensor in target.items():
        if name not in state:
            raise ArpipeError(f"train.init_from {path} lacks parameter {name}")
        weights = state[name]
        if name == "wpe.weight" and weights.shape[0] >= tensor.shape[0]:
            weights = weights[: tensor.shape[0]]  # a shorter context uses the first positions
        elif name == "wpe.weight":
            raise ArpipeError(f"train.init_from {path} has {weights.shape[0]} positions, fewer than "
                              f"data.block_len {tensor.shape[0]}: set data.block_len={weights.shape[0]} or less")
        if weights.shape != tensor.shape:
            raise ArpipeError(f"train.init_from {path}: parameter {name} has shape {tuple(weights.shape)} there and "
                              f"{tuple(tensor.shape)} here (the data's shape differs)")
        target[name] = weights
    model.load_state_dict(target)
    LOG.info("init_from %s: weights loaded (%s); optimizer and step start fresh", path, source_cfg["name"])


def read_hf(path: Path) -> tuple[dict, int, dict[str, torch.Tensor]]:
    """An HF checkpoint directory as (arpipe model config, vocabulary size, arpipe state dict)."""
    config = json.loads((path / "config.json").read_text())
    kind = config.get("model_type")
    if kind != "gpt2":
        raise ArpipeError(f"train.init_from {path} is a {kind!r} model; arpipe reads gpt2 checkpoints")
    weights = read_safetensors(path)
    weights = {k.removeprefix("transformer."): v for k, v in weights.items()}  # GPT2Model saves no prefix
    n_layer, d = config["n_layer"], config["n_embd"]
    if config.get("n_inner") not in (None, 4 * d):
        raise ArpipeError(f"train.init_from {path}: n_inner {config['n_inner']} is not 4 × n_embd ({4 * d}), "
                          f"the MLP width of arpipe's GPT")
    if config.get("activation_function", "gelu_new") != "gelu":
        LOG.warning("init_from %s: activation %s is approximated by arpipe's exact GELU; outputs differ slightly "
                    "until training adapts", path, config.get("activation_function", "gelu_new"))
    state = {}
    for ours, theirs, transposed in gpt2_names(n_layer):
        theirs = theirs.removeprefix("transformer.")
        if theirs not in weights:
            raise ArpipeError(f"train.init_from {path}: model.safetensors lacks {theirs}")
        state[ours] = weights[theirs].T if transposed else weights[theirs]
    state = {k: v.float().contiguous() for k, v in state.items()}
    head = weights.get("lm_head.weight")
    if head is not None and not torch.equal(head.float(), state["wte.weight"]):
        raise ArpipeError(f"train.init_from {path} has an output head apart from its embeddings; "
                          f"arpipe's GPT ties them")
    state["head.weight"] = state["wte.weight"]
    vocab_size = state["wte.weight"].shape[0]

    bos = configured_token(path, "bos_token")
    has_tokenizer = (path / "tokenizer.json").is_file()
    bos_id = Tokenizer.from_file(str(path / "tokenizer.json")).token_to_id(bos) if bos and has_tokenizer else None
    if bos_id is None:
        bos_id = config.get("bos_token_id")
    if not isinstance(bos_id, int) or not 0 <= bos_id < vocab_size:
        raise ArpipeError(f"train.init_from {path} names no BOS token in its vocabulary (bos_token in "
                          f"tokenizer_config.json, or bos_token_id in config.json, got {bos_id!r}): its embedding "
                          f"becomes arpipe's start vector")
    state["start_vector"] = state["wte.weight"][bos_id].clone()
    model_cfg = model_config({"name": "gpt", "n_layer": n_layer, "n_head": config["n_head"], "d_model": d}).model_dump()
    return model_cfg, vocab_size, state


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """model.safetensors, or the shards listed in model.safetensors.index.json."""
    index = path / "model.safetensors.index.json"
    files = ["model.safetensors"]
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    weights = {}
    for name in files:
        file = path / name
        if not file.is_file() or Path(name).name != name:
            raise ArpipeError(f"{path} holds no {name}: arpipe reads safetensors checkpoints only (save with "
                              f"transformers' save_pretrained, which writes them by default)")
        with safe_open(str(file), "pt") as f:
            weights.update({k: f.get_tensor(k) for k in f.keys()})
    return weights
