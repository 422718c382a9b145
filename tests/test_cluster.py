"""lmexp at team scale on real components: sweeps on a real SLURM cluster (munge, slurmctld and
slurmd on this machine), tracked by a real `mlflow server` over a real PostgreSQL.

The test run starts and stops all of it itself (tests/services.py). Where the machine lacks the
programs (Debian's slurm-wlm, munge and postgresql, psycopg, root) these tests skip with the
reason, except when LMEXP_REQUIRE_CLUSTER=1 (CI sets it): there a skip is a failure.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import services
from conftest import REPO, TINY, expect_sweep_refused, run_module

from lmexp.tracking.base import EPOCH_METRICS, PARENT_TAG

pytestmark = pytest.mark.slow

# Jobs on the test cluster: the CPU preset, one CPU and 1 GB each (the node has two cores).
SLURM_CPU = [
    "hydra/launcher=slurm_cpu",
    "hydra.launcher.partition=cpu",
    "hydra.launcher.cpus_per_task=1",
    "hydra.launcher.mem_gb=1",
    "hydra.launcher.timeout_min=10",
]
TINY_SLURM = [o for o in TINY if o != "trainer.threads=1"]  # threads from SLURM_CPUS_PER_TASK


def _require_cluster() -> None:
    missing = services.missing_programs()
    if missing:
        reason = f"needs {', '.join(missing)}"
        if os.environ.get("LMEXP_REQUIRE_CLUSTER") == "1":
            pytest.fail(f"LMEXP_REQUIRE_CLUSTER=1 but the cluster tests {reason}")
        pytest.skip(reason)


@pytest.fixture(scope="module")
def team(tmp_path_factory):
    """A SLURM cluster, a PostgreSQL and an MLflow server on it, for this module's tests."""
    _require_cluster()
    root = tmp_path_factory.mktemp("team")
    # A SIGTERM to pytest (a CI timeout, say) unwinds like Ctrl-C, so the daemons below stop too.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    with (
        services.slurm_cluster(root / "slurm") as slurm,
        services.postgres() as pg,
        services.mlflow_server(pg.create_database("mlflow"), root / "server") as server,
    ):
        yield slurm, pg, server
    signal.signal(signal.SIGTERM, previous)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _experiment_runs(uri: str, name: str) -> list:
    client = _client(uri)
    exp = client.get_experiment_by_name(name)
    assert exp is not None, f"experiment {name} missing in {uri}"
    return client.search_runs([exp.experiment_id], "", max_results=1000)


def _steps(uri: str, run_id: str, key: str) -> list[int]:
    """The steps a metric was logged at, in logging order, duplicates kept."""
    return sorted(m.step for m in _client(uri).get_metric_history(run_id, key))


def _train(*args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 600):
    return run_module("lmexp.train", *args, cwd=cwd, env=env, timeout=timeout)


def _children(uri: str, experiment: str) -> tuple[object, list]:
    runs = _experiment_runs(uri, experiment)
    parents = [r for r in runs if r.data.tags.get("lmexp.kind") == "sweep"]
    assert len(parents) == 1, [r.info.run_name for r in runs]
    children = [r for r in runs if r.data.tags.get(PARENT_TAG) == parents[0].info.run_id]
    return parents[0], children


