"""Experiment tracking. The only module that imports mlflow (lazily: importing it costs seconds).

`Tracker` is what the training loop talks to: params, per-epoch metrics, tags, artifacts, a
final status. `MlflowTracker` writes them to an MLflow store through `MlflowClient` (no global
"active run"), so a resumed job can reopen its run by id and a sweep can parent its jobs' runs.
"""

from __future__ import annotations

import functools
import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmexp.config import first_line
from lmexp.stores import TrackingError, permission_refused, redact, sqlite_path, store_lock

PARENT_TAG = "mlflow.parentRunId"
FAILURE_TAG = "lmexp.failure_reason"
NOTE_TAG = "mlflow.note.content"  # a run's description, Markdown on its Overview page
# On a trial stopped by an Optuna pruner (its run ends KILLED): the epochs it trained.
PRUNED_TAG = "lmexp.pruned_after_epoch"
KIND_TAG = "lmexp.kind"  # "sweep" on a sweep's parent run, "bench" on lmexp.bench's runs
# The metrics every training run logs once per epoch (step = epoch), in this order.
EPOCH_METRICS = ("train_ppl", "valid_ppl", "lr", "train_wps", "epoch_time_s")
# A run's model: its exported files as artifacts under model/, and the pyfunc model of that name,
# so that mlflow.pyfunc.load_model(f"runs:/{run_id}/model") loads it.
MODEL_NAME = "model"
MODEL_FILES = ("model.pt", "config.json", "vocab.json")


class TrackingLost(TrackingError):
    """The store stopped answering in the middle of a run, past MLflow's own retries (for a
    server: MLFLOW_HTTP_REQUEST_MAX_RETRIES=7 with backoff, about four minutes)."""


# MLflow's answers to a request it understood and refused: our bug or bad input, not an outage.
REFUSALS = frozenset(
    {"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "RESOURCE_ALREADY_EXISTS",
     "INVALID_STATE", "BAD_REQUEST", "PERMISSION_DENIED", "UNAUTHENTICATED"}
)  # fmt: skip


def _refused(err: Any) -> bool:
    return getattr(err, "error_code", None) == "PERMISSION_DENIED"


def create_run(
    client: Any, uri: str, experiment: str, experiment_id: str, name: str | None, tags: dict
) -> str:
    """A new run's id; a server's 403 (no EDIT on the experiment) as one sentence."""
    from mlflow.exceptions import MlflowException

    try:
        return client.create_run(experiment_id, run_name=name, tags=tags).info.run_id
    except MlflowException as err:
        if _refused(err):
            raise TrackingError(permission_refused(uri, experiment, "create runs in")) from None
        raise


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def prepare_experiment(uri: str, name: str) -> str:
    """Create (and migrate) the store and the experiment once, under the lock; return its id."""
    from mlflow.exceptions import MlflowException

    with store_lock(uri):
        try:
            client = _client(uri)
            experiment = client.get_experiment_by_name(name)
            if experiment is not None:
                return experiment.experiment_id
            db = sqlite_path(uri)
            # Artifacts beside the database, so `mlflow ui` run from that folder serves them.
            location = (db.parent / "mlartifacts").as_uri() if db is not None else None
            try:
                experiment_id = client.create_experiment(name, artifact_location=location)
            except MlflowException as err:
                # Jobs starting together on a tracking server (no lock spans processes there):
                # another one created it first.
                if err.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                return client.get_experiment_by_name(name).experiment_id
            for key, value in experiment_view_tags().items():
                client.set_experiment_tag(experiment_id, key, value)
            return experiment_id
        except MlflowException as err:
            if _refused(err):
                raise TrackingError(permission_refused(uri, name, "use")) from None
            raise TrackingError(
                f"Tracking store {redact(uri)} could not be opened: {err.message}"
            ) from err
        except Exception as err:  # noqa: BLE001 - SQLAlchemy's and the driver's errors
            reason = first_line(err)
            raise TrackingError(
                f"Tracking store {redact(uri)} could not be opened ({reason}); check that it is a "
                "working MLflow store, or point logger.tracking_uri elsewhere."
            ) from err


