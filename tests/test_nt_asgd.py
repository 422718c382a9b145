"""optimizer=nt_asgd (AWD-LSTM's non-monotonically triggered averaged SGD), against its
definition: the switch on a scripted validation history as awd-lstm-lm's main.py decides it, the
averages as the mean of the iterates by hand and as torch.optim.ASGD(t0=0, lambd=0) keeps them,
and a run resumed across the switch equal to the uninterrupted one."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY, metric_history, mlflow_runs, run_module

from lmexp.engine import checkpoint
from lmexp.optim.optimizers import NTASGD, nt_asgd_should_switch


def awd_lstm_switch_epoch(history: list[float], nonmono: int) -> int | None:
    """awd-lstm-lm's main.py, its loop over epochs reduced to the switch (0-based epoch)."""
    best_val_loss: list[float] = []
    for epoch, val_loss in enumerate(history):
        if len(best_val_loss) > nonmono and val_loss > min(best_val_loss[:-nonmono]):
            return epoch
        best_val_loss.append(val_loss)
    return None


HISTORY = [10.0, 9.0, 8.0, 7.0, 7.5, 7.6, 7.7, 7.8, 7.9, 6.9, 8.1, 7.0]


@pytest.mark.unit
@pytest.mark.parametrize(("nonmono", "expected"), [(5, 10), (1, 5), (3, 7), (20, None)])
def test_the_switch_comes_at_the_check_awd_lstm_makes_it(nonmono, expected):
    # nonmono 5: at check 10, 8.1 is worse than min(10, 9, 8, 7, 7.5) = 7, the best of the checks
    # made more than 5 before it; check 9's 6.9 was not (nor were 6-8 against 10, 9, 8).
    # nonmono 1: check 5's 7.6 > min(10, 9, 8, 7) = 7 (check 4's 7.5 was not above 8).
    # nonmono 3: check 7's 7.8 > min(10, 9, 8, 7) = 7 (check 6's 7.7 was not above 8).
    first = next(
        (i for i in range(len(HISTORY)) if nt_asgd_should_switch(HISTORY[: i + 1], nonmono)),
        None,
    )
    assert first == awd_lstm_switch_epoch(HISTORY, nonmono) == expected


@pytest.mark.unit
def test_the_averages_are_the_mean_of_the_iterates_as_torchs_asgd_keeps_them():
    torch.manual_seed(0)
    start = torch.randn(5)
    grads = [torch.randn(5) for _ in range(6)]
    p = torch.nn.Parameter(start.clone())
    opt = NTASGD([p], lr=0.1, weight_decay=0.01, nonmono=5)
    iterates = []
    for i, g in enumerate(grads):
        if i == 2:
            opt.switch()
        p.grad = g.clone()
        opt.step()
        if i >= 2:
            iterates.append(p.detach().clone())
    # SGD with L2 decay throughout: p -= lr * (g + wd * p)
    expected = start.clone()
    for g in grads:
        expected = expected - 0.1 * (g + 0.01 * expected)
    torch.testing.assert_close(p.detach(), expected)
    # the mean of the iterates from the second step after the switch (torch's ASGD: its mu lags)
    mean = torch.stack(iterates[1:]).mean(0)
    torch.testing.assert_close(opt.state[p]["ax"], mean)
    with opt.averaged():
        torch.testing.assert_close(p.detach(), mean)
    torch.testing.assert_close(p.detach(), expected)  # the training weights come back

    # torch.optim.ASGD(t0=0, lambd=0), switched to at the same point (as awd-lstm-lm does)
    q = torch.nn.Parameter(start.clone())
    sgd = NTASGD([q], lr=0.1, weight_decay=0.01, nonmono=5)
    for g in grads[:2]:
        q.grad = g.clone()
        sgd.step()
    asgd = torch.optim.ASGD([q], lr=0.1, t0=0, lambd=0.0, weight_decay=0.01)
    for g in grads[2:]:
        q.grad = g.clone()
        asgd.step()
    torch.testing.assert_close(q.detach(), p.detach())
    torch.testing.assert_close(asgd.state[q]["ax"], opt.state[p]["ax"])