def test_slurm_sweep_logs_every_epoch_once_to_the_server(team, tmp_path):
    """The dp_keep_prob sweep on SLURM (CPU preset), tracked over HTTP by the team's server: three
    FINISHED children under one parent, each epoch's metrics once, the report on the parent and
    downloadable through the server; the console says each job's state, without sacct noise."""
    import psutil

    slurm, _, server = team
    experiment = f"slurm-{uuid.uuid4().hex[:6]}"
    # Unlike this machine's physical cores, so that a job's thread count shows where it came from
    cpus = 2 if psutil.cpu_count(logical=False) == 1 else 1
    proc = _train(
        "-m", *SLURM_CPU, f"hydra.launcher.cpus_per_task={cpus}", *TINY_SLURM, "trainer.max_epochs=2",
        f"logger.tracking_uri={server.url}", f"logger.experiment_name={experiment}",
        "dropout.dp_keep_prob=0.5,0.7,0.9", "hydra.sweep.dir=sweep",
        cwd=tmp_path, env=slurm.env,
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:] + slurm.log()
    parent, children = _children(server.url, experiment)
    assert parent.info.status == "FINISHED"
    assert sorted(c.data.params["dropout.dp_keep_prob"] for c in children) == ["0.5", "0.7", "0.9"]
    for child in children:
        assert child.info.status == "FINISHED", child.data.tags
        for key in EPOCH_METRICS:
            assert _steps(server.url, child.info.run_id, key) == [1, 2], key
        # Artifacts went through the server (jobs need no access to its artifact folder).
        assert child.info.artifact_uri.startswith("mlflow-artifacts:"), child.info.artifact_uri
    names = {a.path for a in _client(server.url).list_artifacts(parent.info.run_id)}
    assert {"runs.md", "runs.csv"} <= names, names
    from mlflow.artifacts import download_artifacts

    table = download_artifacts(
        run_id=parent.info.run_id, artifact_path="runs.md", dst_path=str(tmp_path / "dl"),
        tracking_uri=server.url,
    )  # fmt: skip
    assert all(c.info.run_id in Path(table).read_text() for c in children)
    # One line per job state change, and none of submitit's sacct warnings (no accounting here).
    assert "sacct" not in out and "accounting storage is disabled" not in out, out[-3000:]
    assert re.search(r"SLURM job \d+_\d: RUNNING", out), out[-3000:]
    # docs/cluster.md shows these lines: they have the shape lmexp prints them in. (Which states
    # a run prints varies: a job may start before a poll sees it PENDING, or leave squeue
    # before one sees it COMPLETED, which then prints GONE.)
    line = r"\[HYDRA\] SLURM job \d+_\d+: [A-Z_]+( on \S+| \(ended; squeue no longer lists it\))?"
    printed = [ln for ln in out.splitlines() if re.search(r"\[HYDRA\] SLURM job ", ln)]
    assert any(re.search(line + " on ", ln) for ln in printed), printed
    shown = re.search(r"```console\n(.*?)\n```", (REPO / "docs" / "cluster.md").read_text(), re.S)
    jobs = [ln for ln in shown[1].splitlines() if "SLURM job" in ln]
    assert jobs and all(re.search(line, ln) for ln in jobs), jobs
    assert f" {cpus} threads;" in "".join(
        p.read_text() for p in (tmp_path / "sweep").glob(".submitit/*/*_log.out")
    )  # trainer.threads=0 took SLURM_CPUS_PER_TASK


def test_a_job_squeue_no_longer_lists_counts_as_ended(team, tmp_path, monkeypatch):
    """With no accounting, squeue is the only source of job states and forgets a job MinJobAge
    after it ends: such a job must count as ended (GONE), or a sweep whose job left no result
    file (scancel, an exit before any result) waits for it forever. A live job keeps its state."""
    from submitit.slurm import slurm as submitit_slurm

    from lmexp.orchestration.slurm import squeue_watcher

    slurm, _, _ = team
    monkeypatch.setenv("SLURM_CONF", slurm.env["SLURM_CONF"])
    live = slurm.run("sbatch", "--parsable", "--partition=cpu", "--mem=100M",
                     f"--output={tmp_path}/%j.out", "--wrap=sleep 60").stdout.strip()  # fmt: skip
    try:
        watcher = squeue_watcher(submitit_slurm.SlurmInfoWatcher)(delay_s=60)
        watcher.register_job(live)
        watcher.register_job("424242")  # a job id the controller no longer knows
        watcher.update()
        assert watcher.get_state("424242", mode="cache") == "GONE"
        assert watcher.is_done("424242", mode="cache")
        assert watcher.get_state(live, mode="cache") in ("PENDING", "RUNNING")
        assert not watcher.is_done(live, mode="cache")
    finally:
        slurm.run("scancel", live)


