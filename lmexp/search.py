"""Optuna searches with pruning: the search space, the study, and the workers that run trials.

The sweeper (hydra_plugins/lmexp_optuna_sweeper) checks the search with `check_search`, creates
the study in database storage (sqlite in the sweep folder unless hydra.sweeper.storage names
one, e.g. the team's PostgreSQL), writes `optuna_study.json` there, and launches n_jobs *worker*
jobs through the configured launcher (in-process, joblib, SLURM). Each worker (`run_trials`)
asks the shared study for a trial, trains it in <sweep dir>/trial_<n> as a child MLflow run,
reports its validation perplexity after every epoch, stops when the pruner says so, tells the
study, and asks again until the study holds n_trials trials. So a worker never waits for others
to finish a batch (Optuna's own pattern for distributed optimisation), whatever the launcher.

A trial interrupted (SIGTERM, preemption, a kill) stays RUNNING in the study; a worker of a
later run of the same command, seeing that no live process holds its folder, resumes it from its
checkpoint before asking for new trials.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import json
import logging
import math
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lmexp.config import (
    RECIPE,
    SHAPE,
    LmexpError,
    Preempted,
    RunStopped,
    first_line,
    keys_with_role,
)

log = logging.getLogger("lmexp.search")

SWEEPER_TARGET = "hydra_plugins.lmexp_optuna_sweeper.optuna_sweeper.LmexpOptunaSweeper"
STUDY_FILE = "optuna_study.json"  # in the sweep folder: where the workers find the study
ASK_LOCK = ".optuna_ask.lock"  # one worker at a time counts the trials and asks for one
TRIAL_FOLDER_ATTR = "lmexp.folder"  # a trial's run folder, in its user attributes
WORKER_ATTR = "lmexp.worker"  # and the worker that started it
PRUNED_ATTR = "lmexp.pruned_after_epoch"  # set before a pruned trial's run is closed
SWEEP_DIR_ATTR = "lmexp.sweep_dir"  # a study's: the search it belongs to
SPACE_ATTR = "lmexp.space"  # and the space it samples
RECIPE_ATTR = "lmexp.recipe"  # and the recipe its trials share (every key it does not sample)
UID_ATTR = "lmexp.study_uid"  # and an id of its own: a study made anew under the same name differs
OWNER_FILE = "lmexp_study.json"  # in a trial folder: the study (uid, name) the trial belongs to
# The settings every trial of one study must share: what a single run's resume also refuses to
# change (config.py's roles), and its length (a run may be extended, but trials of 3 and of 6
# epochs compared on their best valid ppl is no search), less the keys the search samples.
RECIPE_KEYS = frozenset(keys_with_role(SHAPE) | keys_with_role(RECIPE) | {"trainer.max_epochs"})

SAMPLERS = {"tpe": "TPESampler", "random": "RandomSampler", "qmc": "QMCSampler"}
PRUNERS = {
    "none": "NopPruner",
    "median": "MedianPruner",
    "percentile": "PercentilePruner",
    "asha": "SuccessiveHalvingPruner",
    "hyperband": "HyperbandPruner",
}


def uses_search(config: DictConfig) -> bool:
    """Whether a multirun's sweeper is lmexp's Optuna search."""
    return OmegaConf.select(config, "hydra.sweeper._target_") == SWEEPER_TARGET


# --- the search space --------------------------------------------------------------------------


def distribution(key: str, override: Any) -> Any:
    """The Optuna distribution of one swept key, from Hydra's override grammar: interval(a, b)
    (tag(log, ...) for a log scale, tag(int, ...) for integers), choice(...) and range(...)."""
    import optuna.distributions as d
    from hydra.core.override_parser.types import Transformer

    if override.is_interval_sweep():
        interval = override.value()
        low, high = interval.start, interval.end
        if not low < high:
            raise LmexpError(
                f"hydra.sweeper.params.{key}: interval({_num(low)}, {_num(high)}) is empty "
                "(low must be below high); write it as interval(low, high)."
            )
        log_scale = "log" in interval.tags
        if log_scale and low <= 0:
            raise LmexpError(
                f"hydra.sweeper.params.{key}: a log-scale interval must start above 0, not at "
                f"{_num(low)}; raise its low end or drop tag(log, ...)."
            )
        if "int" in interval.tags:
            return d.IntDistribution(int(low), int(high), log=log_scale)
        return d.FloatDistribution(float(low), float(high), log=log_scale)
    values = list(override.sweep_iterator(transformer=Transformer.encode))
    if len(values) < 2:
        raise LmexpError(
            f"hydra.sweeper.params.{key} offers {len(values)} value; give a choice of at least "
            "two or set the key as a plain value."
        )
    return d.CategoricalDistribution(values)


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def search_space(
    params: list[Any], task: list[Any], config: DictConfig
) -> tuple[dict[str, Any], list[str]]:
    """The distributions to sample (sweeper params, then command-line sweeps, later winning) and
    the fixed overrides every trial gets. A key must name a value of lmexp's config: config
    groups (model=small,medium) are chosen per search, not sampled."""
    space: dict[str, Any] = {}
    fixed: dict[str, str] = {}
    for override in params + task:
        key = override.get_key_element()
        if not override.is_sweep_override():
            fixed[key] = override.input_line
            space.pop(key, None)
            continue
        node = OmegaConf.select(config, key, default=None)
        if isinstance(node, DictConfig) or key in (config.hydra.runtime.choices or {}):
            raise LmexpError(
                f"hydra.sweeper.params.{key} is a config group: the search samples values, "
                f"not groups; run one search per {key}=... or search over its keys instead."
            )
        space[key] = distribution(key, override)
        fixed.pop(key, None)
    if not space:
        raise LmexpError(
            "The search has nothing to sample; give hydra.sweeper.params (for example "
            "dropout.dp_keep_prob: interval(0.3, 1.0)) or a sweep on the command line."
        )
    return space, list(fixed.values())


# --- sampler, pruner, storage ------------------------------------------------------------------


def _settings(node: Any) -> tuple[str, dict[str, Any]]:
    """A sampler's or pruner's name and keyword arguments: {name: ..., key: value} or the name."""
    if not isinstance(node, DictConfig | dict):
        return str(node if node is not None else ""), {}
    settings = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node
    settings = dict(settings)  # type: ignore[arg-type]
    return str(settings.pop("name", "")), settings


def _plain(node: Any) -> dict[str, Any]:
    name, kwargs = _settings(node)
    return {"name": name, **kwargs}


def make_sampler(node: Any, worker: int = 0) -> Any:
    """hydra.sweeper.sampler: {name: tpe|random|qmc, seed: ..., other keyword arguments}. Worker
    w gets seed + w, so parallel workers do not propose the same points."""
    import optuna

    name, kwargs = _settings(node)
    if name not in SAMPLERS:
        raise LmexpError(
            f"hydra.sweeper.sampler.name={name or '(empty)'} is not a sampler lmexp knows; "
            f"use one of {', '.join(SAMPLERS)}."
        )
    seed = kwargs.get("seed")
    if seed is not None:
        if type(seed) is not int:  # Hydra reads abc as a string and 1.7 as a float
            raise LmexpError(
                f"hydra.sweeper.sampler.seed={seed} is not a whole number; give an integer "
                "seed, or null for a random one."
            )
        kwargs["seed"] = seed + worker
    return _build(getattr(optuna.samplers, SAMPLERS[name]), kwargs, "sampler", name)


def make_pruner(node: Any) -> Any:
    """hydra.sweeper.pruner: {name: median|percentile|asha|hyperband|none, keyword arguments}.
    Steps are epochs, from 1: n_warmup_steps=k prunes from epoch k on."""
    import optuna

    name, kwargs = _settings(node)
    if name not in PRUNERS:
        raise LmexpError(
            f"hydra.sweeper.pruner.name={name or '(empty)'} is not a pruner lmexp knows; use "
            f"one of {', '.join(PRUNERS)}."
        )
    if name == "none":
        kwargs = {}  # the settings of the pruner it replaces (pruner.name=none) mean nothing
    return _build(getattr(optuna.pruners, PRUNERS[name]), kwargs, "pruner", name)


def _build(cls: type, kwargs: dict[str, Any], what: str, name: str) -> Any:
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise LmexpError(
            f"hydra.sweeper.{what} {name} cannot be built with {kwargs} ({first_line(err)}); "
            f"fix its settings (they are {cls.__name__}'s keyword arguments)."
        ) from None


def storage_url(config: DictConfig) -> str:
    """hydra.sweeper.storage, or a sqlite file in the sweep folder."""
    url = OmegaConf.select(config, "hydra.sweeper.storage")
    if url:
        return str(url)
    return f"sqlite:///{Path(config.hydra.sweep.dir).resolve() / 'optuna.db'}"


def open_storage(url: str, default: bool = False) -> Any:
    """Optuna's database storage (sqlite waits up to a minute for another writer), or one
    sentence when it cannot be opened. default: the url is the sweep folder's own optuna.db
    (hydra.sweeper.storage null), whose fix is another than a storage the user named."""
    import optuna

    from lmexp.runtime import sqlite_problem
    from lmexp.tracking import redact, sqlite_path

    db = sqlite_path(url)
    reason = sqlite_problem(db) if db is not None and db.is_file() and db.stat().st_size else None
    if reason is None:
        kwargs = {"connect_args": {"timeout": 60}} if db is not None else {}
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
        except Exception as err:  # noqa: BLE001 - a bad URL, no driver, no server, no password
            reason = first_line(root_cause(err))
    if default:
        raise LmexpError(
            f"The search's study database {db} is unusable ({reason}); restore it from a "
            "backup, or start the search afresh in a new folder (another hydra.sweep.dir): the "
            "trials in this one belong to the study it held."
        )
    raise LmexpError(
        f"hydra.sweeper.storage={redact(url)} cannot be opened ({reason}); give a database URL "
        "Optuna can reach (sqlite:///path/optuna.db, postgresql://user@host/db), or leave it "
        "null for a sqlite file in the sweep folder."
    )


def root_cause(err: BaseException) -> BaseException:
    """The error under a library's wrapper: Optuna reports any failed commit (a corrupt page, a
    read-only file) as 'invalid data in the commit, e.g. exceeding max length'."""
    while err.__cause__ is not None or err.__context__ is not None:
        err = err.__cause__ or err.__context__  # type: ignore[assignment]
    return err


def direction(config: DictConfig) -> str:
    """minimize: a trial's value is its best validation perplexity, lower is better. maximize
    would make the worst model the study's best (and disagree with the MLflow parent's)."""
    value = str(OmegaConf.select(config, "hydra.sweeper.direction"))
    if value != "minimize":
        raise LmexpError(
            f"hydra.sweeper.direction={value} does not fit the objective: each trial returns "
            "its best validation perplexity, where lower is better; leave it at minimize."
        )
    return value


def create_study(config: DictConfig, space: dict[str, Any]) -> Any:
    """The study in its storage, created or (the same command again) loaded. A study belongs to
    one sweep folder and one search space: another search cannot take over its trials."""
    import optuna
    import optuna.distributions as d

    from lmexp.tracking import redact, resolve_tracking_uri

    url = storage_url(config)
    tracking = OmegaConf.select(config, "logger.tracking_uri")
    if tracking and resolve_tracking_uri(tracking, Path.cwd()) == url:
        raise LmexpError(
            f"hydra.sweeper.storage is MLflow's own store ({redact(url)}); Optuna and MLflow "
            "each keep an alembic_version table, so give the study a database of its own."
        )
    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
    name = str(config.hydra.sweeper.study_name)
    default = not OmegaConf.select(config, "hydra.sweeper.storage")
    try:
        study = optuna.create_study(
            storage=open_storage(url, default),
            study_name=name,
            direction=direction(config),
            load_if_exists=True,
        )
        attrs = study.user_attrs
    except LmexpError:
        raise
    except Exception as err:  # noqa: BLE001 - storage that opens but cannot hold a study
        where = "The search's study database" if default else "hydra.sweeper.storage="
        raise LmexpError(
            f"{where}{' ' if default else ''}{redact(url)} cannot hold study {name} "
            f"({first_line(root_cause(err))}); check the database and its permissions."
        ) from None
    other = "or give this search its own hydra.sweeper.study_name"
    if study.direction.name.lower() != direction(config):
        raise LmexpError(
            f"Study {name} in {redact(url)} was made to {study.direction.name.lower()}; {other}."
        )
    folder = str(Path(config.hydra.sweep.dir).resolve())
    owner = attrs.get(SWEEP_DIR_ATTR, folder)
    if owner != folder:
        raise LmexpError(
            f"Study {name} in {redact(url)} belongs to the search in {owner}; continue that one "
            f"with hydra.sweep.dir={owner}, {other}."
        )
    stored = {k: d.json_to_distribution(v) for k, v in attrs.get(SPACE_ATTR, {}).items()}
    if stored and stored != space:
        changed = sorted(k for k in stored.keys() | space.keys() if stored.get(k) != space.get(k))
        raise LmexpError(
            f"Study {name} searches another space than this command ({', '.join(changed)} "
            f"differ); use the same hydra.sweeper.params to continue it, {other}."
        )
    recipe = recipe_of(config, space)
    stored_recipe = attrs.get(RECIPE_ATTR)
    if stored_recipe is not None and stored_recipe != recipe:
        changed = sorted(k for k in stored_recipe.keys() | recipe.keys()
                         if stored_recipe.get(k) != recipe.get(k))  # fmt: skip
        shown = ", ".join(
            f"{k}={stored_recipe.get(k, '(unset)')} (now {recipe.get(k, '(unset)')})"
            for k in changed
        )
        raise LmexpError(
            f"Study {name} was run with {shown}; continuing it would mix two recipes in one "
            "study, so rerun it with its own settings, or start this search in a folder of its "
            "own (another hydra.sweep.dir) with its own hydra.sweeper.study_name."
        )
    uid = attrs.get(UID_ATTR) or uuid.uuid4().hex
    check_trial_folders(Path(folder), study, uid, name)
    study.set_user_attr(SWEEP_DIR_ATTR, folder)
    study.set_user_attr(SPACE_ATTR, {k: d.distribution_to_json(v) for k, v in space.items()})
    study.set_user_attr(RECIPE_ATTR, recipe)
    study.set_user_attr(UID_ATTR, uid)
    return study


def recipe_of(config: DictConfig, space: dict[str, Any]) -> dict[str, str]:
    """The settings a study's trials share, as text: every recipe or shape key not sampled."""
    return {
        key: json.dumps(OmegaConf.select(config, key, default=None))
        for key in sorted(RECIPE_KEYS - space.keys())
    }


