"""Hugging Face in and out: arpipe's text GPT and Llama as `transformers` checkpoints
(`arpipe export-hf`: GPT2LMHeadModel, LlamaForCausalLM), and arpipe or HF checkpoints as the
starting weights of a run (`train.init_from`).

The start vector. arpipe's models condition their first token on a learned start vector, not on
a BOS token; a transformers causal LM needs a token at position 0. A new BOS row cannot carry
it exactly: it would add a BOS logit to every softmax, and neither GPT2LMHeadModel nor
LlamaForCausalLM has an output bias that could pin that logit at -inf. So no row is added and
every probability stays arpipe's:

- GPT-2: the end-of-document token is also the BOS, as in GPT-2 itself, and the start vector is
  folded into position 0's embedding, wpe'[0] = wpe[0] + start_vector - wte[eos]: at position 0
  the input wte[eos] + wpe'[0] is arpipe's start_vector + wpe[0]; the tied head is unchanged.
- Llama (RoPE: no position embedding to fold into): the BOS is a token arpipe never reads as
  input (`input_free_token`), its input embedding row becomes the start vector and the head is
  untied, so that token's output row, the only other use of the row, stays as it was.

BOS is never a target: a text's likelihood is the sum over the tokens after it.

Reading back, position 0's input of any HF GPT-2 or Llama, ours or not, is the embedding of its
BOS (wte[bos] + wpe[0] for GPT-2), so the start vector becomes that embedding row (the
tokenizer's bos_token, else config.json's bos_token_id): the same function, whichever model the
checkpoint came from. A Llama whose input and output embeddings differ in the BOS row alone is
arpipe's tied model, tied again.

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
from pipeline.models.llama import Llama


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
    tokenizer.json, tokenizer_config.json) for an arpipe text GPT or Llama: an export, run or checkpoint."""
    from transformers import GenerationConfig

    model, codec, meta = load_any(model_path)
    if not isinstance(model, (GPT, Llama)) or not isinstance(codec, TextCodec):
        raise ArpipeError(f"{model_path} holds a {meta['model']['name']} model of {codec.modality}; export-hf carries "
                          f"text GPT and Llama models only (transformers has no architecture for the others): use it "
                          f"with `arpipe eval` and `arpipe sample`, or read its model.safetensors directly")
    if isinstance(model, GPT):
        bos_token, bos = codec.eos_token, codec.eos_id
        config, weights = gpt2_checkpoint(model, bos, codec.eos_id)
    else:
        bos_token, bos = input_free_token(codec)
        config, weights = llama_checkpoint(model, bos, codec.eos_id)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(out)
    GenerationConfig.from_model_config(config).save_pretrained(out)

    # The tokenizer puts BOS first by itself (post-processor, add_bos_token) and, like arpipe,
    # encodes special-token strings inside text as text (split_special_tokens) and decodes
    # without touching spaces, so HF sees exactly the tokens arpipe trained and evaluated on.
    tokenizer = Tokenizer.from_str(codec.tokenizer.to_str())
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos_token}:0 $A:0", pair=f"{bos_token}:0 $A:0 {bos_token}:1 $B:1", special_tokens=[(bos_token, bos)])
    tokenizer.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos_token, "eos_token": codec.eos_token,
        "add_bos_token": True, "add_eos_token": False, "split_special_tokens": True,
        "clean_up_tokenization_spaces": False, "model_max_length": model.context}, indent=1))
    LOG.info("export-hf: %s -> %s (%s, %d positions, BOS %s, EOS %s)", model_path, out, config.architectures[0],
             model.context, bos_token, codec.eos_token)
    return out