# --- what the MLflow UI shows first ----------------------------------------------------------
# MLflow 3.17's UI opens experiments in its GenAI view unless the URL says workflowType; the
# experimentKind tag is what older 3.x UIs read. Columns cannot be picked by a URL, but a saved
# view (an experiment tag the UI lists under "Views", opened by viewStateShareKey) carries them.
VIEW_TAG_PREFIX = "mlflow.sharedViewState."
EXPERIMENT_VIEW = "perplexity"  # the experiment-wide view's id
KEY_METRICS = ("valid_ppl", "test_ppl", "train_ppl", "best_valid_ppl", "train_wps_mean")


def _view_tag(name: str, search: str, params: list[str]) -> str:
    columns = [f"params.`{p}`" for p in params] + [f"metrics.`{m}`" for m in KEY_METRICS]
    state = {
        "searchFilter": search,
        "orderByKey": "metrics.`best_valid_ppl`",
        "orderByAsc": True,
        "selectedColumns": columns,
        "runsHiddenMode": "SHOW_ALL",  # the UI's default charts only the first 10 runs
    }
    now = int(time.time() * 1000)
    return json.dumps(
        {"name": name, "createdAt": now, "updatedAt": now, "state": json.dumps(state)}
    )


def experiment_view_tags() -> dict[str, str]:
    """Tags for a new experiment: a model-training experiment, with a view of perplexities."""
    params = ["model.name", "data.name", "dropout.dp_keep_prob", "lr_policy.lr"]
    return {
        "mlflow.experimentKind": "custom_model_development",
        VIEW_TAG_PREFIX + EXPERIMENT_VIEW: _view_tag("lmexp: perplexity", "", params),
    }


def save_sweep_view(uri: str, experiment_id: str, parent_run_id: str, swept: list[str]) -> None:
    """A view of one sweep's children, its swept params and key metrics as columns."""
    search = f"tags.`{PARENT_TAG}` = '{parent_run_id}'"
    tag = _view_tag(f"sweep {parent_run_id[:8]}", search, swept)
    _client(uri).set_experiment_tag(experiment_id, VIEW_TAG_PREFIX + parent_run_id, tag)


MLFLOW_UI = "http://127.0.0.1:5000"  # where `mlflow ui` listens unless told otherwise


def ui_base(uri: str, ui: str | None = None) -> str:
    """Where the MLflow UI for `uri` is: ui (logger.ui_url) when given, else the server itself,
    or `mlflow ui`'s default address for a database store."""
    if ui:
        return ui.rstrip("/")
    parts = urllib.parse.urlparse(uri)
    if parts.scheme not in ("http", "https"):
        return MLFLOW_UI
    host = parts.netloc.rpartition("@")[2]  # a browser link carries no user or password
    return urllib.parse.urlunparse(parts._replace(netloc=host)).rstrip("/")


def ui_start(uri: str, ui: str | None = None) -> str:
    """How to open the UI the links point at: nothing to do for a server (or a logger.ui_url
    the user gave), else the `mlflow ui` command for this store, in the words of a log line."""
    if ui or urllib.parse.urlparse(uri).scheme in ("http", "https"):
        return ""
    return f" (start it with: mlflow ui --backend-store-uri {redact(uri)})"


def ui_url(
    uri: str,
    experiment_id: str,
    view: str | None = None,
    run_id: str | None = None,
    ui: str | None = None,
) -> str:
    """The UI page of a run, or of an experiment's runs in the model-training view (chart mode,
    with a saved view's columns when `view` is given); ui: see ui_base."""
    base = f"{ui_base(uri, ui)}/#/experiments/{experiment_id}"
    if run_id:
        return f"{base}/runs/{run_id}"
    query = "workflowType=machine_learning&compareRunsMode=CHART"
    return f"{base}/runs?{query}" + (f"&viewStateShareKey={view}" if view else "")


class Tracker:
    """No-op tracker (logger=none); the interface MlflowTracker implements."""

    run_id: str | None = None
    uri: str | None = None
    page: str | None = None  # the run's page in the MLflow UI

    def log_params(self, params: dict[str, Any]) -> None: ...

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def set_tags(self, tags: dict[str, str]) -> None: ...

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None: ...

    def log_model(self, folder: Path) -> None: ...

    def logged_steps(self, key: str) -> set[int]:
        return set()

    def finish(self, status: str = "FINISHED", reason: str | None = None) -> None: ...


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
    def call(self: MlflowTracker, *args: Any, **kwargs: Any) -> Any:
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


