"""Every registered choice, trained: each model, recurrent cell, corpus, optimizer and lr policy
that a registry holds trains two epochs in-process on a few-thousand-word corpus and resumes
exactly: stopped by a SIGTERM in the middle of its second epoch, then the same run started again
in the same folder, it ends with the same weights and best validation as two epochs at once (so
each optimizer's and schedule's state, and each model's recurrent state, are in the mid-epoch
checkpoint). The cases are read from the registries, so the next entry is
covered without editing this file (as pytorch/examples' CI runs every --model choice and
lightning-hydra-template composes every config)."""

from __future__ import annotations

import math
import os
import signal
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from lmexp.config import Preempted, conf_dir
from lmexp.data import SOURCES, tiny_corpus
from lmexp.engine import checkpoint
from lmexp.engine.loop import train_epoch
from lmexp.models import MODELS
from lmexp.models.rnn import CELLS
from lmexp.optim.optimizers import OPTIMIZERS
from lmexp.optim.schedules import SCHEDULES
from lmexp.orchestration.launch import register_configs
from lmexp.run import RunContext, run_training
from lmexp.validation import to_typed

pytestmark = pytest.mark.unit

register_configs()

# A small, quick run: the tiny model, 12 windows of 10 x 10 tokens an epoch.
BASE = ["model=tiny", "model.hidden_size=16", "logger=none", "trainer.progress=false"]
BASE += ["trainer.threads=1", "trainer.limit_train_batches=12", "trainer.limit_eval_batches=4"]
# Where an entry needs another setting than the tiny model's to train at all (an adaptive
# optimizer's lr), and nothing else.
NEEDS = {"optimizer=adam": ["lr_policy.lr=0.003"], "optimizer=adamw": ["lr_policy.lr=0.003"]}

CASES = (
    [f"model.arch={a}" for a in MODELS]
    + [f"model.cell={c}" for c in CELLS]
    + [f"data={s}" for s in SOURCES]
    + [f"optimizer={o}" for o in OPTIMIZERS]
    + [f"lr_policy={p}" for p in SCHEDULES]
)


@pytest.fixture(scope="module")
def text_folder(tmp_path_factory) -> Path:
    """The tiny corpus written out under the file names of PTB and WikiText, so data=ptb and
    data=wikitext2 read it from data.root; its text/ subfolder holds it once per split, as
    data=text wants (any folder of plain text, one file per split)."""
    corpus = tiny_corpus(50, 3000, 600, 1234)
    folder = tmp_path_factory.mktemp("corpus")
    (folder / "text").mkdir()
    for split in ("train", "valid", "test"):
        words = [corpus.vocab[i] for i in getattr(corpus, split).tolist()]
        lines = " ".join(words).replace(" <eos> ", "\n").replace("<eos>", "\n") + "\n"
        for name in (f"text/{split}.txt", f"ptb.{split}.txt", f"wiki.{split}.tokens"):
            (folder / name).write_text(lines)
    return folder


def _train(case: str, text_folder: Path, epochs: int, folder: Path) -> tuple[float, dict]:
    overrides = [*BASE, case, *NEEDS.get(case, []), f"trainer.max_epochs={epochs}"]
    if not case.startswith("data="):
        overrides.append("data=tiny")
    elif case != "data=tiny":
        root = text_folder / "text" if case == "data=text" else text_folder
        overrides += [f"data.root={root}", "data.verify_md5=false"]
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    ctx = RunContext(output_dir=folder, launch_dir=folder, resolved=resolved)  # type: ignore[arg-type]
    best = run_training(to_typed(cfg), ctx)
    return best, torch.load(folder / "model" / "model.pt", weights_only=True)


@pytest.fixture
def sigterm_at_batch(monkeypatch):
    """sigterm_at_batch(n): a real SIGTERM, sent to this process while the n-th training batch
    of the run (counted across epochs) is computed; lmexp's handler sees it between batches, as
    it sees SLURM's or a user's."""

    def arm(n: int) -> None:
        seen = 0

        def counting(*args, **kwargs):
            nonlocal seen
            should_stop = kwargs["should_stop"]

            def poll() -> bool:
                nonlocal seen
                seen += 1
                if seen == n:
                    os.kill(os.getpid(), signal.SIGTERM)
                return should_stop()

            return train_epoch(*args, **{**kwargs, "should_stop": poll})

        monkeypatch.setattr("lmexp.engine.fit.train_epoch", counting)

    return arm


@pytest.mark.parametrize("case", CASES)
def test_every_registered_choice_trains_and_resumes_exactly(
    case, text_folder, tmp_path, sigterm_at_batch
):
    best, whole = _train(case, text_folder, 2, tmp_path / "whole")
    assert math.isfinite(best)
    sigterm_at_batch(
        11 + 5
    )  # after the 5th of the second epoch's 12 batches (the last is not polled)
    with pytest.raises(Preempted):
        _train(case, text_folder, 2, tmp_path / "split")
    saved = checkpoint.load(tmp_path / "split" / "checkpoints" / "last.pt")
    assert (saved["epoch"], saved["progress"]["batch"]) == (1, 5)
    sigterm_at_batch(0)  # none
    resumed_best, resumed = _train(case, text_folder, 2, tmp_path / "split")
    assert resumed_best == best
    assert whole.keys() == resumed.keys()
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    # What does not steer the weights is compared where it lives (ASGD's average; a schedule's
    # count of bad epochs): the optimizer's state and the history, in the last checkpoints.
    want, got = (
        checkpoint.load(tmp_path / r / "checkpoints" / "last.pt") for r in ("whole", "split")
    )
    assert_same(want["step"], got["step"])
    compared = ("train_ppl", "valid_ppl", "lr")
    assert [[e[k] for k in compared] for e in want["history"]] == [
        [e[k] for k in compared] for e in got["history"]
    ]


def assert_same(want, got, where="step") -> None:
    """Equal nested dicts and lists, tensors equal element for element."""
    if isinstance(want, torch.Tensor):
        assert torch.equal(want, got), where
    elif isinstance(want, dict):
        assert want.keys() == got.keys(), where
        for key in want:
            assert_same(want[key], got[key], f"{where}.{key}")
    elif isinstance(want, (list, tuple)):
        assert len(want) == len(got), where
        for i, (a, b) in enumerate(zip(want, got, strict=True)):
            assert_same(a, b, f"{where}[{i}]")
    else:
        assert want == got, where
