"""`python -m lmexp.adapt source=RUN method=cache|dynamic [split=valid] [cache.theta=...]`: a
trained model scored with the continuous cache (lmexp.engine.cache) or dynamic evaluation
(lmexp.engine.dynamic_eval), and the score logged to the model's own MLflow run as
`<split>_ppl_<method>` beside its plain `<split>_ppl`.

Its settings are config keys, so a Hydra multirun over them on split=valid is a grid search
(`-m cache.theta=0.5,1.0 cache.lambd=0.05,0.1`); the test split is then scored once with the
setting chosen.

Dynamic evaluation (tens of minutes for a medium model on PTB's test split on a CPU, hours on
WikiText-2) is resumable: it checkpoints `dynamic.pt` in its run folder every
dynamic.ckpt_every_n_segments segments and on SIGTERM/SIGINT/SIGUSR1/2 (SLURM's preemption
signals), and the same command rerun in that folder goes on from there, ending with the
uninterrupted evaluation's score, bit for bit.
"""

from __future__ import annotations

import logging
import shlex
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmexp.config import AdaptConfig, LmexpError
from lmexp.data import batchify
from lmexp.engine.cache import cache_evaluate
from lmexp.engine.dynamic_eval import (
    EvaluationStopped,
    GradientStats,
    Progress,
    dynamic_evaluate,
    fingerprint,
    gradient_stats,
)
from lmexp.engine.loop import evaluate, perplexity
from lmexp.engine.runtime import Preemption
from lmexp.loading import resolve_model, split_tokens
from lmexp.tracking.base import adapted_metric
from lmexp.validation import validate_adapt

log = logging.getLogger("lmexp.adapt")


def settings(cfg: AdaptConfig) -> dict[str, Any]:
    """The keys that decide the adapted score (what its tag on the run records)."""
    c, d = cfg.cache, cfg.dynamic
    if cfg.method == "cache":
        return {
            "window": c.window,
            "theta": c.theta,
            "lambd": c.lambd,
            "batch_size": cfg.batch_size,
        }
    chosen = {"kind": d.kind, "lr": d.lr, "decay": d.decay, "segment": d.segment}
    if d.kind == "rms":
        chosen |= {"epsilon": d.epsilon, "stats_batch_size": d.stats_batch_size}
        chosen |= {"stats_segments": d.stats_segments or "all"}
    return chosen | {"batch_size": cfg.batch_size}


def target_run(cfg: AdaptConfig) -> tuple[str, str] | None:
    """(store, run id) that the score is logged to: the source when it is a run id (its store
    checked writable now, before any time is spent), else none."""
    if Path(cfg.source).exists() or not cfg.log_to_run:
        return None
    from lmexp.tracking.stores import check_store, resolve_tracking_uri

    uri = resolve_tracking_uri(cfg.tracking_uri, Path.cwd())
    check_store(uri)
    return uri, cfg.source


CHECKPOINT = "dynamic.pt"


@dataclass
class Where:
    """The run folder of this scoring, and how to continue it there once stopped."""

    folder: Path
    resume: str


def score(
    cfg: AdaptConfig,
    model: Any,
    vocab: list[str],
    config: dict[str, Any],
    tokens: torch.Tensor,
    progress: Progress | None,
    preemption: Preemption,
) -> tuple[float, float, float]:
    """(adapted, plain) perplexity of `tokens` under cfg's method, and the seconds plain
    evaluation took (the adapted one's are logged). The adapted score comes first: a stop
    signal is answered within a segment of it, and plain evaluation is the short part."""
    steps = config["trainer"]["eval_num_steps"]
    data = batchify(tokens, cfg.batch_size).to(torch.device(cfg.device))
    c = cfg.cache
    if cfg.method == "cache":
        loss = cache_evaluate(model, data, steps, c.window, c.theta, c.lambd)
    else:
        assert progress is not None
        loss = dynamic_score(cfg, model, vocab, config, data, progress, preemption)
    started = time.monotonic()
    plain = perplexity(*evaluate(model, data, steps))
    return perplexity(*loss), plain, time.monotonic() - started


def dynamic_score(
    cfg: AdaptConfig,
    model: Any,
    vocab: list[str],
    config: dict[str, Any],
    data: torch.Tensor,
    progress: Progress,
    preemption: Preemption,
) -> tuple[float, int]:
    """Dynamic evaluation's summed NLL and token count, from where `progress` stands."""
    if progress.done is not None:
        log.info("%s holds this evaluation, finished: its score is reused.", progress.path)
        return progress.done
    d = cfg.dynamic
    with preemption.installed():  # a stop signal is polled before each segment
        stats = progress.stats
        if d.kind == "rms" and stats is None:
            stats = training_stats(cfg, model, vocab, config, preemption)
            progress.save(stats, None)  # the statistics survive a stop before the first checkpoint
        loss = dynamic_evaluate(
            model, data, d.segment, d.kind, d.lr, d.decay, d.epsilon, stats,
            start=progress.position,
            checkpoint_every=d.ckpt_every_n_segments,
            on_checkpoint=lambda position: progress.save(stats, position),
            should_stop=preemption.requested,
        )  # fmt: skip
    progress.finish(loss)
    return loss


