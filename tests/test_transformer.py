"""The Transformer language model (model.arch=transformer) against its definition."""

from __future__ import annotations

import pytest
import torch

from lmexp.config import DropoutConfig, ModelConfig
from lmexp.models import build_model
from lmexp.models.transformer import TransformerLanguageModel

# Fast, in-process tests of the library: the unit lane (pytest -m unit).
pytestmark = pytest.mark.unit


def make(context: int, keep: float = 1.0) -> TransformerLanguageModel:
    torch.manual_seed(0)
    model = ModelConfig(arch="transformer", hidden_size=16, num_layers=2, num_heads=4,
                        context=context)  # fmt: skip
    dropout = DropoutConfig(kind="standard", dp_keep_prob=keep)
    return build_model(model, dropout, vocab_size=30).eval()  # type: ignore[return-value]


def test_a_position_sees_only_the_tokens_before_it():
    model = make(context=0)
    tokens = torch.randint(0, 30, (9, 2))
    changed = tokens.clone()
    changed[5:] = (changed[5:] + 1) % 30
    before, _ = model(tokens, model.init_state(2))
    after, _ = model(changed, model.init_state(2))
    torch.testing.assert_close(after[:5], before[:5])
    assert not torch.allclose(after[5:], before[5:])


def test_windows_with_their_memory_score_as_one_long_window():
    """With model.context at least the text's length, reading it in windows of 4, the state
    carried, gives the logits of one pass over all of it; without memory the later windows
    are scored blind and differ."""
    tokens = torch.randint(0, 30, (12, 3))
    for context, same in ((12, True), (0, False)):
        model = make(context)
        whole, _ = model(tokens, model.init_state(3))
        state, parts = model.init_state(3), []
        for start in range(0, 12, 4):
            logits, state = model(tokens[start : start + 4], state)
            parts.append(logits)
        assert torch.allclose(torch.cat(parts), whole, atol=1e-5) is same


def test_the_state_is_the_last_context_tokens():
    model = make(context=5)
    first, second = torch.randint(0, 30, (3, 2)), torch.randint(0, 30, (4, 2))
    _, state = model(first, model.init_state(2))
    assert torch.equal(state, first)  # fewer than 5 seen so far: all of them
    _, state = model(second, state)
    assert torch.equal(state, torch.cat([first, second])[-5:])
    assert model.init_state(2).shape == (0, 2)


def test_dropout_acts_only_while_training():
    model = make(context=0, keep=0.5)
    tokens = torch.randint(0, 30, (6, 2))
    evaluation = [model(tokens, model.init_state(2))[0] for _ in range(2)]
    torch.testing.assert_close(evaluation[0], evaluation[1])
    model.train()
    training = [model(tokens, model.init_state(2))[0] for _ in range(2)]
    assert not torch.allclose(training[0], training[1])
