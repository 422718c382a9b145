"""lmexp.orchestration.trials, the workers of a search, in-process on a real sqlite study: the trial loop,
its pruner's judge, what a worker tells the study, a dead worker's trials, and a trial told
while another worker claims."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from pathlib import Path

import pytest

# --- the workers' trial loop, on a real sqlite study ----------------------------------------------


def _search(tmp_path: Path, n_trials: int, pruner: str = "median"):
    """A study in sqlite and the optuna_study.json a sweeper writes for it, over one key."""
    import optuna
    import optuna.distributions as d

    from lmexp.orchestration.search import STUDY_FILE, Search

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="s", storage=storage)
    search = Search(
        storage=storage, study_name="s", n_trials=n_trials,
        space={"dropout.dp_keep_prob": d.FloatDistribution(0.3, 1.0)}, fixed=[],
        sampler={"name": "random", "seed": 1}, pruner={"name": pruner},
    )  # fmt: skip
    (tmp_path / STUDY_FILE).write_text(search.to_json())
    return study


def _run(tmp_path: Path, train) -> float:
    from omegaconf import OmegaConf

    from lmexp.orchestration.trials import run_trials

    cfg = OmegaConf.create({"dropout": {"dp_keep_prob": 0.5}})
    return run_trials(cfg, tmp_path, 0, train)


def test_the_judge_prunes_a_trailing_trial_but_never_after_its_last_epoch():
    import optuna

    from lmexp.orchestration.search import PRUNED_ATTR
    from lmexp.orchestration.trials import Judge, Pruned
    from lmexp.tracking.base import PRUNED_TAG

    study = optuna.create_study(pruner=optuna.pruners.MedianPruner(n_startup_trials=1))
    good = study.ask()
    good.report(100.0, 1)
    good.report(90.0, 2)
    study.tell(good, 90.0)
    trailing = study.ask()
    judge = Judge(trailing, "median")
    judge(1, 100.0, False)  # level with the median: goes on
    judge(2, 300.0, True)  # worse, but its training is over: it finishes
    assert PRUNED_ATTR not in trailing.user_attrs
    with pytest.raises(Pruned) as pruned:  # the epoch callback stops the run by raising
        judge(2, 300.0, False)
    assert pruned.value.reason == (
        "pruned by Optuna's median pruner after epoch 2 (valid ppl 300.00, trial 1)"
    )
    assert pruned.value.status == "KILLED" and pruned.value.tags == {PRUNED_TAG: "2"}
    assert study.trials[1].user_attrs[PRUNED_ATTR] == 2  # marked before its run is closed


def test_a_storage_failing_while_a_trial_reports_stops_it_to_be_resumed():
    """The judge's storage calls failing (a database gone) is one sentence, as StudyLost, which
    the worker lets through (the trial stays RUNNING) instead of telling the trial FAIL."""
    import optuna

    from lmexp.config import LmexpError
    from lmexp.orchestration.trials import Judge, StudyLost

    class Unreachable:  # the failure a PostgreSQL storage raises when its server is gone
        number = 4

        def report(self, value: float, step: int) -> None:
            raise optuna.exceptions.StorageInternalError("server closed the connection\nmore")

    with pytest.raises(StudyLost) as err:
        Judge(Unreachable(), "median")(2, 150.0, False)
    assert isinstance(err.value, LmexpError) and str(err.value) == (
        "Optuna's storage failed while trial 4 reported epoch 2 (server closed the connection); "
        "once it works, rerun the same command with the same hydra.sweep.dir: the trial resumes "
        "from this epoch's checkpoint."
    )


def test_a_trial_folder_stays_locked_until_the_study_knows_its_result(tmp_path, monkeypatch):
    """Between the end of a trial's training and the study being told, another worker must not
    see a RUNNING trial with a free folder (it would resume a finished trial)."""
    from optuna.trial import TrialState

    import lmexp.files

    study = _search(tmp_path, n_trials=3)
    unlock, seen = lmexp.files.unlock_folder, []

    def checked_unlock(folder: Path) -> None:
        if folder.name.startswith("trial_"):
            (trial,) = [t for t in study.get_trials() if t.number == int(folder.name[6:])]
            seen.append(trial.state)
        unlock(folder)

    monkeypatch.setattr(lmexp.files, "unlock_folder", checked_unlock)
    trained = []
    best = _run(tmp_path, lambda cfg, params, *_: trained.append(cfg.dropout.dp_keep_prob) or 2.0)
    assert best == 2.0 and len(trained) == 3
    assert seen == [TrialState.COMPLETE] * 3
    # The worker trained each trial with the sampled value, as a number.
    assert trained == [t.params["dropout.dp_keep_prob"] for t in study.get_trials()]


OWNER = """
import sys, time
from pathlib import Path
from omegaconf import OmegaConf
from lmexp.orchestration.trials import run_trials