def test_time_limit_requeues_the_job_which_resumes_into_the_same_run(team, tmp_path):
    """A job that reaches its SLURM time limit: SLURM's USR2 ahead of the limit → checkpoint →
    submitit requeues → the requeued job resumes into the same MLflow run; each epoch logged
    once; the final perplexities equal an uninterrupted run's with the same seed."""
    slurm, _, server = team
    experiment = f"timelimit-{uuid.uuid4().hex[:6]}"
    # About 80 s of training on a quiet core; SLURM signals 45 s before the 2-minute limit
    # (checked every 30 s, so 45-75 s in), which lands in epoch 3 or 4 of 4. On a busy machine
    # (CI runs another test file beside this one, and the reference run shares the cores) one
    # epoch can take longer than an allocation, so the job may need many requeues: allow them.
    job = [*TINY, "data.tiny_train_tokens=1500000", "trainer.max_epochs=4", "trainer.seed=7",
           "dropout.dp_keep_prob=0.9"]  # fmt: skip
    reference = subprocess.Popen(
        [sys.executable, "-m", "lmexp.train", *job, "logger.tracking_uri=sqlite:///ref.db",
         "hydra.run.dir=reference"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"},
    )  # fmt: skip
    proc = _train(
        "-m", *SLURM_CPU, "hydra.launcher.timeout_min=2", "hydra.launcher.signal_delay_s=45",
        "hydra.launcher.max_num_timeout=30", *job, f"logger.tracking_uri={server.url}", f"logger.experiment_name={experiment}",
        "hydra.sweep.dir=sweep",
        cwd=tmp_path, env=slurm.env, timeout=900,
    )  # fmt: skip
    ref_out, _ = reference.communicate(timeout=600)
    assert reference.returncode == 0, ref_out[-3000:]
    job_log = "".join(p.read_text() for p in (tmp_path / "sweep").glob(".submitit/*/*_log.out"))
    assert proc.returncode == 0, proc.stderr[-3000:] + job_log[-3000:] + slurm.log()
    assert "Requeued job" in job_log and "SIGUSR2 received: checkpoint saved" in job_log, job_log
    assert "Resumed from" in job_log, job_log
    _, children = _children(server.url, experiment)
    assert len(children) == 1  # the requeued job went on in the run it had
    run = children[0]
    assert run.info.status == "FINISHED"
    for key in EPOCH_METRICS:
        assert _steps(server.url, run.info.run_id, key) == [1, 2, 3, 4], key
    ref = _experiment_runs(f"sqlite:///{tmp_path / 'ref.db'}", "lmexp")[0]
    for key in ("test_ppl", "best_valid_ppl", "train_ppl"):
        assert run.data.metrics[key] == pytest.approx(ref.data.metrics[key], rel=1e-6), key


def test_scancel_kills_the_run_and_a_rerun_finishes_only_what_is_missing(team, tmp_path):
    """scancel of a running job: its run ends KILLED with a checkpoint, the parent is closed
    KILLED (not left RUNNING), and the same sweep again skips the finished job and resumes the
    cancelled one into its own run."""
    slurm, _, server = team
    experiment = f"scancel-{uuid.uuid4().hex[:6]}"
    args = [
        "-m", *SLURM_CPU, *TINY_SLURM, "data.tiny_train_tokens=600000", "trainer.max_epochs=3",
        f"logger.tracking_uri={server.url}", f"logger.experiment_name={experiment}",
        "dropout.dp_keep_prob=0.5,0.9", "hydra.sweep.dir=sweep",
    ]  # fmt: skip
    sweeper = subprocess.Popen(
        [sys.executable, "-m", "lmexp.train", *args],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, **slurm.env},
    )  # fmt: skip

    def second_job_trained_an_epoch() -> bool:
        exp = _client(server.url).get_experiment_by_name(experiment)
        if exp is None:
            return False
        runs = _client(server.url).search_runs(
            [exp.experiment_id], "params.`dropout.dp_keep_prob` = '0.9'"
        )
        return bool(runs) and "valid_ppl" in runs[0].data.metrics

    services.wait_for("job #1's first epoch", second_job_trained_an_epoch, 180)
    job = next(j for j, state in slurm.jobs().items() if j.endswith("_1") and state == "RUNNING")
    assert slurm.run("scancel", job).returncode == 0
    out, _ = sweeper.communicate(timeout=300)
    assert sweeper.returncode != 0, out[-3000:]  # the sweep did not finish
    assert f"To finish it, run the same command with hydra.sweep.dir={tmp_path / 'sweep'}" in out
    assert "GONE" in out or "CANCELLED" in out, out[-3000:]  # the console said what happened
    parent, children = _children(server.url, experiment)
    by_keep = {c.data.params["dropout.dp_keep_prob"]: c for c in children}
    assert by_keep["0.5"].info.status == "FINISHED"
    cancelled = by_keep["0.9"]
    assert cancelled.info.status == "KILLED", cancelled.data.tags
    assert "SIGTERM" in cancelled.data.tags["lmexp.failure_reason"]
    assert parent.info.status == "KILLED"
    done_epochs = _steps(server.url, cancelled.info.run_id, "valid_ppl")

    rerun_ms = time.time() * 1000
    again = _train(*args, cwd=tmp_path, env=slurm.env)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    parent_after, children_after = _children(server.url, experiment)
    assert parent_after.info.run_id == parent.info.run_id
    assert parent_after.info.status == "FINISHED"
    assert {c.info.run_id for c in children_after} == {c.info.run_id for c in children}
    for child in children_after:
        assert child.info.status == "FINISHED"
        for key in EPOCH_METRICS:
            assert _steps(server.url, child.info.run_id, key) == [1, 2, 3], key
    # The finished job was not trained again: its epochs keep their first timestamps.
    first = _client(server.url).get_metric_history(by_keep["0.5"].info.run_id, "valid_ppl")
    assert max(m.timestamp for m in first) < rerun_ms
    assert "already finished all 3 epochs" in "".join(
        p.read_text() for p in (tmp_path / "sweep").glob(".submitit/*/*_log.out")
    )
    assert done_epochs, "the cancelled job had logged an epoch before scancel"


