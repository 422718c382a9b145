"""An Optuna search's workers (see lmexp.orchestration.search for the search and its study): each claims a
trial (an interrupted one first, resumed from its checkpoint), trains it in its own folder,
reports each epoch to the pruner (Judge) and tells the study, until the study has n_trials.
Workers share nothing but the study's storage and the sweep folder's locks, so none waits
for another, whatever the launcher."""

from __future__ import annotations

import contextlib
import copy
import fcntl
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lmexp.config import LmexpError, Preempted, RunStopped, first_line
from lmexp.orchestration.search import (
    ASK_LOCK,
    FAILURE_ATTR,
    PRUNED_ATTR,
    TRIAL_FOLDER_ATTR,
    WORKER_ATTR,
    Search,
    claim_folder,
    make_pruner,
    make_sampler,
    open_storage,
    read_search,
)

log = logging.getLogger("lmexp.search")


# --- pruning -----------------------------------------------------------------------------------


class Pruned(RunStopped):
    """Raised by a trial's Judge when the study's pruner stops it: its run ends KILLED, tagged
    with the epoch it was pruned after."""


class StudyLost(LmexpError, RunStopped):
    """The study's storage failed while a trial trained: the trial stops, to be resumed."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.reason = f"{message}; resumable"  # its run's KILLED reason; the error stays as is


@dataclass
class Judge:
    """Reports a trial's validation perplexity per epoch; says why, when the pruner stops it."""

    trial: Any
    pruner: str

    def __call__(self, epoch: int, valid_ppl: float, last: bool) -> None:
        """Called after each epoch; raises Pruned when the pruner stops the trial."""
        from lmexp.tracking.base import PRUNED_TAG

        why = self.verdict(epoch, valid_ppl, last)
        if why is not None:
            raise Pruned(why, tags={PRUNED_TAG: str(epoch)})

    def verdict(self, epoch: int, valid_ppl: float, last: bool) -> str | None:
        try:
            self.trial.report(valid_ppl, epoch)
            # After its last epoch a trial has cost all it will: it finishes (and is tested).
            if last or not self.trial.should_prune():
                return None
            # Marked before its run is closed: if the worker dies before telling the study,
            # the next worker tells it PRUNED instead of training it on.
            self.trial.set_user_attr(PRUNED_ATTR, epoch)
        except Exception as err:  # noqa: BLE001 - the storage's errors are driver-specific
            raise StudyLost(
                f"Optuna's storage failed while trial {self.trial.number} reported epoch "
                f"{epoch} ({first_line(err)}); once it works, rerun the same command with the "
                "same hydra.sweep.dir: the trial resumes from this epoch's checkpoint."
            ) from None
        return (
            f"pruned by Optuna's {self.pruner} pruner after epoch {epoch} (valid ppl "
            f"{valid_ppl:.2f}, trial {self.trial.number})"
        )


# --- the workers -------------------------------------------------------------------------------


