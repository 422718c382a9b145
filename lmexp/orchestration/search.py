"""Optuna searches with pruning: the search space, the sampler and pruner, the study and its
storage, checked before any trial. The workers that run the trials are lmexp.orchestration.trials.

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

import json
import logging
import uuid
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lmexp.config import (
    RECIPE,
    SHAPE,
    LmexpError,
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
FAILURE_ATTR = "lmexp.failure"  # a failed trial's reason, in one line
# How the search in this process ended: the sweeper sets exit_code 1 when no trial finished and
# some failed, and the entry point exits with it (Hydra's sweepers return no status).
OUTCOME = {"exit_code": 0}
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


# Config groups a search may sample (dropout=choice(standard,variational)): each trial's config is
# composed again with its choice. Each sets keys of its own section only. Not the model presets
# (each a whole recipe: its own epochs, batch and lr schedule, which one study must share), not
# the corpus (trials on two corpora have incomparable perplexities), nor the groups that say how
# or where a run goes (trainer, logger, hydra/...).
SEARCHABLE_GROUPS = ("dropout", "lr_policy", "optimizer", "regularizer")


def distribution(key: str, override: Any, config: DictConfig | None = None) -> Any:
    """The Optuna distribution of one swept key, from Hydra's override grammar, mapped as Hydra's
    Optuna sweeper maps it: choice(...) and shuffle(range(...)) categorical; interval(a, b) a
    float (tag(log, ...) on a log scale), int(interval(a, b)) an integer (lmexp's older
    tag(int, interval(a, b)) too); range(a, b[, step]) an ordered integer (or, with a float end
    or step, float) distribution over exactly the values Hydra's range lists, stop excluded.
    With the config, an integer key sampled from floats is refused."""
    import optuna.distributions as d
    from hydra.core.override_parser.types import Transformer

    if override.is_interval_sweep():
        interval = override.value()
        low, high = interval.start, interval.end
        if not low < high:
            raise LmexpError(
                f"hydra.sweeper.params.{key}: interval({override_number(low)}, {override_number(high)}) is empty "
                "(low must be below high); write it as interval(low, high)."
            )
        log_scale = "log" in interval.tags
        if log_scale and low <= 0:
            raise LmexpError(
                f"hydra.sweeper.params.{key}: a log-scale interval must start above 0, not at "
                f"{override_number(low)}; raise its low end or drop tag(log, ...)."
            )
        if "int" in interval.tags or (isinstance(low, int) and isinstance(high, int)):
            return d.IntDistribution(int(low), int(high), log=log_scale)
        if config is not None and _integer_key(config, key):
            written = f"int(interval({override_number(low)}, {override_number(high)}))"
            written = f"tag(log, {written})" if log_scale else written
            raise LmexpError(f"{key} is an integer: write {written} to sample whole numbers.")
        return d.FloatDistribution(float(low), float(high), log=log_scale)
    values = list(override.sweep_iterator(transformer=Transformer.encode))
    if len(values) < 2:
        raise LmexpError(
            f"hydra.sweeper.params.{key} offers {len(values)} value; give a choice of at least "
            "two or set the key as a plain value."
        )
    if override.is_range_sweep() and not override.value().shuffle:
        # Ordered, as Hydra's sweeper makes it, so that TPE can use the order; over the values
        # Hydra's range lists (range(1, 3) is 1, 2), where Hydra's Optuna sweeper would add the
        # stop (IntDistribution(1, 3) also samples 3, a value the basic sweeper never runs).
        step = abs(override.value().step)
        low = min(values)
        if all(isinstance(v, int) for v in (*values, step)):
            return d.IntDistribution(low, low + step * (len(values) - 1), step=step)
        # In decimal, as Optuna checks the grid: 0.1 + 3 * 0.3 in binary is 0.9999999999999999,
        # which Optuna would round down to 0.7, dropping a value the range lists.
        high = on_grid(low, step, len(values) - 1)
        return d.FloatDistribution(float(low), high, step=float(step))
    return d.CategoricalDistribution(values)


def on_grid(low: float, step: float, i: int) -> float:
    """The i-th value of a stepped grid, low + i * step, in decimal as Optuna checks the grid."""
    return float(Decimal(repr(float(low))) + Decimal(repr(float(step))) * i)


def _integer_key(config: DictConfig, key: str) -> bool:
    """Whether lmexp's schema types the key as an integer."""
    from omegaconf.nodes import IntegerNode

    parent_key, _, leaf = key.rpartition(".")
    parent = OmegaConf.select(config, parent_key, default=None) if parent_key else config
    node = parent._get_node(leaf) if isinstance(parent, DictConfig) else None
    return isinstance(node, IntegerNode)