def test_tracking_server_restarted_mid_run_loses_no_metric(team, tmp_path):
    """The server goes down for a while during a run and comes back on the same address:
    MLflow's client retries, the run goes on and every epoch is logged once."""
    _, pg, _ = team
    with services.mlflow_server(pg.create_database("restart"), tmp_path / "server") as server:
        run = subprocess.Popen(
            [sys.executable, "-m", "lmexp.train", *TINY, "data.tiny_train_tokens=300000",
             "trainer.max_epochs=5", f"logger.tracking_uri={server.url}", "hydra.run.dir=run"],
            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        services.wait_for(
            "epoch 1 on the server", lambda: _logged(server.url, "valid_ppl") >= 1, 120
        )
        server.stop()
        time.sleep(8)  # epochs end while it is down: their logging waits and retries
        server.start()
        out, _ = run.communicate(timeout=300)
        assert run.returncode == 0, out[-3000:]
        (only,) = _experiment_runs(server.url, "lmexp")
        assert only.info.status == "FINISHED"
        for key in EPOCH_METRICS:
            assert _steps(server.url, only.info.run_id, key) == [1, 2, 3, 4, 5], key


def _logged(uri: str, key: str) -> int:
    client = _client(uri)
    exp = client.get_experiment_by_name("lmexp")
    runs = client.search_runs([exp.experiment_id], "") if exp else []
    return len(client.get_metric_history(runs[0].info.run_id, key)) if runs else 0


def test_tracking_server_gone_past_the_retries_stops_with_a_resumable_checkpoint(team, tmp_path):
    """Past MLflow's retries (shortened here) the run stops in one sentence that says how to
    resume; the rerun continues the same MLflow run and backfills the epoch it could not log."""
    _, pg, _ = team
    short_retries = {
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    }
    with services.mlflow_server(pg.create_database("gone"), tmp_path / "server") as server:
        args = [*TINY, "data.tiny_train_tokens=300000", "trainer.max_epochs=3",
                f"logger.tracking_uri={server.url}", "hydra.run.dir=run"]  # fmt: skip
        run = subprocess.Popen(
            [sys.executable, "-m", "lmexp.train", *args],
            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, **short_retries},
        )  # fmt: skip
        services.wait_for(
            "epoch 1 on the server", lambda: _logged(server.url, "valid_ppl") >= 1, 120
        )
        server.stop()
        out, _ = run.communicate(timeout=300)
        assert run.returncode == 2, out[-3000:]
        errors = [line for line in out.splitlines() if "[ERROR]" in line]
        assert len(errors) == 1, out[-3000:]
        assert f"Tracking store {server.url} stopped answering" in errors[0]
        advice = f"once it answers again, run python -m lmexp.train {' '.join(args[:-1])} "
        assert f"{advice}hydra.run.dir={tmp_path / 'run'} to continue MLflow run" in errors[0]
        assert "Traceback" not in out
        server.start()
        again = _train(*args, cwd=tmp_path)
        assert again.returncode == 0, again.stderr[-3000:]
        (only,) = _experiment_runs(server.url, "lmexp")
        assert only.info.status == "FINISHED"
        for key in EPOCH_METRICS:
            assert _steps(server.url, only.info.run_id, key) == [1, 2, 3], key


