"""A team's tracking server with authentication, on the real thing: `mlflow server --app-name
basic-auth` on a loopback port (its users in a sqlite store of their own, default permission
READ, --allowed-hosts set), an admin, a writer granted EDIT on the team's experiment and a
reader who has only the default. What an outsider, a reader and a writer can each do, and
lmexp's one-sentence refusals, before any run is created and without echoing a password.
"""

from __future__ import annotations

import http.server
import json
import os
import threading
import urllib.error
import urllib.request
from unittest import mock

import pytest
import services
from conftest import TINY, run_module

pytestmark = pytest.mark.slow

EXPERIMENT = "team"
ADMIN = ("admin", "admin-Pw-0451")
WRITER = ("writer", "writer-Pw-7713")
READER = ("reader", "reader-Pw-2290")
WRONG = "not-the-Pw-9931"


def _as(user: tuple[str, str]) -> dict[str, str]:
    return {"MLFLOW_TRACKING_USERNAME": user[0], "MLFLOW_TRACKING_PASSWORD": user[1]}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The server, its users and the team's experiment; stopped by PID, also when a test fails."""
    root = tmp_path_factory.mktemp("auth-server")
    with services.auth_mlflow_server(
        f"sqlite:///{root / 'mlflow.db'}", f"sqlite:///{root / 'users.db'}", root, ADMIN
    ) as srv:
        services.add_team(srv.url, ADMIN, EXPERIMENT, dict([WRITER]), dict([READER]))
        yield srv


def _env(values: dict[str, str]):
    """MLflow's client reads the login from os.environ: set it for a block, then restore."""
    return mock.patch.dict(os.environ, values)


def _runs(url: str, user: tuple[str, str] = ADMIN) -> list:
    from mlflow.tracking import MlflowClient

    with _env(_as(user)):
        client = MlflowClient(url)
        exp = client.get_experiment_by_name(EXPERIMENT)
        return client.search_runs([exp.experiment_id], "", max_results=100)


def _status(url: str, host: str | None = None, user: tuple[str, str] | None = None) -> int:
    import base64

    request = urllib.request.Request(f"{url}/api/2.0/mlflow/experiments/search?max_results=5")
    if host:
        request.add_header("Host", host)
    if user:
        login = base64.b64encode(f"{user[0]}:{user[1]}".encode()).decode()
        request.add_header("Authorization", f"Basic {login}")
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as err:
        return err.code


def _train(server, tmp_path, env: dict[str, str], *more: str, sweep: bool = False):
    args = [*TINY, "trainer.max_epochs=1", f"logger.tracking_uri={server.url}"]
    args += [f"logger.experiment_name={EXPERIMENT}", *more]
    env = {"MLFLOW_TRACKING_USERNAME": "", "MLFLOW_TRACKING_PASSWORD": "", **env}
    return run_module("lmexp.train", *(["-m"] if sweep else []), *args, cwd=tmp_path, env=env)


def test_an_outsider_is_refused_by_the_rest_api_and_a_foreign_host_header_by_the_server(server):
    assert _status(server.url) == 401
    assert _status(server.url, user=(READER[0], WRONG)) == 401
    assert _status(server.url, user=READER) == 200
    # DNS rebinding: a page on another name that resolves here must not reach the API.
    assert _status(server.url, host="evil.example", user=ADMIN) == 403


def test_training_without_a_login_names_the_two_variables_and_creates_no_run(server, tmp_path):
    before = len(_runs(server.url))
    proc = _train(server, tmp_path, {})
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-2000:]
    assert "asks for a login (HTTP 401): set MLFLOW_TRACKING_USERNAME and " in out, out[-2000:]
    assert "MLFLOW_TRACKING_PASSWORD" in out and "Traceback" not in out
    assert len(_runs(server.url)) == before


def test_a_refused_login_costs_no_work_not_even_the_corpus_download(server, tmp_path):
    """PTB not yet cached: the run would download it first. The server's refusal comes before:
    the archive's server (here a local one that counts requests) is never asked."""
    asked = []

    class Archive(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the name http.server calls
            asked.append(self.path)
            self.send_error(404)

        def log_message(self, *args):
            pass

    archive = http.server.HTTPServer(("127.0.0.1", 0), Archive)
    threading.Thread(target=archive.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{archive.server_port}/simple-examples.tgz"
        proc = _train(
            server, tmp_path, {}, "data=ptb", "data.root=null", f"data.cache_dir={tmp_path}",
            f"data.url={url}",
        )  # fmt: skip
    finally:
        archive.shutdown()
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-2000:]
    assert "asks for a login (HTTP 401)" in out, out[-2000:]
    assert asked == [] and not (tmp_path / "ptb").exists()


def test_a_wrong_password_is_refused_without_being_echoed(server, tmp_path):
    before = len(_runs(server.url))
    proc = _train(server, tmp_path, _as((WRITER[0], WRONG)))
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-2000:]
    assert "refused the login of user 'writer' (HTTP 401)" in out, out[-2000:]
    assert WRONG not in out and "Traceback" not in out
    assert len(_runs(server.url)) == before
    for path in tmp_path.rglob("*"):
        if path.is_file() and path.suffix in (".json", ".yaml", ".log"):
            assert WRONG not in path.read_text(errors="replace"), path


