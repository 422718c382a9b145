"""AWD-LSTM's regularisers, checked against their definitions (Merity et al. 2017; awd-lstm-lm's
embed_regularize.py and main.py): embedding dropout (dropout.embedding) and activation
regularisation (regularizer.ar, regularizer.tar)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.nn import functional as F

from lmexp.config import ConfigError, DropoutConfig, RegularizerConfig, TrainConfig
from lmexp.data import batchify, tiny_corpus, windows
from lmexp.engine.loop import TrainStep, activation_penalty
from lmexp.models.rnn import RNNLanguageModel, embedding_dropout
from lmexp.optim.optimizers import FusedSGD
from lmexp.validation import validate

# Fast, in-process tests of the library: the unit lane (pytest -m unit).
pytestmark = pytest.mark.unit

CORPUS = tiny_corpus(50, 20000, 2000, 1234)


def test_embedding_dropout_drops_whole_rows_and_scales_the_rest():
    torch.manual_seed(0)
    weight = torch.randn(2000, 8)
    p = 0.3
    dropped = embedding_dropout(weight, p, training=True)
    zero = (dropped == 0).all(dim=1)
    kept = ~zero
    # every row is either all zeros or the whole row scaled by 1/(1 - p)
    assert torch.equal(dropped[zero], torch.zeros_like(dropped[zero]))
    torch.testing.assert_close(dropped[kept], weight[kept] / (1 - p), rtol=1e-6, atol=0)
    assert abs(zero.float().mean().item() - p) < 0.04  # 2000 rows: within 4 points of p
    assert embedding_dropout(weight, p, training=False) is weight
    assert embedding_dropout(weight, 0.0, training=True) is weight


def test_a_dropped_word_is_zero_at_every_position_of_the_batch():
    """One mask per batch over the vocabulary: the same word is dropped everywhere it occurs."""
    torch.manual_seed(3)
    weight = torch.randn(6, 4)
    tokens = torch.tensor([[1, 2], [1, 3], [2, 1]])
    embedded = F.embedding(tokens, embedding_dropout(weight, 0.5, training=True))
    for word in (1, 2):
        rows = embedded[tokens == word]
        assert torch.equal(rows, rows[:1].expand_as(rows))


def test_ar_and_tar_of_a_fixed_tensor_are_the_hand_computation():
    dropped = torch.tensor([[[1.0, 2.0]], [[3.0, 4.0]]])  # (steps 2, batch 1, hidden 2)
    raw = torch.tensor([[[1.0, 1.0]], [[2.0, 4.0]]])
    # AR: mean(1, 4, 9, 16) = 7.5; TAR: mean((2-1)^2, (4-1)^2) = mean(1, 9) = 5
    assert activation_penalty(dropped, raw, 2.0, 0.0).item() == 15.0
    assert activation_penalty(dropped, raw, 0.0, 1.0).item() == 5.0
    assert activation_penalty(dropped, raw, 2.0, 1.0).item() == 20.0
    assert activation_penalty(dropped, raw, 0.0, 0.0).item() == 0.0


@pytest.mark.parametrize("loss_reduction", ["sum_steps", "mean"])
def test_the_step_descends_the_cross_entropy_plus_ar_and_tar(loss_reduction):
    """One step with AR 2 and TAR 1 moves every weight as plain SGD on (mean cross-entropy +
    AR + TAR), scaled by the window length for TF's loss, computed here by autograd."""
    torch.manual_seed(0)
    dropout = DropoutConfig(kind="standard", dp_keep_prob=1.0)  # deterministic, but not none
    model = RNNLanguageModel(CORPUS.vocab_size, 16, 2, 1.0, dropout)  # large activations
    reference = copy.deepcopy(model)
    lr, clip = 0.5, 1e9  # no clipping
    step = TrainStep(
        model, FusedSGD(model.parameters(), lr, clip), clip, loss_reduction, ar=2.0, tar=1.0
    )
    inputs, targets = next(windows(batchify(CORPUS.train, 4), 7, drop_last=True))
    step(inputs, targets, model.init_state(4))

    reference.train()
    dropped, raw, _ = reference.features_and_raw(inputs, reference.init_state(4))
    logits = reference.decoder(dropped)
    objective = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))
    objective = objective + 2.0 * dropped.pow(2).mean() + 1.0 * (raw[1:] - raw[:-1]).pow(2).mean()
    if loss_reduction == "sum_steps":
        objective = objective * inputs.size(0)
    objective.backward()
    with torch.no_grad():
        for (name, got), want in zip(model.named_parameters(), reference.parameters(), strict=True):
            torch.testing.assert_close(got, want - lr * want.grad, rtol=1e-5, atol=1e-6, msg=name)

    plain = copy.deepcopy(reference)  # the same step without the penalty lands elsewhere
    for param in plain.parameters():
        param.grad = None
    plain_step = TrainStep(plain, FusedSGD(plain.parameters(), lr, clip), clip, loss_reduction)
    plain_step(inputs, targets, plain.init_state(4))
    # AR and TAR act on the recurrent output, so on the recurrent weights (not the decoder's)
    assert (plain.rnn.weight_ih_l1 - model.rnn.weight_ih_l1).abs().max() > 1e-3


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (
            {"dropout": DropoutConfig(kind="none"), "regularizer": RegularizerConfig(ar=2.0)},
            r"regularizer\.ar=2\.0 penalises the last layer's dropped output, which "
            r"dropout\.kind=none does not have",
        ),
        (
            {"dropout": DropoutConfig(kind="none", embedding=0.1)},
            r"dropout\.embedding=0\.1 needs dropout=standard, variational or weight_drop",
        ),
        (
            {"dropout": DropoutConfig(embedding=1.0)},
            r"dropout\.embedding=1\.0 must be in \[0, 1\)",
        ),
        ({"regularizer": RegularizerConfig(tar=-1.0)}, r"regularizer\.tar=-1\.0 must be >= 0"),
    ],
)
def test_a_regulariser_the_model_cannot_take_is_one_sentence(settings, message):
    with pytest.raises(ConfigError, match=message):
        validate(TrainConfig(**settings))


def test_the_model_drops_embedding_rows_in_training_only():
    torch.manual_seed(0)
    with_rows = RNNLanguageModel(
        CORPUS.vocab_size, 16, 2, 0.1, DropoutConfig(kind="standard", embedding=0.5)
    )
    plain = copy.deepcopy(with_rows)
    plain.p_words = 0.0
    tokens = torch.randint(0, CORPUS.vocab_size, (5, 3))
    state = with_rows.init_state(3)
    for model in (with_rows, plain):
        model.eval()
    assert torch.equal(with_rows.features(tokens, state)[0], plain.features(tokens, state)[0])
    with_rows.train()
    plain.train()
    assert not torch.equal(with_rows.features(tokens, state)[0], plain.features(tokens, state)[0])