def _start_together(commands: list[list[str]], cwd: Path, env: dict[str, str] | None = None):
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "lmexp.train", *cmd],
            cwd=cwd,
            env={**os.environ, **(env or {})},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for cmd in commands
    ]
    return [(p.wait(timeout=300), p.stdout.read()) for p in procs]


def test_runs_starting_together_on_a_fresh_postgres_store_make_one_experiment(team, tmp_path):
    """Two runs starting at the same moment, straight on a new PostgreSQL database (each would
    create MLflow's tables) and on the server with a new experiment name: no error, one
    experiment holding both runs."""
    _, pg, server = team
    fresh_db = pg.create_database("fresh_direct")
    experiment = f"together-{uuid.uuid4().hex[:6]}"
    for uri, name in ((fresh_db, "lmexp"), (server.url, experiment)):
        results = _start_together(
            [[*TINY, "trainer.max_epochs=1", f"logger.tracking_uri={uri}",
              f"logger.experiment_name={name}", f"hydra.run.dir=run_{name}_{i}"]
             for i in range(2)],
            tmp_path,
        )  # fmt: skip
        for rc, out in results:
            assert rc == 0, out[-3000:]
        experiments = [e.name for e in _client(uri).search_experiments()]
        assert experiments.count(name) == 1, experiments
        assert len(_experiment_runs(uri, name)) == 2