def gpt2_checkpoint(model: GPT, bos: int, eos: int):
    """GPT2Config and weights; the start vector folded into position 0's embedding (module docstring)."""
    from transformers import GPT2Config

    state = {name: param.detach() for name, param in model.state_dict().items()}
    weights = {theirs: (state[ours].T if transposed else state[ours]).contiguous()
               for ours, theirs, transposed in gpt2_names(model.cfg.n_layer)}
    weights["transformer.wpe.weight"] = weights["transformer.wpe.weight"].clone()
    weights["transformer.wpe.weight"][0] += state["start_vector"] - state["wte.weight"][bos]
    c = model.cfg
    config = GPT2Config(vocab_size=model.vocab_size, n_positions=model.context, n_embd=c.d_model, n_layer=c.n_layer,
                        n_head=c.n_head, n_inner=4 * c.d_model, activation_function="gelu",  # exact erf GELU
                        resid_pdrop=c.dropout, embd_pdrop=c.dropout, attn_pdrop=c.dropout, layer_norm_epsilon=1e-5,
                        bos_token_id=bos, eos_token_id=eos, tie_word_embeddings=True,
                        architectures=["GPT2LMHeadModel"])
    return config, weights


def llama_checkpoint(model: Llama, bos: int, eos: int):
    """LlamaConfig and weights (arpipe's names are HF's); the start vector is the input embedding of
    `bos`, a token arpipe never reads, and the head is untied so that its output row stays."""
    from transformers import LlamaConfig

    state = {name: param.detach() for name, param in model.state_dict().items()}
    weights = {name: tensor.contiguous() for name, tensor in state.items() if name != "start_vector"}
    weights["model.embed_tokens.weight"] = weights["model.embed_tokens.weight"].clone()
    weights["model.embed_tokens.weight"][bos] = state["start_vector"]
    c = model.cfg
    config = LlamaConfig(vocab_size=model.vocab_size, hidden_size=c.d_model, intermediate_size=c.ff_width,
                         num_hidden_layers=c.n_layer, num_attention_heads=c.n_head, num_key_value_heads=c.kv_heads,
                         head_dim=c.d_model // c.n_head, hidden_act="silu", max_position_embeddings=model.context,
                         rms_norm_eps=c.norm_eps, rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},
                         tie_word_embeddings=False, bos_token_id=bos, eos_token_id=eos,
                         architectures=["LlamaForCausalLM"])
    return config, weights


def input_free_token(codec: TextCodec) -> tuple[str, int]:
    """A token arpipe never reads as input, whose input embedding can carry Llama's start vector:
    the BOS the tokenizer's own post-processor adds (arpipe encodes without it), else byte 0xFF,
    which UTF-8 text never contains (`<0xFF>` with byte fallback, `ÿ` in byte-level BPE)."""
    spec = json.loads(codec.tokenizer.to_str())
    candidates = own_bos(spec.get("post_processor")) + ["<0xFF>"]
    if "ByteLevel" in json.dumps(spec.get("pre_tokenizer")):
        candidates.append("ÿ")
    for name in candidates:
        token = codec.tokenizer.token_to_id(name)
        if token is not None and token != codec.eos_id:
            return name, token
    raise ArpipeError("export-hf needs a token arpipe never reads as input to carry a Llama's start vector (a BOS "
                      "of the tokenizer's own, or a byte-fallback or byte-level token for byte 0xFF); this "
                      "tokenizer has none")


def own_bos(processor: dict | None) -> list[str]:
    """The special token a tokenizer.json post-processor puts first, if any."""
    if not processor:
        return []
    if processor.get("type") == "Sequence":
        return [t for p in processor["processors"] for t in own_bos(p)]
    first = (processor.get("single") or [{}])[0] if processor.get("type") == "TemplateProcessing" else {}
    return [first["SpecialToken"]["id"]] if "SpecialToken" in first else []


