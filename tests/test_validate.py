"""Input checks say what was expected and what arrived."""

import numpy as np
import pytest
import torch

from dgmlab import validate as V
from dgmlab.base import GenerativeModel


def test_check_tensor_accepts_good_input_and_converts_arrays():
    x = V.check_tensor(np.zeros((3, 64), dtype=np.float32), "x", shape=(None, 64), kind="float", min=0, max=1)
    assert isinstance(x, torch.Tensor) and x.shape == (3, 64)
    assert V.check_tensor(torch.tensor([0.0, 3.0]), whole=True).tolist() == [0.0, 3.0]  # whole floats are fine


@pytest.mark.parametrize("kwargs,x,message", [
    ({"shape": (None, 64)}, torch.zeros(3, 63), r"shape \(N, 64\), got \(3, 63\)"),
    ({"ndim": 2}, torch.zeros(3), "2 dimensions, got 1"),
    ({"kind": "float"}, torch.zeros(2, dtype=torch.long), "float values.*x.float"),
    ({"kind": "integer"}, torch.zeros(2), "integer values"),
    ({"min": 0, "max": 1}, torch.tensor([0.5, 2.0]), r"lie in \[0, 1\].*\[0.5, 2\]"),
    ({"finite": True}, torch.tensor([1.0, float("nan")]), "NaN"),
    ({"whole": True}, torch.tensor([1.0, 0.5]), "whole numbers"),
])
def test_check_tensor_messages(kwargs, x, message):
    with pytest.raises((ValueError, TypeError), match=message):
        V.check_tensor(x, "x", **kwargs)


def test_other_checks():
    with pytest.raises(TypeError, match="torch.Tensor"):
        V.check_tensor("pixels", "x")
    with pytest.raises(ValueError, match="sum to 1"):
        V.check_probabilities(torch.tensor([0.5, 0.6]))
    with pytest.raises(ValueError, match="negative"):
        V.check_probabilities(torch.tensor([1.5, -0.5]))
    assert V.check_probabilities(torch.tensor([0.25, 0.75])).sum() == 1
    with pytest.raises(TypeError, match="integer"):
        V.check_positive_int(2.0, "n")
    with pytest.raises(ValueError, match="positive"):
        V.check_positive_int(0, "n")
    assert V.check_positive_int(0, "n", allow_zero=True) == 0
    with pytest.raises(ValueError, match="one of 'a', 'b'"):
        V.check_choice("c", "letter", ("a", "b"))


def test_model_api_defaults():
    class Coin(GenerativeModel):
        def __init__(self):
            super().__init__()
            self.logit = torch.nn.Parameter(torch.tensor(0.0))

        def log_prob(self, x):
            return torch.distributions.Bernoulli(logits=self.logit).log_prob(x)

    coin = Coin()
    x = torch.tensor([1.0, 0.0, 1.0])
    assert coin.loss(x).item() == pytest.approx(-coin.log_prob(x).mean().item())
    assert coin.num_parameters() == 1 and coin.device == torch.device("cpu")
    assert not coin.log_prob_is_bound
    with pytest.raises(NotImplementedError, match="Coin does not define sample"):
        coin.sample(3)


def test_value_checks_switch_off_and_shape_checks_stay():
    x = torch.tensor([0.5, 3.0])
    with pytest.raises(ValueError, match="should lie in"):
        V.check_tensor(x, "x", min=0, max=1)
    with V.validation(False):
        assert not V.validation_enabled()
        assert V.check_tensor(x, "x", min=0, max=1, whole=True, finite=True) is x  # no read of the data
        with pytest.raises(ValueError, match="shape"):
            V.check_tensor(x, "x", shape=(3,), min=0, max=1)
        with V.validation(True):
            with pytest.raises(ValueError, match="whole numbers"):
                V.check_tensor(x, "x", whole=True)
        assert not V.validation_enabled()
    assert V.validation_enabled()
