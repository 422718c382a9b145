"""`python -m lmexp.train [overrides]`: train the PTB LSTM language model, tracked in MLflow.

Wires config -> corpus -> batches -> model -> loop -> metrics -> tracker. Everything a user can
get wrong (config, data, output folder, checkpoint, tracking store) is checked before training.
Returns the best validation perplexity, which Hydra's sweepers minimise.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lmexp import checkpoint
from lmexp.config import LmexpError, TrainConfig, TrainerConfig, check_device_support, flatten
from lmexp.data import Corpus, batchify, load_corpus
from lmexp.loop import DivergenceError, EpochProgress, TrainStep, evaluate, perplexity, train_epoch
from lmexp.model import LSTMLanguageModel, State
from lmexp.schedules import learning_rate
from lmexp.tracking import PARENT_TAG, Tracker, open_tracker, read_sweep, resolve_tracking_uri

log = logging.getLogger("lmexp.train")

EPOCH_METRICS = ("train_ppl", "valid_ppl", "lr", "train_wps", "epoch_time_s")
# Keys a checkpoint must agree on with the config it is resumed under.
# A checkpoint given as trainer.ckpt_path must match these (the weights' and batches' shapes).
RESUME_KEYS = ("model", "dropout.kind", "data.name", "trainer.batch_size", "trainer.num_steps")
# Resuming a run in its own folder continues the same experiment: every key must match except
# these, which change how or where it runs, not what it computes (max_epochs may be extended).
SAME_RUN_FREE_KEYS = (
    "trainer.max_epochs",
    "trainer.device",
    "trainer.threads",
    "trainer.progress",
    "trainer.log_every_n_batches",
    "trainer.ckpt_every_n_batches",
    "trainer.resume",
    "trainer.ckpt_path",
    "trainer.precision",
    "trainer.compile",
    "trainer.cuda_graphs",
    "data.root",
    "data.cache_dir",
    "data.url",
    "data.verify_md5",
    "logger",
)


@dataclass
class RunContext:
    """Where the run lives; built by the Hydra entry, so the rest never touches Hydra."""

    output_dir: Path
    launch_dir: Path
    resolved: dict[str, Any]  # the resolved config as plain data (params, artifacts)
    overrides: list[str] = field(default_factory=list)
    job_num: int | None = None
    parent_run_id: str | None = None
    tracking_uri: str | None = None


def select_device(requested: str, job_num: int | None = None) -> torch.device:
    """auto: CUDA when present, else CPU. Parallel sweep jobs are spread over the visible GPUs."""
    if requested == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        index = (job_num or 0) % torch.cuda.device_count()
        return torch.device("cuda", index)
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LmexpError(
            f"trainer.device={requested} but no CUDA device is visible; use trainer.device=auto or cpu."
        )
    return device


def configure_threads(threads: int) -> int:
    """torch intra-op threads: the configured number, else one per physical core."""
    if threads == 0:
        try:
            import psutil

            threads = psutil.cpu_count(logical=False) or os.cpu_count() or 1
        except (
            ImportError
        ):  # psutil comes with lmexp; a bare GPU box running only the bench may lack it
            threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    return threads


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def check_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise LmexpError(
            f"Output folder {folder} is not writable ({err.strerror}); set hydra.run.dir (or "
            "hydra.sweep.dir) to a writable folder."
        ) from err


def git_commit(*folders: Path) -> str:
    for folder in folders:
        try:
            out = subprocess.run(
                ["git", "-C", str(folder), "rev-parse", "HEAD"],
                capture_output=True,
                text=True,
                timeout=5,
            )
        except (OSError, subprocess.SubprocessError):
            continue
        if out.returncode == 0:
            return out.stdout.strip()
    return "unknown"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def run_tags(device: torch.device, ctx: RunContext) -> dict[str, str]:
    tags = {
        "mlflow.source.git.commit": git_commit(Path(__file__).resolve().parent, ctx.launch_dir),
        "mlflow.source.name": "lmexp.train",
        "device": device_name(device),
        "torch_version": torch.__version__,
        "cudnn_version": str(torch.backends.cudnn.version() if device.type == "cuda" else None),
        "hydra_overrides": " ".join(ctx.overrides),
        "output_dir": str(ctx.output_dir),
    }
    if ctx.parent_run_id:
        tags[PARENT_TAG] = ctx.parent_run_id
    if ctx.job_num is not None:
        tags["job_num"] = str(ctx.job_num)
    return tags


def find_resume(
    trainer: TrainerConfig, ckpt_dir: Path, resolved: dict[str, Any]
) -> dict[str, Any] | None:
    """The checkpoint to resume from (trainer.ckpt_path, else this run's last.pt), verified."""
    if trainer.ckpt_path:
        path, same_run = Path(trainer.ckpt_path).expanduser(), False
    elif trainer.resume and (ckpt_dir / "last.pt").exists():
        path, same_run = ckpt_dir / "last.pt", True
    else:
        return None
    state = checkpoint.load(path)
    saved = flatten(state.get("config", {}))
    current = flatten(resolved)

    def under(key: str, prefixes: tuple[str, ...]) -> bool:
        return any(key == p or key.startswith(p + ".") for p in prefixes)

    for key in sorted(current):
        if key not in saved or saved[key] == current[key]:
            continue
        if under(key, RESUME_KEYS):
            raise checkpoint.CheckpointError(
                f"{path} was trained with {key}={saved[key]!r} but the config has "
                f"{current[key]!r}; resume with the same settings or start a new run."
            )
        if same_run and not under(key, SAME_RUN_FREE_KEYS):
            raise checkpoint.CheckpointError(
                f"{path} belongs to a run with {key}={saved[key]!r}, not {current[key]!r}: this "
                "folder holds another experiment; give this one its own hydra.run.dir (or "
                "hydra.sweep.dir), or rerun that one with its own settings."
            )
    state["path"] = str(path)
    return state


class Preemption:
    """Turns SIGTERM/SIGUSR1/SIGUSR2 (what SLURM sends before preemption or a time limit) into a
    flag the loop polls between batches; the previous handlers (submitit's requeue) run after the
    checkpoint is written."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)

    def __init__(self) -> None:
        self.signum: int | None = None
        self.frame: Any = None
        self.previous: dict[int, Any] = {}

    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum
        self.frame = frame

    @contextmanager
    def installed(self) -> Iterator[Preemption]:
        import threading

        if threading.current_thread() is not threading.main_thread():
            yield self  # signals reach only the main thread; a threaded launcher handles them
            return
        for sig in self.SIGNALS:
            self.previous[sig] = signal.signal(sig, self._handle)
        try:
            yield self
        finally:
            for sig, handler in self.previous.items():
                signal.signal(sig, handler)

    def hand_over(self) -> None:
        """Run the handler that was installed before ours (submitit requeues the job there)."""
        handler = self.previous.get(self.signum)
        if callable(handler):
            handler(self.signum, self.frame)


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


def backfill_metrics(tracker: Tracker, history: list[dict[str, float]]) -> None:
    """Log the epochs a checkpoint knows but MLflow does not (a kill between the two writes)."""
    for key in EPOCH_METRICS:
        logged = tracker.logged_steps(key)
        for record in history:
            if int(record["epoch"]) not in logged:
                tracker.log_metrics({key: record[key]}, step=int(record["epoch"]))


def progress_printer(epoch: int, lr: float) -> Any:
    """A live line on a terminal; otherwise a log line at each tenth of the epoch."""
    tty = sys.stderr.isatty()
    last_tenth = -1

    def on_log(progress: EpochProgress, total: int) -> None:
        nonlocal last_tenth
        line = (
            f"epoch {epoch} [{progress.batch:>5}/{total}] ppl {progress.ppl:9.2f} "
            f"{progress.wps:8.0f} words/s lr {lr:.4g}"
        )
        if tty:
            print(
                "\r" + line, end="" if progress.batch < total else "\n", file=sys.stderr, flush=True
            )
        elif progress.batch * 10 // total != last_tenth:
            last_tenth = progress.batch * 10 // total
            log.info(line)

    return on_log


def run_training(cfg: TrainConfig, ctx: RunContext) -> float:
    """Train, evaluate and track one run; return its best validation perplexity."""
    t, d = cfg.trainer, cfg.data
    device = select_device(t.device, ctx.job_num)
    check_device_support(t, device.type)
    threads = configure_threads(t.threads)
    corpus: Corpus = load_corpus(d)
    ckpt_dir = ctx.output_dir / "checkpoints"
    check_writable(ckpt_dir)
    resume = find_resume(t, ckpt_dir, ctx.resolved)
    uri = ctx.tracking_uri or resolve_tracking_uri(cfg.logger.tracking_uri, ctx.launch_dir)
    tracker, note = open_tracker(
        cfg.logger.kind,
        uri,
        cfg.logger.experiment_name,
        run_id=resume.get("mlflow_run_id") if resume else None,
        run_name=cfg.logger.run_name,
        tags=run_tags(device, ctx),
        timeout=cfg.logger.connect_timeout_s,
        fallback_uri=cfg.logger.fallback_uri
        and resolve_tracking_uri(cfg.logger.fallback_uri, ctx.launch_dir),
    )
    if note:
        log.warning(note)
    try:
        if resume is None:
            tracker.log_params(flatten(ctx.resolved))
        return _train(cfg, ctx, corpus, device, threads, tracker, resume, ckpt_dir)
    except DivergenceError as err:
        log.error("Run diverged: %s", err)
        tracker.finish("FAILED", f"diverged: {err}")
        return float("inf")
    except KeyboardInterrupt:
        tracker.finish("KILLED", "interrupted (KeyboardInterrupt)")
        raise
    except SystemExit:
        raise
    except BaseException as err:
        tracker.finish("FAILED", f"{type(err).__name__}: {err}")
        raise


def _train(
    cfg: TrainConfig,
    ctx: RunContext,
    corpus: Corpus,
    device: torch.device,
    threads: int,
    tracker: Tracker,
    resume: dict[str, Any] | None,
    ckpt_dir: Path,
) -> float:
    t = cfg.trainer
    seed_everything(t.seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    model = LSTMLanguageModel.from_config(cfg.model, cfg.dropout, corpus.vocab_size).to(device)
    train_data = batchify(corpus.train, t.batch_size).to(device)
    valid_data = batchify(corpus.valid, t.eval_batch_size).to(device)
    test_data = batchify(corpus.test, t.test_batch_size).to(device)

    history: list[dict[str, float]] = []
    start_epoch, best_valid = 0, math.inf
    progress: EpochProgress | None = None
    state: State | None = None
    if resume is not None:
        model.load_state_dict(resume["model"])
        history, best_valid = resume["history"], resume["best_valid_ppl"]
        start_epoch = resume["epoch"]
        if resume.get("progress"):
            progress = EpochProgress(**resume["progress"])
            state = (resume["state"][0].to(device), resume["state"][1].to(device))
        checkpoint.set_rng_state(resume["rng"])
        backfill_metrics(tracker, history)
        if start_epoch >= t.max_epochs and tracker.logged_steps("test_ppl"):
            log.info(
                "Run %s already finished all %d epochs; nothing to do.",
                tracker.run_id,
                t.max_epochs,
            )
            tracker.finish("FINISHED")
            return best_valid
        log.info(
            "Resumed from %s at epoch %d, batch %d",
            resume["path"],
            start_epoch + 1,
            progress.batch if progress else 0,
        )
    model.flatten_parameters()
    step = TrainStep.from_config(model, t, cfg.lr_policy.lr)
    n_params = sum(p.numel() for p in model.parameters())
    log.info(
        "model=%s: %.2fM parameters, vocab %d, device %s, %d threads; MLflow run %s at %s",
        cfg.model.name,
        n_params / 1e6,
        corpus.vocab_size,
        device,
        threads,
        tracker.run_id,
        tracker.uri,
    )

    def save(name: str, epoch: int, progress: EpochProgress | None, state: State | None) -> None:
        checkpoint.save(
            ckpt_dir / name,
            {
                "model": model.state_dict(),
                "epoch": epoch,
                "progress": progress.to_dict() if progress else None,
                "state": [s.detach().cpu() for s in state] if state is not None else None,
                "history": history,
                "best_valid_ppl": best_valid,
                "rng": checkpoint.rng_state(),
                "mlflow_run_id": tracker.run_id,
                "config": ctx.resolved,
                "vocab": corpus.vocab,
            },
        )

    preemption = Preemption()
    with preemption.installed():
        for epoch in range(start_epoch, t.max_epochs):
            lr = learning_rate(cfg.lr_policy, epoch, [h["valid_ppl"] for h in history])
            step.set_lr(lr)
            progress, state, stopped = train_epoch(
                step,
                train_data,
                t.num_steps,
                state if state is not None else model.init_state(t.batch_size),
                progress,
                limit_batches=t.limit_train_batches,
                log_every=t.log_every_n_batches,
                on_log=progress_printer(epoch + 1, lr) if t.progress else None,
                checkpoint_every=t.ckpt_every_n_batches,
                on_checkpoint=lambda p, s, e=epoch: save("last.pt", e, p, s),
                should_stop=preemption.requested,
            )
            if stopped:
                save("last.pt", epoch, progress, state)
                name = signal.Signals(preemption.signum).name
                log.warning(
                    "%s received: checkpoint saved at epoch %d batch %d in %s; rerun the same "
                    "command (or trainer.ckpt_path=%s) to resume.",
                    name,
                    epoch + 1,
                    progress.batch,
                    ckpt_dir,
                    ckpt_dir / "last.pt",
                )
                tracker.finish("KILLED", f"stopped by {name} at epoch {epoch + 1}; resumable")
                preemption.hand_over()
                sys.exit(128 + preemption.signum)
            valid_ppl = perplexity(
                *evaluate(model, valid_data, t.eval_num_steps, t.limit_eval_batches, t.precision)
            )
            if not math.isfinite(valid_ppl):
                raise DivergenceError(
                    f"validation perplexity is {valid_ppl} after epoch {epoch + 1}"
                )
            record = ppl_record(epoch + 1, lr, progress, valid_ppl, progress.seconds)
            history.append(record)
            improved = valid_ppl < best_valid
            best_valid = min(best_valid, valid_ppl)
            save("last.pt", epoch + 1, None, None)  # checkpoint first: MLflow is backfilled from it
            if improved:
                save("best.pt", epoch + 1, None, None)
            tracker.log_metrics({k: record[k] for k in EPOCH_METRICS}, step=epoch + 1)
            log.info(
                "Epoch %d: lr %.4g train ppl %.2f valid ppl %.2f, %.0f words/s, %.1f s",
                epoch + 1,
                lr,
                record["train_ppl"],
                valid_ppl,
                record["train_wps"],
                record["epoch_time_s"],
            )
            progress, state = None, None

    test_ppl = perplexity(
        *evaluate(model, test_data, t.eval_num_steps, t.limit_eval_batches, t.precision)
    )
    tracker.log_metrics({"test_ppl": test_ppl, "best_valid_ppl": best_valid}, step=t.max_epochs)
    log.info("Test perplexity %.2f (best valid %.2f)", test_ppl, best_valid)
    export_model(model, corpus, ctx, tracker, test_ppl, cfg.logger.log_model)
    tracker.finish("FINISHED")
    return best_valid


def export_model(
    model: LSTMLanguageModel,
    corpus: Corpus,
    ctx: RunContext,
    tracker: Tracker,
    test_ppl: float,
    log_model: bool,
) -> Path:
    """Final weights + vocabulary (JSON) + config into <run dir>/model, and to MLflow as artifacts."""
    out = ctx.output_dir / "model"
    out.mkdir(parents=True, exist_ok=True)
    checkpoint.save(
        out / "model.pt",
        {"model": model.state_dict(), "config": ctx.resolved, "vocab": corpus.vocab},
    )
    (out / "vocab.json").write_text(json.dumps(corpus.vocab))
    (out / "config.json").write_text(json.dumps(ctx.resolved, indent=2))
    (out / "metrics.json").write_text(json.dumps({"test_ppl": test_ppl}))
    if log_model:
        for name in ("model.pt", "vocab.json", "config.json"):
            tracker.log_artifact(out / name, "model")
    return out


def hydra_context(cfg: Any) -> RunContext:
    """Read what the run needs from Hydra's runtime config (entry-point only)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    hc = HydraConfig.get()
    ctx = RunContext(
        output_dir=Path(hc.runtime.output_dir),
        launch_dir=Path(hc.runtime.cwd),
        resolved=OmegaConf.to_container(cfg, resolve=True),  # type: ignore[arg-type]
        overrides=list(hc.overrides.task),
    )
    if hc.mode == RunMode.MULTIRUN:
        ctx.job_num = hc.job.num
        sweep = read_sweep(Path(hc.sweep.dir))
        if sweep is not None:
            ctx.parent_run_id, ctx.tracking_uri = sweep["parent_run_id"], sweep["tracking_uri"]
    return ctx


def task(cfg: Any) -> float:
    """The Hydra task: validate the composed config, then train. Module-level so that launchers
    (joblib, submitit) pickle it by reference."""
    from lmexp.config import to_typed

    try:
        return run_training(to_typed(cfg), hydra_context(cfg))
    except LmexpError as err:
        log.error("%s", err)
        sys.exit(2)


def preflight_output_dir(argv: list[str], launch_dir: Path) -> None:
    """Fail in one sentence when Hydra could not create its run folder (it would raise a traceback).

    Checks the folder named by hydra.run.dir / hydra.sweep.dir (up to its first interpolation),
    else the launch folder, where outputs/ and multirun/ go by default.
    """
    targets = [
        a.split("=", 1)[1] for a in argv if a.startswith(("hydra.run.dir=", "hydra.sweep.dir="))
    ]
    for target in targets or ["."]:
        path = Path(target.split("$", 1)[0] or ".")
        path = path if path.is_absolute() else launch_dir / path
        try:
            check_writable(path)  # creates what Hydra would create next anyway
        except LmexpError as err:
            log.error("%s", err)
            sys.exit(2)


def main() -> None:
    """Console entry point (`lmexp-train`) and `python -m lmexp.train`."""
    logging.basicConfig(
        format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s", level=logging.INFO
    )
    preflight_output_dir(sys.argv[1:], Path.cwd())
    import hydra

    from lmexp.config import conf_dir, register_configs

    register_configs()
    hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="train")(task)()


if __name__ == "__main__":
    # Run the copy imported as lmexp.train, not this __main__ one, so `task` pickles by reference.
    from lmexp.train import main as _main

    _main()
