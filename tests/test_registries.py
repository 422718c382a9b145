"""Every registered choice, trained: each model, recurrent cell, corpus, optimizer and lr policy
that a registry holds trains two epochs in-process on a few-thousand-word corpus and resumes
exactly (one epoch, then the run extended to two in the same folder, ends with the same
weights as two epochs at once). The cases are read from the registries, so the next entry is
covered without editing this file (as pytorch/examples' CI runs every --model choice and
lightning-hydra-template composes every config)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from lmexp.config import conf_dir
from lmexp.data import SOURCES, tiny_corpus
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


@pytest.mark.parametrize("case", CASES)
def test_every_registered_choice_trains_and_resumes_exactly(case, text_folder, tmp_path):
    best, whole = _train(case, text_folder, 2, tmp_path / "whole")
    assert math.isfinite(best)
    _train(case, text_folder, 1, tmp_path / "split")
    resumed_best, resumed = _train(case, text_folder, 2, tmp_path / "split")
    assert resumed_best == best
    assert whole.keys() == resumed.keys()
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
