from __future__ import annotations

import pytest

from lmexp.config import LrPolicyConfig
from lmexp.optim.schedules import learning_rate

# Fast, in-process tests of the library: the unit lane (pytest -m unit).
pytestmark = pytest.mark.unit


def lrs(policy: LrPolicyConfig, epochs: int, history=()) -> list[float]:
    return [learning_rate(policy, e, list(history)) for e in range(epochs)]


def test_zaremba_small_recipe():
    got = lrs(LrPolicyConfig(kind="zaremba", lr=1.0, lr_decay=0.5, max_epoch=4), 7)
    assert got == [1.0, 1.0, 1.0, 1.0, 0.5, 0.25, 0.125]  # max_epoch=4 epochs at the full lr


def test_zaremba_matches_tf_formula_for_large():
    policy = LrPolicyConfig(kind="zaremba", lr=1.0, lr_decay=1 / 1.15, max_epoch=14)
    for epoch, lr in enumerate(lrs(policy, 55)):
        assert lr == pytest.approx(1.0 * (1 / 1.15) ** max(epoch + 1 - 14, 0))


def test_port_decay_compounds_every_epoch():
    policy = LrPolicyConfig(kind="port", lr=20.0, lr_decay=1 / 1.15, max_epoch=14)
    expected, lr = [], 20.0
    for epoch in range(40):  # the port's own loop, verbatim
        lr = lr * (1 / 1.15) ** max(epoch - 14, 0)
        expected.append(lr)
    assert lrs(policy, 40) == pytest.approx(expected, rel=1e-12)
    assert lrs(policy, 17)[14:] == pytest.approx([20.0, 20.0 / 1.15, 20.0 / 1.15**3])


def test_plateau_divides_when_validation_stops_improving():
    policy = LrPolicyConfig(kind="plateau", lr=20.0, plateau_factor=4.0, plateau_patience=0)
    history = [300.0, 200.0, 210.0, 190.0, 195.0, 196.0]
    assert lrs(policy, 7, history) == [20.0, 20.0, 20.0, 5.0, 5.0, 1.25, 0.3125]
    patient = LrPolicyConfig(kind="plateau", lr=1.0, plateau_factor=2.0, plateau_patience=1)
    assert lrs(patient, 5, [10.0, 11.0, 12.0, 9.0]) == [1.0, 1.0, 1.0, 0.5, 0.5]


def test_constant():
    assert lrs(LrPolicyConfig(kind="constant", lr=0.3), 3) == [0.3, 0.3, 0.3]