class MlflowTracker(Tracker):
    """Writes to one MLflow run, new or reopened by id."""

    def __init__(
        self,
        uri: str,
        experiment_name: str,
        run_id: str | None = None,
        run_name: str | None = None,
        tags: dict[str, str] | None = None,
        system_metrics_s: float | None = None,
        ui: str | None = None,
    ) -> None:
        from mlflow.exceptions import MlflowException

        self.uri = uri
        self.monitor: Any = None
        self.experiment_id = prepare_experiment(uri, experiment_name)
        self.client = _client(uri)
        if run_id is not None:
            try:
                self.client.get_run(run_id)
            except MlflowException as err:
                raise TrackingError(
                    f"MLflow run {run_id} (named in the checkpoint) is not in {redact(uri)}; use the "
                    "same logger.tracking_uri as the interrupted run."
                ) from err
            reopen_run(self.client, run_id)
            self.run_id = run_id
        else:
            self.run_id = create_run(
                self.client, uri, experiment_name, self.experiment_id, run_name, tags or {}
            )
        self.page = ui_url(uri, self.experiment_id, run_id=self.run_id, ui=ui)
        if system_metrics_s:
            self.monitor = start_system_metrics(
                uri, self.run_id, system_metrics_s, run_id is not None
            )

    @lost_store
    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    @lost_store
    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        self.client.log_batch(self.run_id, metrics=batch)

    @lost_store
    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    @lost_store
    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    @lost_store
    def log_model(self, folder: Path) -> None:
        """An exported model folder: its files as artifacts under model/, and a pyfunc model
        ("models from code": lmexp/pyfunc_model.py, nothing pickled) linked to this run."""
        import mlflow
        import pandas
        import torch
        from mlflow.entities import LoggedModelOutput

        from lmexp import pyfunc_model

        for name in MODEL_FILES:
            self.log_artifact(folder / name, MODEL_NAME)
        # pyfunc.log_model links a model to the fluent API's active run only, which it would
        # end on exit; creating the model here links it to this run and leaves the run open.
        model = self.client.create_logged_model(
            self.experiment_id, name=MODEL_NAME, source_run_id=self.run_id
        )
        mlflow.set_tracking_uri(self.uri)  # log_model writes to the global tracking URI
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        with warnings.catch_warnings():
            # It advises an input example, which it would validate by running the model; the
            # signature already says what predict takes.
            warnings.filterwarnings("ignore", ".*An input example was not provided")
            mlflow.pyfunc.log_model(
                name=MODEL_NAME,
                python_model=pyfunc_model.__file__,
                artifacts={Path(name).stem: str(folder / name) for name in MODEL_FILES},
                signature=pyfunc_model.signature(),
                # Given, so MLflow does not load the model again to infer them.
                pip_requirements=[
                    f"mlflow=={mlflow.__version__}",
                    f"torch=={torch.__version__.split('+')[0]}",
                    f"pandas=={pandas.__version__}",
                ],
                model_id=model.model_id,
            )
        self.client.log_outputs(self.run_id, [LoggedModelOutput(model.model_id, step=0)])

    @lost_store
    def logged_steps(self, key: str) -> set[int]:
        return {m.step for m in self.client.get_metric_history(self.run_id, key)}

    @lost_store
    def finish(self, status: str = "FINISHED", reason: str | None = None) -> None:
        if self.monitor is not None:  # its last samples, while the run is still RUNNING
            self.monitor.finish()
            self.monitor = None
        if reason:
            self.set_tags({FAILURE_TAG: reason[:5000]})
        self.client.set_terminated(self.run_id, status)