def check_trial_folders(sweep_dir: Path, study: Any, uid: str, name: str) -> None:
    """Refuse a study that does not own the trial folders already in its sweep folder: a new
    study there (optuna.db deleted or lost, another study_name) would otherwise resume, retrain
    or copy the old trials as its own. A folder is this study's when its owner file names the
    study's uid, or (folders made before owner files) when one of the study's trials names it."""
    known = {str(t.user_attrs.get(TRIAL_FOLDER_ATTR)) for t in study.get_trials(deepcopy=False)}
    foreign = []
    for folder in sorted(sweep_dir.glob("trial_*"), key=lambda f: (len(f.name), f.name)):
        owner = read_owner(folder)
        if owner.get("uid") != uid and not (not owner and str(folder.resolve()) in known):
            foreign.append((folder.name, owner.get("study")))
    if not foreign:
        return
    names = ", ".join(n for n, _ in foreign[:3]) + (", ..." if len(foreign) > 3 else "")
    other = foreign[0][1]
    whose = (
        f"of an earlier study named {name}, which its storage no longer holds (deleted or replaced)"
        if other in (None, name)
        else f"of study {other}, not of {name}; continue that one with its own "
        "hydra.sweeper.study_name and storage"
    )
    raise LmexpError(
        f"{sweep_dir} holds the trials ({names}) {whose}; or start this search in a new folder "
        "with another hydra.sweep.dir."
    )


