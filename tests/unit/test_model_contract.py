"""The factorisation contract every model family must keep (see pipeline/models/base.py):
(a) perturbing x_j changes no conditional at positions <= j and does change a later one,
(b) for a tiny vocabulary and length, probabilities over all sequences sum to 1,
(c) cached / incremental sampling equals the full forward pass."""

import itertools

import pytest
import torch

from pipeline.models import build_model

# (model config, vocab, shape): a tiny member of every family.
FAMILIES = {
    "gpt": ({"name": "gpt", "n_layer": 2, "n_head": 2, "d_model": 16}, 5, (8,)),
    "wavenet": ({"name": "wavenet", "stacks": 2, "layers_per_stack": 2, "residual_channels": 8, "gate_channels": 8,
                 "skip_channels": 16}, 5, (8,)),  # receptive field 7: the queues wrap within 8 variables
    "gru": ({"name": "gru", "n_layer": 2, "d_model": 16}, 5, (8,)),
    # images (C, H, W): the gated PixelCNN in grey and colour (R→G→B masks), and the plain one
    "pixelcnn-gated-grey": ({"name": "pixelcnn", "n_layer": 2, "hidden": 6, "head": 6, "first_kernel": 3}, 4, (1, 3, 4)),
    "pixelcnn-gated-rgb": ({"name": "pixelcnn", "n_layer": 2, "hidden": 6, "head": 6, "first_kernel": 3}, 4, (3, 3, 3)),
    "pixelcnn-plain-rgb": ({"name": "pixelcnn", "gated": False, "n_layer": 2, "hidden": 6, "head": 6,
                            "first_kernel": 3}, 4, (3, 3, 3)),
    # the classic families (pipeline/models/fvsbn.py, nade.py, made.py), multi-level here and
    # binary in ENUMERABLE; MADE in a random ordering of its own (the contract's positions are
    # in the model's ordering, so perturbing position j perturbs variable o_j) and as the
    # eval-mode mixture over 3 orderings
    "fvsbn": ({"name": "fvsbn"}, 5, (8,)),
    "nade": ({"name": "nade", "hidden": 6}, 4, (1, 3, 3)),
    "made": ({"name": "made", "hidden": [32, 24], "data_order_first": False, "seed": 3}, 4, (1, 3, 3)),
    "made-ensemble": ({"name": "made", "hidden": [24], "orderings": 3, "data_order_first": False}, 5, (8,)),
    "made-direct": ({"name": "made", "hidden": [6], "direct": True, "data_order_first": False}, 4, (1, 3, 3)),
}

# (vocab, shape) small enough to enumerate every input; sequence models use (3, (4,)).
ENUMERABLE = {"pixelcnn-gated-grey": (2, (1, 2, 2)), "pixelcnn-gated-rgb": (2, (3, 2, 2)),
              "pixelcnn-plain-rgb": (2, (3, 2, 2)), "fvsbn": (2, (6,)), "nade": (2, (1, 2, 3)),
              "made": (2, (1, 2, 3)), "made-ensemble": (2, (6,)),
              "made-direct": (2, (1, 2, 3))}

# Mixtures of several factorisations: their log_prob is no single product of forward's conditionals
# and greedy decoding depends on the member drawn (tests/unit/test_classic.py checks them against
# their members instead).
MIXTURES = {"made-ensemble"}


def tiny(name, vocab=None, shape=None, seed=0):
    cfg, v, s = FAMILIES[name]
    torch.manual_seed(seed)
    return build_model(cfg, vocab or v, shape or s).eval()


@pytest.mark.parametrize("name", FAMILIES)
def test_perturbing_a_variable_changes_only_later_conditionals(name):
    model = tiny(name)
    torch.manual_seed(1)
    x = torch.randint(0, model.vocab_size, (1, *model.shape))
    base = model.to_sequence(model(x))[0]
    for j in range(model.num_vars):
        seq = model.to_sequence(x).clone()
        seq[0, j] = (seq[0, j] + 1) % model.vocab_size
        logits = model.to_sequence(model(model.from_sequence(seq)))[0]
        change = (logits - base).abs().amax(-1)
        assert change[: j + 1].max() == 0, f"variable {j} leaked into an earlier or its own conditional"
        if j + 1 < model.num_vars:
            assert change[j + 1 :].max() > 1e-4, f"variable {j} changes no later conditional"


@pytest.mark.parametrize("name", FAMILIES)
def test_probabilities_over_all_sequences_sum_to_one(name):
    vocab, shape = ENUMERABLE.get(name, (3, (4,)))
    model = tiny(name, vocab=vocab, shape=shape)
    everything = torch.tensor(list(itertools.product(range(vocab), repeat=model.num_vars)))
    with torch.no_grad():
        total = model.log_prob(model.from_sequence(everything)).double().exp().sum().item()
    assert total == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("name", FAMILIES)
def test_incremental_logits_equal_the_full_forward_pass(name):
    model = tiny(name)
    x = torch.randint(0, model.vocab_size, (3, *model.shape))
    with torch.no_grad():
        full = model.to_sequence(model(x))
        seq = model.to_sequence(x)
        cache, logits = model.start(3)
        steps = [logits]
        for i in range(model.num_vars - 1):
            steps.append(model.step(cache, seq[:, i : i + 1]))
    torch.testing.assert_close(torch.stack(steps, 1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", FAMILIES)
def test_cached_sampling_equals_full_recompute_sampling(name):
    model = tiny(name)
    a = model.sample(4, generator=torch.Generator().manual_seed(7))
    b = model.sample(4, generator=torch.Generator().manual_seed(7), cached=False)
    assert torch.equal(a, b)


@pytest.mark.parametrize("name", FAMILIES)
def test_prefix_is_kept_and_top1_is_greedy(name):
    model = tiny(name)
    prefix = torch.tensor([[1, 2, 3]])
    out = model.to_sequence(model.sample(2, prefix=prefix, generator=torch.Generator().manual_seed(0)))
    assert torch.equal(out[:, :3], prefix.expand(2, -1))
    if name in MIXTURES:
        return
    greedy = model.sample(1, temperature=0)
    top1 = model.sample(1, top_k=1, generator=torch.Generator().manual_seed(3))
    assert torch.equal(greedy, top1)


@pytest.mark.parametrize("name", [name for name in FAMILIES if name not in MIXTURES])
def test_log_prob_is_the_sum_of_conditionals(name):
    model = tiny(name)
    x = torch.randint(0, model.vocab_size, (2, *model.shape))
    with torch.no_grad():
        logp = torch.log_softmax(model.to_sequence(model(x)), -1)
        manual = logp.gather(-1, model.to_sequence(x)[..., None]).squeeze(-1).sum(1)
        torch.testing.assert_close(model.log_prob(x), manual)
