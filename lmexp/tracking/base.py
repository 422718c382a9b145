"""What the engine talks to while it trains: a write-only `Tracker` (params, per-epoch metrics,
tags, artifacts, the model, a final status) and a `RunHistory` that reads back what a run
already holds (which epochs it logged, for the backfill after a kill). Both are no-ops here
(logger.kind=none); MLflow's are lmexp.tracking.runs.MlflowTracker and
lmexp.tracking.queries.MlflowHistory. No MLflow import: another backend is one more
implementation of these two classes, and the engine does not change.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# The names every store records a run under (MLflow's own where it has one).
PARENT_TAG = "mlflow.parentRunId"
FAILURE_TAG = "lmexp.failure_reason"
NOTE_TAG = "mlflow.note.content"  # a run's description, Markdown on its Overview page
# On a trial stopped by an Optuna pruner (its run ends KILLED): the epochs it trained.
PRUNED_TAG = "lmexp.pruned_after_epoch"
KIND_TAG = "lmexp.kind"  # "sweep" on a sweep's parent run, "bench" on lmexp.bench's runs
# A run's model: its exported files as artifacts under model/, and the pyfunc model of that name,
# so that mlflow.pyfunc.load_model(f"runs:/{run_id}/model") loads it.
MODEL_NAME = "model"
MODEL_FILES = ("model.pt", "config.json", "vocab.json")
# The metrics every training run logs once per epoch (step = epoch), in this order.
EPOCH_METRICS = ("train_ppl", "valid_ppl", "lr", "train_wps", "epoch_time_s")
# lmexp.adapt's scores, added to a trained run: test_ppl_cache, valid_ppl_dynamic, ... each with
# the settings that gave it in the tag "lmexp.<metric>".
ADAPT_METHODS = ("cache", "dynamic")


def adapted_metric(split: str, method: str) -> str:
    return f"{split}_ppl_{method}"


def adapted_metrics(names: Any) -> list[str]:
    """Those of `names` that are lmexp.adapt's scores, test first, then valid."""
    wanted = [adapted_metric(s, m) for s in ("test", "valid") for m in ADAPT_METHODS]
    return [w for w in wanted if w in set(names)]


class Tracker:
    """Where one run's records go, write-only; this one records nothing (logger.kind=none)."""

    run_id: str | None = None
    uri: str | None = None
    page: str | None = None  # the run's page in a UI, when the store has one

    def log_params(self, params: dict[str, Any]) -> None: ...

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def set_tags(self, tags: dict[str, str]) -> None: ...

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None: ...

    def log_model(self, folder: Path) -> None: ...

    def finish(self, status: str = "FINISHED", reason: str | None = None) -> None: ...


class RunHistory:
    """What one run already holds, read back from its store; this one holds nothing."""

    def logged_steps(self, key: str) -> set[int]:
        """The steps (epochs) at which metric `key` was logged."""
        return set()
