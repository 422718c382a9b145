"""The entry points' first checks (lmexp.orchestration.launch), in-process: what is refused before Hydra
composes a config or a folder is touched."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest

from lmexp.config import LmexpError, TrainConfig, conf_dir
from lmexp.orchestration.launch import check_sweeper_settings, launch

# Fast, in-process tests of the library: the unit lane (pytest -m unit).
pytestmark = pytest.mark.unit


def _never(cfg):  # the task: must not be reached
    raise AssertionError("the task ran")


@pytest.mark.parametrize(
    ("argv", "what", "module"),
    [
        (["hparams_search=ptb_optuna"], "The Optuna search", "optuna"),
        (["hydra/launcher=joblib"], "The joblib launcher", "hydra_plugins.hydra_joblib_launcher"),
        (
            ["hydra/launcher=submitit_slurm"],
            "The SLURM launcher",
            "hydra_plugins.hydra_submitit_launcher",
        ),
    ],
)
def test_a_search_or_launcher_without_its_extra_is_one_sentence(
    argv, what, module, monkeypatch, caplog, tmp_path
):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, module, None)  # as if not installed: importing it fails
    with caplog.at_level(logging.ERROR), pytest.raises(SystemExit) as stop:
        launch(_never, "train", ["-m", *argv, "data=tiny"], TrainConfig)
    assert stop.value.code == 2
    name = module.split(".")[-1]
    assert [r.getMessage() for r in caplog.records] == [
        f"{what} needs lmexp's sweep extra ({name} is not installed); pip install 'lmexp[sweep]'."
    ]
    assert list(tmp_path.iterdir()) == []  # nothing written


@pytest.mark.parametrize(
    ("choice", "base"),
    [
        ("experiment=_pytorch_base", "_pytorch_base"),
        ("+experiment=_examples_tied", "_examples_tied"),
        ("experiment=pytorch_port,_pytorch_base", "_pytorch_base"),  # in a sweep
    ],
)
def test_a_base_config_chosen_as_a_recipe_is_one_sentence_naming_the_recipes(
    choice, base, monkeypatch, caplog, tmp_path
):
    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.ERROR), pytest.raises(SystemExit) as stop:
        launch(_never, "train", ["-m", choice, "data=tiny"], TrainConfig)
    assert stop.value.code == 2
    assert [r.getMessage() for r in caplog.records] == [
        f"experiment={base} is a base the experiment configs build on, not one to choose; "
        "choose one of experiment=awd_lstm, awd_medium, examples_lstm, large_tied, medium_tied, "
        "pytorch_port, transformer."
    ]
    assert list(tmp_path.iterdir()) == []  # nothing written


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["regularizer.tar=abc"], "Invalid config: regularizer.tar='abc' is not a number"),
        (["optimizer.nonmono=1.5"], "Invalid config: optimizer.nonmono=1.5 is not an integer"),
        (["trainer.bptt_jitter=maybe"], "Invalid config: trainer.bptt_jitter='maybe' is not true or false"),
        (["model.embedding_size=wide"], "Invalid config: model.embedding_size='wide' is not an integer"),
        (["-m", "lr_policy.lr=1,x"], "Invalid config: lr_policy.lr='x' is not a number"),  # a sweep's value
    ],
)  # fmt: skip
def test_a_value_of_the_wrong_type_is_one_sentence_naming_the_key(
    argv, message, monkeypatch, caplog, tmp_path
):
    """Hydra's own error for these is five lines and exit 1; any other bad value is one
    sentence and exit 2, and so are these."""
    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.ERROR), pytest.raises(SystemExit) as stop:
        launch(_never, "train", [*argv, "data=tiny"], TrainConfig)
    assert stop.value.code == 2
    assert [r.getMessage() for r in caplog.records] == [
        f"{message}; see docs/reference/configuration.md for its allowed values."
    ]
    assert list(tmp_path.iterdir()) == []  # nothing written


@pytest.mark.parametrize("argv", [["model=huge"], ["-m", "model=small,huge"]])
def test_a_preset_that_does_not_exist_is_one_sentence_naming_the_presets(
    argv, monkeypatch, caplog, tmp_path
):
    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.ERROR), pytest.raises(SystemExit) as stop:
        launch(_never, "train", [*argv, "data=tiny"], TrainConfig)
    assert stop.value.code == 2
    assert [r.getMessage() for r in caplog.records] == [
        "model=huge is not one of model=large, medium, small, tiny; python -m lmexp.train "
        "--help lists each group's choices."
    ]


def test_a_misspelt_pruner_or_sampler_setting_is_refused_with_the_nearest_ones():
    with pytest.raises(LmexpError, match=r"pruner\.n_warmup_step is a setting none of .* did you mean n_warmup_steps\?"):  # fmt: skip
        check_sweeper_settings(["hydra.sweeper.pruner.n_warmup_step=2"])
    with pytest.raises(LmexpError, match=r"sampler\.n_startup_trial is .* n_startup_trials"):
        check_sweeper_settings(["hydra.sweeper.sampler.n_startup_trial=2"])
    # A setting some pruner takes, an added one (+) and the name pass on, to Optuna's own check.
    check_sweeper_settings(
        [
            "hydra.sweeper.pruner.n_min_trials=2",
            "+hydra.sweeper.pruner.patience=2",
            "hydra.sweeper.pruner.name=asha",
            "hydra.sweeper.sampler.seed=3",
        ]
    )


@pytest.mark.parametrize("entry", ["lmexp.train", "lmexp.bench"])
def test_help_lists_the_recipes_and_choices_not_the_bases(entry):
    out = subprocess.run(
        [sys.executable, "-m", entry, "--help"], capture_output=True, text=True, check=True
    ).stdout
    groups = dict(line.split(": ", 1) for line in out.splitlines() if ": " in line and "," in line)
    recipes = sorted(p.stem for p in (conf_dir() / "experiment").glob("[!_]*.yaml"))
    assert groups["experiment"].split(", ") == recipes
    assert groups["model"] == "large, medium, small, tiny"
    # lmexp's presets and the Hydra launchers its sweep extra installs (the README uses joblib)
    assert (
        groups["hydra/launcher"]
        == "basic, joblib, slurm, slurm_cpu, submitit_local, submitit_slurm"
    )
    assert "_pytorch_base" not in out and "_examples_tied" not in out
    if entry == "lmexp.bench":  # examples and the bench's own keys, not the whole training config
        assert "python -m lmexp.bench model=medium trainer.precision=bf16" in out
        assert "bench.repeats=3" in out and "bench.log_mlflow=false" in out
        assert "lr_decay:" not in out  # no dump of the training config
