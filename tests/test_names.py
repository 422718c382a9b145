"""Run names: readable, explicit, unique within a sweep."""

from __future__ import annotations

import pytest

from lmexp.reporting.names import MAX_NAME_CHARS, child_name, parent_name, single_name

# Fast, in-process tests of the library: the unit lane (pytest -m unit).
pytestmark = pytest.mark.unit


def test_a_child_is_named_by_its_swept_values():
    swept = ["dropout.dp_keep_prob"]
    assert child_name(swept, ["data=tiny", "dropout.dp_keep_prob=0.7"], 1) == "dp_keep_prob=0.7"
    two = ["dropout.dp_keep_prob", "trainer.seed"]
    overrides = ["dropout.dp_keep_prob=0.5", "trainer.seed=3"]
    assert child_name(two, overrides, 4) == "dp_keep_prob=0.5, seed=3"


def test_values_that_print_alike_still_give_unique_names():
    """Optuna's samples differ past the 4 digits a name shows: the job number tells them apart."""
    swept = ["lr_policy.lr"]
    a = child_name(swept, ["lr_policy.lr=1.4029222764457856"], 3)
    b = child_name(swept, ["lr_policy.lr=1.4029222799999999"], 7)
    assert a == "lr=1.403 #3" and b == "lr=1.403 #7"


def test_keys_sharing_a_last_part_are_named_in_full():
    swept = ["a.lr", "b.lr"]
    assert child_name(swept, ["a.lr=1", "b.lr=2"], 0) == "a.lr=1, b.lr=2"


def test_a_single_run_is_named_by_its_recipe_and_what_it_changed():
    overrides = [
        "data.root=/data/ptb", "model=small", "dropout.dp_keep_prob=0.8", "lr_policy=plateau",
        "trainer.threads=1", "trainer.progress=false", "logger.experiment_name=x",
    ]  # fmt: skip
    assert single_name("small", overrides, "16-39-15") == (
        "small dp_keep_prob=0.8 lr_policy=plateau (16-39-15)"
    )
    assert single_name("medium", [], "16-40-02") == "medium (16-40-02)"
    long = single_name("small", [f"model.k{i}=1" for i in range(40)], "16-40-02")
    assert long.endswith("… (16-40-02)") and len(long) == MAX_NAME_CHARS


def test_a_parent_is_named_by_what_its_sweep_varies():
    assert parent_name(["dropout.dp_keep_prob"], "02-39-35") == "sweep dp_keep_prob (02-39-35)"