def start_system_metrics(uri: str, run_id: str, interval_s: float, resumed: bool) -> Any:
    """MLflow's system metrics (CPU, memory, disk, network; GPU through nvidia-ml-py where there
    is one) for a run made with MlflowClient, sampled every interval_s seconds."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(
        run_id, sampling_interval=interval_s, resume_logging=resumed, tracking_uri=uri
    )
    monitor.start()
    return monitor


def open_tracker(
    kind: str,
    uri: str,
    experiment_name: str,
    run_id: str | None,
    run_name: str | None,
    tags: dict[str, str],
    system_metrics_s: float | None = None,
    ui: str | None = None,
) -> Tracker:
    """The tracker for logger.kind, writing to uri, a store usable_store has checked (before
    the work, so that a store that refuses the run costs none of it)."""
    if kind == "none":
        return Tracker()
    return MlflowTracker(uri, experiment_name, run_id, run_name, tags, system_metrics_s, ui)


def rerun_decision(
    uri: str, earlier: str, params: dict[str, Any], resume: bool
) -> tuple[bool, str]:
    """Whether a rerun that found no checkpoint continues the MLflow run its earlier attempt
    opened (killed before its first checkpoint: one job stays one run), and the line that says
    what happens. Not when that run finished, is gone, was made with other settings, or the
    rerun asked for a new run (trainer.resume=false)."""
    try:
        record = fetch_run(uri, earlier)
    except TrackingError:
        return (
            False,
            f"starting a new run; its earlier MLflow run {earlier} is not in {redact(uri)}",
        )
    status, logged = record.status, record.params
    changed = sorted(k for k, v in params.items() if k in logged and logged[k] != str(v))
    if resume and status != "FINISHED" and not changed:
        return True, f"MLflow run {earlier}, interrupted before its first checkpoint, starts again"
    if status == "RUNNING":  # its process was killed outright: close it, it will not go on
        status = "KILLED"
        end_run(uri, earlier, status, "superseded by a new run in the same folder")
    why = (
        "trainer.resume=false"
        if not resume
        else "it finished"
        if record.status == "FINISHED"
        else f"the settings changed ({', '.join(changed[:3])})"
    )
    return False, f"{why}: starting a new run; the earlier MLflow run {earlier} stays {status}"


def download_model(uri: str, run_id: str, dest: Path) -> Path:
    """Fetch a run's exported model (model/model.pt, config.json, vocab.json) into dest; return
    the path of model.pt."""
    from mlflow.artifacts import download_artifacts
    from mlflow.exceptions import MlflowException

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    client = _client(uri)
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


def start_parent_run(
    uri: str,
    experiment_name: str,
    run_name: str,
    tags: dict[str, str],
    swept: list[str],
    reopen: str | None = None,
) -> tuple[str, str]:
    """Open a sweep's parent run: `reopen` (an earlier parent of the same sweep folder), set
    RUNNING again, when it still exists in that experiment; else a new run, with a saved UI
    view of its children. Returns the run's and the experiment's ids."""
    from mlflow.exceptions import MlflowException

    experiment_id = prepare_experiment(uri, experiment_name)
    client = _client(uri)
    if reopen:
        try:
            run = client.get_run(reopen)
            if run.info.experiment_id == experiment_id and run.info.lifecycle_stage == "active":
                reopen_run(client, reopen)
                return reopen, experiment_id
        except MlflowException:
            pass  # deleted or from another store: start a new parent
    # Refused here, the sweep's jobs would be refused too: it stops before any.
    run_id = create_run(client, uri, experiment_name, experiment_id, run_name, tags)
    save_sweep_view(uri, experiment_id, run_id, swept)
    return run_id, experiment_id


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
    client = _client(uri)
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
    client = _client(uri)
    names = []
    for experiment in sorted(client.search_experiments(), key=lambda e: int(e.experiment_id)):
        if client.search_runs([experiment.experiment_id], "", max_results=1):
            names.append(experiment.name)
    return names


def experiment_name_of(uri: str, run_id: str) -> str:
    """The name of the experiment a run is in."""
    client = _client(uri)
    return client.get_experiment(fetch_run(uri, run_id).experiment_id).name


def fetch_run(uri: str, run_id: str, history_keys: tuple[str, ...] = ()) -> RunRecord:
    """One run by id, with the metric histories asked for."""
    from mlflow.exceptions import MlflowException

    client = _client(uri)
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


def end_run(uri: str, run_id: str, status: str, reason: str) -> None:
    """Terminate a run with `status`, recording why."""
    client = _client(uri)
    client.set_tag(run_id, FAILURE_TAG, reason)
    client.set_terminated(run_id, status)


def set_run_outcome(
    uri: str, run_id: str, tags: dict[str, Any], artifacts: list[Path], status: str = "FINISHED"
) -> None:
    """Record a run's summary as tags, attach artifacts, and terminate it (the sweep parent)."""
    from mlflow.entities import RunTag

    client = _client(uri)
    client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])
    for path in artifacts:
        client.log_artifact(run_id, str(path))
    client.set_terminated(run_id, status)


def reopen_run(client: Any, run_id: str) -> None:
    """Set a run RUNNING again, dropping the reason it was stopped last time."""
    if FAILURE_TAG in client.get_run(run_id).data.tags:
        client.delete_tag(run_id, FAILURE_TAG)
    client.update_run(run_id, status="RUNNING")
