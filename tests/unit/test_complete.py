"""Completing images with arbitrary missing parts (pipeline/complete.py): completions follow the
exact conditional p(missing | observed), its NLL is reported exactly, and a model that cannot
give that conditional is refused."""

import itertools
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import ArpipeError
from pipeline.codecs.image import ImageCodec
from pipeline.complete import complete_rows, load_mask
from pipeline.export import save_export
from pipeline.models import build_model
from tests.conftest import arpipe


def tiny(cfg, vocab=3, shape=(1, 2, 2), scale=3.0, seed=0):
    """A random model with sharpened conditionals, so the exact conditional is far from uniform."""
    torch.manual_seed(seed)
    model = build_model(cfg, vocab, shape).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(scale)
    return model


def exact_conditional(model, row, missing, order):
    """p(missing values | observed) for every filling, by enumerating the joint in `order`."""
    slots = missing.nonzero()[:, 0]
    fillings = list(itertools.product(range(model.vocab_size), repeat=len(slots)))
    x = row.repeat(len(fillings), 1)
    x[:, slots] = torch.tensor(fillings)
    logits = model.logits_in(model.from_data(x), order.to(torch.long))
    logp = torch.log_softmax(logits.float(), -1).gather(-1, model.from_data(x)[..., None]).flatten(1).sum(1)
    return fillings, torch.softmax(logp.double(), 0)


def test_completions_follow_the_exact_conditional_of_an_order_agnostic_made():
    """Observed: the 2 middle sub-pixels of 4 (a prefix of no fixed raster ordering). A MADE trained
    on random orderings builds masks for one that puts them first; 3000 completions of the two
    missing ones match the conditional enumerated from the model's joint in that ordering."""
    model = tiny({"name": "made", "hidden": [24, 24], "train_orderings": "random"})
    row = torch.tensor([2, 0, 1, 2])
    missing = torch.tensor([True, False, False, True])
    rows, nll, what = complete_rows(model, row, missing, 3000, torch.Generator().manual_seed(0))
    assert "new ordering" in what
    assert torch.equal(rows[:, 1:3], row[1:3].expand(3000, -1))  # the observed part stays
    fillings, p = exact_conditional(model, row, missing, torch.tensor([1, 2, 0, 3]))
    counts = torch.tensor([((rows[:, 0] == a) & (rows[:, 3] == b)).sum().item() for a, b in fillings]).double()
    chi2 = ((counts - 3000 * p) ** 2 / (3000 * p)).sum().item()
    assert chi2 < 26.1, f"chi-square {chi2:.1f} with 8 degrees of freedom (p < 0.001)"
    assert nll == pytest.approx(-math.log(p[fillings.index((2, 2))].item()), rel=1e-5)


def test_an_ensemble_completes_with_the_member_whose_ordering_starts_with_the_observed_part():
    model = tiny({"name": "made", "hidden": [16], "orderings": 3, "data_order_first": False, "seed": 1},
                 shape=(1, 2, 3))
    order = model.orderings[2]
    missing = torch.ones(6, dtype=torch.bool)
    missing[order[:2]] = False
    if any(not missing[o[:2]].any() for o in model.orderings[:2]):
        pytest.skip("another member starts with the same two variables")
    row = torch.tensor([0, 1, 2, 2, 1, 0])
    rows, nll, what = complete_rows(model, row, missing, 5)
    assert what.startswith("its ordering 2 of 3")
    assert torch.equal(rows[:, ~missing], row[~missing].expand(5, -1))
    fillings, p = exact_conditional(model, row, missing, order)
    truth = tuple(row[missing.nonzero()[:, 0]].tolist())
    assert nll == pytest.approx(-math.log(p[fillings.index(truth)].item()), rel=1e-5)


@pytest.mark.parametrize("cfg", [{"name": "gpt", "n_layer": 1, "n_head": 1, "d_model": 8},
                                 {"name": "pixelcnn", "n_layer": 1, "hidden": 4, "head": 4, "first_kernel": 3},
                                 {"name": "made", "hidden": [8]}])
def test_a_model_that_cannot_give_the_conditional_refuses_and_a_prefix_works(cfg):
    model = tiny(cfg, shape=(1, 2, 2))
    row = torch.tensor([1, 2, 0, 1])
    left = torch.from_numpy(load_mask("left-half", 2, 2, 1).reshape(-1))
    with pytest.raises(ArpipeError, match="cannot complete this mask exactly.*What would work"):
        complete_rows(model, row, left, 2)
    bottom = torch.from_numpy(load_mask("bottom-half", 2, 2, 1).reshape(-1))
    rows, nll, _ = complete_rows(model, row, bottom, 2)
    assert torch.equal(rows[:, :2], row[:2].expand(2, -1)) and nll > 0


def test_masks_from_patterns_and_files(tmp_path):
    assert load_mask("left-half", 2, 4, 1)[:, :, 0].tolist() == [[True, True, False, False]] * 2
    assert load_mask("center-square", 4, 4, 3).sum() == 4 * 3
    assert load_mask("random-50%", 4, 4, 1, seed=3).sum() == 8
    Image.fromarray(np.array([[255, 0], [0, 255]], dtype=np.uint8)).resize((8, 8), Image.Resampling.NEAREST).save(
        tmp_path / "mask.png")
    assert load_mask(str(tmp_path / "mask.png"), 2, 2, 1)[..., 0].tolist() == [[True, False], [False, True]]
    np.save(tmp_path / "mask.npy", np.ones((2, 3), dtype=bool))
    with pytest.raises(ArpipeError, match=r"has shape \(2, 3\)"):
        load_mask(str(tmp_path / "mask.npy"), 2, 2, 1)
    with pytest.raises(ArpipeError, match="not one of the patterns"):
        load_mask("upper-third", 2, 2, 1)


def test_complete_command_writes_the_grid_and_the_nll(tmp_path):
    codec = ImageCodec(8, 8, 1, 16)
    cfg = {"name": "made", "hidden": [32], "train_orderings": "random"}
    torch.manual_seed(0)
    model = build_model(cfg, 16, (1, 8, 8))
    export = save_export(tmp_path / "export", {k: v.detach() for k, v in model.named_parameters()}, cfg, 16,
                         (1, 8, 8), codec.config(), tmp_path, {})
    digits = np.load("pipeline/bundled/digits.npz")
    Image.fromarray(digits[digits.files[0]][0].astype(np.uint8)).save(tmp_path / "digit.png")
    result = arpipe("complete", "--model", export, "--input", tmp_path / "digit.png", "--mask", "left-half",
                    "-n", 3, "--out", tmp_path / "out")
    assert "bits/dim" in result.stdout
    report = json.loads((tmp_path / "out" / "complete.json").read_text())
    assert report["missing"] == 32 and report["nll_nats"] > 0
    assert Image.open(tmp_path / "out" / "complete.png").size == (5 * 66 + 2, 68)
