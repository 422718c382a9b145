"""One training run, read top to bottom: `run_training` checks the machine and the folder, loads
and batches the data, builds the model (and restores a checkpoint), opens the tracking run,
fits (lmexp.engine.fit), tests and exports; the functions it calls follow it in that order.
Everything a user can get wrong (config, device, data, output folder, checkpoint, tracking
store) is refused in one sentence before the tracking run is created. It returns the best
validation perplexity, which Hydra's sweepers minimise.

It knows nothing of searches, seed loops or Hydra: lmexp.orchestration.jobs builds its
RunContext, and adds epoch callbacks (an Optuna trial's pruner) that may stop it by raising
RunStopped, as a preemption signal does; the run is then closed KILLED and the exception goes
on to the caller.
"""

from __future__ import annotations

import json
import logging
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lmexp.config import Preempted, RunStopped, TrainConfig, flatten
from lmexp.data import Corpus, batch_splits, load_corpus
from lmexp.engine import checkpoint
from lmexp.engine.fit import EpochCallback, Position, Run, fit
from lmexp.engine.loop import DivergenceError, EpochProgress, evaluate, perplexity
from lmexp.engine.resume import changed_on_resume, find_resume, remember_run, remembered_run
from lmexp.engine.runtime import (
    check_device_support,
    configure_threads,
    device_name,
    git_commit,
    keep_freed_memory,
    seed_everything,
    select_device,
)
from lmexp.files import check_writable, folder_lock
from lmexp.models import LanguageModel, build_model
from lmexp.models.base import unpack_state
from lmexp.reporting.names import child_name, single_name
from lmexp.reporting.stats import words_per_second
from lmexp.tracking.base import EPOCH_METRICS, PARENT_TAG, RunHistory, Tracker
from lmexp.tracking.queries import TrackingLost, run_history
from lmexp.tracking.runs import open_tracker, rerun_decision
from lmexp.tracking.stores import configured_store, redact
from lmexp.tracking.views import ui_start

log = logging.getLogger("lmexp.train")

EVAL_SCOPE_TAG = "lmexp.eval_scope"


@dataclass
class RunContext:
    """Where the run lives and who launched it; built by lmexp.orchestration.jobs, so no Hydra here."""

    output_dir: Path
    launch_dir: Path
    resolved: dict[str, Any]  # the resolved config as plain data (params, artifacts)
    overrides: list[str] = field(default_factory=list)
    job_num: int | None = None  # a sweep job's number, an Optuna trial's
    slot: int | None = None  # which of the host's GPUs: a sweep job's or Optuna worker's number
    parent_run_id: str | None = None
    tracking_uri: str | None = None
    swept: list[str] = field(default_factory=list)  # the keys the sweep varies
    choices: dict[str, str] = field(default_factory=dict)  # config groups a search chose
    on_epoch_end: list[EpochCallback] = field(default_factory=list)
    # the launch that continues this run when it is one of several (a seed loop's): its
    # overrides and folder; None for the run's own
    launch: tuple[list[str], Path] | None = None


def run_training(cfg: TrainConfig, ctx: RunContext) -> float:
    """Train, evaluate and track one run; return its best validation perplexity."""
    t = cfg.trainer
    device = select_device(t.device, ctx.slot)
    check_device_support(t, device.type)
    if device.type == "cpu":
        keep_freed_memory()  # the same buffers every step: keep them, as a caching allocator does
    with folder_lock(ctx.output_dir):  # no other live process writes into this run's folder
        threads = configure_threads(t.threads)
        uri = checked_store(cfg, ctx)  # a store that refuses the run does so before any work
        corpus = load_corpus(cfg.data)
        warn_unseen(corpus)
        data = {name: split.to(device) for name, split in batch_splits(corpus, t).items()}
        ckpt_dir = ctx.output_dir / "checkpoints"
        check_writable(ckpt_dir)
        resume = find_resume(t, ckpt_dir, ctx.resolved, corpus.vocab)
        continues = resume is not None and not (resume.get("fork") or resume.get("init_only"))
        if not t.resume and not continues:
            set_aside(ctx.output_dir)
        model = prepare_model(cfg, corpus, device, resume)
        tags = run_tags(device, ctx, cfg)
        resume = started_from(resume, tags)
        tracker = start_tracking(
            cfg, ctx, uri, tags, resume["mlflow_run_id"] if continues else None
        )
        if tracker.uri:
            remember_run(ctx.output_dir, tracker.run_id, redact(tracker.uri))
        run = Run(cfg, corpus, data, model, tracker, ckpt_dir, ctx.resolved, ctx.on_epoch_end)
        try:
            best = train_tracked(run, ctx, resume, continues, uri, f"{device}, {threads} threads")
            tracker.finish("FINISHED")
            return best
        except RunStopped as stop:  # preempted, pruned, the study lost: checkpointed, not failed
            tracker.set_tags(stop.tags)
            tracker.finish(stop.status, stop.reason)
            if isinstance(stop, Preempted):
                log.warning("To resume: %s.", resume_how(ctx))
            stop.after_close()
            raise
        except DivergenceError as err:
            log.error("Run diverged: %s", err)
            tracker.finish("FAILED", f"diverged: {err}")
            return float("inf")
        except TrackingLost as err:
            # The store cannot be told either; the checkpoint (written before each epoch's
            # metrics) holds the run, and a rerun backfills what MLflow missed.
            how = resume_advice(ckpt_dir / "last.pt", ctx, tracker.run_id)
            raise TrackingLost(f"{err}; the run stopped: {how}.") from err
        except KeyboardInterrupt:
            tracker.finish("KILLED", "interrupted (KeyboardInterrupt)")
            raise
        except BaseException as err:
            tracker.finish("FAILED", f"{type(err).__name__}: {err}")
            raise