@contextlib.contextmanager
def ask_lock(sweep_dir: Path) -> Iterator[None]:
    """One worker at a time counts the study's trials and claims one (no trial beyond n_trials,
    no trial claimed twice)."""
    with open(sweep_dir / ASK_LOCK, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def claim_trial(study: Any, search: Search, sweep_dir: Path, worker: int) -> Any:
    """The next trial for this worker, its folder locked: an interrupted one (RUNNING, no live
    process on its folder) first, else a new one while the study has fewer than n_trials.
    None when there is nothing left to do."""
    import optuna
    from optuna.trial import TrialState

    from lmexp.files import folder_in_use, lock_folder

    with ask_lock(sweep_dir):
        trials = study.get_trials(deepcopy=False)
        for frozen in trials:
            folder = Path(frozen.user_attrs.get(TRIAL_FOLDER_ATTR, trial_dir(sweep_dir, frozen)))
            if frozen.state != TrialState.RUNNING or folder_in_use(folder):
                continue
            if PRUNED_ATTR in frozen.user_attrs or frozen.params.keys() != search.space.keys():
                # Pruned (or never given its values) by a worker that died before telling.
                state = TrialState.PRUNED if PRUNED_ATTR in frozen.user_attrs else TrialState.FAIL
                study.tell(frozen.number, state=state)
                continue
            lock_folder(folder)
            log.info("Resuming interrupted trial %d in %s", frozen.number, folder)
            return optuna.trial.Trial(study, frozen._trial_id)
        if sum(t.state != TrialState.WAITING for t in trials) >= search.n_trials:
            return None
        trial = study.ask(search.space)  # an enqueued (WAITING) trial first, else a sampled one
        folder = trial_dir(sweep_dir, trial)
        lock_folder(folder)
        claim_folder(folder, study)
        trial.set_user_attr(TRIAL_FOLDER_ATTR, str(folder))
        trial.set_user_attr(WORKER_ATTR, worker)
        return trial


def trial_dir(sweep_dir: Path, trial: Any) -> Path:
    return (sweep_dir / f"trial_{trial.number}").resolve()


def trial_config(
    cfg: DictConfig,
    params: dict[str, Any],
    groups: Sequence[str] = (),
    compose: Callable[[list[str]], DictConfig] | None = None,
) -> DictConfig:
    """The worker's config with a trial's sampled values. When the search samples config
    groups, the config is first composed again (compose, Hydra's compose API) with the trial's
    choices (dropout=variational) after the worker's own overrides, as Hydra composes a job."""
    choices = [f"{key}={params[key]}" for key in groups]
    if choices:
        assert compose is not None, "a search over config groups composes each trial's config"
        out = compose(choices)
    else:
        out = copy.deepcopy(cfg)
    for key, value in params.items():
        if key not in groups:
            OmegaConf.update(out, key, value, merge=False)
    return out


def in_storage(search: Search, sweep_dir: Path, what: str, call: Callable[[], Any]) -> Any:
    """A call to the study's storage; its failure (a database gone, sqlite locked past its
    timeout) in one sentence that says how to go on."""
    from lmexp.tracking.stores import redact

    try:
        return call()
    except LmexpError:
        raise
    except Exception as err:  # noqa: BLE001 - the storage's errors are many and driver-specific
        raise LmexpError(
            f"Optuna's storage {redact(search.storage)} failed to {what} ({first_line(err)}); "
            f"once it works, rerun the same command with hydra.sweep.dir={sweep_dir}: the "
            "study's trials are kept and an interrupted one resumes."
        ) from None


def open_study(search: Search, sweep_dir: Path, worker: int) -> Any:
    """The study as this worker samples it: seeded by worker and by how far the study is, so
    that a rerun or a requeued worker does not propose the points it proposed before (a fresh
    search with one worker is reproducible)."""
    import optuna
    from optuna.trial import TrialState

    storage = in_storage(search, sweep_dir, "open", lambda: open_storage(search.storage))
    study = in_storage(
        search, sweep_dir, "load the study",
        lambda: optuna.load_study(study_name=search.study_name, storage=storage),
    )  # fmt: skip
    started = sum(t.state != TrialState.WAITING for t in study.get_trials(deepcopy=False))
    study.sampler = make_sampler(search.sampler, worker + 1000 * started)
    study.pruner = make_pruner(search.pruner)
    return study


def train_trial(
    train: Callable[..., float],
    config: Callable[[], DictConfig],
    trial: Any,
    params: dict[str, Any],
    pruner: str,
    folder: Path,
) -> tuple[Any, float, str | None]:
    """Train one trial (config makes its config); its outcome for the study: COMPLETE with its value,
    PRUNED, or FAIL with the reason. A signal, or a tracking store or study storage gone,
    propagates (the trial stays RUNNING)."""
    from optuna.trial import TrialState

    from lmexp.tracking.queries import TrackingLost

    judge = None if pruner == "none" else Judge(trial, pruner)
    try:
        value = train(config(), params, folder, trial.number, judge)
    except Pruned as why:
        log.info("Trial %d %s", trial.number, why)
        return TrialState.PRUNED, math.inf, None
    except (TrackingLost, StudyLost, Preempted, SystemExit, KeyboardInterrupt):
        raise  # stopped, not failed: a rerun resumes it
    except Exception as err:  # noqa: BLE001 - one trial's failure is recorded, not the search's
        log.error("Trial %d failed: %s", trial.number, first_line(err))
        return TrialState.FAIL, math.inf, first_line(err)
    if not math.isfinite(value):  # diverged: its run says when and how
        return (
            TrialState.FAIL,
            value,
            (
                "diverged (its validation perplexity was not finite, or far worse than a uniform "
                "guess: its MLflow run says when); lower lr_policy.lr or trainer.max_grad_norm"
            ),
        )
    return TrialState.COMPLETE, value, None


def run_trials(
    cfg: DictConfig,
    sweep_dir: Path,
    worker: int,
    train: Callable[[DictConfig, dict[str, Any], Path, int, Judge | None], float],
    compose: Callable[[list[str]], DictConfig] | None = None,
) -> float:
    """A worker: claim trials and train them until the study has none left; return the best
    value this worker found. train(cfg, params, folder, number, judge) trains one trial and
    returns its best validation perplexity, raising Pruned when the judge stopped it; compose
    makes a trial's config from its config-group choices (see trial_config). A trial that fails
    is told FAIL (its reason in the user attribute lmexp.failure) and the worker goes on; a
    signal, or a tracking store or study storage gone, stops the worker with the trial left
    RUNNING, for a rerun to resume."""
    from optuna.trial import TrialState

    from lmexp.files import unlock_folder

    search = read_search(sweep_dir)
    assert search is not None
    study = open_study(search, sweep_dir, worker)
    pruner = str(search.pruner.get("name"))
    best = math.inf
    claim = lambda: claim_trial(study, search, sweep_dir, worker)  # noqa: E731
    while (trial := in_storage(search, sweep_dir, "hand out a trial", claim)) is not None:
        folder = trial_dir(sweep_dir, trial)
        params = {key: trial.params[key] for key in search.space}
        shown = " ".join(f"{k}={v}" for k, v in params.items())
        log.info("Trial %d (worker %d): %s", trial.number, worker, shown)
        try:
            config = lambda: trial_config(cfg, params, search.groups, compose)  # noqa: E731, B023
            state, value, why = train_trial(train, config, trial, params, pruner, folder)
        except BaseException:
            unlock_folder(folder)
            raise
        told = value if state == TrialState.COMPLETE else None

        def tell() -> None:
            if why is not None:  # noqa: B023
                trial.set_user_attr(FAILURE_ATTR, why)  # noqa: B023
            study.tell(trial, told, state)  # noqa: B023

        # The folder stays locked until the study knows, and both happen under the ask lock: a
        # worker claiming a trial reads the trials, then checks their folders, and must not see
        # this trial RUNNING and its folder free (it would resume a finished trial).
        with ask_lock(sweep_dir):
            in_storage(search, sweep_dir, "record a result", tell)
            unlock_folder(folder)
        if state == TrialState.COMPLETE:
            best = min(best, value)
    return best
