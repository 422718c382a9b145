"""trainer.bptt_jitter, AWD-LSTM's random BPTT lengths, against awd-lstm-lm's main.py: the
length distribution, and each window trained at the epoch's lr times its length / base."""

from __future__ import annotations

import statistics

import pytest
import torch

from lmexp.config import ConfigError, TrainConfig, TrainerConfig
from lmexp.data import batchify, jittered_lengths, tiny_corpus
from lmexp.engine.loop import TrainStep, train_epoch
from lmexp.models.rnn import RNNLanguageModel
from lmexp.optim.optimizers import FusedSGD
from lmexp.validation import validate

# Fast, in-process tests of the library: the unit lane (pytest -m unit).
pytestmark = pytest.mark.unit


def test_the_lengths_follow_awd_lstms_distribution_and_cover_the_data_once():
    base, steps = 70, 700_000
    lengths = jittered_lengths(steps, base, seed=141, epoch=0)
    assert sum(lengths) == steps and min(lengths) >= 1
    body = lengths[:-1]  # the last one is cut to what is left
    assert min(body) >= 5
    # A mixture: N(70, 5) with probability 0.95, N(35, 5) else, each draw cut to an integer
    # (int() truncates: about half a step less on average).
    short = [n for n in body if n < (base + base / 2) / 2]
    assert abs(len(short) / len(body) - 0.05) < 0.01
    assert abs(statistics.mean(n for n in body if n not in short) - (base - 0.5)) < 0.3
    assert abs(statistics.stdev(n for n in body if n not in short) - 5.0) < 0.3
    assert abs(statistics.mean(short) - (base / 2 - 0.5)) < 1.0
    # A function of (seed, epoch): a resumed run gets the same windows, the next epoch others.
    assert jittered_lengths(steps, base, 141, 0) == lengths
    assert jittered_lengths(steps, base, 141, 1) != lengths


def test_each_window_trains_at_the_lr_scaled_by_its_length():
    corpus = tiny_corpus(50, 20000, 2000, 1234)
    data = batchify(corpus.train, 4)
    torch.manual_seed(0)
    model = RNNLanguageModel(corpus.vocab_size, 8, 1, 0.1)
    optimizer = FusedSGD(model.parameters(), 20.0, 0.25)
    seen: list[float] = []
    original = optimizer.step

    def recording_step(closure=None):
        seen.append(optimizer.param_groups[0]["lr"])
        return original(closure)

    optimizer.step = recording_step
    step = TrainStep(model, optimizer, 0.25, "mean")
    lengths = jittered_lengths(data.size(0) - 1, 35, seed=1, epoch=3)
    progress, _, _ = train_epoch(step, data, 35, model.init_state(4), lengths=lengths)
    assert progress.batch == len(lengths) and progress.tokens == sum(lengths) * 4
    assert seen == pytest.approx([20.0 * n / 35 for n in lengths], rel=1e-12)
    assert optimizer.param_groups[0]["lr"] == 20.0  # the epoch's lr again afterwards


def test_jitter_with_tfs_summed_loss_is_one_sentence():
    cfg = TrainConfig(trainer=TrainerConfig(bptt_jitter=True, loss_reduction="sum_steps"))
    with pytest.raises(ConfigError, match=r"trainer\.bptt_jitter=True follows AWD-LSTM, whose "):
        validate(cfg)
