"""The factorisation contract every model family must keep (see pipeline/models/base.py):
(a) perturbing x_j changes no conditional at positions <= j and does change a later one,
(b) for a tiny vocabulary and length, probabilities over all sequences sum to 1,
(c) a family's own incremental path (KV cache, recurrent state, queues, running sums) equals the
    full forward pass, and log_prob is the product of that path's conditionals,
(d) samples beyond the model's shape: a sliding window (GPT, Llama) draws each variable from
    the window that sliding-window evaluation scores it in; WaveNet and GRU run on natively;
    fixed-shape models refuse,
(e) the training loss `forward(x, loss=True)` is the cross-entropy of the logits, and activation
    checkpointing changes no loss and no gradient."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from pipeline import ArpipeError
from pipeline.models import build_model
from pipeline.models.base import ARModel

# (model config, vocab, shape): a tiny member of every family.
FAMILIES = {
    "gpt": ({"name": "gpt", "n_layer": 2, "n_head": 2, "d_model": 16}, 5, (8,)),
    # grouped-query attention (2 query heads per key/value head), untied output layer
    "llama": ({"name": "llama", "n_layer": 2, "n_head": 4, "n_kv_head": 2, "d_model": 16, "tie_embeddings": False},
              5, (8,)),
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
# (tests/unit/test_classic.py checks them against their members too).
MIXTURES = {"made-ensemble"}
# The families with an incremental path of their own (start/step); the others recompute the full
# pass for every variable (PixelCNN: see pipeline/models/pixelcnn.py), so (c) says nothing of them.
INCREMENTAL = [name for name in FAMILIES if "pixelcnn" not in name]
# How each 1-D family samples beyond its shape (base.py's long_samples)
LONG_SAMPLES = {"gpt": "window", "llama": "window", "wavenet": "native", "gru": "native"}


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


def test_the_families_without_an_incremental_path_are_the_ones_named():
    own = {name for name in FAMILIES if type(tiny(name)).step is not ARModel.step}
    assert own == set(INCREMENTAL)


@pytest.mark.parametrize("name", INCREMENTAL)
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


@pytest.mark.parametrize("name", INCREMENTAL)
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
    with torch.no_grad():  # no exact ties, which top-1 would keep all of (FVSBN's biases start at 0)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.01)
    # the same generator: a mixture draws the same member for both, then decodes it greedily
    greedy = model.sample(3, temperature=0, generator=torch.Generator().manual_seed(3))
    top1 = model.sample(3, top_k=1, generator=torch.Generator().manual_seed(3))
    assert torch.equal(greedy, top1)


def step_log_probs(model, x) -> torch.Tensor:
    """(batch,) Σ_i log p(x_i | x_<i) from the family's start/step path (the recompute for PixelCNN),
    in its current ordering."""
    seq = model.to_sequence(x)
    cache, logits = model.start(len(x))
    total = torch.zeros(len(x), dtype=torch.float64)
    for i in range(model.num_vars):
        total += torch.log_softmax(logits.double(), -1).gather(-1, seq[:, i : i + 1]).squeeze(-1)
        if i + 1 < model.num_vars:
            logits = model.step(cache, seq[:, i : i + 1])
    return total


@pytest.mark.parametrize("name", FAMILIES)
def test_log_prob_is_the_product_of_the_step_conditionals(name):
    """log_prob reads forward's logits; start/step build the conditionals one variable at a time
    (for a mixture: per member, then log((1/K) Σ_k p_k))."""
    model = tiny(name)
    x = torch.randint(0, model.vocab_size, (3, *model.shape), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        if name in MIXTURES:
            members = []
            for order in model.orderings:
                model.order = order
                members.append(step_log_probs(model, x))
            model.order = model.orderings[0]
            expected = torch.logsumexp(torch.stack(members), 0) - math.log(len(members))
        else:
            expected = step_log_probs(model, x)
        torch.testing.assert_close(model.log_prob(x).double(), expected, atol=1e-4, rtol=1e-5)


# --- (d) samples beyond the model's shape
def test_each_family_says_how_it_samples_beyond_its_shape():
    assert {name: tiny(name).long_samples for name in FAMILIES if tiny(name).long_samples} == LONG_SAMPLES


@pytest.mark.parametrize("name", [name for name, kind in LONG_SAMPLES.items() if kind == "window"])
@pytest.mark.parametrize("stride", [1, 3, 8])
def test_a_long_sample_draws_each_variable_from_its_sliding_window(name, stride):
    """Greedy decoding to 29 variables with an 8-variable context and an 11-variable prompt: every
    variable is the argmax of a full pass over the window of 8 that holds it — the first
    window, or the earliest of the windows starting at stride, 2·stride, … that reaches it, the
    windows sliding-window evaluation scores with this stride — so it saw at least 8 − stride
    variables and no position beyond 7."""
    model = tiny(name)
    T, length = model.num_vars, 29
    prefix = torch.randint(0, model.vocab_size, (2, 11), generator=torch.Generator().manual_seed(4))
    out = model.sample(2, length=length, stride=stride, prefix=prefix, temperature=0)
    assert out.shape == (2, length) and torch.equal(out[:, :11], prefix)
    with torch.no_grad():
        for i in range(11, length):
            first = 0 if i < T else math.ceil((i - T + 1) / stride) * stride
            assert i < T or i - first >= T - stride
            window = F.pad(out[:, first : first + T], (0, max(0, first + T - length)))  # causal: padding is unseen
            assert torch.equal(out[:, i], model(window)[:, i - first].argmax(-1)), f"variable {i}"
    assert len(out[0].unique()) > 1  # not a constant sequence that any window would give


@pytest.mark.parametrize("name", [name for name, kind in LONG_SAMPLES.items() if kind == "window"])
def test_a_long_sample_through_the_kv_cache_equals_the_recomputed_windows(name):
    model = tiny(name)
    a = model.sample(3, length=30, stride=3, generator=torch.Generator().manual_seed(7))
    b = model.sample(3, length=30, stride=3, generator=torch.Generator().manual_seed(7), cached=False)
    assert torch.equal(a, b)


@pytest.mark.parametrize("name", [name for name, kind in LONG_SAMPLES.items() if kind == "native"])
def test_a_long_sample_runs_on_natively(name):
    """WaveNet's queues and GRU's state beyond the training shape give what the full pass of the
    same weights gives at the sample's length."""
    model = tiny(name)
    length = 3 * model.num_vars + 5
    long = tiny(name, shape=(length,))
    long.load_state_dict(model.state_dict())
    a = model.sample(2, length=length, generator=torch.Generator().manual_seed(7))
    b = long.sample(2, generator=torch.Generator().manual_seed(7), cached=False)
    assert a.shape == (2, length) and torch.equal(a, b)