def test_many_jobs_creating_one_experiment_on_the_server_at_once_share_it(team):
    """Sixteen clients that find an experiment missing and create it at the same moment (the
    window two job processes rarely hit): one experiment, and every client gets its id."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from lmexp.tracking.runs import prepare_experiment

    _, _, server = team
    names = [f"race-{uuid.uuid4().hex[:6]}" for _ in range(3)]
    start = threading.Barrier(16, timeout=60)  # a client that failed breaks it for all

    def create(_: int) -> list[str]:
        _client(server.url).search_experiments(max_results=1)  # warm: the race is in the next
        ids = []
        for name in names:
            start.wait()
            ids.append(prepare_experiment(server.url, name))
        return ids

    with ThreadPoolExecutor(16) as pool:
        ids = list(pool.map(create, range(16)))
    assert all(each == ids[0] for each in ids)
    experiments = [e.name for e in _client(server.url).search_experiments()]
    assert all(experiments.count(name) == 1 for name in names)


def test_store_creation_waits_for_the_postgres_store_lock(team):
    """While another process holds lmexp's advisory lock on a fresh database (it is creating
    MLflow's tables), a run waits for it instead of creating them at the same time."""
    import threading

    from sqlalchemy import create_engine, text

    from lmexp.tracking.runs import prepare_experiment
    from lmexp.tracking.stores import STORE_LOCK_KEY

    _, pg, _ = team
    uri = pg.create_database("locked")
    engine = create_engine(uri, isolation_level="AUTOCOMMIT")
    done = threading.Event()
    with engine.connect() as holder:
        holder.execute(text("SELECT pg_advisory_lock(:k)"), {"k": STORE_LOCK_KEY})
        worker = threading.Thread(target=lambda: (prepare_experiment(uri, "lmexp"), done.set()))
        worker.start()
        assert not done.wait(5), "the store was opened while another process held the lock"
        holder.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": STORE_LOCK_KEY})
        assert done.wait(60), "the run did not go on once the lock was released"
    worker.join()
    engine.dispose()
    assert [e.name for e in _client(uri).search_experiments()].count("lmexp") == 1