def train_tracked(
    run: Run,
    ctx: RunContext,
    resume: dict[str, Any] | None,
    continues: bool,
    uri: str | None,
    on: str,
) -> float:
    """A tracked run's work: its params when new, its position restored from the checkpoint,
    then the epochs and the final evaluation unless the store says it finished; return its best
    validation perplexity."""
    cfg, tracker, t = run.cfg, run.tracker, run.cfg.trainer
    history = run_history(uri, tracker.run_id)  # what the store holds of this run already
    if not continues:  # a new run: its own settings are its params
        tracker.log_params({**flatten(ctx.resolved), **ctx.choices, **unseen_params(run.corpus)})
    position = restore(run, resume, history) if resume else Position()
    log.info(
        "model=%s: %.2fM parameters, vocab %d, device %s; MLflow run %s at %s",
        cfg.model.name,
        sum(p.numel() for p in run.model.parameters()) / 1e6,
        run.corpus.vocab_size,
        on,
        tracker.run_id,
        redact(tracker.uri or "nowhere"),
    )
    if tracker.page:
        log.info("In the MLflow UI%s: %s", ui_start(uri, cfg.logger.ui_url), tracker.page)
    if position.epoch < t.max_epochs or not history.logged_steps("test_ppl"):
        fit(run, position)
        finish(run, position, ctx)
    else:
        log.info("Run %s already finished all %d epochs.", tracker.run_id, t.max_epochs)
    return position.best_valid


def set_aside(output_dir: Path) -> None:
    """trainer.resume=false in a folder that holds a run: its checkpoints and model are moved
    into earlier-<time>/ there, not overwritten by the new run."""
    if not (output_dir / "checkpoints" / "last.pt").exists():
        return
    kept = output_dir / time.strftime("earlier-%Y%m%d-%H%M%S")
    kept.mkdir()
    for name in ("checkpoints", "model"):
        if (output_dir / name).exists():
            (output_dir / name).rename(kept / name)
    log.warning(
        "trainer.resume=false: a new run in %s; the earlier run's checkpoints and model are kept "
        "in %s, not overwritten.",
        output_dir,
        kept,
    )


def warn_unseen(corpus: Corpus) -> None:
    """Say how many valid and test words the train split never has: they are read as <unk>,
    which the model cannot learn when the train split holds no <unk> either."""
    for split, rate in corpus.unseen.items():
        if rate > 0:
            log.warning(
                "%.2f%% of the %s split's words never occur in the train split and are read as "
                "<unk>%s.",
                100 * rate,
                split,
                ""
                if corpus.trains_unk
                else ", which the train split never holds: the model "
                "cannot learn to score them, and its perplexity there says little",
            )


def unseen_params(corpus: Corpus) -> dict[str, str]:
    """The share of each evaluation split's words missing from the train split, as params."""
    return {f"data.unseen_{split}": f"{rate:.6g}" for split, rate in corpus.unseen.items()}


def prepare_model(
    cfg: TrainConfig, corpus: Corpus, device: torch.device, resume: dict[str, Any] | None
) -> LanguageModel:
    """The model, with a checkpoint's (or an exported model's) weights when starting from one."""
    seed_everything(cfg.trainer.seed)
    model = build_model(cfg.model, cfg.dropout, corpus.vocab_size)
    if resume is not None:
        try:
            model.load_state_dict(resume["model"])
        except RuntimeError as err:
            raise checkpoint.CheckpointError(
                f"{resume['path']} does not fit model={cfg.model.name} with dropout="
                f"{cfg.dropout.kind} ({checkpoint.state_dict_mismatch(err)}); start from a model of the "
                "same size and dropout kind, or leave trainer.ckpt_path unset."
            ) from err
    return model.to(device)


