"""What the MLflow UI shows first, and where its pages are: the experiment's saved view of
perplexities, a sweep's view of its children, and the links lmexp prints. No MLflow import.
"""

from __future__ import annotations

import json
import time
import urllib.parse

from lmexp.tracking.stores import redact

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
    training = "workflowType=machine_learning"  # a run's page too, else the GenAI sidebar
    if run_id:
        return f"{base}/runs/{run_id}?{training}"
    query = f"{training}&compareRunsMode=CHART"
    return f"{base}/runs?{query}" + (f"&viewStateShareKey={view}" if view else "")
