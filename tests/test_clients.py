"""lmexp's outputs read by two real third-party clients over HTTP on loopback ports:
optuna-dashboard on a search's study (its optuna.db), and `mlflow models serve` on the pyfunc
model a training run logged. Each server is started here, in a process group of its own, and
stopped by its id when its tests end, also when one fails; then nothing may listen on its port.

What each server answers is compared with what optuna and MLflow themselves read from the same
files (optuna.load_study, mlflow.pyfunc.load_model), never with numbers written down here.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from conftest import REPO, TINY, metric_history, mlflow_runs, run_module, split_runs
from services import free_port

pytestmark = pytest.mark.slow

# The servers' programs: the console scripts beside this Python (the venv's bin), also when the
# venv is not activated; on PATH for them too, as `mlflow models serve` runs `uvicorn` by name.
BIN = Path(sys.executable).parent
SERVER_ENV = {"PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}

STUDY = "lmexp_tiny"
# test_search's pruning search, cut to its three enqueued trials of two epochs: the third (lr 2,
# keeping 30% of units) trails the first two after epoch 1, so the median pruner (after two
# finished trials) prunes it there; the first two finish.
ENQUEUED = [
    {"dropout.dp_keep_prob": keep, "lr_policy.lr": lr}
    for keep, lr in ((0.9, 1.0), (0.9, 0.5), (0.3, 2.0))
]
EPOCHS = 2
SEARCH = [
    "hparams_search=ptb_optuna", *TINY, f"trainer.max_epochs={EPOCHS}", "hydra.sweeper.n_trials=3",
    "hydra.sweeper.sampler.n_startup_trials=2", "hydra.sweeper.pruner.n_startup_trials=2",
    "lr_policy.lr=tag(log, interval(0.25, 2.0))", "hydra.sweep.dir=search",
]  # fmt: skip

# Rows for the served model: in the tiny corpus's vocabulary (w1...), out of it (zebra, quux),
# several lines in one row, and one without a line break.
ROWS = ["w1 w2 w3 zebra\n", "w4 w5 quux w6\nw7 w8 w9\n", "w10 w11 w12 w13 w14"]
PROMPT = "w1 w2"
GENERATE = {"mode": "generate", "words": 10, "seed": 1}


# --- a server in a process group of its own --------------------------------------------------


def _get(url: str, timeout: float = 10) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status, r.read()


def _post(url: str, body: dict, timeout: float = 60) -> dict:
    request = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as err:  # the server's own account of what it refused
        pytest.fail(f"POST {url} {json.dumps(body)}: {err.code} {err.read().decode()[-3000:]}")


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _alive_in_group(pgid: int) -> list[int]:
    """The processes of group pgid that still run (zombies, left to whoever reaps them, not)."""
    alive = []
    for p in psutil.process_iter(["status"]):
        with contextlib.suppress(ProcessLookupError, psutil.Error):
            if os.getpgid(p.pid) == pgid and p.info["status"] != psutil.STATUS_ZOMBIE:
                alive.append(p.pid)
    return alive


def _stop_group(proc: subprocess.Popen, grace: float = 5) -> None:
    """SIGTERM to the server's process group, SIGKILL to what is left after `grace` seconds."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if proc.poll() is not None and not _alive_in_group(proc.pid):
                return
            time.sleep(0.1)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)


