"""The Hydra side of lmexp's Optuna search: its config schema and the Sweeper that checks the
search, creates the study and launches the workers (see lmexp.orchestration.search for the rest)."""

# No `from __future__ import annotations` here: Hydra's plugin scan runs this module before it
# is in sys.modules, where dataclasses look string annotations up (and fail).
import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


@dataclass
class LmexpOptunaSweeperConf:
    _target_: str = "hydra_plugins.lmexp_optuna_sweeper.optuna_sweeper.LmexpOptunaSweeper"
    study_name: str = "lmexp"
    # Optuna's database URL; null: sqlite:///<sweep dir>/optuna.db.
    storage: Optional[str] = None  # noqa: UP045 - a structured config: OmegaConf reads the type
    direction: str = "minimize"
    n_trials: int = 20  # trials in the study, counting those of earlier runs of the search
    n_jobs: int = 1  # workers, each asking for trials until n_trials (launch them in parallel)
    # {name: tpe|random|qmc, ...keyword arguments}, or just the name.
    sampler: Any = field(default_factory=lambda: {"name": "tpe", "seed": None})
    # {name: median|percentile|asha|hyperband|none, ...keyword arguments}, or just the name.
    pruner: Any = field(default_factory=lambda: {"name": "median"})
    # key: interval(a, b) | tag(log, interval(a, b)) | int(interval(a, b)) | choice(...) |
    # range(a, b[, step]); group: choice(option, ...). The grammar: docs/searches.md.
    params: dict[str, str] | None = None


ConfigStore.instance().store(
    group="hydra/sweeper", name="lmexp_optuna", node=LmexpOptunaSweeperConf, provider="lmexp"
)


class LmexpOptunaSweeper(Sweeper):
    def __init__(self, **settings: Any) -> None:
        self.settings = settings  # read again from the config, where Hydra resolved them
        self.config: DictConfig | None = None
        self.launcher: Any = None
        self.hydra_context: HydraContext | None = None

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            config=config, hydra_context=hydra_context, task_function=task_function
        )

    def sweep(self, arguments: list[str]) -> Any:
        from lmexp.config import LmexpError
        from lmexp.files import write_private
        from lmexp.orchestration.search import OUTCOME, STUDY_FILE, check_search, open_storage
        from lmexp.orchestration.sweep import parse_sweep
        from lmexp.tracking.stores import redact

        assert self.config is not None
        config = self.config
        OUTCOME["exit_code"] = 0  # this search's, not an earlier one's in the same process
        try:
            search = check_search(config, *parse_sweep(config))
        except LmexpError as err:
            log.error("%s Search not started, no trial run.", err)
            sys.exit(2)
        sweep_dir = Path(config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        write_private(sweep_dir / STUDY_FILE, search.to_json())  # it holds the storage URL
        workers = int(config.hydra.sweeper.n_jobs)
        log.info(
            "Study %s in %s: %d trials over %s, %d worker(s), sampler %s, pruner %s",
            search.study_name,
            redact(search.storage),
            search.n_trials,
            ", ".join(search.space),
            workers,
            search.sampler.get("name"),
            search.pruner.get("name"),
        )
        jobs = [[*search.fixed, f"hydra.sweep.subdir=worker_{w}"] for w in range(workers)]
        self.validate_batch_is_legal(jobs)
        returns = self.launcher.launch(jobs, initial_job_idx=0)
        for job in returns:
            job.return_value  # noqa: B018 - a worker's own error (not a trial's) surfaces here
        import optuna

        study = optuna.load_study(
            study_name=search.study_name, storage=open_storage(search.storage)
        )
        write_results(study, sweep_dir)
        return [returns]


def write_results(study: Any, sweep_dir: Path) -> None:
    """optimization_results.yaml (as Hydra's Optuna sweeper writes it), with the trial counts.
    Failed trials are counted in one line with the first one's reason; a search none of whose
    trials finished, some failing, makes the command exit 1 (lmexp.orchestration.search.OUTCOME)."""
    from optuna.trial import TrialState

    from lmexp.orchestration.search import FAILURE_ATTR, OUTCOME

    counts = {s.name.lower(): 0 for s in TrialState}
    trials = study.get_trials(deepcopy=False)
    for trial in trials:
        counts[trial.state.name.lower()] += 1
    results: dict[str, Any] = {"name": "lmexp_optuna", "trials": counts}
    if counts["complete"]:
        best = study.best_trial
        results.update(best_params=dict(best.params), best_value=best.value)
        log.info("Best parameters: %s", best.params)
        log.info("Best value: %s (trial %d)", best.value, best.number)
    else:
        results.update(best_params=None, best_value=math.nan)
    log.info("Trials: %s", ", ".join(f"{n} {s}" for s, n in counts.items() if n))
    OmegaConf.save(OmegaConf.create(results), sweep_dir / "optimization_results.yaml")
    failed = [t for t in trials if t.state == TrialState.FAIL]
    if failed:
        first = min(failed, key=lambda t: t.number)
        # No reason recorded: told FAIL by a worker that found it never given its values.
        why = first.user_attrs.get(FAILURE_ATTR, "its worker died before it was given its values")
        many = (
            f"All {len(failed)}"
            if len(failed) == len(trials)
            else f"{len(failed)} of {len(trials)}"
        )
        if counts["complete"]:
            log.warning("%s trials failed; the first, trial %d: %s", many, first.number, why)
        else:
            log.error(
                "%s trials failed and none finished; the first, trial %d: %s",
                many,
                first.number,
                why,
            )
            OUTCOME["exit_code"] = 1
    if not counts["complete"] and not failed:
        log.warning("No trial finished, so the search has no best value.")
