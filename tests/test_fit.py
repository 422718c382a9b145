"""lmexp.engine.fit, the epoch loop, in-process with a tracker of the test's own: the engine
talks to any write-only Tracker (here a list of calls), checkpoints each epoch before logging
it, and stops through a callback's RunStopped, never an exit."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra import compose, initialize_config_dir

from lmexp.config import RunStopped, conf_dir
from lmexp.data import batch_splits, load_corpus
from lmexp.engine import checkpoint
from lmexp.engine.fit import Position, Run, fit
from lmexp.engine.loop import DivergenceError
from lmexp.models.rnn import RNNLanguageModel
from lmexp.orchestration.launch import register_configs
from lmexp.tracking.base import EPOCH_METRICS, Tracker
from lmexp.validation import to_typed

# Fast, in-process tests of the library: the unit lane (pytest -m unit).
pytestmark = pytest.mark.unit

register_configs()


class ListTracker(Tracker):
    """A second tracker, in a few lines: it records the calls; the engine needs nothing else."""

    run_id = "list-1"

    def __init__(self, ckpt: Path) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.ckpt = ckpt

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        # the checkpoint holds this epoch already when it is logged (a kill between the two
        # loses nothing: the rerun backfills the store from the checkpoint)
        saved = checkpoint.load(self.ckpt / "last.pt")["epoch"]
        self.calls.append(("log_metrics", (step, tuple(metrics), saved)))


def _run(tmp_path: Path, callbacks=(), epochs: int = 2) -> tuple[Run, ListTracker]:
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = to_typed(
            compose("train", ["data=tiny", "model=tiny", f"trainer.max_epochs={epochs}"])
        )
    cfg = replace(cfg, trainer=replace(cfg.trainer, progress=False))
    torch.manual_seed(cfg.trainer.seed)
    corpus = load_corpus(cfg.data)
    model = RNNLanguageModel.from_config(cfg.model, cfg.dropout, corpus.vocab_size)
    ckpt = tmp_path / "checkpoints"
    ckpt.mkdir()
    tracker = ListTracker(ckpt)
    data = batch_splits(corpus, cfg.trainer)
    run = Run(cfg, corpus, data, model, tracker, ckpt, {"optimizer": {}}, list(callbacks))
    return run, tracker


def test_fit_logs_every_epoch_to_any_tracker_after_its_checkpoint(tmp_path):
    run, tracker = _run(tmp_path)
    position = Position()
    fit(run, position)
    assert tracker.calls == [
        ("log_metrics", (1, EPOCH_METRICS, 1)),
        ("log_metrics", (2, EPOCH_METRICS, 2)),
    ]
    assert position.epoch == 2 and len(position.history) == 2
    assert position.best_valid == min(h["valid_ppl"] for h in position.history)
    assert position.history[1]["train_ppl"] < position.history[0]["train_ppl"]  # it learns


def test_a_callback_stops_the_fit_with_an_exception_after_the_epoch_is_kept(tmp_path):
    seen = []

    def prune(epoch: int, valid_ppl: float, last: bool) -> None:
        seen.append((epoch, last))
        raise RunStopped("pruned")

    run, tracker = _run(tmp_path, [prune], epochs=3)
    with pytest.raises(RunStopped):
        fit(run, Position())
    assert seen == [(1, False)]
    assert [c[1][0] for c in tracker.calls] == [1]  # epoch 1 logged, epochs 2-3 never trained
    assert checkpoint.load(run.ckpt_dir / "last.pt")["epoch"] == 1


def _scripted_validation(monkeypatch, ratios: list[float], vocab_size: int) -> None:
    """The fit loop's validation scores ratio x a uniform guess, epoch by epoch: a trajectory
    scripted, not hoped for from one CPU's arithmetic."""
    scores = iter(ratios)

    def evaluate(*args, **kwargs) -> tuple[float, int]:
        return math.log(next(scores) * vocab_size) * 1000, 1000  # loss sum, tokens

    monkeypatch.setattr("lmexp.engine.fit.evaluate", evaluate)


def test_a_first_epoch_worse_than_guessing_that_recovers_trains_to_the_end(tmp_path, monkeypatch):
    run, tracker = _run(tmp_path, epochs=4)
    _scripted_validation(monkeypatch, [7.5, 0.75, 0.53, 0.5], run.corpus.vocab_size)
    position = Position()
    fit(run, position)
    assert position.epoch == 4 and [s for _, (s, *_) in tracker.calls] == [1, 2, 3, 4]


def test_three_checks_in_a_row_worse_than_guessing_diverge_across_a_resume(tmp_path, monkeypatch):
    """Two bad epochs, the run stopped and extended in the same position (as a resume restores
    it): the third bad check in a row is divergence, and no epoch of it is logged or saved."""
    run, tracker = _run(tmp_path, epochs=2)
    _scripted_validation(monkeypatch, [1.5, 1.2, 1.1], run.corpus.vocab_size)
    position = Position()
    fit(run, position)
    longer = replace(run, cfg=replace(run.cfg, trainer=replace(run.cfg.trainer, max_epochs=3)))
    with pytest.raises(DivergenceError, match="after epoch 3 has been worse than a uniform guess"):
        fit(longer, position)
    assert position.epoch == 2 and len(tracker.calls) == 2
    assert checkpoint.load(run.ckpt_dir / "last.pt")["epoch"] == 2


def test_a_divergence_over_validation_words_train_never_has_names_them_not_the_lr(
    tmp_path, monkeypatch
):
    run, _ = _run(tmp_path, epochs=3)
    assert not run.corpus.trains_unk  # the tiny corpus has no <unk> of its own
    run.corpus.unseen = {"valid": 0.125, "test": 0.0}
    _scripted_validation(monkeypatch, [1.5, 1.2, 1.1], run.corpus.vocab_size)
    with pytest.raises(DivergenceError) as err:
        fit(run, Position())
    assert str(err.value).endswith(
        "12.5% of the validation words never occur in the train split and are read as <unk>, "
        "which the train split never holds, so the model cannot score them: give the train "
        "split those words or <unk> (data.root) before lowering lr_policy.lr"
    )


def test_the_progress_line_gives_the_epoch_out_of_all_and_the_time_left(caplog):
    """10 of 100 batches in 5 s: 90 more in this epoch and 300 in the 3 after it, at 0.5 s each."""
    from lmexp.engine.fit import progress_printer
    from lmexp.engine.loop import EpochProgress

    on_log = progress_printer(2, 5, 1.0)
    with caplog.at_level("INFO", logger="lmexp.train"):
        on_log(
            EpochProgress(batch=10, loss_sum=10 * 350 * math.log(90), tokens=3500, seconds=5.0), 100
        )
    (line,) = [r.getMessage() for r in caplog.records]
    assert line == "epoch 2/5 [   10/100] ppl     90.00      700 words/s lr 1, 3m15s left"
