"""Hydra callback that checks a multirun's jobs up front and gives it one MLflow parent run.

on_multirun_start runs once in the sweeping process before any job. It composes and validates
the config of every job the sweep can launch (the ends of a sampled interval), so a bad value in
the fifth job fails in one sentence before the first job spends hours. It then creates (and
migrates) the store and the experiment, so parallel jobs never race on a fresh sqlite file,
opens the parent run and writes its id into the sweep folder, where each job finds it.
on_multirun_end records the best child and attaches the comparison table and plots. If the
sweeping process ends another way (a job's error, Ctrl-C, SIGTERM), the parent is closed at exit
as FAILED or KILLED with the report of the jobs that did finish, instead of staying RUNNING.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from lmexp.config import LmexpError, first_line
from lmexp.engine.runtime import LOCAL_JOBS_ENV, SWEEPER_PID_ENV, local_jobs_at_once, physical_cores
from lmexp.files import SWEEP_STOPPING, folder_in_use, held_here, lock_folder, write_private
from lmexp.orchestration.search import check_search, override_number, uses_search
from lmexp.orchestration.slurm import check_cluster, follow_jobs, uses_slurm
from lmexp.reporting.stats import SEED_KEY
from lmexp.tracking.base import KIND_TAG
from lmexp.tracking.queries import SWEEP_FILE, read_sweep
from lmexp.tracking.stores import redact

log = logging.getLogger("lmexp.sweep")

# Above this many combinations, check each swept value once (the others at their first value).
MAX_FULL_CHECK = 256
# How long a terminated sweeper waits for its local jobs to checkpoint and close their runs.
JOB_GRACE_S = 60.0


def parse_sweep(config: DictConfig) -> tuple[list[Any], list[Any]]:
    """The sweeper's params and the command line's task overrides, parsed as Hydra's sweepers do
    (with its config loader, which glob() needs to list a group's options)."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create(config_loader=GlobalHydra.instance().config_loader())
    params = OmegaConf.select(config, "hydra.sweeper.params") or {}
    return (
        parser.parse_overrides([f"{k}={v}" for k, v in params.items()]),
        parser.parse_overrides(list(config.hydra.overrides.task)),
    )


def swept_keys(params: list[Any], task: list[Any]) -> list[str]:
    """The keys a sweep varies: command-line sweeps, then every sweeper param."""
    keys = [o.get_key_element().lstrip("+~") for o in task if o.is_sweep_override()]
    keys.extend(k for k in (o.get_key_element() for o in params) if k not in keys)
    return keys


def sweep_jobs(params: list[Any], task: list[Any]) -> list[list[str]]:
    """The overrides of the jobs a sweep can launch: every job of a grid; for a sampled interval,
    its two ends. Past MAX_FULL_CHECK combinations, each swept value once."""
    options: dict[str, list[str]] = {}  # later overrides of a key win, as in Hydra's sweepers
    for override in params + task:
        key = override.get_key_element()
        if not override.is_sweep_override():
            options[key] = [override.input_line]
        elif override.is_discrete_sweep():
            options[key] = [f"{key}={v}" for v in override.sweep_string_iterator()]
        else:
            interval = override.value()
            options[key] = [f"{key}={override_number(v)}" for v in (interval.start, interval.end)]
    choices = list(options.values())
    total = 1
    for values in choices:
        total *= len(values)
    if total <= MAX_FULL_CHECK:
        return [list(job) for job in itertools.product(*choices)]
    base = [values[0] for values in choices]
    return [
        base[:i] + [value] + base[i + 1 :] for i, values in enumerate(choices) for value in values
    ]


def runs_here(config: DictConfig) -> bool:
    """Whether the sweep's jobs run on this machine (not on a cluster's nodes)."""
    return not uses_slurm(config)


def redact_log_records() -> None:
    """Hydra's launchers log each job's overrides: a password in a tracking URI among them
    becomes ***. A record factory, since the launchers configure logging afresh (dropping any
    handler's filters) when they start."""
    make = logging.getLogRecordFactory()
    if getattr(make, "redacts", False):
        return

    def redacting(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = make(*args, **kwargs)
        if "@" in str(record.msg) or any("@" in str(a) for a in record.args or ()):
            with contextlib.suppress(Exception):  # a bad format string fails later, as before
                record.msg, record.args = redact(record.getMessage()), None
        return record

    redacting.redacts = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(redacting)


def check_sweep(config: DictConfig, jobs: list[list[str]]) -> None:
    """Compose and validate every job's config, and for jobs that run on this machine check
    that it can run them (bf16 on a CPU without a bf16 LSTM, say); exit 2 naming the first bad
    job before any runs."""
    from hydra import compose

    from lmexp.engine.runtime import check_device_support, select_device
    from lmexp.validation import to_typed

    for job in jobs:
        try:
            typed = to_typed(compose(config_name=config.hydra.job.config_name, overrides=job))
            if runs_here(config):
                check_device_support(typed.trainer, select_device(typed.trainer.device).type)
        except Exception as err:  # noqa: BLE001 - any job that cannot be composed is the user's
            swept = " ".join(o for o in job if o not in config.hydra.overrides.task)
            reason = missing_option(err) or first_line(err)
            log.error("%s Sweep not started, no job run (bad job: %s).", reason, swept or job)
            sys.exit(2)
    log.info("Checked the config of %d sweep jobs", len(jobs))


def missing_option(err: BaseException) -> str | None:
    """A config group option that does not exist, with the ones that do (Hydra's own message
    lists them on lines of their own, after 'In 'train': Could not find ...')."""
    from hydra.errors import MissingConfigException

    if not isinstance(err, MissingConfigException) or not err.missing_cfg_file:
        return None
    group, _, name = err.missing_cfg_file.rpartition("/")
    if not group:
        return None  # a primary config, not a group's option
    options = ", ".join(err.options or []) or "none"
    return f"{group}={name} is not an option of the config group {group} (it has {options})."


def stop_local_jobs(sweep_dir: Path, signum: int, grace_s: float = JOB_GRACE_S) -> None:
    """Pass the sweeper's SIGTERM on to its job processes (joblib's workers), then wait until
    their run folders are released: each job checkpoints and ends its run KILLED itself, rather
    than being killed with its sweeper and left RUNNING. Jobs on a cluster are not our children
    and go on; a job that outlasts grace_s is closed as KILLED by the parent's summary."""
    import psutil

    (sweep_dir / SWEEP_STOPPING).touch()  # a job that has yet to start does not start
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            child.send_signal(signum)
    deadline = time.monotonic() + grace_s
    jobs = [p for p in sweep_dir.iterdir() if p.is_dir()]
    others = [job for job in jobs if not held_here(job)]  # in-process jobs stopped themselves
    while any(folder_in_use(job) for job in others) and time.monotonic() < deadline:
        time.sleep(0.2)


def share_cores(config: DictConfig, jobs: int) -> None:
    """With trainer.threads unset, local jobs that train at once share the physical cores
    (lmexp.engine.runtime.configure_threads reads how many from the environment they inherit)."""
    launcher = str(OmegaConf.select(config, "hydra.launcher._target_", default=""))
    at_once = local_jobs_at_once(launcher, OmegaConf.select(config, "hydra.launcher.n_jobs"), jobs)
    os.environ.pop(LOCAL_JOBS_ENV, None)
    if at_once > 1 and OmegaConf.select(config, "trainer.threads", default=0) == 0:
        os.environ[LOCAL_JOBS_ENV] = str(at_once)
        cores = physical_cores()
        log.info(
            "%d jobs train at once on this machine's %d physical cores: each uses %d thread(s) "
            "(trainer.threads=N to choose).",
            at_once,
            cores,
            max(1, cores // at_once),
        )


def guard_joblib_workers(sweep_dir: Path) -> None:
    """A joblib worker process killed outright (SIGKILL, the out-of-memory killer) makes the
    launcher raise joblib's TerminatedWorkerError, which Hydra prints as a 30-line traceback.
    Said instead in one sentence with the way on, and the sweep exits 1 (its parent run is then
    closed with the finished jobs' report). Hydra's joblib launcher has no hook for this, so its
    launch is wrapped, in the sweeping process only."""
    try:
        from hydra_plugins.hydra_joblib_launcher.joblib_launcher import JoblibLauncher
        from joblib.externals.loky.process_executor import TerminatedWorkerError
    except ImportError:
        return  # no joblib launcher installed, so none to guard
    launch = getattr(JoblibLauncher.launch, "unguarded", JoblibLauncher.launch)

    def guarded(self: Any, job_overrides: Any, initial_job_idx: int) -> Any:
        try:
            return launch(self, job_overrides, initial_job_idx)
        except TerminatedWorkerError as err:
            said, marker = str(err), "exit codes of the workers are"
            said = said if marker in said else marker  # no codes given: "?"
            codes = (said.rsplit(marker, 1)[-1].strip().splitlines() or ["?"])[0]
            log.error(
                "A joblib worker process of this sweep was killed (exit codes %s; SIGKILL, or "
                "out of memory) and joblib ended the others; rerun the same command with "
                "hydra.sweep.dir=%s to resume its jobs from their checkpoints and run the rest.",
                codes,
                sweep_dir.resolve(),
            )
            sys.exit(1)

    guarded.unguarded = launch  # type: ignore[attr-defined]
    JoblibLauncher.launch = guarded  # type: ignore[method-assign]


class MlflowSweepCallback(Callback):
    def __init__(self) -> None:
        self.parent: dict[str, Any] | None = None  # set while the parent run is open
        self.signum: int | None = None
        self.sweep_dir = Path(".")
        self.local_jobs = True
        self.expected = 0  # the runs the sweep makes (its jobs, or a search's trials)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        # Hydra turns a callback's exception into a warning and launches the jobs anyway, so
        # each error here ends the process itself, in one sentence.
        redact_log_records()
        params, task = parse_sweep(config)
        jobs = sweep_jobs(params, task)
        check_sweep(config, jobs)
        n_jobs = int(config.hydra.sweeper.n_jobs) if uses_search(config) else len(jobs)
        share_cores(config, n_jobs)
        os.environ[SWEEPER_PID_ENV] = str(os.getpid())  # the workers it starts end without it
        self.expected = int(config.hydra.sweeper.n_trials) if uses_search(config) else len(jobs)
        try:
            if uses_search(config):
                check_search(config, params, task)  # before the parent run: nothing to undo
            if uses_slurm(config):
                check_cluster(config.hydra.launcher)
                follow_jobs()
            self._claim_folder(config)
            if config.logger.kind == "mlflow":
                swept = swept_keys(params, task)
                seeds = OmegaConf.select(config, "trainer.seeds_per_job", default=1)
                named = any(o.get_key_element() == SEED_KEY for o in task)  # even one value
                if (seeds > 1 or named) and SEED_KEY not in swept:
                    swept.append(SEED_KEY)  # each job's seeds: grouped by the report
                self._open_parent(config, swept)
        except LmexpError as err:
            log.error("%s Sweep not started, no job run.", err)
            sys.exit(2)

    def _claim_folder(self, config: DictConfig) -> None:
        """Hold the sweep folder for this sweeper's life; on SIGTERM, stop the local jobs."""
        self.sweep_dir = Path(config.hydra.sweep.dir)
        lock_folder(self.sweep_dir, "sweep")
        guard_joblib_workers(self.sweep_dir)
        (self.sweep_dir / SWEEP_STOPPING).unlink(missing_ok=True)  # left by a stopped run of it
        # Jobs on a cluster are not this process's to stop: they finish, or a rerun takes over.
        self.local_jobs = runs_here(config)
        if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            # SIGTERM's default ends the process without running atexit; exit through Python.
            signal.signal(signal.SIGTERM, self._terminate)

    def _open_parent(self, config: DictConfig, swept: list[str]) -> None:
        from lmexp.reporting.names import parent_name
        from lmexp.tracking.runs import start_parent_run
        from lmexp.tracking.stores import configured_store
        from lmexp.tracking.views import ui_start, ui_url

        lg = config.logger
        uri, note = configured_store(
            lg.tracking_uri, lg.fallback_uri, Path(os.getcwd()), lg.connect_timeout_s
        )
        if note:
            log.warning(note)
        sweep_dir = Path(config.hydra.sweep.dir)
        # The same sweep folder again (hydra.sweep.dir=...): resuming an interrupted sweep.
        earlier = read_sweep(sweep_dir) or {}
        parent, experiment_id = start_parent_run(
            uri,
            config.logger.experiment_name,
            run_name=parent_name(swept, sweep_dir.name),
            swept=swept,
            tags={
                KIND_TAG: "sweep",
                "sweep_dir": str(sweep_dir.resolve()),
                "swept_params": ",".join(swept),
                "hydra_overrides": redact(" ".join(config.hydra.overrides.task)),
                "sweeper": str(OmegaConf.select(config, "hydra.sweeper._target_")),
                "launcher": str(OmegaConf.select(config, "hydra.launcher._target_")),
            },
            reopen=earlier.get("parent_run_id") if earlier.get("tracking_uri") == uri else None,
        )
        if parent == earlier.get("parent_run_id"):
            log.info("Continuing the sweep in %s: its finished jobs are skipped", sweep_dir)
        record = {
            "parent_run_id": parent,
            "tracking_uri": uri,
            "experiment": config.logger.experiment_name,
            "swept_params": swept,
            "runs": self.expected,
        }
        write_private(sweep_dir / SWEEP_FILE, json.dumps(record))  # the jobs read the URI here
        log.info("Sweep folder: %s", sweep_dir.resolve())
        log.info("MLflow sweep parent run %s in %s", parent, redact(uri))
        ui = config.logger.get("ui_url")
        page = ui_url(uri, experiment_id, view=parent, ui=ui)
        log.info("Compare its runs in the MLflow UI%s: %s", ui_start(uri, ui), page)
        self.parent = {**record, "sweep_dir": sweep_dir}
        atexit.register(self._close_unfinished)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self.parent is not None:
            sweep_dir = self.parent["sweep_dir"].resolve()
            self._summarize("FINISHED")
            log.info("Sweep folder: %s (its report in report/)", sweep_dir)

    def _summarize(self, status: str | None) -> None:
        from lmexp.orchestration.outcome import summarize_sweep

        parent, self.parent = self.parent, None
        assert parent is not None
        summarize_sweep(
            parent["tracking_uri"],
            parent["experiment"],
            parent["parent_run_id"],
            parent["swept_params"],
            parent["sweep_dir"],
            status=status,
        )

    def _terminate(self, signum: int, frame: Any) -> None:
        self.signum = signum
        if self.local_jobs:
            stop_local_jobs(self.sweep_dir, signum)
        sys.exit(128 + signum)

    def _close_unfinished(self) -> None:
        """At exit, close a parent run the sweep did not reach on_multirun_end for."""
        if self.parent is None:
            return
        sweep_dir = self.parent["sweep_dir"]
        log.warning(
            "Sweep ended early: closing MLflow parent run %s with the finished jobs' report",
            self.parent["parent_run_id"],
        )
        self._summarize("KILLED" if self.signum is not None else None)
        log.warning(
            "To finish it, run the same command with hydra.sweep.dir=%s: finished jobs are "
            "skipped, stopped ones resume from their checkpoints.",
            sweep_dir.resolve(),
        )
