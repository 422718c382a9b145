"""The epoch loop: from a Position to trainer.max_epochs, train, validate, checkpoint, log, then
the epoch callbacks. It knows a run only through plain values (the config, the batched splits,
the model, a write-only Tracker) and nothing of Hydra, MLflow, Optuna or SLURM: what a search or
a seed loop needs comes in as epoch callbacks, and a stop (a preemption signal, a pruner) is an
exception (RunStopped), never an exit.
"""

from __future__ import annotations

import logging
import math
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lmexp.config import Preempted, TrainConfig
from lmexp.data import Corpus, jittered_lengths
from lmexp.engine import checkpoint
from lmexp.engine.loop import (
    LR_ADVICE,
    EpochProgress,
    TrainStep,
    check_diverged,
    evaluate,
    perplexity,
    train_epoch,
)
from lmexp.engine.runtime import Preemption
from lmexp.models import LanguageModel
from lmexp.models.base import State, flatten_recurrent_weights, pack_state
from lmexp.optim.optimizers import averaged_weights
from lmexp.optim.schedules import learning_rate
from lmexp.tracking.base import EPOCH_METRICS, Tracker

log = logging.getLogger("lmexp.train")


# Called after each epoch is checkpointed and logged, with (epoch, valid_ppl, last epoch?); may
# raise RunStopped to end the run there (an Optuna trial's pruner does).
EpochCallback = Callable[[int, float, bool], None]


@dataclass
class Run:
    """What the epochs of one run work with."""

    cfg: TrainConfig
    corpus: Corpus
    data: dict[str, torch.Tensor]
    model: LanguageModel
    tracker: Tracker
    ckpt_dir: Path
    resolved: dict[str, Any]  # the resolved config, saved in each checkpoint
    callbacks: list[EpochCallback] = field(default_factory=list)


@dataclass
class Position:
    """Where training stands: what a checkpoint saves and a resumed run restores."""

    epoch: int = 0  # epochs completed
    history: list[dict[str, float]] = field(default_factory=list)
    best_valid: float = math.inf
    partial: EpochProgress | None = None  # set while stopped inside an epoch
    state: State | None = None  # the recurrent state at that point
    step_state: dict[str, Any] | None = None  # the optimizer's and grad scaler's, to continue


def fit(run: Run, position: Position) -> None:
    """Epochs from `position` to trainer.max_epochs: train, validate, checkpoint, log, then the
    epoch callbacks. A preemption signal checkpoints at the next batch and stops the run (see
    stop)."""
    t, model = run.cfg.trainer, run.model
    if run.data["train"].device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    flatten_recurrent_weights(model)
    step = TrainStep.from_config(
        model, t, run.cfg.optimizer, run.cfg.lr_policy.lr, run.cfg.regularizer
    )
    if position.step_state is not None:
        step.load_state_dict(position.step_state)
    preemption = Preemption()
    with preemption.installed():
        for epoch in range(position.epoch, t.max_epochs):
            lr = learning_rate(run.cfg.lr_policy, epoch, [h["valid_ppl"] for h in position.history])
            step.set_lr(lr)
            progress = train_one_epoch(run, step, position, epoch, lr, preemption)
            valid_ppl = validate(run, step)
            check_diverged(
                [h["valid_ppl"] for h in position.history] + [valid_ppl],
                run.corpus.vocab_size,
                divergence_advice(run.corpus),
            )
            observe_validation(run, step, position, valid_ppl, epoch + 1)
            record = ppl_record(epoch + 1, lr, progress, valid_ppl, progress.seconds)
            end_epoch(run, position, record, step)
            for callback in run.callbacks:
                callback(epoch + 1, valid_ppl, epoch + 1 == t.max_epochs)
    keep_averaged = getattr(step.optimizer, "keep_averaged", None)
    if keep_averaged is not None:  # the test and the export use the averages
        keep_averaged()


def train_one_epoch(
    run: Run, step: TrainStep, position: Position, epoch: int, lr: float, preemption: Preemption
) -> EpochProgress:
    """Train epoch `epoch` from where `position` stands in it (its partial totals and state),
    checkpointing every trainer.ckpt_every_n_batches; on a preemption signal, checkpoint and stop
    the run."""
    t = run.cfg.trainer

    def mid_epoch(partial: EpochProgress, state: State) -> None:
        position.partial, position.state = partial, state
        save_checkpoint(run, "last.pt", position, step)

    train = run.data["train"]
    progress, state, stopped = train_epoch(
        step,
        train,
        t.num_steps,
        position.state if position.state is not None else run.model.init_state(t.batch_size),
        position.partial,
        limit_batches=t.limit_train_batches,
        log_every=t.log_every_n_batches,
        on_log=progress_printer(epoch + 1, t.max_epochs, lr) if t.progress else None,
        checkpoint_every=t.ckpt_every_n_batches,
        on_checkpoint=mid_epoch,
        should_stop=preemption.requested,
        lengths=(
            jittered_lengths(train.size(0) - 1, t.num_steps, t.seed, epoch)
            if t.bptt_jitter
            else None
        ),
    )
    if stopped:
        mid_epoch(progress, state)
        stop(run, preemption, epoch, progress.batch)
    return progress


def validate(run: Run, step: TrainStep) -> float:
    """Validation perplexity, with NT-ASGD's averaged weights once it has switched."""
    t = run.cfg.trainer
    with averaged_weights(step.optimizer):
        return perplexity(
            *evaluate(
                run.model, run.data["valid"], t.eval_num_steps, t.limit_eval_batches, t.precision
            )
        )