@pytest.mark.unit
def test_the_switch_and_the_averages_are_in_the_state_dict():
    p = torch.nn.Parameter(torch.ones(3))
    opt = NTASGD([p], lr=0.5, weight_decay=0.0, nonmono=2)
    assert not opt.observe([5.0, 4.0, 3.0, 4.5])  # 4.5 > min(5.0)? no: only 5.0 is old enough
    assert opt.observe([5.0, 4.0, 3.0, 4.5, 6.0])  # 6.0 > min(5.0, 4.0)
    assert not opt.observe([5.0, 4.0, 3.0, 4.5, 6.0, 9.0])  # switched already
    for _ in range(3):
        p.grad = torch.ones(3)
        opt.step()
    again = NTASGD([torch.nn.Parameter(p.detach().clone())], lr=0.5, weight_decay=0.0, nonmono=2)
    again.load_state_dict(opt.state_dict())
    assert again.averaging and again.param_groups[0]["averaged_steps"] == 3
    (state,) = again.state.values()
    torch.testing.assert_close(state["ax"], opt.state[p]["ax"])


NT = [
    *TINY,
    "optimizer=nt_asgd",
    "optimizer.nonmono=1",
    "lr_policy=constant",
    "lr_policy.lr=3",
]  # fmt: skip  (the tiny corpus at lr 3: validation worsens after a few epochs, so averaging starts)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The 8-epoch run the resumed ones are compared with, in its own store, and the first
    epoch it averaged. Where the switch falls depends on the CPU's arithmetic (epoch 6 on an
    Intel Xeon with AMX, 5 on an AMD EPYC), so the tests read it from this run."""
    cwd = tmp_path_factory.mktemp("uninterrupted")
    proc = run_module("lmexp.train", *NT, "trainer.max_epochs=8", "hydra.run.dir=ref", cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (ref,) = mlflow_runs(cwd / "mlflow.db")
    switch = int(ref.data.tags["lmexp.averaging_from_epoch"])
    assert 3 <= switch <= 7, f"averaging from epoch {switch}: no epoch to stop before or after it"
    return cwd, ref, switch


@pytest.mark.slow
@pytest.mark.parametrize("when", ["resumed-before-the-switch", "resumed-after-it"])
def test_a_run_resumed_across_the_switch_is_the_uninterrupted_run(tmp_path, when, uninterrupted):
    ref_dir, ref, switch = uninterrupted
    # The switch is decided by epoch switch-1's validation: stop a launch two epochs before the
    # first averaged one (the decision still ahead), or at it (the averages already running).
    first = switch - 2 if when == "resumed-before-the-switch" else switch
    for epochs in (first, 8):  # the second launch extends the first run in its folder
        proc = run_module(
            "lmexp.train", *NT, f"trainer.max_epochs={epochs}", "hydra.run.dir=split", cwd=tmp_path
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
    db, ref_db = tmp_path / "mlflow.db", ref_dir / "mlflow.db"
    (split,) = mlflow_runs(db)
    assert split.data.tags["lmexp.averaging_from_epoch"] == str(switch)
    for key in ("valid_ppl", "train_ppl"):
        assert metric_history(db, split.info.run_id, key) == metric_history(
            ref_db, ref.info.run_id, key
        )
    assert split.data.metrics["test_ppl"] == ref.data.metrics["test_ppl"]
    # best.pt holds the averaged model that scored best_valid_ppl, last.pt the training weights
    for run in (ref_dir / "ref", tmp_path / "split"):
        best = checkpoint.load(run / "checkpoints" / "best.pt")
        last = checkpoint.load(run / "checkpoints" / "last.pt")
        averages = last["step"]["optimizer"]["state"]
        assert averages and best["epoch"] >= switch
        assert not torch.equal(best["model"]["decoder.weight"], last["model"]["decoder.weight"])