@pytest.mark.parametrize("name", [name for name in FAMILIES if name not in LONG_SAMPLES])
def test_fixed_shape_models_refuse_other_lengths(name):
    model = tiny(name)
    with pytest.raises(ArpipeError, match=f"samples exactly its shape .* \\({model.num_vars} variables\\), not "
                                          f"{model.num_vars + 1}; longer samples need a sequence model"):
        model.sample(1, length=model.num_vars + 1)


def test_a_1d_model_on_images_refuses_other_lengths():
    model = build_model(FAMILIES["gpt"][0], 4, (1, 2, 4))
    with pytest.raises(ArpipeError, match=r"samples exactly its shape \(1, 2, 4\)"):
        model.sample(1, length=12)


# --- (e) the training loss and activation checkpointing
@pytest.mark.parametrize("name", FAMILIES)
def test_the_training_loss_is_the_cross_entropy_of_the_logits(name):
    """What the trainer computed from the logits before forward(x, loss=True) existed, in
    training mode (MADE draws its ordering per forward: the same seed draws the same one)."""
    model = tiny(name).train()
    x = torch.randint(0, model.vocab_size, (3, *model.shape))
    torch.manual_seed(5)
    loss = model(x, loss=True)
    torch.manual_seed(5)
    logits = model.to_sequence(model(x))
    expected = F.cross_entropy(logits.float().flatten(0, 1), model.to_sequence(x).flatten())
    assert loss.dtype == torch.float32 and loss.shape == ()
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-6)


# the families with blocks to recompute; the others refuse (the two tests below pin both lists)
CHECKPOINTED = ["gpt", "llama", "wavenet", "pixelcnn-gated-grey", "pixelcnn-gated-rgb", "pixelcnn-plain-rgb"]


def saved_bytes_and_gradients(model, x, seed) -> tuple[int, torch.Tensor, dict]:
    """A training loss and its gradients, and the bytes autograd kept for the backward pass."""
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    model.zero_grad()
    torch.manual_seed(seed)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(x, loss=True)
    loss.backward()
    return sum(saved), loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}


@pytest.mark.parametrize("name", CHECKPOINTED)
def test_activation_checkpointing_changes_no_loss_and_no_gradient(name):
    cfg, vocab, shape = FAMILIES[name]
    cfg = {**cfg, "n_layer": 6} if "n_layer" in cfg else cfg  # blocks hold most of the activations
    if name == "gpt":
        cfg = {**cfg, "dropout": 0.3}  # the recomputed blocks must draw the same dropout masks
    torch.manual_seed(0)
    model = build_model(cfg, vocab, shape).train()
    x = torch.randint(0, vocab, (4, *shape), generator=torch.Generator().manual_seed(1))
    kept, loss, grads = saved_bytes_and_gradients(model, x, seed=3)
    model.set_activation_checkpointing(True)
    kept_checkpointed, loss_checkpointed, grads_checkpointed = saved_bytes_and_gradients(model, x, seed=3)
    assert kept_checkpointed < kept / 2  # the blocks' activations are not kept
    assert torch.equal(loss_checkpointed, loss)
    for key in grads:
        torch.testing.assert_close(grads_checkpointed[key], grads[key], rtol=0, atol=1e-6, msg=key)
    if name == "gpt":  # dropout is on: another seed gives another loss
        assert not torch.equal(saved_bytes_and_gradients(model, x, seed=4)[1], loss)


@pytest.mark.parametrize("name", [name for name in FAMILIES if name not in CHECKPOINTED])
def test_families_without_blocks_refuse_activation_checkpointing(name):
    with pytest.raises(ArpipeError, match="train.activation_checkpointing: .* has no blocks"):
        tiny(name).set_activation_checkpointing(True)
