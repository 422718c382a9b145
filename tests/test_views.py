"""tracking.views: the links lmexp prints to the MLflow UI; runs are exercised end to end elsewhere."""

from __future__ import annotations

import pytest

# Fast, in-process tests of the library: the unit lane (pytest -m unit).
pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("uri", "ui", "page", "start"),
    [  # a database store: `mlflow ui` on its default port, and how to start it
        ("sqlite:////tmp/m.db", None, "http://127.0.0.1:5000", "mlflow ui --backend-store-uri sqlite:////tmp/m.db"),
        ("postgresql://u:pw@db/m", None, "http://127.0.0.1:5000", "--backend-store-uri postgresql://u:***@db/m"),
        # a server is its own UI; a login in its URI is not a browser's
        ("https://u:pw@mlflow.lab:8443/", None, "https://mlflow.lab:8443", None),
        # logger.ui_url: where the user runs the UI
        ("sqlite:////tmp/m.db", "http://gpu-7:8080/", "http://gpu-7:8080", None),
    ],
)  # fmt: skip
def test_printed_ui_links_follow_the_ui_address(uri, ui, page, start):
    from lmexp.tracking.views import ui_start, ui_url

    assert (
        ui_url(uri, "3", run_id="abc", ui=ui)
        == f"{page}/#/experiments/3/runs/abc?workflowType=machine_learning"
    )
    assert (start in ui_start(uri, ui)) if start else ui_start(uri, ui) == ""