def warm_start(model: ARModel, model_cfg: dict, path: str | Path, codec) -> None:
    """`train.init_from`: copy the weights of an arpipe export/run/checkpoint or an HF GPT-2 or
    Llama directory into a freshly built `model`. Family, hyperparameters and vocabulary (its size and,
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

    ours_cfg, source_cfg = settled(model_cfg), settled(source_cfg)
    changes = [f"model.{k}={v}" for k, v in source_cfg.items() if k != "dropout" and ours_cfg.get(k) != v]
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


def settled(cfg: dict) -> dict:
    """A model section with the values its defaults stand for (Llama's n_kv_head and d_ff), so that
    `n_kv_head: null` and `n_kv_head: 6` compare equal for 6 heads."""
    config = model_config(cfg)
    values = config.model_dump()
    if isinstance(config, Llama.Config):
        values.update(n_kv_head=config.kv_heads, d_ff=config.ff_width)
    return values


def read_hf(path: Path) -> tuple[dict, int, dict[str, torch.Tensor]]:
    """An HF GPT-2 or Llama directory as (arpipe model config, vocabulary size, arpipe state dict);
    the start vector is the input embedding of its BOS token (module docstring)."""
    config = json.loads((path / "config.json").read_text())
    readers = {"gpt2": read_gpt2, "llama": read_llama}
    kind = config.get("model_type")
    if kind not in readers:
        raise ArpipeError(f"train.init_from {path} is a {kind!r} model; arpipe reads "
                          f"{' and '.join(readers)} checkpoints")
    weights = read_safetensors(path)
    vocab_size = config["vocab_size"]
    bos = configured_token(path, "bos_token")
    has_tokenizer = (path / "tokenizer.json").is_file()
    bos_id = Tokenizer.from_file(str(path / "tokenizer.json")).token_to_id(bos) if bos and has_tokenizer else None
    if bos_id is None:
        bos_id = config.get("bos_token_id")
    if not isinstance(bos_id, int) or not 0 <= bos_id < vocab_size:
        raise ArpipeError(f"train.init_from {path} names no BOS token in its vocabulary (bos_token in "
                          f"tokenizer_config.json, or bos_token_id in config.json, got {bos_id!r}): its embedding "
                          f"becomes arpipe's start vector")
    model_cfg, state = readers[kind](path, config, weights, bos_id)
    return model_config(model_cfg).model_dump(), vocab_size, {k: v.float().contiguous() for k, v in state.items()}


def weight(path: Path, weights: dict, name: str) -> torch.Tensor:
    if name not in weights:
        raise ArpipeError(f"train.init_from {path}: its safetensors lack {name}")
    return weights[name]


def read_gpt2(path: Path, config: dict, weights: dict, bos: int) -> tuple[dict, dict]:
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
        tensor = weight(path, weights, theirs.removeprefix("transformer."))
        state[ours] = tensor.T if transposed else tensor
    head = weights.get("lm_head.weight")
    if head is not None and not torch.equal(head, state["wte.weight"]):
        raise ArpipeError(f"train.init_from {path} has an output head apart from its embeddings; "
                          f"arpipe's GPT ties them")
    state["head.weight"] = state["wte.weight"]
    state["start_vector"] = state["wte.weight"][bos]
    return {"name": "gpt", "n_layer": n_layer, "n_head": config["n_head"], "d_model": d}, state


def read_llama(path: Path, config: dict, weights: dict, bos: int) -> tuple[dict, dict]:
    d, n_head = config["hidden_size"], config["num_attention_heads"]
    rope = config.get("rope_parameters") or {"rope_type": "default", "rope_theta": config.get("rope_theta", 10000.0)}
    for key, value, expected in [("hidden_act", config.get("hidden_act", "silu"), "silu"),
                                 ("attention_bias", config.get("attention_bias", False), False),
                                 ("mlp_bias", config.get("mlp_bias", False), False),
                                 ("head_dim", config.get("head_dim") or d // n_head, d // n_head),
                                 ("rope type", rope.get("rope_type", "default"), "default")]:
        if value != expected:
            raise ArpipeError(f"train.init_from {path}: {key} {value!r}; arpipe's Llama has {expected!r}")
    state = {k: v for k, v in weights.items() if k.startswith("model.")}
    embed = weight(path, weights, "model.embed_tokens.weight")
    head = weights.get("lm_head.weight")
    # arpipe's export of a tied model unties it in the BOS row alone: tied again here
    tied = head is None or set((head != embed).any(1).nonzero().flatten().tolist()) <= {bos}
    state["model.embed_tokens.weight"] = embed if head is None else head if tied else embed
    state["lm_head.weight"] = state["model.embed_tokens.weight"] if tied else head
    state["start_vector"] = embed[bos]
    cfg = {"name": "llama", "n_layer": config["num_hidden_layers"], "n_head": n_head, "d_model": d,
           "n_kv_head": config.get("num_key_value_heads") or n_head, "d_ff": config["intermediate_size"],
           "rope_theta": rope["rope_theta"], "norm_eps": config.get("rms_norm_eps", 1e-6), "tie_embeddings": tied}
    return cfg, state


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
