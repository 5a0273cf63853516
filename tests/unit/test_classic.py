"""The classic models (FVSBN, NADE, MADE) beyond the shared contract (test_model_contract.py runs
causality, normalisation and cached sampling on them): MADE's masks and orderings, order-agnostic
training's state, NADE's one-pass computation, the exact ensemble over orderings, eval and
completions for a model with its own ordering, and the classic-models recipe."""

import itertools
import math

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import ArpipeError
from pipeline.codecs.image import ImageCodec
from pipeline.config import load_config
from pipeline.data.shards import Shards
from pipeline.eval.nll import evaluate_nll
from pipeline.eval.samples import complete_in_model_order, write_samples
from pipeline.export import load_export, save_export
from pipeline.models import build_model, check_ordering
from pipeline.recipes import load_recipe
from tests.conftest import REPO, arpipe

DIGITS = REPO / "pipeline" / "bundled" / "digits.npz"


def made(vocab=2, shape=(6,), torch_seed=0, **cfg):
    torch.manual_seed(torch_seed)
    return build_model({"name": "made", **cfg}, vocab, shape).eval()


def everything(model) -> torch.Tensor:
    """Every input of a tiny model, in its layout."""
    rows = torch.tensor(list(itertools.product(range(model.vocab_size), repeat=model.num_vars)))
    return model.from_data(rows)


def sharpen(model, factor: float):
    """Scale the weights so the members' distributions are far apart (and tests can tell them apart)."""
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(factor)
    return model


# --- MADE: masks and orderings
def connectivity(model, order) -> torch.Tensor:
    """(D, D) bool: output variable d is reachable from input variable d' through the layer masks
    (and the direct weights' mask, if any)."""
    D, V = model.num_vars, model.vocab_size
    masks = model.masks(order)
    direct = masks.pop().double() if model.direct is not None else 0
    paths = None
    for mask in masks:
        paths = mask.double() if paths is None else mask.double() @ paths
    return ((paths + direct).view(D, V, D, V) > 0).any(3).any(1)


