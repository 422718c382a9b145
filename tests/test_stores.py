"""stores.py in-process: which store a run logs to, its password hidden, and the one-sentence
refusals of a store that cannot be used, on real sqlite files and a real closed port."""

from __future__ import annotations

import socket

import pytest

from lmexp.tracking.stores import (
    TrackingError,
    check_store,
    redact,
    resolve_tracking_uri,
    usable_store,
)

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


def test_the_store_is_the_setting_else_the_environment_else_mlflow_db_in_the_launch_folder(
    tmp_path, monkeypatch
):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(None, tmp_path) == f"sqlite:///{tmp_path}/mlflow.db"
    # A relative sqlite path is the launch folder's, so every job of a sweep shares one store.
    assert (
        resolve_tracking_uri("sqlite:///runs/m.db", tmp_path) == f"sqlite:///{tmp_path}/runs/m.db"
    )
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    assert resolve_tracking_uri(None, tmp_path) == "http://mlflow:5000"
    assert resolve_tracking_uri("sqlite:////abs/m.db", tmp_path) == "sqlite:////abs/m.db"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once closed


@pytest.mark.parametrize(
    ("store", "sentence"),
    [
        ("sqlite:///{tmp}/no_folder/m.db", "folder {tmp}/no_folder does not exist; create it"),
        ("sqlite:///{tmp}/notes.txt", "{tmp}/notes.txt is not an SQLite database; move it away"),
        ("file://{tmp}/mlruns", "is a file store, which MLflow 3 no longer supports"),
        ("http://127.0.0.1:{port}", "Tracking server http://127.0.0.1:{port} cannot be reached"),
        ("postgresql://u:secret@127.0.0.1:{port}/m", "Tracking store postgresql://u:***@127.0.0.1"),
    ],
)
def test_a_store_that_cannot_be_used_is_one_sentence_naming_it(tmp_path, store, sentence):
    (tmp_path / "notes.txt").write_text("not a database, and not to be touched\n" * 200)
    port = _closed_port()
    store, sentence = (x.format(tmp=tmp_path, port=port) for x in (store, sentence))
    with pytest.raises(TrackingError) as err:
        check_store(store, timeout=2)
    assert sentence in str(err.value) and "secret" not in str(err.value), err.value
    assert (tmp_path / "notes.txt").read_text().startswith("not a database")  # left as it was


def test_a_stopped_server_tells_a_report_where_to_point_not_how_to_train(tmp_path):
    """lmexp.report, lmexp.evaluate and lmexp.generate read (--tracking-uri) and never train."""
    port = _closed_port()
    with pytest.raises(TrackingError) as err:
        check_store(f"http://127.0.0.1:{port}", timeout=2, read_only=True)
    assert str(err.value).endswith(
        "start it, or pass --tracking-uri (or set MLFLOW_TRACKING_URI) to the store the runs were "
        "logged to."
    )


def test_a_report_reads_only_a_store_that_exists_and_creates_none(tmp_path):
    with pytest.raises(TrackingError, match="does not exist, so there are no runs to read"):
        check_store(f"sqlite:///{tmp_path}/mlflow.db", read_only=True)
    assert list(tmp_path.iterdir()) == []


def test_the_fallback_store_is_used_with_a_note_saying_why(tmp_path):
    port = _closed_port()
    fallback = f"sqlite:///{tmp_path}/fallback.db"
    uri, note = usable_store(f"http://127.0.0.1:{port}", 2, fallback)
    assert uri == fallback
    assert note.startswith(f"Tracking server http://127.0.0.1:{port} cannot be reached")
    assert note.endswith(f"Logging to the fallback {fallback} instead.")
    with pytest.raises(TrackingError, match="cannot be reached"):
        usable_store(f"http://127.0.0.1:{port}", 2)  # no fallback: the run does not start
