import pytest
import torch

from pipeline import ArpipeError
from pipeline.models import build_model


def test_build_model_defaults_and_shape():
    model = build_model({"name": "gpt"}, 100, (16,))
    assert model(torch.zeros(2, 16, dtype=torch.long)).shape == (2, 16, 100)
    assert model.wte.weight is model.head.weight  # tied


@pytest.mark.parametrize("cfg, message", [
    ({"name": "gtp"}, "model.name 'gtp' is not one of"),
    ({"name": "gpt", "n_layers": 2}, "model.n_layers: Extra inputs are not permitted"),
    ({"name": "gpt", "n_layer": "two"}, "model.n_layer: Input should be a valid integer"),
])
def test_bad_model_config_names_the_key(cfg, message):
    with pytest.raises(ArpipeError, match=message):
        build_model(cfg, 10, (4,))


def test_prefix_longer_than_context_is_an_error():
    model = build_model({"name": "gpt", "n_layer": 1, "n_head": 1, "d_model": 8}, 10, (4,))
    with pytest.raises(ValueError, match="longer than"):
        model.sample(1, prefix=torch.zeros(1, 5, dtype=torch.long))


def test_a_trained_step_lowers_the_loss():
    torch.manual_seed(0)
    model = build_model({"name": "gpt", "n_layer": 1, "n_head": 2, "d_model": 32}, 7, (12,))
    x = (torch.arange(12)[None] % 7).expand(8, -1)  # a deterministic sequence is learnable
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first = -model.log_prob(x).mean().item()
    for _ in range(50):
        loss = model.token_nll(x).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert -model.log_prob(x).mean().item() < first / 4
