"""The pyfunc model's own LSTM (torch only, no lmexp) against lmexp's model."""

from __future__ import annotations

import pytest
import torch

from lmexp.config import DropoutConfig
from lmexp.model import LSTMLanguageModel
from lmexp.pyfunc_model import WordLSTM


@pytest.mark.parametrize("kind", ["none", "standard", "variational"])
def test_word_lstm_gives_lmexp_models_logits_for_every_dropout_kind(kind):
    torch.manual_seed(0)
    dropout = DropoutConfig(kind=kind, dp_keep_prob=0.5)
    model = LSTMLanguageModel(20, 16, 3, 0.1, dropout=dropout).eval()
    tokens = torch.randint(0, 20, (12, 2))
    expected, (h, c) = model(tokens, model.init_state(2))
    logits, (h_plain, c_plain) = WordLSTM(model.state_dict(), num_layers=3)(tokens)
    torch.testing.assert_close(logits, expected)
    torch.testing.assert_close((h_plain, c_plain), (h, c))
