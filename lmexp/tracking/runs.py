"""Writing runs to MLflow (the only package that imports mlflow, lazily: importing it costs
seconds). `MlflowTracker` is the engine's write-only Tracker for one MLflow run, new or reopened
by id, written through `MlflowClient` (no global "active run"), so a resumed job reopens its run
and a sweep parents its jobs' runs. Also here: the experiment and a sweep's parent run, and the
runs a rerun or a sweep closes.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

from lmexp.config import first_line
from lmexp.tracking.base import FAILURE_TAG, MODEL_FILES, MODEL_NAME, PARENT_TAG, Tracker
from lmexp.tracking.queries import fetch_run, full_run_id, lost_store
from lmexp.tracking.queries import mlflow_client as _client
from lmexp.tracking.stores import TrackingError, permission_refused, redact, sqlite_path, store_lock
from lmexp.tracking.views import VIEW_TAG_PREFIX, _view_tag, experiment_view_tags, ui_url


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


def save_sweep_view(uri: str, experiment_id: str, parent_run_id: str, swept: list[str]) -> None:
    """A view of one sweep's children, its swept params and key metrics as columns."""
    search = f"tags.`{PARENT_TAG}` = '{parent_run_id}'"
    tag = _view_tag(f"sweep {parent_run_id[:8]}", search, swept)
    _client(uri).set_experiment_tag(experiment_id, VIEW_TAG_PREFIX + parent_run_id, tag)


def model_code(into: Path) -> Path:
    """lmexp's model code as a package for a logged model to carry (MLflow's code_paths): the
    package's __init__.py, config.py (the schema) and models/ (every architecture), which import
    nothing but torch and each other, so the served model builds the network lmexp trained."""
    import lmexp

    source, package = Path(lmexp.__file__).parent, into / "lmexp"
    (package / "models").mkdir(parents=True)
    for name in ("__init__.py", "config.py"):
        shutil.copy2(source / name, package / name)
    for file in (source / "models").glob("*.py"):
        shutil.copy2(file, package / "models" / file.name)
    return package


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
        ("models from code": lmexp/tracking/pyfunc_model.py, nothing pickled, with lmexp's
        model code, model_code) linked to this run."""
        import mlflow
        import pandas
        import torch
        from mlflow.entities import LoggedModelOutput

        from lmexp.tracking import pyfunc_model

        for name in MODEL_FILES:
            self.log_artifact(folder / name, MODEL_NAME)
        # pyfunc.log_model links a model to the fluent API's active run only, which it would
        # end on exit; creating the model here links it to this run and leaves the run open.
        model = self.client.create_logged_model(
            self.experiment_id, name=MODEL_NAME, source_run_id=self.run_id
        )
        mlflow.set_tracking_uri(self.uri)  # log_model writes to the global tracking URI
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        with warnings.catch_warnings(), tempfile.TemporaryDirectory() as tmp:
            # It advises an input example, which it would validate by running the model; the
            # signature already says what predict takes.
            warnings.filterwarnings("ignore", ".*An input example was not provided")
            mlflow.pyfunc.log_model(
                name=MODEL_NAME,
                python_model=pyfunc_model.__file__,
                code_paths=[str(model_code(Path(tmp)))],
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


def log_adapted_score(
    uri: str, run_id: str, metric: str, value: float, settings: dict[str, Any]
) -> str:
    """An adapted score (test_ppl_cache, ...) added to a trained run, finished or not, without
    reopening it; its settings as the tag `lmexp.<metric>`, so that the UI shows which gave it.
    Returns the run's full id."""
    run_id = full_run_id(uri, run_id)
    client = _client(uri)
    client.log_metric(run_id, metric, value)
    client.set_tag(run_id, f"lmexp.{metric}", " ".join(f"{k}={v}" for k, v in settings.items()))
    return run_id