folder = Path(sys.argv[1])

def train(cfg, params, trial_folder, number, judge):
    (folder / "training").touch()
    while not (folder / "go").exists():
        time.sleep(0.02)
    return 2.0

run_trials(OmegaConf.create({"dropout": {"dp_keep_prob": 0.5}}), folder, 0, train)
"""


def test_a_trial_told_while_another_worker_claims_is_not_resumed(tmp_path):
    """A worker claiming a trial reads the study's trials, then looks at their folders. The
    trial's owner (another process) finishes right after that read: it must not tell the study
    and free the folder in between, or the claimer resumes a finished trial (and fails to tell
    it: "Cannot tell a COMPLETE trial", seen in CI with two joblib workers)."""
    from lmexp.orchestration.search import read_search
    from lmexp.orchestration.trials import claim_trial, open_study

    study = _search(tmp_path, n_trials=1)
    owner = subprocess.Popen([sys.executable, "-c", OWNER, str(tmp_path)])
    deadline = time.monotonic() + 60
    while not (tmp_path / "training").exists():
        assert owner.poll() is None and time.monotonic() < deadline, "the owner never trained"
        time.sleep(0.05)
    search = read_search(tmp_path)
    claimer = open_study(search, tmp_path, 1)
    read = claimer.get_trials

    def read_then_the_owner_finishes(*args, **kwargs):
        trials = read(*args, **kwargs)
        (tmp_path / "go").touch()
        # It tells and frees its folder now, unless the claim keeps it waiting.
        with contextlib.suppress(subprocess.TimeoutExpired):
            owner.wait(timeout=2)
        return trials

    claimer.get_trials = read_then_the_owner_finishes
    trial = claim_trial(claimer, search, tmp_path, 1)
    assert trial is None  # the study's one trial is the owner's, finished: nothing to resume
    assert owner.wait(timeout=60) == 0
    assert [t.state.name for t in study.get_trials()] == ["COMPLETE"]


def test_a_failing_trial_is_told_fail_and_the_worker_goes_on_until_the_storage_fails(tmp_path):
    from lmexp.config import LmexpError
    from lmexp.orchestration.search import FAILURE_ATTR
    from lmexp.orchestration.trials import Pruned, StudyLost

    study = _search(tmp_path, n_trials=5)
    outcomes = iter(
        [RuntimeError("boom"), LmexpError("a bad checkpoint"), Pruned("pruned"), float("inf"),
         StudyLost("the storage failed")]
    )  # fmt: skip

    def train(*_):
        outcome = next(outcomes)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    with pytest.raises(StudyLost):
        _run(tmp_path, train)
    states = [t.state.name for t in study.get_trials()]
    assert states == ["FAIL", "FAIL", "PRUNED", "FAIL", "RUNNING"]  # the last one to resume
    # Each failure's reason, in one line, for the search's closing line.
    reasons = [t.user_attrs.get(FAILURE_ATTR) for t in study.get_trials()]
    assert reasons[:3] == ["boom", "a bad checkpoint", None]
    assert reasons[3].startswith("diverged (its validation perplexity was not finite, or far worse")


def test_a_dead_workers_trials_are_resumed_or_closed_by_the_next(tmp_path):
    """Three RUNNING trials whose folders no process holds (their worker died): one interrupted
    while training (resumed first, with its own values), one the pruner had stopped (told
    PRUNED, not trained on), one that never got its values (told FAIL)."""
    import optuna

    from lmexp.orchestration.search import PRUNED_ATTR, TRIAL_FOLDER_ATTR

    study = _search(tmp_path, n_trials=4)
    space = {"dropout.dp_keep_prob": optuna.distributions.FloatDistribution(0.3, 1.0)}
    interrupted, pruned = study.ask(space), study.ask(space)
    pruned.set_user_attr(PRUNED_ATTR, 2)
    empty = study.ask()
    for trial in (interrupted, pruned, empty):
        trial.set_user_attr(TRIAL_FOLDER_ATTR, str(tmp_path / f"trial_{trial.number}"))
    trained = []
    _run(tmp_path, lambda cfg, params, folder, number, judge: trained.append(number) or 3.0)
    assert trained == [0, 3]  # the interrupted trial, then one new trial: 4 in all
    states = [t.state.name for t in study.get_trials()]
    assert states == ["COMPLETE", "PRUNED", "FAIL", "COMPLETE"]
    assert study.get_trials()[0].params == interrupted.params
