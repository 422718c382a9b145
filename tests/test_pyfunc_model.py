"""The pyfunc model's own network (torch only, no lmexp) against lmexp's model."""

from __future__ import annotations

import pytest
import torch

from lmexp.config import DropoutConfig
from lmexp.models import rnn as lmexp_model
from lmexp.models.rnn import RNNLanguageModel
from lmexp.tracking import pyfunc_model
from lmexp.tracking.pyfunc_model import WordRNN

# Fast, in-process tests of the library: the unit lane (pytest -m unit).
pytestmark = pytest.mark.unit


def test_the_standalone_model_knows_every_cell_lmexp_trains():
    """pyfunc_model.py cannot import lmexp, so it keeps its own cell table: the same one."""
    assert pyfunc_model.CELLS == lmexp_model.CELLS


@pytest.mark.parametrize("cell", sorted(lmexp_model.CELLS))
@pytest.mark.parametrize("kind", ["none", "standard", "variational"])
def test_word_rnn_gives_lmexp_models_logits_for_every_cell_and_dropout_kind(kind, cell):
    torch.manual_seed(0)
    dropout = DropoutConfig(kind=kind, dp_keep_prob=0.5)
    model = RNNLanguageModel(20, 16, 3, 0.1, dropout=dropout, cell=cell).eval()
    tokens = torch.randint(0, 20, (12, 2))
    expected, state = model(tokens, model.init_state(2))
    logits, plain_state = WordRNN(model.state_dict(), num_layers=3, cell=cell)(tokens)
    torch.testing.assert_close(logits, expected)
    torch.testing.assert_close(plain_state, state)


@pytest.mark.parametrize("cell", sorted(lmexp_model.CELLS))
def test_word_rnn_gives_the_logits_of_a_model_whose_layers_differ_in_size(cell):
    """model.embedding_size other than hidden_size (AWD-LSTM's 400/1150/400): one module per
    layer, the last giving the embedding's size to the tied softmax; logits equal over two
    windows, the state carried."""
    torch.manual_seed(0)
    dropout = DropoutConfig(kind="variational", dp_keep_prob=0.5)
    model = RNNLanguageModel(
        20, 16, 3, 0.1, dropout=dropout, cell=cell, tie_weights=True, embedding_size=6
    ).eval()
    assert [(m.input_size, m.hidden_size) for m in model.layers] == [(6, 16), (16, 16), (16, 6)]
    plain = WordRNN(model.state_dict(), num_layers=3, cell=cell)
    state, plain_state = model.init_state(2), None
    for _ in range(2):
        tokens = torch.randint(0, 20, (7, 2))
        expected, state = model(tokens, state)
        logits, plain_state = plain(tokens, plain_state)
        torch.testing.assert_close(logits, expected)


@pytest.mark.parametrize("temperature", [float("nan"), float("inf"), 0.0, -1.0])
def test_a_temperature_that_is_not_a_finite_positive_number_is_refused(temperature):
    with pytest.raises(ValueError, match=r"^words must be >= 1, temperature a finite number > 0"):
        pyfunc_model.generation({"temperature": temperature})
    assert pyfunc_model.generation({"temperature": 0.5})["temperature"] == 0.5