def reachable_by_the_degree_rule(D: int, hidden: list[int], order: torch.Tensor) -> torch.Tensor:
    """(D, D) bool from MADE's rule alone (Germain et al., 2015): hidden unit k of a layer of width
    H has degree ⌊k·(D−1)/H⌋; input d' reaches output d iff degrees r(d') ≤ m_1 ≤ … ≤ m_L < r(d)
    exist among the layers' units. The smallest admissible degree in each layer decides."""
    rank = torch.argsort(order).tolist()
    layers = [sorted({k * (D - 1) // width for k in range(width)}) for width in hidden]
    reach = torch.zeros(D, D, dtype=torch.bool)
    for source in range(D):
        m = rank[source]
        for degrees in layers:
            m = next((d for d in degrees if d >= m), None)
            if m is None:
                break
        for target in range(D):
            reach[target, source] = m is not None and m < rank[target]
    return reach


@pytest.mark.parametrize("direct", [False, True])
@pytest.mark.parametrize("hidden", [[40], [40, 30], [13, 40, 25, 13], [3], [5, 2]])
@pytest.mark.parametrize("trial", range(3))
def test_made_masks_connect_each_output_exactly_to_the_variables_before_it(hidden, trial, direct):
    D = 14
    model = made(vocab=3, shape=(D,), hidden=hidden, direct=direct)
    order = torch.randperm(D, generator=torch.Generator().manual_seed(trial))
    rank = torch.argsort(order)
    allowed = rank[None, :] < rank[:, None]  # [d, d']: d' comes before d in the ordering
    reach = connectivity(model, order)
    expected = allowed if direct else reachable_by_the_degree_rule(D, hidden, order)
    assert torch.equal(reach, expected)
    assert not (expected & ~allowed).any(), "the rule itself: an output sees its own or a later variable"
    if min(hidden) < D - 1 and not direct:  # narrow layers: some earlier variables are out of reach
        assert (allowed & ~reach).any()


@pytest.mark.parametrize("cfg", [{"hidden": [48]}, {"hidden": [32, 32, 32], "orderings": 4, "data_order_first": False},
                                 {"hidden": [8], "orderings": 2, "direct": True}])
def test_made_conditionals_follow_its_ordering(cfg):
    """Changing x at variable o_j changes no conditional at o_0..o_j and some later one, in the
    layout itself (not through to_sequence), for each of the model's orderings."""
    model = made(vocab=3, shape=(1, 3, 4), **cfg)
    x = torch.randint(0, 3, (1, 1, 3, 4), generator=torch.Generator().manual_seed(1))
    assert torch.equal(model.orderings[0], torch.arange(12)) == model.cfg.data_order_first
    for order in model.orderings:
        with torch.no_grad():
            base = model.logits_in(x, order).flatten(1, 3)[0]
            for j, var in enumerate(order.tolist()):
                y = x.flatten(1).clone()
                y[0, var] = (y[0, var] + 1) % 3
                change = (model.logits_in(y.view_as(x), order).flatten(1, 3)[0] - base).abs().amax(-1)
                assert change[order[: j + 1]].max() == 0
                if j + 1 < len(order):
                    assert change[order[j + 1 :]].max() > 0  # masked paths give exactly 0
    # to_sequence reads the layout in the current ordering (o_0 in eval mode)
    assert torch.equal(model.to_sequence(x), x.flatten(1)[:, model.orderings[0]])
    assert torch.equal(model.from_sequence(model.to_sequence(x)), x)


def test_made_orderings_come_from_its_config_and_travel_with_the_weights(tmp_path):
    cfg = {"name": "made", "hidden": [8], "orderings": 3, "data_order_first": False, "seed": 5}
    a, b = made(shape=(1, 2, 3), torch_seed=0, **cfg), made(shape=(1, 2, 3), torch_seed=1, **cfg)
    assert torch.equal(a.orderings, b.orderings)  # the training seed draws weights, not orderings
    assert len({tuple(o.tolist()) for o in a.orderings}) == 3
    assert not torch.equal(a.orderings, made(shape=(1, 2, 3), **{**cfg, "seed": 6}).orderings)
    codec = ImageCodec(2, 3, 1, 2)
    export = save_export(tmp_path / "export", dict(a.named_parameters()), cfg, 2, (1, 2, 3), codec.config(),
                         tmp_path, {"step": 0})
    loaded, _, _ = load_export(export)
    assert torch.equal(loaded.orderings, a.orderings)
    x = everything(a)
    with torch.no_grad():
        torch.testing.assert_close(loaded.log_prob(x), a.log_prob(x))


@pytest.mark.parametrize("mode", ["fixed", "random"])
def test_training_draws_an_ordering_per_forward_and_to_sequence_keeps_it(mode):
    model = made(shape=(8,), hidden=[32], orderings=3, train_orderings=mode, data_order_first=False).train()
    x = torch.randint(0, 2, (2, 8), generator=torch.Generator().manual_seed(0))
    fixed = {tuple(o.tolist()) for o in model.orderings}
    seen = set()
    torch.manual_seed(0)
    for _ in range(12):
        logits = model.to_sequence(model(x))  # what the trainer does right after the forward
        order = model.order.clone()
        seen.add(tuple(order.tolist()))
        targets = model.to_sequence(x)
        assert torch.equal(targets, x[:, order])
        # position j's conditional in the sequence ignores sequence positions >= j
        j = 4
        seq = targets.clone()
        seq[:, j:] = 1 - seq[:, j:]
        again = model.to_sequence(model.logits_in(model.from_sequence(seq), model.order))
        assert torch.equal(again[:, : j + 1], logits[:, : j + 1]) and not torch.equal(again, logits)
    if mode == "fixed":
        assert seen <= fixed and len(seen) > 1
    else:
        assert len(seen - fixed) > 3  # new orderings, so new masks
    model.eval()
    assert torch.equal(model.order, model.orderings[0])


# --- NADE
def test_nade_one_pass_equals_the_per_conditional_formula():
    torch.manual_seed(0)
    D, V, H = 10, 3, 7
    model = build_model({"name": "nade", "hidden": H}, V, (D,)).eval()
    x = torch.randint(0, V, (4, D))
    with torch.no_grad():
        fast = model(x)
        onehot = torch.nn.functional.one_hot(x, V).float()  # (B, D, V)
        for i in range(D):  # a_i = c + Σ_{j<i} W_j[x_j] from scratch, for each conditional
            a = model.c + torch.einsum("bjv,jvh->bh", onehot[:, :i], model.W[:i])
            naive = torch.sigmoid(a) @ model.V[i].T + model.b[i]
            torch.testing.assert_close(fast[:, i], naive, atol=1e-5, rtol=1e-5)


# --- the ensemble over orderings
def members(model) -> list:
    """Each ordering of an ensemble as a one-ordering MADE with the same weights."""
    out = []
    for order in model.orderings:
        single = build_model({**model.cfg.model_dump(), "orderings": 1}, model.vocab_size, model.shape).eval()
        single.load_state_dict({**model.state_dict(), "orderings": order[None]})
        single.train().eval()  # re-enter eval so the current ordering is the loaded one
        out.append(single)
    return out


def test_ensemble_log_prob_is_the_log_of_the_mean_member_probability():
    model = sharpen(made(vocab=3, shape=(4,), hidden=[20, 20], orderings=4, data_order_first=False), 3.0)
    x = everything(model)
    with torch.no_grad():
        mixture = model.log_prob(x)
        per_member = torch.stack([m.log_prob(x).double() for m in members(model)])  # products of conditionals
    torch.testing.assert_close(mixture, per_member.exp().mean(0).log())
    assert mixture.double().exp().sum().item() == pytest.approx(1.0, abs=1e-6)
    for lp in per_member:
        assert lp.exp().sum().item() == pytest.approx(1.0, abs=1e-5)
    # a real mixture: neither a member nor the average of the members' log-probabilities (or logits)
    assert (mixture - per_member[0]).abs().max() > 0.1 and (mixture - per_member.mean(0)).abs().max() > 0.1
    # token_nll: a (batch, D) table whose rows sum to -log p(x), what eval adds up
    nll = model.token_nll(x)
    assert nll.shape == (len(x), 4)
    torch.testing.assert_close(nll.sum(1), -mixture, rtol=0, atol=0)


def test_ensemble_samples_follow_its_mixture_probabilities():
    model = sharpen(made(vocab=2, shape=(3,), hidden=[16], orderings=3, data_order_first=False), 4.0)
    x = everything(model)
    with torch.no_grad():
        p = model.log_prob(x).double().exp()
        p0 = members(model)[0].log_prob(x).double().exp()
    assert 0.5 * (p - p0).abs().sum() > 0.1  # member 0 alone would fail this test
    n = 40_000
    samples = model.sample(n, generator=torch.Generator().manual_seed(0))
    index = (samples * torch.tensor([4, 2, 1])).sum(1)  # rows of `everything` are binary numbers
    counts = torch.bincount(index, minlength=8).double()
    chi2 = ((counts - n * p) ** 2 / (n * p)).sum().item()
    assert chi2 < 24.3, f"chi-square {chi2:.1f} with 7 degrees of freedom (p < 0.001)"
    assert 0.5 * (counts / n - p).abs().sum() < 0.01


# --- eval and completions for a model with its own ordering
@pytest.fixture(scope="module")
def binary_digits(tmp_path_factory):
    out = tmp_path_factory.mktemp("classic") / "digits"
    arpipe("shard", "image", "--input", DIGITS, "--out", out, "--levels", "2", "--val-fraction", "0.05")
    return Shards(out)


def test_eval_of_an_ensemble_is_the_exact_mixture_likelihood(binary_digits):
    model = made(shape=(1, 8, 8), hidden=[64], orderings=3, data_order_first=False)
    result = evaluate_nll(model, binary_digits, "val", 0, 16)
    rows = []
    for shard, entry in binary_digits.chunks("val"):
        tokens, offsets = binary_digits.read_chunk(shard, entry["key"])
        rows += [tokens[a:b] for a, b in zip(offsets[:-1], offsets[1:])]
    x = model.from_data(torch.from_numpy(np.stack(rows).astype(np.int64)))
    with torch.no_grad():
        nats = -model.log_prob(x).sum().item()
    assert result["items"] == len(rows) and result["dims"] == 64 * len(rows)
    assert result["nats"] == pytest.approx(nats, rel=1e-7)  # batches of 16 round differently
    assert result["nats_per_item"] == pytest.approx(result["nats"] / len(rows), rel=1e-12)
    assert result["bits_per_dim"] == pytest.approx(result["nats"] / (64 * len(rows) * math.log(2)), rel=1e-12)


def test_models_with_their_own_ordering_refuse_packed_data():
    model = made(shape=(32,), hidden=[8])
    with pytest.raises(ArpipeError, match="MADE orders the variables itself and needs fixed-length items"):
        check_ordering(model, {"modality": "text", "vocab_size": 2}, "shards/text")
    check_ordering(model, ImageCodec(4, 8, 1, 2).config(), "shards/images")
    check_ordering(build_model({"name": "nade"}, 2, (32,)), {"modality": "text"}, "shards/text")  # data order


def test_completions_of_a_model_with_its_own_ordering_keep_exactly_the_given_variables(tmp_path):
    codec = ImageCodec(4, 4, 3, 4, "snake")
    model = made(vocab=4, shape=codec.model_shape(0), hidden=[64], orderings=2, data_order_first=False)
    items = [np.random.default_rng(i).integers(0, 4, 48) for i in range(3)]
    rows, given = complete_in_model_order(model, items, 20, generator=torch.Generator().manual_seed(0))
    expected = np.zeros(48, bool)
    expected[model.orderings[0][:20].numpy()] = True  # the first 20 in the model's ordering, scattered
    assert np.array_equal(given.numpy(), expected)
    assert not np.array_equal(expected, np.arange(48) < 20)
    for row, item in zip(rows.numpy(), items):
        assert np.array_equal(row[expected], item[expected])
    [grid] = write_samples(model, codec, items, tmp_path, samples=0, temperature=1.0, top_k=None, seed=0,
                           prompt_len=20)
    shown = np.asarray(Image.open(grid))
    scale, pad = 64 // 4, 2
    cells = [shown[pad : pad + 4 * scale : scale, x0 : x0 + 4 * scale : scale]
             for x0 in (pad, pad + 4 * scale + pad)]  # the first completion and its map of given sub-pixels
    given_map = expected[codec.inv].astype(np.uint8) * 255  # the row's mask in the (H, W, C) image
    assert np.array_equal(cells[1], given_map.reshape(4, 4, 3))
    assert np.array_equal(cells[0], codec.to_pixels(rows[:1].numpy())[0])
    with pytest.raises(ArpipeError, match="need whole items of 48 variables"):
        complete_in_model_order(model, [item[:20] for item in items], 20)


# --- bad input
def test_bad_input_is_a_clear_error():
    with pytest.raises(ArpipeError, match=r"fvsbn on 784 variables × 256 levels needs 4\.0e\+10 weights"):
        build_model({"name": "fvsbn"}, 256, (1, 28, 28))
    with pytest.raises(ArpipeError, match="model.hidden: List should have at least 1 item"):
        build_model({"name": "made", "hidden": []}, 2, (4,))
    with pytest.raises(ArpipeError, match="model.orderings: Input should be greater than or equal to 1"):
        build_model({"name": "made", "orderings": 0}, 2, (4,))
    with pytest.raises(ArpipeError, match="model.depth: Extra inputs are not permitted"):
        build_model({"name": "nade", "depth": 2}, 2, (4,))
    for name in ("fvsbn", "nade", "made"):
        with pytest.raises(ArpipeError, match=r"token ids must lie in 0\.\.1, found 0\.\.2"):
            build_model({"name": name}, 2, (3,))(torch.tensor([[0, 2, 1]]))


# --- the recipe
def test_classic_recipe_builds_every_variant():
    recipe = load_recipe(REPO / "configs" / "image-classic.yaml")
    assert recipe.metric == "nats_per_item"
    assert "--levels" in recipe.shard.args and recipe.shard.args[recipe.shard.args.index("--levels") + 1] == "2"
    names = set()
    for variant in recipe.variants.values():
        cfg = load_config(REPO / (variant.config or recipe.config), [*recipe.overrides, *variant.overrides])
        model = build_model(cfg.model, 2, (1, 28, 28))
        names.add(cfg.model["name"])
        assert model.num_vars == 784
    assert names == {"fvsbn", "nade", "made", "pixelcnn"}