@pytest.mark.parametrize("how", ["login-in-the-uri", "wrong-password"])
def test_a_login_problem_is_one_sentence_and_never_falls_back_to_another_store(
    server, tmp_path, how
):
    """With logger.fallback_uri set (for a server that is down), a login problem still stops
    the run: a login written into the URI (which the health check once read as a host name)
    or a refused one. No run in either store, and the password echoed nowhere."""
    host = server.url.split("://", 1)[1]
    uri = f"http://{WRITER[0]}:{WRONG}@{host}" if how == "login-in-the-uri" else server.url
    env = {"MLFLOW_TRACKING_USERNAME": WRITER[0] if how == "wrong-password" else ""}
    env["MLFLOW_TRACKING_PASSWORD"] = WRONG if how == "wrong-password" else ""
    before = len(_runs(server.url))
    proc = run_module(
        "lmexp.train", *TINY, "trainer.max_epochs=1", f"logger.tracking_uri={uri}",
        f"logger.experiment_name={EXPERIMENT}", "logger.fallback_uri=sqlite:///fallback.db",
        cwd=tmp_path, env=env,
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-2000:]
    errors = [line for line in out.splitlines() if "[ERROR]" in line]
    if how == "login-in-the-uri":
        assert errors[0].endswith(
            f"Tracking URI http://{WRITER[0]}:***@{host} holds a login; give the server's address "
            "alone and the login in the environment (MLFLOW_TRACKING_USERNAME and "
            "MLFLOW_TRACKING_PASSWORD), where it stays out of the run's params, logs and shell "
            "history."
        )
    else:
        assert "refused the login of user 'writer' (HTTP 401)" in errors[0]
    assert len(errors) == 1 and WRONG not in out and "fallback" not in errors[0]
    assert not (tmp_path / "fallback.db").exists() and len(_runs(server.url)) == before


def test_a_reader_can_search_the_runs_but_not_train_into_them(server, tmp_path):
    before = len(_runs(server.url, READER))  # searching is what READ allows
    proc = _train(server, tmp_path, _as(READER))
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-2000:]
    assert (
        "does not let user 'reader' create runs in experiment 'team' (HTTP 403, it needs EDIT "
        "permission there)"
    ) in out, out[-2000:]
    assert "Traceback" not in out
    assert len(_runs(server.url)) == before


def test_a_readers_sweep_stops_before_its_parent_run(server, tmp_path):
    before = len(_runs(server.url))
    proc = _train(server, tmp_path, _as(READER), "dropout.dp_keep_prob=0.5,0.9", sweep=True)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-2000:]
    assert "does not let user 'reader' create runs in experiment 'team'" in out, out[-2000:]
    assert "Traceback" not in out and "#0 :" not in out  # no job launched
    assert len(_runs(server.url)) == before


def test_a_writers_sweep_runs_end_to_end_and_records_no_password(server, tmp_path):
    proc = _train(server, tmp_path, _as(WRITER), "dropout.dp_keep_prob=0.5,0.9", sweep=True)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    runs = _runs(server.url, WRITER)
    (parent,) = [r for r in runs if r.data.tags.get("lmexp.kind") == "sweep"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.info.status for r in children) == ["FINISHED", "FINISHED"]
    assert parent.info.status == "FINISHED"
    with _env(_as(WRITER)):
        from mlflow.tracking import MlflowClient

        artifacts = [a.path for a in MlflowClient(server.url).list_artifacts(parent.info.run_id)]
    assert artifacts, "the sweep's report is not on its parent run"
    for run in [parent, *children]:
        recorded = json.dumps([run.data.params, run.data.tags])
        assert WRITER[1] not in recorded
    for path in tmp_path.rglob("*"):
        if path.is_file() and path.suffix in (".json", ".yaml", ".log"):
            assert WRITER[1] not in path.read_text(errors="replace"), path


def test_the_ui_behind_the_login_shows_the_sweep_to_a_member_and_nothing_to_an_outsider(server):
    """After the writer's sweep above: a reader logged in sees its parent run in the UI, in a real
    browser; a browser without a login gets the 401 page, and no run."""
    from test_ui import BROWSER_ARGS, CHROMIUM, _require_browser

    _require_browser()
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import sync_playwright

    (parent,) = [r for r in _runs(server.url) if r.data.tags.get("lmexp.kind") == "sweep"]
    page_url = f"{server.url}/#/experiments/{parent.info.experiment_id}/runs"
    page_url += "?workflowType=machine_learning"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
        try:
            outsider = browser.new_context().new_page()
            # The server asks for a login; a browser with none shows no page at all.
            with pytest.raises(PlaywrightError, match="ERR_INVALID_AUTH_CREDENTIALS"):
                outsider.goto(page_url)
            for path in ("/", "/ajax-api/2.0/mlflow/runs/search"):
                answer = outsider.request.get(server.url + path)
                assert answer.status == 401, (path, answer.status)
                assert parent.info.run_name not in answer.text()
            login = {"username": READER[0], "password": READER[1]}
            member = browser.new_context(
                viewport={"width": 1400, "height": 900}, http_credentials=login
            ).new_page()
            member.set_default_timeout(60_000)  # the UI's first load compiles a large bundle
            member.goto(page_url)
            member.get_by_text(parent.info.run_name, exact=True).first.wait_for()
        finally:
            browser.close()
