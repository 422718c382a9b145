"""What one Hydra job of `python -m lmexp.train` runs: one run, trainer.seeds_per_job runs with
successive seeds, or, in an Optuna search, a worker's trials. The Hydra side of training: it
reads Hydra's runtime config into the RunContext lmexp.run takes, and adds what a search
needs (the trial's pruner as an epoch callback); lmexp.run knows none of this.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from lmexp.config import LmexpError, RunStopped, TrainConfig
from lmexp.engine.runtime import SWEEPER_PID_ENV
from lmexp.files import SWEEP_STOPPING
from lmexp.orchestration.search import SWEEPER_TARGET
from lmexp.orchestration.trials import run_trials
from lmexp.reporting.stats import SEED_KEY
from lmexp.run import RunContext, resume_how, run_training
from lmexp.tracking.queries import read_sweep
from lmexp.tracking.stores import redact
from lmexp.validation import to_typed

log = logging.getLogger("lmexp.train")


def task(cfg: Any) -> float:
    """The Hydra task: validate the composed config, then train. Module-level so that launchers
    (joblib, submitit) pickle it by reference."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    watch_sweeper()
    _running.set()
    ctx = None
    try:
        typed, ctx = to_typed(cfg), hydra_context(cfg)
        if OmegaConf.select(HydraConfig.get(), "sweeper._target_") == SWEEPER_TARGET:
            worker = ctx.job_num or 0
            return run_trials(cfg, ctx.output_dir.parent, worker, trial_runner(ctx), compose_job)
        value = train_job(typed, ctx)
        if ctx.job_num is None and not math.isfinite(value):
            sys.exit(1)  # diverged (said and recorded): a chain of commands stops here; a
            # sweep's job returns +inf instead, which its sweeper counts as a failed job
        return value
    except LmexpError as err:
        log.error("%s", err)
        discard_if_bare()
        sys.exit(2)
    except RunStopped as stop:  # a preemption signal: the run is checkpointed and closed
        sys.exit(stop.exit_code)
    except KeyboardInterrupt:  # a second Ctrl-C (or one before training): the run closed KILLED
        how = f"; to resume from the last checkpoint, if one was written: {resume_how(ctx)}"
        log.warning("Interrupted: stopped at once%s.", how if ctx is not None else "")
        sys.exit(130)
    finally:
        _running.clear()


# What Hydra and lmexp put in a run folder before any work: the composed config, the log, the lock.
BARE = {".hydra", "train.log", ".lmexp.lock"}