@contextlib.contextmanager
def server(
    name: str, cmd: list[str], ready: str, cwd: Path, env: dict[str, str], timeout: float = 120
) -> Iterator[str]:
    """Run cmd (its "{port}" a free loopback port) until ready (a path) answers 200; yields the
    base URL. Stopped on exit, its whole process group; then its port must be closed."""
    port = free_port()
    log_path = cwd / f"{name}.log"
    log = open(log_path, "w")  # noqa: SIM115 - the server's whole life
    proc = subprocess.Popen(
        [arg.replace("{port}", str(port)) for arg in cmd],
        cwd=cwd,
        env={**os.environ, **SERVER_ENV, **env},
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"

    def output() -> str:
        return log_path.read_text(errors="replace")[-4000:]

    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                pytest.fail(f"{name} exited with {proc.returncode} before answering:\n{output()}")
            with contextlib.suppress(OSError):
                if _get(url + ready, timeout=2)[0] == 200:
                    break
            if time.monotonic() > deadline:
                pytest.fail(
                    f"{name} did not answer {url}{ready} within {timeout:.0f} s:\n{output()}"
                )
            time.sleep(0.2)
        yield url
    finally:
        _stop_group(proc)
        log.close()
        left = _alive_in_group(proc.pid)
        assert not left, f"{name}: processes {left} of its group outlived SIGKILL"
        assert not _listening(port), f"{name}: something still listens on port {port}"


# --- optuna-dashboard on a search's study ------------------------------------------------------


@pytest.fixture(scope="module")
def search(tmp_path_factory) -> Path:
    """A real lmexp search with pruning (trial 2 PRUNED, trials 0 and 1 COMPLETE): its optuna.db."""
    import optuna

    cwd = tmp_path_factory.mktemp("search")
    db = cwd / "search" / "optuna.db"
    db.parent.mkdir()
    study = optuna.create_study(study_name=STUDY, storage=f"sqlite:///{db}")
    for params in ENQUEUED:
        study.enqueue_trial(params)
    proc = run_module("lmexp.train", *SEARCH, cwd=cwd)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return db


@pytest.fixture(scope="module")
def study(search):
    """The study as optuna itself reads it from the storage the dashboard serves."""
    import optuna

    return optuna.load_study(study_name=STUDY, storage=f"sqlite:///{search}")


@pytest.fixture(scope="module")
def dashboard(search) -> Iterator[str]:
    cmd = ["optuna-dashboard", f"sqlite:///{search}", "--host", "127.0.0.1", "--port", "{port}"]
    cwd = search.parent.parent
    # It serves with gunicorn, whose control socket is $XDG_RUNTIME_DIR/gunicorn.ctl, else
    # ~/.gunicorn/gunicorn.ctl: here, in the test's folder.
    with server("optuna-dashboard", cmd, "/api/studies", cwd, {"XDG_RUNTIME_DIR": str(cwd)}) as url:
        yield url


def _study_id(dashboard: str) -> int:
    _, body = _get(f"{dashboard}/api/studies")
    ids = {s["study_name"]: s["study_id"] for s in json.loads(body)["study_summaries"]}
    assert STUDY in ids, ids
    return ids[STUDY]


def test_optuna_dashboard_lists_the_search_study_by_name(dashboard, study):
    """/api/studies: the search's one study, by the name, direction and sweep folder optuna reads."""
    _, body = _get(f"{dashboard}/api/studies")
    listing = json.loads(body)["study_summaries"]
    assert [s["study_name"] for s in listing] == [study.study_name] == [STUDY]
    (listed,) = listing
    assert listed["directions"] == [d.name.lower() for d in study.directions] == ["minimize"]
    # lmexp's study attributes, such as the folder the search ran in
    attrs = {a["key"]: a["value"] for a in listed["user_attrs"]}
    assert attrs["lmexp.sweep_dir"] == study.user_attrs["lmexp.sweep_dir"]


def test_optuna_dashboard_shows_each_trial_as_optuna_reads_the_study(dashboard, study, search):
    """Trials, states (PRUNED among them), params with their distributions, per-epoch validation
    perplexities (step = epoch), values and the best trial: as optuna.load_study reads them; and
    each curve is the valid_ppl its trial's MLflow run logged epoch by epoch."""
    trials = study.trials
    mlflow_db = search.parent.parent / "mlflow.db"
    _, children = split_runs(mlflow_db)
    runs = {int(r.data.tags["job_num"]): r.info.run_id for r in children}
    states = [t.state.name for t in trials]
    assert "PRUNED" in states and "COMPLETE" in states, states  # the search pruned, and finished
    _, body = _get(f"{dashboard}/api/studies/{_study_id(dashboard)}?after=0")
    detail = json.loads(body)
    assert detail["name"] == STUDY
    shown = detail["trials"]
    assert [t["number"] for t in shown] == [t.number for t in trials]
    assert [t["state"].upper() for t in shown] == states
    for got, trial in zip(shown, trials, strict=True):
        params = {p["name"]: p for p in got["params"]}
        assert {k: p["param_external_value"] for k, p in params.items()} == {
            k: str(v) for k, v in trial.params.items()
        }
        for key, dist in trial.distributions.items():
            assert params[key]["param_internal_value"] == dist.to_internal_repr(trial.params[key])
            assert params[key]["distribution"] == {
                "type": type(dist).__name__, "low": dist.low, "high": dist.high,
                "step": dist.step, "log": dist.log,
            }  # fmt: skip
        curve = {v["step"]: v["value"] for v in got["intermediate_values"]}
        assert curve == trial.intermediate_values
        # lmexp reports each epoch's validation perplexity at step = epoch, from 1
        epochs = EPOCHS if trial.state.name == "COMPLETE" else len(curve)
        assert list(curve) == list(range(1, epochs + 1)) and 1 <= epochs <= EPOCHS
        logged = metric_history(mlflow_db, runs[trial.number], "valid_ppl")
        assert curve == pytest.approx(dict(logged)) and len(logged) == len(curve)
        assert got.get("values") == trial.values
        attrs = {a["key"]: a["value"] for a in got["user_attrs"]}
        assert attrs["lmexp.folder"] == trial.user_attrs["lmexp.folder"]
    assert [t["number"] for t in detail["best_trials"]] == [study.best_trial.number]


# --- mlflow models serve on a run's logged model ------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, str]:
    """A real training run on the tiny corpus, its store sqlite:///<cwd>/mlflow.db: (cwd, run id)."""
    cwd = tmp_path_factory.mktemp("trained")
    proc = run_module("lmexp.train", *TINY, "trainer.max_epochs=1", "hydra.run.dir=run", cwd=cwd)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    (run,) = mlflow_runs(cwd / "mlflow.db")
    return cwd, run.info.run_id


@pytest.fixture(scope="module")
def local_model(trained):
    """The model runs:/<run id>/model names, loaded in this process by mlflow.pyfunc: the logged
    model whose source is the run, from its artifact location (so no global tracking URI)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    cwd, run_id = trained
    client = MlflowClient(tracking_uri=f"sqlite:///{cwd / 'mlflow.db'}")
    (output,) = client.get_run(run_id).outputs.model_outputs
    logged = client.get_logged_model(output.model_id)
    assert (logged.name, logged.source_run_id) == ("model", run_id)
    return mlflow.pyfunc.load_model(logged.artifact_location)


@pytest.fixture(scope="module")
def served(trained) -> Iterator[str]:
    cwd, run_id = trained
    cmd = ["mlflow", "models", "serve", "-m", f"runs:/{run_id}/model", "--env-manager", "local"]
    cmd += ["--host", "127.0.0.1", "-p", "{port}"]
    env = {
        "MLFLOW_TRACKING_URI": f"sqlite:///{cwd / 'mlflow.db'}",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    }
    with server("mlflow-models-serve", cmd, "/ping", cwd, env) as url:
        yield url


@pytest.mark.parametrize(
    "request_body",
    [
        pytest.param({"inputs": ROWS}, id="inputs"),
        pytest.param(
            {"dataframe_split": {"columns": ["text"], "data": [[row] for row in ROWS]}},
            id="dataframe_split",
        ),
    ],
)
def test_mlflow_models_serve_scores_rows_as_the_logged_model_does_in_process(
    served, local_model, request_body
):
    """POST /invocations with rows of text: one prediction per row, its perplexity, tokens and
    unknown words those mlflow.pyfunc.load_model(...).predict gives for the same rows."""
    predictions = _post(f"{served}/invocations", request_body)["predictions"]
    expected = local_model.predict(ROWS).to_dict(orient="records")
    assert len(predictions) == len(expected) == len(ROWS)
    for got, want in zip(predictions, expected, strict=True):
        assert set(got) == {"perplexity", "tokens", "unknown"}
        assert (got["tokens"], got["unknown"]) == (want["tokens"], want["unknown"])
        assert got["perplexity"] == pytest.approx(want["perplexity"], rel=1e-5)
    assert all(p["unknown"] >= 1 for p in predictions[:2])  # zebra, quux: read as <unk>


def test_mlflow_models_serve_generates_as_the_logged_model_does_in_process(served, local_model):
    """params mode=generate: the prompt and `words` sampled words, the text predict gives for the
    same prompt and seed in this process."""
    body = {"inputs": [PROMPT], "params": GENERATE}
    (got,) = _post(f"{served}/invocations", body)["predictions"]
    assert list(got) == ["text"], got  # generated, not scored: the params reached predict
    (want,) = local_model.predict([PROMPT], params=GENERATE)["text"]
    assert got["text"] == want
    # Words as the model reads them: a generated <eos> is a line break in the text.
    words = got["text"].replace("\n", " <eos> ").split()
    assert words[:2] == PROMPT.split() and len(words) == 2 + GENERATE["words"]


def _docs_blocks(fence: str) -> list[str]:
    page = (REPO / "docs" / "using-a-model.md").read_text()
    return [block.split("\n```", 1)[0] for block in page.split(f"```{fence}\n")[1:]]


def test_the_docs_show_what_this_run_s_model_answers(trained, served, local_model):
    """docs/using-a-model.md's outputs are this module's model's (the command its text names):
    the pyfunc table, the served scores and the generated text, so a reader who runs that command
    and those requests gets them (the last digits of a perplexity vary with the CPU)."""
    import ast
    import re

    page = (REPO / "docs" / "using-a-model.md").read_text()
    assert (
        "`python -m lmexp.train data=tiny model=tiny trainer.max_epochs=1 trainer.threads=1`"
        in page
    )
    (python,) = [b for b in _docs_blocks("python") if "mlflow.pyfunc.load_model" in b]
    rows = ast.literal_eval(re.search(r"model\.predict\((\[.*?\])\)", python).group(1))
    table = next(b for b in _docs_blocks("") if b.lstrip().startswith("perplexity"))
    shown = [line.split()[1:] for line in table.splitlines()[1 : 1 + len(rows)]]
    scored = local_model.predict(rows).to_dict(orient="records")
    for (ppl, tokens, unknown), want in zip(shown, scored, strict=True):
        assert (int(tokens), int(unknown)) == (want["tokens"], want["unknown"]), table
        assert float(ppl) == pytest.approx(want["perplexity"], rel=1e-3), (table, scored)
    replies = [json.loads(b) for b in _docs_blocks("json")]
    served_scores = _post(f"{served}/invocations", {"inputs": ROWS})["predictions"]
    assert len(replies[0]["predictions"]) == len(served_scores)
    for doc, got in zip(replies[0]["predictions"], served_scores, strict=True):
        assert (doc["tokens"], doc["unknown"]) == (got["tokens"], got["unknown"])
        assert doc["perplexity"] == pytest.approx(got["perplexity"], rel=1e-3), served_scores
    (generated,) = _post(f"{served}/invocations", {"inputs": [PROMPT], "params": GENERATE})[
        "predictions"
    ]
    assert replies[1] == {"predictions": [generated]}, generated
    (prompt,) = ast.literal_eval(re.search(r"model\.predict\((\[[^]]*\]), params", python).group(1))
    pyfunc_generated = local_model.predict([prompt], params=GENERATE)["text"][0]
    last = table.rstrip().splitlines()[-1].split(None, 1)[1]  # pandas shows a line break as \\n
    assert last.strip() == pyfunc_generated.replace("\n", "\\n").strip(), pyfunc_generated
