"""Llama beyond the shared contract (test_model_contract.py runs causality, normalisation, the KV
cache, long samples and activation checkpointing on it): Hugging Face's conventions, its
configuration, and the memory-lean training loss of the vocabulary heads (GPT's too)."""

import pytest
import torch
import torch.nn.functional as F

from pipeline import ArpipeError
from pipeline.models import build_model
from pipeline.models import loss as lean

TINY = {"name": "llama", "n_layer": 2, "n_head": 4, "n_kv_head": 2, "d_model": 32, "d_ff": 48, "rope_theta": 500.0,
        "norm_eps": 1e-6}


@pytest.mark.parametrize("tie", [False, True])
def test_llama_is_hugging_face_llama_with_the_start_vector_as_a_bos_row(tie):
    """The same weights copied by name into transformers' LlamaForCausalLM, the start vector as the
    embedding row of an added BOS token that every sequence starts with: the same logits."""
    transformers = pytest.importorskip("transformers")
    V, T = 11, 9
    torch.manual_seed(0)
    model = build_model({**TINY, "tie_embeddings": tie}, V, (T,)).eval()
    config = transformers.LlamaConfig(
        vocab_size=V + 1, bos_token_id=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, rope_theta=500.0, rms_norm_eps=1e-6,
        tie_word_embeddings=tie, max_position_embeddings=T)
    hf = transformers.LlamaForCausalLM(config).eval()
    ours = dict(model.named_parameters())
    state = {}
    for name, param in hf.named_parameters():  # every HF name is ours
        extra_row = model.start_vector[None] if name == "model.embed_tokens.weight" else torch.zeros(1, 32)
        state[name] = torch.cat([ours[name], extra_row]) if param.shape[0] == V + 1 else ours[name]
    assert set(ours) - set(state) == {"start_vector"}
    hf.load_state_dict(state, strict=not tie)  # tied: lm_head.weight is not a separate tensor
    x = torch.randint(0, V, (3, T))
    with torch.no_grad():
        theirs = hf(torch.cat([torch.full((3, 1), V), x[:, :-1]], 1)).logits[..., :V]
        torch.testing.assert_close(model(x), theirs, rtol=0, atol=1e-5)


def test_llama_options():
    tied = build_model(TINY, 10, (8,))
    untied = build_model({**TINY, "tie_embeddings": False}, 10, (8,))
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    assert untied.lm_head.weight is not untied.model.embed_tokens.weight
    attention = tied.model.layers[0].self_attn
    assert attention.k_proj.weight.shape == (2 * 8, 32) and attention.q_proj.weight.shape == (32, 32)  # GQA
    assert build_model({"name": "llama", "d_model": 768, "n_head": 12}, 10, (8,)).model.layers[0].mlp.gate_proj \
        .weight.shape == (2048, 768)  # 8/3 · d_model
    assert not any(name.endswith("bias") for name, _ in untied.named_parameters())
    # FLOPs: the untied input embedding is a lookup; attention adds 12·L·d·T
    matrices = sum(p.numel() for p in untied.parameters()) - untied.model.embed_tokens.weight.numel()
    assert untied.train_flops_per_variable() == 6 * matrices + 12 * 2 * 32 * 8
    assert tied.train_flops_per_variable() == 6 * sum(p.numel() for p in tied.parameters()) + 12 * 2 * 32 * 8


@pytest.mark.parametrize("cfg, message", [
    ({"n_head": 4, "n_kv_head": 3}, r"model.n_head \(4\) must be a multiple of model.n_kv_head \(3\)"),
    ({"d_model": 30, "n_head": 4}, r"model.d_model \(30\) must be model.n_head \(4\) × an even head size"),
    ({"n_kv_heads": 2}, "model.n_kv_heads: Extra inputs are not permitted"),
])
def test_bad_llama_config_names_the_key(cfg, message):
    with pytest.raises(ArpipeError, match=message):
        build_model({**TINY, **cfg}, 10, (8,))


# --- the lean loss of vocabulary heads
HEADS = {"gpt": {"name": "gpt", "n_layer": 2, "n_head": 2, "d_model": 16}, "llama": {**TINY, "tie_embeddings": False},
         "llama-tied": TINY}


def loss_and_gradients(model, x, lean_loss: bool):
    model.zero_grad()
    if lean_loss:
        loss = model(x, loss=True)
    else:  # the trainer's loss before forward(x, loss=True): fp32 logits of every variable
        loss = F.cross_entropy(model(x).float().flatten(0, 1), x.flatten())
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("chunk_logits", [lean.CHUNK_LOGITS, 7 * 37])  # one chunk; chunks of 7 rows, the last short
@pytest.mark.parametrize("name", HEADS)
def test_the_lean_loss_is_the_plain_loss_with_the_same_gradients(name, chunk_logits, monkeypatch):
    monkeypatch.setattr(lean, "CHUNK_LOGITS", chunk_logits)
    torch.manual_seed(0)
    model = build_model(HEADS[name], 37, (12,)).train()
    x = torch.randint(0, 37, (4, 12))
    plain, plain_grads = loss_and_gradients(model, x, lean_loss=False)
    loss, grads = loss_and_gradients(model, x, lean_loss=True)
    torch.testing.assert_close(loss, plain, rtol=0, atol=1e-6)
    for key in grads:
        torch.testing.assert_close(grads[key], plain_grads[key], rtol=1e-5, atol=1e-7, msg=key)
    with torch.no_grad():  # no gradients wanted: none computed, the same loss
        torch.testing.assert_close(model(x, loss=True), plain, rtol=0, atol=1e-6)


def test_the_lean_loss_under_bf16_autocast_is_the_plain_loss_to_bf16_rounding():
    torch.manual_seed(0)
    model = build_model(HEADS["llama"], 37, (12,)).train()
    x = torch.randint(0, 37, (4, 12))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain, plain_grads = loss_and_gradients(model, x, lean_loss=False)
        loss, grads = loss_and_gradients(model, x, lean_loss=True)
    torch.testing.assert_close(loss, plain, rtol=0, atol=1e-2)
    for key in grads:
        assert grads[key].dtype == torch.float32
        torch.testing.assert_close(grads[key], plain_grads[key], rtol=0.05, atol=1e-3, msg=key)
