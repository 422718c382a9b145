"""tracking.py's pure parts; the stores themselves are exercised end to end elsewhere."""

from __future__ import annotations

import pytest

from lmexp.tracking import redact

# Fast, in-process tests of the library: the unit lane (pytest -m unit).
pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("postgresql://team:pw@db:5432/mlflow", "postgresql://team:***@db:5432/mlflow"),
        ("postgresql+psycopg://u:p%40ss@h/db", "postgresql+psycopg://u:***@h/db"),
        # Hydra's overrides as it logs them, with ':' escaped
        (
            "logger.tracking_uri=postgresql\\://u\\:pw@h\\:5432/db x=1",
            "logger.tracking_uri=postgresql\\://u\\:***@h\\:5432/db x=1",
        ),
        ("http://mlflow:5000", "http://mlflow:5000"),
        ("postgresql://team@db/mlflow", "postgresql://team@db/mlflow"),
        ("sqlite:////tmp/mlflow.db", "sqlite:////tmp/mlflow.db"),
    ],
)
def test_redact_hides_every_uri_password_and_nothing_else(text, shown):
    assert redact(text) == shown