def read_owner(folder: Path) -> dict[str, str]:
    try:
        owner = json.loads((folder / OWNER_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return owner if isinstance(owner, dict) else {}


def claim_folder(folder: Path, study: Any) -> None:
    """Mark a trial's folder as its study's (see check_trial_folders)."""
    folder.mkdir(parents=True, exist_ok=True)
    owner = {"uid": study.user_attrs.get(UID_ATTR, ""), "study": study.study_name}
    (folder / OWNER_FILE).write_text(json.dumps(owner))


@dataclass
class Search:
    """A checked search: what each worker needs, also written to optuna_study.json."""

    storage: str
    study_name: str
    n_trials: int
    space: dict[str, Any]
    fixed: list[str]
    sampler: dict[str, Any]
    pruner: dict[str, Any]

    def to_json(self) -> str:
        import optuna.distributions as d

        record = {
            **self.__dict__,
            "space": {k: d.distribution_to_json(v) for k, v in self.space.items()},
        }
        return json.dumps(record)

    @classmethod
    def from_json(cls, text: str) -> Search:
        import optuna.distributions as d

        record = json.loads(text)
        record["space"] = {k: d.json_to_distribution(v) for k, v in record["space"].items()}
        return cls(**record)


def check_search(config: DictConfig, params: list[Any], task: list[Any]) -> Search:
    """Everything about a search that can be wrong, each in one sentence, before any trial:
    the space, sampler, pruner, trial count and storage (the study is created there)."""
    space, fixed = search_space(params, task, config)
    sweeper = config.hydra.sweeper
    make_sampler(sweeper.sampler)
    pruner = make_pruner(sweeper.pruner)
    n_trials = int(sweeper.n_trials)
    if n_trials < 1 or int(sweeper.n_jobs) < 1:
        raise LmexpError(
            f"hydra.sweeper.n_trials={n_trials} and n_jobs={sweeper.n_jobs} must both be at "
            "least 1."
        )
    seeds = OmegaConf.select(config, "trainer.seeds_per_job", default=1)
    if seeds > 1 and type(pruner).__name__ != "NopPruner":
        raise LmexpError(
            f"trainer.seeds_per_job={seeds} judges a trial over seeds trained one after "
            "another, which a pruner cannot follow epoch by epoch; add hydra.sweeper.pruner=none."
        )
    create_study(config, space)
    return Search(
        storage=storage_url(config),
        study_name=str(sweeper.study_name),
        n_trials=n_trials,
        space=space,
        fixed=fixed,
        sampler=_plain(sweeper.sampler),
        pruner=_plain(sweeper.pruner),
    )


def read_search(sweep_dir: Path) -> Search | None:
    path = sweep_dir / STUDY_FILE
    return Search.from_json(path.read_text()) if path.exists() else None


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
        from lmexp.tracking import PRUNED_TAG

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

    from lmexp.runtime import folder_in_use, lock_folder

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


def trial_config(cfg: DictConfig, params: dict[str, Any]) -> DictConfig:
    """The worker's config with a trial's sampled values."""
    out = copy.deepcopy(cfg)
    for key, value in params.items():
        OmegaConf.update(out, key, value, merge=False)
    return out


def in_storage(search: Search, sweep_dir: Path, what: str, call: Callable[[], Any]) -> Any:
    """A call to the study's storage; its failure (a database gone, sqlite locked past its
    timeout) in one sentence that says how to go on."""
    from lmexp.tracking import redact

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
    cfg: DictConfig,
    trial: Any,
    params: dict[str, Any],
    pruner: str,
    folder: Path,
) -> tuple[Any, float]:
    """Train one trial; its outcome for the study: COMPLETE with its value, PRUNED or FAIL. A
    signal, or a tracking store or study storage gone, propagates (the trial stays RUNNING)."""
    from optuna.trial import TrialState

    from lmexp.tracking import TrackingLost

    judge = None if pruner == "none" else Judge(trial, pruner)
    try:
        value = train(trial_config(cfg, params), params, folder, trial.number, judge)
    except Pruned as why:
        log.info("Trial %d %s", trial.number, why)
        return TrialState.PRUNED, math.inf
    except (TrackingLost, StudyLost, Preempted, SystemExit, KeyboardInterrupt):
        raise  # stopped, not failed: a rerun resumes it
    except Exception as err:  # noqa: BLE001 - one trial's failure is recorded, not the search's
        log.error("Trial %d failed: %s", trial.number, first_line(err))
        return TrialState.FAIL, math.inf
    if not math.isfinite(value):
        return TrialState.FAIL, value  # diverged: its run says so
    return TrialState.COMPLETE, value


def run_trials(
    cfg: DictConfig,
    sweep_dir: Path,
    worker: int,
    train: Callable[[DictConfig, dict[str, Any], Path, int, Judge | None], float],
) -> float:
    """A worker: claim trials and train them until the study has none left; return the best
    value this worker found. train(cfg, params, folder, number, judge) trains one trial and
    returns its best validation perplexity, raising Pruned when the judge stopped it. A trial
    that fails is told FAIL and the worker goes on; a signal, or a tracking store or study
    storage gone, stops the worker with the trial left RUNNING, for a rerun to resume."""
    from optuna.trial import TrialState

    from lmexp.runtime import unlock_folder

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
            state, value = train_trial(train, cfg, trial, params, pruner, folder)
        except BaseException:
            unlock_folder(folder)
            raise
        told = value if state == TrialState.COMPLETE else None
        # The folder stays locked until the study knows: no other worker resumes it meanwhile.
        in_storage(search, sweep_dir, "record a result", lambda: study.tell(trial, told, state))  # noqa: B023
        unlock_folder(folder)
        if state == TrialState.COMPLETE:
            best = min(best, value)
    return best