def override_number(value: float) -> str:
    """A number as an override writes it: 3, not 3.0; 0.001 as repr gives it."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def search_space(
    params: list[Any], task: list[Any], config: DictConfig
) -> tuple[dict[str, Any], list[str], list[str]]:
    """The distributions to sample (sweeper params, then command-line sweeps, later winning),
    the fixed overrides every trial gets (key=value, ~key, +key=value: passed on unchanged), and
    the sampled keys that are config groups (each trial's config is composed with its choice)."""
    space: dict[str, Any] = {}
    fixed: dict[str, str] = {}
    groups: list[str] = []
    for override in params + task:
        key = override.get_key_element()
        if not override.is_sweep_override():
            fixed[key] = override.input_line
            space.pop(key, None)
            continue
        if key in (config.hydra.runtime.choices or {}) or key.startswith("hydra/"):
            space[key] = group_distribution(key, override)
            groups.append(key)
        elif isinstance(OmegaConf.select(config, key, default=None), DictConfig):
            raise LmexpError(
                f"hydra.sweeper.params.{key} is a section of the config, not a value or a "
                f"config group; sample its keys instead ({key}.<key>=interval(a, b))."
            )
        else:
            space[key] = distribution(key, override, config)
        fixed.pop(key, None)
    if not space:
        raise LmexpError(
            "The search has nothing to sample; give hydra.sweeper.params (for example "
            "dropout.dp_keep_prob: interval(0.3, 1.0)) or a sweep on the command line."
        )
    return space, list(fixed.values()), [g for g in dict.fromkeys(groups) if g in space]


def group_distribution(key: str, override: Any) -> Any:
    """A config group's options as a categorical distribution (dropout=choice(standard,
    variational)); refused for groups a search cannot compare trials over."""
    import optuna.distributions as d
    from hydra.core.override_parser.types import Transformer

    if key == "model":
        raise LmexpError(
            "hydra.sweeper.params.model is a whole recipe (size, epochs, batch, lr schedule), "
            "which a study's trials share; run one search per model=..., or sample its keys "
            "(model.hidden_size=int(interval(200, 650)))."
        )
    if key not in SEARCHABLE_GROUPS:
        why = (
            "the corpus: trials on different corpora have perplexities that cannot be compared"
            if key == "data"
            else "not a group a search can sample"
        )
        raise LmexpError(
            f"hydra.sweeper.params.{key} is {why}; set {key}=... once for the search (it can "
            f"sample the groups {', '.join(SEARCHABLE_GROUPS)})."
        )
    if not override.is_discrete_sweep():
        raise LmexpError(
            f"hydra.sweeper.params.{key} is a config group: sample its options with "
            f"choice(...), e.g. {key}=choice(a, b)."
        )
    values = list(override.sweep_iterator(transformer=Transformer.encode))
    if len(values) < 2:
        raise LmexpError(
            f"hydra.sweeper.params.{key} offers {len(values)} option; give a choice of at least "
            f"two or set {key}={values[0] if values else '...'} once for the search."
        )
    return d.CategoricalDistribution([str(v) for v in values])


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

    from lmexp.tracking.stores import lacks_write_access, redact, sqlite_path, sqlite_problem

    db = sqlite_path(url)
    reason = sqlite_problem(db) if db is not None and db.is_file() and db.stat().st_size else None
    if reason is None:
        kwargs = {"connect_args": {"timeout": 60}} if db is not None else {}
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
        except Exception as err:  # noqa: BLE001 - a bad URL, no driver, no server, no password
            reason = first_line(root_cause(err))
    if default:
        fix = (
            f"make {db} and its folder writable for this user"
            if lacks_write_access(str(reason))
            else "restore it from a backup"
        )
        raise LmexpError(
            f"The search's study database {db} is unusable ({reason}); {fix}, or start the "
            "search afresh in a new folder (another hydra.sweep.dir): the trials in this one "
            "belong to the study it held."
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
    import optuna.distributions as d

    url, name = storage_url(config), str(config.hydra.sweeper.study_name)
    study = create_or_load_study(config, url, name)
    folder = str(Path(config.hydra.sweep.dir).resolve())
    check_study_is_this_search(study, config, space, url, folder)
    uid = study.user_attrs.get(UID_ATTR) or uuid.uuid4().hex
    check_trial_folders(Path(folder), study, uid, name)
    study.set_user_attr(SWEEP_DIR_ATTR, folder)
    study.set_user_attr(SPACE_ATTR, {k: d.distribution_to_json(v) for k, v in space.items()})
    study.set_user_attr(RECIPE_ATTR, recipe_of(config, space))
    study.set_user_attr(UID_ATTR, uid)
    return study


def create_or_load_study(config: DictConfig, url: str, name: str) -> Any:
    """Create or load study `name` in the storage at `url`, which must not be MLflow's own."""
    import optuna

    from lmexp.tracking.stores import redact, resolve_tracking_uri

    tracking = OmegaConf.select(config, "logger.tracking_uri")
    if tracking and resolve_tracking_uri(tracking, Path.cwd()) == url:
        raise LmexpError(
            f"hydra.sweeper.storage is MLflow's own store ({redact(url)}); Optuna and MLflow "
            "each keep an alembic_version table, so give the study a database of its own."
        )
    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
    default = not OmegaConf.select(config, "hydra.sweeper.storage")
    try:
        study = optuna.create_study(
            storage=open_storage(url, default),
            study_name=name,
            direction=direction(config),
            load_if_exists=True,
        )
        study.user_attrs  # noqa: B018 - a storage that opens but cannot hold a study fails here
    except LmexpError:
        raise
    except Exception as err:  # noqa: BLE001 - storage that opens but cannot hold a study
        where = "The search's study database" if default else "hydra.sweeper.storage="
        raise LmexpError(
            f"{where}{' ' if default else ''}{redact(url)} cannot hold study {name} "
            f"({first_line(root_cause(err))}); check the database and its permissions."
        ) from None
    return study


def check_study_is_this_search(
    study: Any, config: DictConfig, space: dict[str, Any], url: str, folder: str
) -> None:
    """Refuse a loaded study made by another search: another direction, sweep folder, search
    space or recipe. Updates `space` where the study stored one of its ranges the old way."""
    import optuna.distributions as d

    from lmexp.tracking.stores import redact

    name, attrs = study.study_name, study.user_attrs
    other = "or give this search its own hydra.sweeper.study_name"
    if study.direction.name.lower() != direction(config):
        raise LmexpError(
            f"Study {name} in {redact(url)} was made to {study.direction.name.lower()}; {other}."
        )
    owner = attrs.get(SWEEP_DIR_ATTR, folder)
    if owner != folder:
        raise LmexpError(
            f"Study {name} in {redact(url)} belongs to the search in {owner}; continue that one "
            f"with hydra.sweep.dir={owner}, {other}."
        )
    stored = {k: d.json_to_distribution(v) for k, v in attrs.get(SPACE_ATTR, {}).items()}
    for key, was in stored.items():
        if key in space and was != space[key] and same_values(was, space[key]):
            space[key] = was  # a range stored as a categorical before ranges were ordered
    if stored and stored != space:
        changed = sorted(k for k in stored.keys() | space.keys() if stored.get(k) != space.get(k))
        raise LmexpError(
            f"Study {name} searches another space than this command ({', '.join(changed)} "
            f"differ); use the same hydra.sweeper.params to continue it, {other}."
        )
    check_same_recipe(name, attrs.get(RECIPE_ATTR), recipe_of(config, space))


def check_same_recipe(name: str, stored: dict[str, Any] | None, recipe: dict[str, Any]) -> None:
    """Refuse to continue a study with other settings than it was run with."""
    if stored is None or stored == recipe:
        return
    changed = sorted(k for k in stored.keys() | recipe.keys() if stored.get(k) != recipe.get(k))
    shown = ", ".join(
        f"{k}={stored.get(k, '(unset)')} (now {recipe.get(k, '(unset)')})" for k in changed
    )
    raise LmexpError(
        f"Study {name} was run with {shown}; continuing it would mix two recipes in one "
        "study, so rerun it with its own settings, or start this search in a folder of its "
        "own (another hydra.sweep.dir) with its own hydra.sweeper.study_name."
    )


def same_values(was: Any, now: Any) -> bool:
    """Whether a categorical distribution (a study's range from before lmexp ordered ranges)
    holds exactly the values of a stepped integer or float distribution."""
    import optuna.distributions as d

    if not isinstance(was, d.CategoricalDistribution) or getattr(now, "step", None) is None:
        return False
    count = round((now.high - now.low) / now.step)
    grid = [on_grid(now.low, now.step, i) for i in range(count + 1)]
    return sorted(was.choices) == grid


def recipe_of(config: DictConfig, space: dict[str, Any]) -> dict[str, str]:
    """The settings a study's trials share, as text: every recipe or shape key not sampled. A
    sampled config group's keys are recorded as the command composes them (its default option
    and the fixed overrides): a rerun that changes one of those (dropout.weight_drop=0.3) would
    change the trials it has yet to run."""
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
    groups: list[str] = field(default_factory=list)  # sampled keys that are config groups

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
    space, fixed, groups = search_space(params, task, config)
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
        groups=groups,
    )


def read_search(sweep_dir: Path) -> Search | None:
    path = sweep_dir / STUDY_FILE
    return Search.from_json(path.read_text()) if path.exists() else None