def divergence_advice(corpus: Corpus) -> str:
    """What to change when validation says a run diverged: the lr, or the corpus when its
    validation words are missing from the train split, which holds no <unk> to learn them by."""
    rate = corpus.unseen.get("valid", 0.0)
    if rate > 0 and not corpus.trains_unk:
        return (
            f"{rate:.1%} of the validation words never occur in the train split and are read as "
            "<unk>, which the train split never holds, so the model cannot score them: give the "
            "train split those words or <unk> (data.root) before lowering lr_policy.lr"
        )
    return LR_ADVICE


def observe_validation(
    run: Run, step: TrainStep, position: Position, valid_ppl: float, epoch: int
) -> None:
    """Tell an optimizer that switches on the validation history (NT-ASGD) this epoch's score;
    a switch is logged and tagged (lmexp.averaging_from_epoch: the first averaged epoch)."""
    observe = getattr(step.optimizer, "observe", None)
    if observe is None:
        return
    if observe([h["valid_ppl"] for h in position.history] + [valid_ppl]):
        log.info(
            "Epoch %d: validation ppl %.2f is worse than the best of the checks made more than "
            "%d before it; averaged SGD from epoch %d on",
            epoch,
            valid_ppl,
            step.optimizer.nonmono,
            epoch + 1,
        )
        run.tracker.set_tags({"lmexp.averaging_from_epoch": str(epoch + 1)})


def progress_printer(epoch: int, epochs: int, lr: float) -> Any:
    """A live line on a terminal; otherwise a log line at each tenth of the epoch. It gives the
    epoch out of all, and the training time left at this epoch's pace (validation not counted)."""
    tty = sys.stderr.isatty()
    last_tenth = -1

    def on_log(progress: EpochProgress, total: int) -> None:
        nonlocal last_tenth
        left = (total - progress.batch + (epochs - epoch) * total) * progress.seconds
        line = (
            f"epoch {epoch}/{epochs} [{progress.batch:>5}/{total}] ppl {progress.ppl:9.2f} "
            f"{progress.wps:8.0f} words/s lr {lr:.4g}, {duration(left / progress.batch)} left"
        )
        if tty:
            print(
                "\r" + line, end="" if progress.batch < total else "\n", file=sys.stderr, flush=True
            )
        elif progress.batch * 10 // total != last_tenth:
            last_tenth = progress.batch * 10 // total
            log.info(line)

    return on_log


def duration(seconds: float) -> str:
    """3h05m, 4m07s or 12s: a time left, to the precision it has."""
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def ppl_record(
    epoch: int, lr: float, progress: EpochProgress, valid_ppl: float, elapsed: float
) -> dict[str, float]:
    return {
        "epoch": epoch,
        "train_ppl": progress.ppl,
        "valid_ppl": valid_ppl,
        "lr": lr,
        "train_wps": progress.wps,
        "epoch_time_s": elapsed,
    }


def end_epoch(run: Run, position: Position, record: dict[str, float], step: TrainStep) -> None:
    """Checkpoint first (MLflow is backfilled from it after a kill), then log the epoch."""
    improved = record["valid_ppl"] < position.best_valid
    position.history.append(record)
    position.epoch, position.partial, position.state = int(record["epoch"]), None, None
    position.best_valid = min(position.best_valid, record["valid_ppl"])
    save_checkpoint(run, "last.pt", position, step)
    if improved:
        with averaged_weights(step.optimizer):  # the best model is the one validated
            save_checkpoint(run, "best.pt", position, step)
    run.tracker.log_metrics({k: record[k] for k in EPOCH_METRICS}, step=position.epoch)
    log.info(
        "Epoch %d: lr %.4g train ppl %.2f valid ppl %.2f, %.0f words/s, %.1f s",
        *(record[k] for k in ("epoch", "lr", "train_ppl", "valid_ppl", "train_wps")),
        record["epoch_time_s"],
    )


def save_checkpoint(run: Run, name: str, position: Position, step: TrainStep) -> None:
    state = position.state
    checkpoint.save(
        run.ckpt_dir / name,
        {
            "model": run.model.state_dict(),
            "epoch": position.epoch,
            "progress": position.partial.to_dict() if position.partial else None,
            "state": [s.detach().cpu() for s in pack_state(state)] if state is not None else None,
            "history": position.history,
            "best_valid_ppl": position.best_valid,
            "rng": checkpoint.rng_state(),
            "step": step.state_dict(),
            "mlflow_run_id": run.tracker.run_id,
            "config": run.resolved,
            "vocab": run.corpus.vocab,
        },
    )


def stop(run: Run, preemption: Preemption, epoch: int, batch: int) -> None:
    """After a preemption signal's checkpoint: stop the run, resumable (run_training closes it
    KILLED, then Preempted hands the signal to the handler installed before lmexp's)."""
    assert preemption.signum is not None
    name = signal.Signals(preemption.signum).name
    if run.cfg.trainer.progress and sys.stderr.isatty():
        print(file=sys.stderr)  # end the live progress line: the notice gets a line of its own
    log.warning(
        "%s received: checkpoint saved at epoch %d batch %d in %s.", name, epoch + 1, batch,
        run.ckpt_dir,
    )  # fmt: skip
    raise Preempted(f"stopped by {name} at epoch {epoch + 1}; resumable", preemption)