def training_stats(
    cfg: AdaptConfig, model: Any, vocab: list[str], config: dict[str, Any], preemption: Preemption
) -> GradientStats:
    """The rms update's gradient statistics over the model's training split."""
    d = cfg.dynamic
    train, _ = split_tokens(config, "train", cfg.data_root, vocab)
    started = time.monotonic()
    train_data = batchify(train, d.stats_batch_size).to(torch.device(cfg.device))
    stats = gradient_stats(
        model, train_data, d.segment, d.stats_segments, should_stop=preemption.requested
    )
    log.info(
        "Gradient statistics from %d training segments in %.0f s.",
        stats.segments,
        time.monotonic() - started,
    )
    return stats


def identity(
    cfg: AdaptConfig, model: Any, config: dict[str, Any], tokens: torch.Tensor
) -> dict[str, Any]:
    """What makes two dynamic evaluations the same one: the model (its weights and the settings
    it is built with), the tokens scored and the settings that decide the score."""
    return {
        "weights": fingerprint(dict(model.named_parameters())),
        "model": config["model"],
        "tokens": fingerprint({"tokens": tokens}),
        "settings": settings(cfg),
    }


def task(cfg: Any) -> float:
    """One scoring (a job of a multirun); returns the adapted perplexity, a sweeper's objective."""
    from omegaconf import OmegaConf

    where = hydra_where()
    preemption = Preemption()  # installed around the dynamic evaluation only (dynamic_score)
    try:
        typed = validate_adapt(OmegaConf.to_object(cfg))
        return adapt(typed, where, preemption)
    except LmexpError as err:
        log.error("%s", err)
        sys.exit(2)
    except EvaluationStopped as stop:
        assert preemption.signum is not None
        name = signal.Signals(preemption.signum).name
        if stop.position is None:
            log.warning("%s received during the gradient statistics: stopped.", name)
        else:
            log.warning(
                "%s received: dynamic evaluation checkpointed after %d segments in %s.",
                name, stop.position.segments, where.folder / CHECKPOINT,
            )  # fmt: skip
        log.warning("To resume: %s.", where.resume)
        preemption.hand_over()
        sys.exit(128 + preemption.signum)
    except KeyboardInterrupt:  # a second Ctrl-C, or one outside the dynamic evaluation
        log.warning(
            "Interrupted: stopped at once; to go on from the last checkpoint, if one was "
            "written: %s.",
            where.resume,
        )
        sys.exit(130)


def adapt(typed: AdaptConfig, where: Where, preemption: Preemption) -> float:
    """Score, log the score to the run, say what was done."""
    run = target_run(typed)
    model, vocab, config = resolve_model(typed.source, typed.tracking_uri, typed.device)
    tokens, label = split_tokens(config, typed.split, typed.data_root, vocab)
    if typed.limit_tokens is not None:
        tokens, label = tokens[: typed.limit_tokens], f"{label} (first {typed.limit_tokens} tokens)"
    progress = None
    if typed.method == "dynamic":
        progress = Progress(where.folder / CHECKPOINT, identity(typed, model, config, tokens))
        if progress.position is not None:
            log.info(
                "Resumed from %s after %d segments.", progress.path, progress.position.segments
            )
    started = time.monotonic()
    adapted, plain, plain_s = score(typed, model, vocab, config, tokens, progress, preemption)
    adapted_s = time.monotonic() - started - plain_s
    chosen = " ".join(f"{k}={v}" for k, v in settings(typed).items())
    log.info(
        "%s: perplexity %.2f with %s (%s) in %.0f s, %.2f without in %.0f s.",
        label,
        adapted,
        "the cache" if typed.method == "cache" else "dynamic evaluation",
        chosen,
        adapted_s,
        plain,
        plain_s,
    )
    if run is None:
        log.info("Not logged to a run: %s", why_not_logged(typed))
    elif typed.limit_tokens is None:
        metric = adapted_metric(typed.split, typed.method)
        run_id = log_score(run, metric, adapted, settings(typed))
        log.info("Logged to MLflow run %s as %s.", run_id, metric)
    else:
        log.info("Not logged to the run: limit_tokens scores part of the split only.")
    return adapted


def hydra_where() -> Where:
    """This job's folder, and the command that continues it there (entry point only)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hc = HydraConfig.get()
    folder = Path(hc.runtime.output_dir)
    if hc.mode == RunMode.MULTIRUN:
        return Where(folder, f"rerun the sweep's command with hydra.sweep.dir={hc.sweep.dir}")
    from lmexp.tracking.stores import redact

    args = [*map(redact, hc.overrides.task), f"hydra.run.dir={folder}"]
    return Where(folder, "run " + " ".join(["python -m lmexp.adapt", *map(shlex.quote, args)]))


def log_score(run: tuple[str, str], metric: str, value: float, chosen: dict[str, Any]) -> str:
    from lmexp.tracking.runs import log_adapted_score

    return log_adapted_score(run[0], run[1], metric, value, chosen)


def why_not_logged(cfg: AdaptConfig) -> str:
    if not cfg.log_to_run:
        return "log_to_run=false."
    return "the source is a file; pass its MLflow run id as source= to log the score to the run."


def main() -> None:
    """Console entry point and `python -m lmexp.adapt`."""
    from lmexp.orchestration.launch import launch

    launch(task, "adapt", sys.argv[1:], AdaptConfig)


if __name__ == "__main__":
    main()