def started_from(resume: dict[str, Any] | None, tags: dict[str, str]) -> dict[str, Any] | None:
    """What a new run starting from another run's checkpoint or an exported model records of it
    (tags); the checkpoint to restore, None when only its weights are taken."""
    if resume is not None and resume.get("init_only"):
        log.info("Starting a new run from the weights of %s", resume["path"])
        tags["init_from"] = resume["path"]
        return None
    if resume is not None and resume.get("fork"):
        origin = f"{resume['path']} (MLflow run {resume.get('mlflow_run_id')})"
        log.info(
            "Starting a new run from %s at epoch %d, with this command's settings; that run is "
            "left as it is",
            origin,
            resume["epoch"] + 1,
        )
        tags["lmexp.started_from"] = origin
    return resume


def checked_store(cfg: TrainConfig, ctx: RunContext) -> str | None:
    """The store this run logs to, checked (reachable, writable, the login accepted): the
    sweep's or logger.tracking_uri, else logger.fallback_uri with a warning; None for
    logger.kind=none. A store that cannot be used is one sentence, before the corpus loads."""
    lg = cfg.logger
    if lg.kind == "none":
        return None
    uri, note = configured_store(
        ctx.tracking_uri or lg.tracking_uri, lg.fallback_uri, ctx.launch_dir, lg.connect_timeout_s
    )  # a sweep's store (ctx.tracking_uri) is already resolved
    if note:
        log.warning(note)
    return uri


def start_tracking(
    cfg: TrainConfig, ctx: RunContext, uri: str | None, tags: dict[str, str], run_id: str | None
) -> Tracker:
    """The run's tracker in the checked store uri (see checked_store): run_id reopened
    (resuming), else a new run; no tracker for uri None (logger.kind=none)."""
    lg = cfg.logger
    if uri is None:
        return Tracker()
    if lg.run_name:
        name = lg.run_name
    elif ctx.parent_run_id:
        name = child_name(ctx.swept, ctx.overrides, ctx.job_num)
    else:
        name = single_name(cfg.model.name, ctx.overrides, ctx.output_dir.name)
    system_metrics = lg.system_metrics if lg.system_metrics is not None else cfg.data.name != "tiny"
    earlier = remembered_run(ctx.output_dir, redact(uri)) if run_id is None else None
    if earlier is not None:
        # Killed before its first checkpoint: continue that run (one job, one run), or say why not.
        params = flatten(ctx.resolved)
        again, why = rerun_decision(uri, earlier, params, cfg.trainer.resume)
        log.warning("No checkpoint in %s: %s.", ctx.output_dir / "checkpoints", why)
        run_id = earlier if again else None
    return open_tracker(
        lg.kind, uri, lg.experiment_name, run_id, name, tags,
        lg.system_metrics_every_s if system_metrics else None, lg.ui_url,
    )  # fmt: skip


def run_tags(device: torch.device, ctx: RunContext, cfg: TrainConfig) -> dict[str, str]:
    tags = {
        "mlflow.source.git.commit": git_commit(Path(__file__).resolve().parent, ctx.launch_dir),
        "mlflow.source.name": "lmexp.train",
        "device": device_name(device),
        "torch_version": torch.__version__,
        "cudnn_version": str(torch.backends.cudnn.version() if device.type == "cuda" else None),
        "hydra_overrides": " ".join(ctx.overrides),
        "output_dir": str(ctx.output_dir),
    }
    if cfg.trainer.limit_eval_batches is not None:
        tags[EVAL_SCOPE_TAG] = eval_scope(cfg.trainer.limit_eval_batches)
    if ctx.parent_run_id:
        tags[PARENT_TAG] = ctx.parent_run_id
    if ctx.job_num is not None:
        tags["job_num"] = str(ctx.job_num)
    return tags


def eval_scope(limit: int) -> str:
    return (
        f"valid_ppl and test_ppl cover only the first {limit} windows of each split "
        f"(trainer.limit_eval_batches={limit}); lmexp.evaluate scores the whole split"
    )


