"""Reading runs back from an MLflow store: one run or an experiment's (with metric histories),
a run's logged epochs (the RunHistory the engine's backfill asks), a run's exported model, and
the sweep record a multirun folder holds. Nothing here writes to a run.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmexp.config import first_line
from lmexp.tracking.base import (
    KIND_TAG,
    MODEL_FILES,
    MODEL_NAME,
    PARENT_TAG,
    PRUNED_TAG,
    RunHistory,
)
from lmexp.tracking.stores import TrackingError, redact


class TrackingLost(TrackingError):
    """The store stopped answering in the middle of a run, past MLflow's own retries (for a
    server: MLFLOW_HTTP_REQUEST_MAX_RETRIES=7 with backoff, about four minutes)."""


# MLflow's answers to a request it understood and refused: our bug or bad input, not an outage.
REFUSALS = frozenset(
    {"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "RESOURCE_ALREADY_EXISTS",
     "INVALID_STATE", "BAD_REQUEST", "PERMISSION_DENIED", "UNAUTHENTICATED"}
)  # fmt: skip


def _database_outage(err: BaseException) -> bool:
    """MLflow's SQL store reports a dropped database connection as BAD_REQUEST; its cause is a
    SQLAlchemy or driver error about the connection, not about the request."""
    cause = err.__cause__ or err.__context__
    while cause is not None:
        if type(cause).__module__.split(".")[0] in ("sqlalchemy", "psycopg", "psycopg2"):
            name = type(cause).__name__
            return name in (
                "OperationalError",
                "InterfaceError",
                "TimeoutError",
                "DisconnectionError",
            )
        cause = cause.__cause__ or cause.__context__
    return False


def lost_store(method: Callable[..., Any]) -> Callable[..., Any]:
    """A tracker method whose store stops answering raises TrackingLost, in one sentence."""

    @functools.wraps(method)
    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        from mlflow.exceptions import MlflowException

        try:
            return method(self, *args, **kwargs)
        except MlflowException as err:
            if err.error_code in REFUSALS and not _database_outage(err):
                raise
            reason = first_line(err)
        except ConnectionError as err:
            reason = first_line(err)
        except Exception as err:
            if type(err).__module__.split(".")[0] not in ("sqlalchemy", "psycopg", "requests"):
                raise
            reason = first_line(err)
        raise TrackingLost(
            f"Tracking store {redact(self.uri or '')} stopped answering during "
            f"{method.__name__} ({redact(reason)[:300]})"
        )

    return call


def mlflow_client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def run_history(uri: str | None, run_id: str | None) -> RunHistory:
    """What run `run_id` in store `uri` holds already; nothing for no store (logger.kind=none)."""
    return MlflowHistory(uri, run_id) if uri and run_id else RunHistory()


class MlflowHistory(RunHistory):
    """What one MLflow run holds already."""

    def __init__(self, uri: str, run_id: str) -> None:
        self.uri, self.run_id, self.client = uri, run_id, mlflow_client(uri)

    @lost_store
    def logged_steps(self, key: str) -> set[int]:
        return {m.step for m in self.client.get_metric_history(self.run_id, key)}


FIND_RUN = "check the run id and logger.tracking_uri (--tracking-uri), or pass a model.pt path"


def full_run_id(uri: str, run_id: str, advice: str = FIND_RUN) -> str:
    """The run id that the short one (the 8 characters lmexp's tables show) starts, when one
    run's does; a full id, or what is no id's start, as it is (fetching it then says why).
    `advice` ends the error when no run's id starts so: how to find the run from the caller."""
    if not re.fullmatch(r"[0-9a-f]{1,31}", run_id):
        return run_id
    from mlflow.entities import ViewType

    client = mlflow_client(uri)
    experiments = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
    matches, token = [], None
    while experiments:
        page = client.search_runs(
            experiments, run_view_type=ViewType.ALL, max_results=1000, page_token=token
        )
        matches += [r.info.run_id for r in page if r.info.run_id.startswith(run_id)]
        token = page.token
        if not token:
            break
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise TrackingError(f"No run in {redact(uri)} has an id starting with {run_id}; {advice}.")
    raise TrackingError(
        f"{run_id} starts {len(matches)} run ids in {redact(uri)} "
        f"({', '.join(sorted(m[: len(run_id) + 4] for m in matches))}...); give more of it."
    )


def download_model(uri: str, run_id: str, dest: Path) -> Path:
    """Fetch a run's exported model (model/model.pt, config.json, vocab.json) into dest; return
    the path of model.pt. run_id may be the start of one run's id."""
    from mlflow.artifacts import download_artifacts
    from mlflow.exceptions import MlflowException

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    run_id = full_run_id(uri, run_id)
    client = mlflow_client(uri)
    local, base = [], None
    for name in MODEL_FILES:  # each lands in dest itself
        try:
            # From the run's own artifact store: through a runs:/ URI MLflow would also look up
            # the run's logged model, in the default store (creating ./mlflow.db) not in uri.
            base = base or client.get_run(run_id).info.artifact_uri
            local.append(
                download_artifacts(
                    artifact_uri=f"{base}/{MODEL_NAME}/{name}", dst_path=str(dest), tracking_uri=uri
                )
            )
        except (MlflowException, OSError) as err:
            raise TrackingError(
                f"Run {run_id} in {redact(uri)} has no {MODEL_NAME}/{name} artifact "
                f"({str(err).splitlines()[0]}); check the run id and logger.tracking_uri "
                "(--tracking-uri), or pass a model.pt path."
            ) from err
    return Path(local[0])


# --- sweeps: a parent run per multirun, read back by the report ----------------------------

# In a sweep folder: parent_run_id, tracking_uri, experiment and swept_params, which the jobs,
# a resumed sweep and the report read.
SWEEP_FILE = "mlflow_sweep.json"


def read_sweep(folder: Path) -> dict[str, Any] | None:
    """The sweep record a multirun folder holds, or None when it has none."""
    path = folder / SWEEP_FILE
    return json.loads(path.read_text()) if path.is_file() else None


@dataclass
class RunRecord:
    """One run as the report needs it: params, final metrics, per-epoch histories."""

    run_id: str
    run_name: str
    status: str
    params: dict[str, str]
    metrics: dict[str, float]
    tags: dict[str, str]
    history: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    experiment_id: str = ""


def fetch_runs(
    uri: str,
    experiment_name: str,
    parent_run_id: str | None = None,
    history_keys: tuple[str, ...] = (),
) -> list[RunRecord]:
    """The runs of an experiment, or only the children of one sweep's parent run."""
    client = mlflow_client(uri)
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        raise TrackingError(f"Experiment {experiment_name!r} does not exist in {redact(uri)}.")
    query = f"tags.`{PARENT_TAG}` = '{parent_run_id}'" if parent_run_id else ""
    runs, token = [], None
    while True:
        page = client.search_runs(
            [experiment.experiment_id], query, max_results=1000, page_token=token
        )
        runs.extend(page)
        token = page.token
        if not token:
            break
    return [
        _record(client, run, history_keys)
        for run in runs
        # sweep parents hold summaries, not a training run
        if parent_run_id or run.data.tags.get(KIND_TAG) != "sweep"
    ]


def experiment_names(uri: str) -> list[str]:
    """The names of the store's experiments that hold runs, oldest first."""
    client = mlflow_client(uri)
    names = []
    for experiment in sorted(client.search_experiments(), key=lambda e: int(e.experiment_id)):
        if client.search_runs([experiment.experiment_id], "", max_results=1):
            names.append(experiment.name)
    return names


def experiment_name_of(uri: str, run_id: str) -> str:
    """The name of the experiment a run is in."""
    client = mlflow_client(uri)
    return client.get_experiment(fetch_run(uri, run_id).experiment_id).name


def fetch_run(uri: str, run_id: str, history_keys: tuple[str, ...] = ()) -> RunRecord:
    """One run by id, with the metric histories asked for."""
    from mlflow.exceptions import MlflowException

    client = mlflow_client(uri)
    try:
        run = client.get_run(run_id)
    except MlflowException as err:
        raise TrackingError(
            f"Run {run_id} is not in {redact(uri)}; check the run id and --tracking-uri."
        ) from err
    return _record(client, run, history_keys)


def _record(client: Any, run: Any, history_keys: tuple[str, ...]) -> RunRecord:
    history = {}
    for key in history_keys:
        points = sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)
        history[key] = [(m.step, m.value) for m in points]
    status = run.info.status
    if status == "KILLED" and PRUNED_TAG in run.data.tags:
        status = "PRUNED"  # stopped by the search's pruner, not by a signal
    return RunRecord(
        run.info.run_id,
        run.info.run_name or "",
        status,
        dict(run.data.params),
        dict(run.data.metrics),
        dict(run.data.tags),
        history,
        run.info.experiment_id,
    )