@pytest.mark.parametrize("launcher", ["joblib", "slurm"])
def test_parallel_sweep_jobs_on_a_fresh_postgres_store(team, tmp_path, launcher):
    """A sweep's parallel jobs (joblib's two workers, or SLURM) on a new PostgreSQL database
    they reach directly: no error, one experiment, all children FINISHED under the parent."""
    slurm, pg, _ = team
    uri = pg.create_database(f"sweep_{launcher}")
    launch = (
        ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"] if launcher == "joblib" else SLURM_CPU
    )
    proc = _train(
        "-m", *launch, *TINY_SLURM, "trainer.max_epochs=1", f"logger.tracking_uri={uri}",
        "dropout.dp_keep_prob=0.5,0.9", "hydra.sweep.dir=sweep",
        cwd=tmp_path, env=slurm.env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert [e.name for e in _client(uri).search_experiments()].count("lmexp") == 1
    parent, children = _children(uri, "lmexp")
    assert parent.info.status == "FINISHED" and len(children) == 2
    assert all(c.info.status == "FINISHED" for c in children)
    assert pg.password not in proc.stdout + proc.stderr  # Hydra's job lines are redacted too
    # The jobs read the store's URI from the sweep folder: a file for this user only.
    assert (tmp_path / "sweep" / "mlflow_sweep.json").stat().st_mode & 0o777 == 0o600


def test_search_on_slurm_shares_a_postgres_study_between_workers(team, tmp_path):
    """The team's Optuna search: two SLURM worker jobs share one study on the team's PostgreSQL
    (a database of its own beside MLflow's; the password from $PGPASSWORD, never in a URI), each
    trial a child run on the tracking server, the median pruner on. The study and MLflow agree
    on every trial's outcome, and both workers ran trials."""
    import optuna

    slurm, pg, server = team
    storage = pg.uri("optuna").replace(f":{pg.password}@", "@")
    pg.create_database("optuna")
    experiment = f"search-{uuid.uuid4().hex[:6]}"
    slower = ["model.hidden_size=64", "data.tiny_train_tokens=40000", "trainer.max_epochs=3"]
    proc = _train(
        "hparams_search=ptb_optuna", *SLURM_CPU, *TINY_SLURM, *slower, "hydra.sweeper.n_trials=6",
        "hydra.sweeper.n_jobs=2", "hydra.sweeper.sampler.n_startup_trials=2",
        "hydra.sweeper.pruner.n_startup_trials=2", f"hydra.sweeper.storage={storage}",
        # lr up to 2: higher ones can diverge on the tiny corpus (such a trial is a FAIL)
        "lr_policy.lr=tag(log, interval(0.25, 2.0))",
        f"logger.tracking_uri={server.url}", f"logger.experiment_name={experiment}",
        "hydra.sweep.dir=sweep", cwd=tmp_path, env={**slurm.env, "PGPASSWORD": pg.password},
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:] + slurm.log()
    os.environ["PGPASSWORD"] = pg.password
    try:
        trials = optuna.load_study(study_name="lmexp_tiny", storage=storage).trials
    finally:
        del os.environ["PGPASSWORD"]
    assert sorted(t.number for t in trials) == list(range(6))
    assert {t.state.name for t in trials} <= {"COMPLETE", "PRUNED", "FAIL"}, trials
    assert any(t.state.name == "COMPLETE" for t in trials), [t.state for t in trials]
    assert {t.user_attrs["lmexp.worker"] for t in trials} == {0, 1}
    parent, children = _children(server.url, experiment)
    assert parent.info.status == "FINISHED" and len(children) == 6
    runs = {int(c.data.tags["job_num"]): c for c in children}
    for trial in trials:
        run = runs[trial.number]
        if trial.state.name == "PRUNED":
            assert run.info.status == "KILLED" and "lmexp.pruned_after_epoch" in run.data.tags
        elif trial.state.name == "FAIL":  # only a diverged trial fails here
            assert run.info.status == "FAILED"
            assert "diverged" in run.data.tags["lmexp.failure_reason"]
        else:
            assert run.info.status == "FINISHED"
            assert trial.value == pytest.approx(run.data.metrics["best_valid_ppl"])
    pruned = sum(t.state.name == "PRUNED" for t in trials)
    assert parent.data.tags.get("n_pruned", "0") == str(pruned)
    logs = "".join(p.read_text() for p in (tmp_path / "sweep").glob(".submitit/*/*_log.*"))
    assert logs.count("Trial ") >= 6 and pg.password not in out + logs


# --- bad input: one sentence before any job ---------------------------------------------------


def test_unknown_partition_stops_the_sweep_before_any_job(team, tmp_path):
    slurm, _, _ = team
    before = slurm.submitted()
    proc = _train(
        "-m", *SLURM_CPU, "hydra.launcher.partition=gpu-a100", *TINY_SLURM,
        f"logger.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        "dropout.dp_keep_prob=0.5,0.9", "hydra.sweep.dir=sweep", cwd=tmp_path, env=slurm.env,
    )  # fmt: skip
    expect_sweep_refused(
        proc,
        "hydra.launcher.partition=gpu-a100 is not a partition of this SLURM cluster (it has "
        "debug, cpu); set hydra.launcher.partition to one of them.",
        tmp_path,
    )
    assert slurm.submitted() == before  # no job was submitted


def test_unreachable_controller_stops_the_sweep_before_any_job(team, tmp_path):
    slurm, _, _ = team
    conf = Path(slurm.env["SLURM_CONF"]).read_text()
    port = re.search(r"SlurmctldPort=(\d+)", conf).group(1)
    dead = tmp_path / "slurm.conf"
    dead.write_text(conf.replace(f"SlurmctldPort={port}", f"SlurmctldPort={services.free_port()}"))
    proc = _train(
        "-m", *SLURM_CPU, *TINY_SLURM, "dropout.dp_keep_prob=0.5,0.9", "hydra.sweep.dir=sweep",
        cwd=tmp_path, env={"SLURM_CONF": str(dead)}, timeout=120,
    )  # fmt: skip
    expect_sweep_refused(proc, "SLURM's controller does not answer (sinfo: ", tmp_path)


def test_wrong_postgres_password_is_one_sentence_without_the_password(team, tmp_path):
    _, pg, _ = team
    wrong = pg.uri("mlflow", password="not-the-pw-123")
    proc = _train(*TINY, f"logger.tracking_uri={wrong}", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    errors = [line for line in out.splitlines() if "[ERROR]" in line]
    assert len(errors) == 1, out[-3000:]
    assert 'password authentication failed for user "lmexp"' in errors[0]
    assert "check the user and password" in errors[0]
    assert "not-the-pw-123" not in proc.stdout + proc.stderr
    assert f"postgresql://lmexp:***@127.0.0.1:{pg.port}/mlflow" in errors[0]
    assert not (tmp_path / "outputs").exists() or not list((tmp_path / "outputs").rglob("*.pt"))


def test_run_on_postgres_never_records_the_password(team, tmp_path):
    """A password in logger.tracking_uri reaches neither the console, nor MLflow's params and
    tags, nor the exported config.json."""
    _, pg, _ = team
    uri = pg.create_database("secret_check")
    proc = _train(
        *TINY,
        "trainer.max_epochs=1",
        f"logger.tracking_uri={uri}",
        "hydra.run.dir=run",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert pg.password not in proc.stdout + proc.stderr
    (run,) = _experiment_runs(uri, "lmexp")
    recorded = str(run.data.params) + str(run.data.tags)
    assert pg.password not in recorded and "lmexp:***@" in run.data.params["logger.tracking_uri"]
    assert pg.password not in (tmp_path / "run" / "model" / "config.json").read_text()


def test_the_team_server_with_logins_on_postgres_takes_a_writers_slurm_sweep_not_a_readers(
    team, tmp_path
):
    """The README's team recipe whole: the basic-auth server keeps its runs and its users in two
    PostgreSQL databases. A reader's SLURM sweep is refused before any job is submitted; a
    writer's logs every job, its jobs logging in with the login they inherit from the submitting
    shell, and the password is in no file of the sweep's folder."""
    from unittest import mock

    slurm, pg, _ = team
    admin, writer, reader = (
        ("admin", "admin-Pw-5120"),
        ("alice", "alice-Pw-8841"),
        ("bob", "bob-Pw-30417"),
    )
    runs_db, users_db = pg.create_database("team_runs"), pg.create_database("team_users")
    with services.auth_mlflow_server(runs_db, users_db, tmp_path / "server", admin) as server:
        services.add_team(server.url, admin, "team", dict([writer]), dict([reader]))

        def sweep(user: tuple[str, str], folder: str) -> subprocess.CompletedProcess:
            login = {"MLFLOW_TRACKING_USERNAME": user[0], "MLFLOW_TRACKING_PASSWORD": user[1]}
            return _train(
                "-m", *SLURM_CPU, *TINY_SLURM, "trainer.max_epochs=1",
                f"logger.tracking_uri={server.url}", "logger.experiment_name=team",
                "dropout.dp_keep_prob=0.5,0.9", f"hydra.sweep.dir={folder}",
                cwd=tmp_path, env={**slurm.env, **login},
            )  # fmt: skip

        refused = sweep(reader, "by_reader")
        out = refused.stdout + refused.stderr
        assert refused.returncode != 0, out[-3000:]
        assert "does not let user 'bob' create runs in experiment 'team' (HTTP 403" in out, out
        assert not (tmp_path / "by_reader" / ".submitit").exists()  # no job was submitted
        proc = sweep(writer, "by_writer")
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, out[-4000:] + slurm.log()
        with mock.patch.dict(os.environ, {"MLFLOW_TRACKING_USERNAME": admin[0],
                                          "MLFLOW_TRACKING_PASSWORD": admin[1]}):  # fmt: skip
            parent, children = _children(server.url, "team")
        # The server takes runs only from a login with EDIT here: the jobs, on SLURM, had alice's.
        assert parent.info.status == "FINISHED"
        assert sorted(c.info.status for c in children) == ["FINISHED", "FINISHED"]
    for path in (tmp_path / "by_writer").rglob("*"):
        if path.is_file():
            assert writer[1].encode() not in path.read_bytes(), path