def discard_if_bare() -> None:
    """A single run refused before it wrote anything (a missing corpus, no GPU) leaves no folder
    behind: it would hold only Hydra's config and the log of the error just printed, and make the
    folder of a real run to resume harder to find among them."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hc = HydraConfig.get()
    out = Path(hc.runtime.output_dir)
    if hc.mode == RunMode.MULTIRUN or not out.is_dir():
        return
    if {p.name for p in out.iterdir()} <= BARE:
        shutil.rmtree(out, ignore_errors=True)
        day = out.parent  # outputs/<date>/, Hydra's, when nothing else is left in it
        if day.parent.name == "outputs" and not any(day.iterdir()):
            day.rmdir()


_running = threading.Event()  # set while this process runs a job
_watching: list[int] = []


def watch_sweeper(poll_s: float = 1.0) -> None:
    """In a launcher's worker process (joblib's): end it once the sweeper that started it is
    gone (killed with SIGKILL, its workers were left alive and idle for minutes). A job running
    then gets SIGTERM, as from the sweeper: it checkpoints and closes its run KILLED, resumable;
    an idle worker exits at once."""
    sweeper = os.environ.get(SWEEPER_PID_ENV, "")
    if not sweeper.isdigit() or int(sweeper) != os.getppid() or _watching:
        return  # not a worker of a live sweeper (an in-process job, SLURM), or watched already
    _watching.append(int(sweeper))

    def watch() -> None:
        while os.getppid() == int(sweeper):
            time.sleep(poll_s)
        if _running.is_set():
            log.warning("The sweeper (pid %s) is gone: stopping this job, resumable.", sweeper)
            os.kill(os.getpid(), signal.SIGTERM)
            while _running.is_set():
                time.sleep(poll_s)
        os._exit(0)

    threading.Thread(target=watch, name="lmexp-sweeper-watch", daemon=True).start()


def train_job(cfg: TrainConfig, ctx: RunContext) -> float:
    """One job of a sweep (or a single run): one seed, or trainer.seeds_per_job of them."""
    if cfg.trainer.seeds_per_job == 1:
        return run_training(cfg, ctx)
    return over_seeds(cfg, ctx)


def over_seeds(cfg: TrainConfig, ctx: RunContext) -> float:
    """trainer.seeds_per_job=k: train the job's config with seeds seed .. seed+k-1, each a run
    of its own (in <job dir>/seed_<s>, named with its seed) beside the sweep's other children,
    and return the mean of their best validation perplexities: what an Optuna trial then
    optimises. A diverged seed makes the mean +inf."""
    results = []
    for seed in range(cfg.trainer.seed, cfg.trainer.seed + cfg.trainer.seeds_per_job):
        resolved = {**ctx.resolved, "trainer": {**ctx.resolved["trainer"], "seed": seed}}
        one = replace(
            ctx,
            output_dir=ctx.output_dir / f"seed_{seed}",
            resolved=resolved,
            overrides=[*ctx.overrides, f"trainer.seed={seed}"],
            swept=[*ctx.swept, SEED_KEY] if SEED_KEY not in ctx.swept else ctx.swept,
            launch=ctx.launch or (ctx.overrides, ctx.output_dir),
        )
        results.append(run_training(replace(cfg, trainer=replace(cfg.trainer, seed=seed)), one))
    mean = sum(results) / len(results)
    log.info("Mean best valid ppl over %d seeds: %.2f", len(results), mean)
    return mean


def trial_runner(worker: RunContext) -> Callable[..., float]:
    """How an Optuna worker (lmexp.orchestration.trials.run_trials) trains one trial: in its own folder, as a
    child run named by its sampled values (config-group choices among them, also logged as
    params: dropout=variational) and numbered by the trial."""
    from omegaconf import DictConfig, OmegaConf

    def train(cfg: Any, params: dict[str, Any], folder: Path, number: int, judge: Any) -> float:
        resolved = redact_logger(OmegaConf.to_container(cfg, resolve=True))  # type: ignore[arg-type]
        groups = {k: str(v) for k, v in params.items() if isinstance(cfg.get(k), DictConfig)}
        ctx = replace(
            worker,
            output_dir=folder,
            resolved=resolved,
            overrides=[*worker.overrides, *(f"{k}={v}" for k, v in params.items())],
            job_num=number,
            on_epoch_end=[*worker.on_epoch_end, *([judge] if judge is not None else [])],
            choices={**worker.choices, **groups},
        )
        return train_job(to_typed(cfg), ctx)

    return train


def compose_job(choices: list[str]) -> Any:
    """This job's config composed again with Hydra's compose API, with config-group choices
    (dropout=variational) after the job's own overrides: what Hydra would have composed for a
    job launched with them. An Optuna trial over config groups gets its config so."""
    from hydra import compose
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    return compose(config_name=hc.job.config_name, overrides=[*hc.overrides.task, *choices])


def hydra_context(cfg: Any) -> RunContext:
    """Read what the run needs from Hydra's runtime config (entry-point only)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    hc = HydraConfig.get()
    ctx = RunContext(
        output_dir=Path(hc.runtime.output_dir),
        launch_dir=Path(hc.runtime.cwd),
        resolved=redact_logger(OmegaConf.to_container(cfg, resolve=True)),  # type: ignore[arg-type]
        overrides=[redact(o) for o in hc.overrides.task],
    )
    if hc.mode == RunMode.MULTIRUN:
        ctx.job_num = ctx.slot = hc.job.num
        if (Path(hc.sweep.dir) / SWEEP_STOPPING).exists():
            raise LmexpError(
                f"Sweep {hc.sweep.dir} is stopping, so job {hc.job.num} was not started; rerun "
                "the sweep into that folder to run it."
            )
        sweep = read_sweep(Path(hc.sweep.dir))
        if sweep is not None:
            ctx.parent_run_id, ctx.tracking_uri = sweep["parent_run_id"], sweep["tracking_uri"]
            ctx.swept = list(sweep["swept_params"])
        # a swept config group (experiment=transformer,examples_lstm) is logged as a param, so
        # the report can group and name the runs by it, as a search's chosen groups are
        ctx.choices = {k: str(hc.runtime.choices[k]) for k in ctx.swept if k in hc.runtime.choices}
    return ctx


def redact_logger(resolved: dict[str, Any]) -> dict[str, Any]:
    """The config as recorded (params, checkpoints, the exported config.json): a password in
    logger.tracking_uri or logger.fallback_uri replaced by ***."""
    logger = {k: redact(v) if isinstance(v, str) else v for k, v in resolved["logger"].items()}
    return {**resolved, "logger": logger}