def restore(run: Run, resume: dict[str, Any], history: RunHistory) -> Position:
    """The position a checkpoint holds (its weights are loaded by prepare_model), with the RNG
    state; epochs the checkpoint knows but MLflow missed (a kill between the two) are logged."""
    device = run.data["train"].device
    position = Position(resume["epoch"], resume["history"], resume["best_valid_ppl"])
    if resume.get("progress"):
        position.partial = EpochProgress(**resume["progress"])
        position.state = unpack_state([s.to(device) for s in resume["state"]])
    checkpoint.set_rng_state(resume["rng"])
    # The optimizer's state continues only under the same optimizer settings (a checkpoint of
    # another run, given as trainer.ckpt_path, may have used another); checkpoints written
    # before lmexp saved it hold none, and fused_sgd has none to lose.
    if resume.get("step") and resume["config"].get("optimizer") == run.resolved["optimizer"]:
        position.step_state = resume["step"]
    elif resume.get("step", {}).get("optimizer", {}).get("state"):
        log.warning(
            "The checkpoint's optimizer state (momentum, averages, NT-ASGD's switch) was made "
            "with other optimizer settings and is not continued: the optimizer starts afresh."
        )
    for key in EPOCH_METRICS:
        logged = history.logged_steps(key)
        for record in position.history:
            if int(record["epoch"]) not in logged:
                run.tracker.log_metrics({key: record[key]}, step=int(record["epoch"]))
    batch = position.partial.batch if position.partial else 0
    log.info("Resumed from %s at epoch %d, batch %d", resume["path"], position.epoch + 1, batch)
    changed = changed_on_resume(resume["config"], run.resolved)
    if changed:  # the run's params keep the first values: the tag says what changed, and when
        what = "; ".join(f"{k}={new} (was {old})" for k, (old, new) in changed.items())
        run.tracker.set_tags({f"lmexp.changed_at_epoch_{position.epoch}": what})
        log.info("Resumed with changed settings: %s", what)
    return position


def finish(run: Run, position: Position, ctx: RunContext) -> None:
    """Test perplexity, the final metrics, and the exported model."""
    t = run.cfg.trainer
    test_ppl = perplexity(
        *evaluate(run.model, run.data["test"], t.eval_num_steps, t.limit_eval_batches, t.precision)
    )
    speed = words_per_second([(h["train_wps"], h["epoch_time_s"]) for h in position.history])
    run.tracker.log_metrics(
        {
            "test_ppl": test_ppl,
            "best_valid_ppl": position.best_valid,
            "train_wps_mean": speed,
        },
        step=t.max_epochs,
    )
    log.info(  # the final weights are tested, not best.pt's: say so beside the best valid
        "Test perplexity %.2f of the final model (best valid %.2f)", test_ppl, position.best_valid
    )
    if t.limit_eval_batches is not None:
        log.warning("Not the full test split: %s.", eval_scope(t.limit_eval_batches))
    export_model(run.model, run.corpus, ctx, run.tracker, test_ppl, run.cfg.logger.log_model)


def export_model(
    model: LanguageModel,
    corpus: Corpus,
    ctx: RunContext,
    tracker: Tracker,
    test_ppl: float,
    log_model: bool,
) -> Path:
    """The final model in the standard format (model.pt, config.json, vocab.json) into
    <run dir>/model, and to MLflow (those files, and a pyfunc model) when log_model is set."""
    out = ctx.output_dir / "model"
    checkpoint.export(out, model.state_dict(), ctx.resolved, corpus.vocab)
    (out / "metrics.json").write_text(json.dumps({"test_ppl": test_ppl}))
    if log_model:
        tracker.log_model(out)
    return out


def resume_command(ctx: RunContext) -> str:
    """The command that continues this run: its own overrides, in its own folder (a run started
    elsewhere, the same command would start a new run in a new time-stamped folder)."""
    overrides, folder = ctx.launch or (ctx.overrides, ctx.output_dir)
    args = [
        *(o for o in overrides if not o.startswith("trainer.resume=")),
        f"hydra.run.dir={folder}",
    ]
    return " ".join(["python -m lmexp.train", *(shlex.quote(a) for a in args)])


def resume_how(ctx: RunContext) -> str:
    """How to continue a stopped run: its sweep rerun into its folder, or the exact command."""
    if ctx.job_num is not None:
        return f"rerun the sweep's command with hydra.sweep.dir={ctx.output_dir.parent}"
    return f"run {resume_command(ctx)}"


def resume_advice(last: Path, ctx: RunContext, run_id: str | None) -> str:
    """How to go on with a run whose tracking store stopped answering."""
    if not last.exists():
        return "rerun once it answers again (no epoch was checkpointed yet)"
    return f"once it answers again, {resume_how(ctx)} to continue MLflow run {run_id}"
