"""Sweeps through real Hydra multirun launches into real MLflow sqlite stores."""

from __future__ import annotations

import csv
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import (
    TINY,
    expect_sweep_refused,
    metric_history,
    mlflow_runs,
    run_module,
    split_runs,
)

pytestmark = pytest.mark.slow
SWEEP = [*TINY, "trainer.max_epochs=2"]


def sweep_dir(cwd: Path) -> Path:
    (folder,) = [p.parent for p in (cwd / "multirun").glob("*/*/mlflow_sweep.json")]
    return folder


def assert_store_intact(db: Path) -> None:
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_dp_keep_prob_sweep_children_parent_and_ordered_report(tmp_path):
    proc = run_module(
        "lmexp.train", "-m", *SWEEP, "dropout.dp_keep_prob=0.35,0.5,0.65", cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the folder --sweep-dir and hydra.sweep.dir= take, said at the start and at the end
    folder = [
        ln.split("Sweep folder: ", 1)[1]
        for ln in (proc.stdout + proc.stderr).splitlines()
        if "Sweep folder: " in ln
    ]
    assert folder == [str(sweep_dir(tmp_path)), f"{sweep_dir(tmp_path)} (its report in report/)"]
    db = tmp_path / "mlflow.db"
    parent, children = split_runs(db)
    assert len(children) == 3 and all(r.info.status == "FINISHED" for r in children)
    assert sorted(r.data.params["dropout.dp_keep_prob"] for r in children) == [
        "0.35",
        "0.5",
        "0.65",
    ]
    for run in children:
        for key in ("train_ppl", "valid_ppl", "lr", "train_wps", "epoch_time_s"):
            assert [s for s, _ in metric_history(db, run.info.run_id, key)] == [1, 2]
    # Each child named by its value (not MLflow's random names), the parent by what it sweeps.
    assert sorted(r.info.run_name for r in children) == [
        "dp_keep_prob=0.35",
        "dp_keep_prob=0.5",
        "dp_keep_prob=0.65",
    ]
    assert parent.info.run_name.startswith("sweep dp_keep_prob (")
    note = parent.data.tags["mlflow.note.content"]  # the description on its Overview page
    assert f"Best: **{best_name(children)}**" in note
    assert all(f"/runs/{r.info.run_id})" in note for r in children)
    # The experiment opens as a model-training one, with a saved view of this sweep's runs.
    from mlflow.tracking import MlflowClient

    experiment = MlflowClient(f"sqlite:///{db}").get_experiment(parent.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    view = json.loads(experiment.tags[f"mlflow.sharedViewState.{parent.info.run_id}"])
    state = json.loads(view["state"])
    assert state["searchFilter"] == f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    assert "params.`dropout.dp_keep_prob`" in state["selectedColumns"]
    assert "metrics.`valid_ppl`" in state["selectedColumns"]
    url = f"#/experiments/{parent.info.experiment_id}/runs?workflowType=machine_learning"
    assert f"{url}&compareRunsMode=CHART&viewStateShareKey={parent.info.run_id}" in (
        proc.stdout + proc.stderr
    )
    # Jobs ran in multirun/<date>/<time>/<n>/.
    folder = sweep_dir(tmp_path)
    assert sorted(p.name for p in folder.iterdir() if p.name.isdigit()) == ["0", "1", "2"]
    # The parent knows the best child and carries the report.
    best = min(children, key=lambda r: r.data.metrics["best_valid_ppl"])
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["best_run_id"] == best.info.run_id
    assert float(parent.data.tags["best_valid_ppl"]) == best.data.metrics["best_valid_ppl"]
    assert parent.data.metrics == {}  # summaries are tags: no single-point charts, nothing twice
    assert parent.data.tags["swept_params"] == "dropout.dp_keep_prob"
    artifacts = Path(parent.info.artifact_uri.removeprefix("file://"))
    assert {"runs.csv", "runs.md", "final_ppl.png", "learning_curves.png"} <= {
        p.name for p in artifacts.iterdir()
    }
    # The report CLI: ordered by validation perplexity.
    report = run_module("lmexp.report", "--sweep-dir", str(folder), "--out", "rep", cwd=tmp_path)
    assert report.returncode == 0, report.stderr
    rows = list(csv.DictReader((tmp_path / "rep" / "runs.csv").read_text().splitlines()))
    assert [float(r["valid_ppl"]) for r in rows] == sorted(float(r["valid_ppl"]) for r in rows)
    assert [r["dropout.dp_keep_prob"] for r in rows][0] == best.data.params["dropout.dp_keep_prob"]
    assert "dropout.dp_keep_prob" in report.stdout.splitlines()[0]
    assert_pngs_have_content(tmp_path / "rep")


def best_name(children: list) -> str:
    return min(children, key=lambda r: r.data.metrics["best_valid_ppl"]).info.run_name


def assert_pngs_have_content(folder: Path) -> None:
    import matplotlib.image as mpimg
    import numpy as np

    for name in ("final_ppl.png", "learning_curves.png"):
        raw = (folder / name).read_bytes()
        assert raw.startswith(b"\x89PNG\r\n\x1a\n")
        pixels = mpimg.imread(folder / name)
        assert pixels.shape[0] > 200 and pixels.shape[1] > 300
        colours = np.unique(pixels.reshape(-1, pixels.shape[-1]).round(2), axis=0)
        assert len(colours) > 20 and pixels.std() > 0.05  # lines, text and axes, not blank


def test_joblib_two_workers_four_jobs_into_fresh_store(tmp_path):
    """Two joblib workers, trainer.threads unset: they share the cores instead of each taking
    all of them (on 2 cores that made each of two jobs 2.4x slower), and the sweep says so."""
    import psutil

    proc = run_module(
        "lmexp.train", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", *SWEEP,
        "trainer.threads=0", "dropout.dp_keep_prob=0.35,0.5,0.65,0.8", cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    cores = psutil.cpu_count(logical=False)
    each = max(1, cores // 2)
    assert (
        f"2 jobs train at once on this machine's {cores} physical cores: each uses {each} "
        "thread(s) (trainer.threads=N to choose)." in proc.stdout + proc.stderr
    )
    logs = list(sweep_dir(tmp_path).glob("*/train.log"))
    assert len(logs) == 4 and all(f"device cpu, {each} threads" in p.read_text() for p in logs)
    db = tmp_path / "mlflow.db"
    _, children = split_runs(db)
    assert len(children) == 4 and all(r.info.status == "FINISHED" for r in children)
    assert_store_intact(db)


def test_parallel_independent_runs_on_a_fresh_store_do_not_corrupt_it(tmp_path):
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "lmexp.train",
                *TINY,
                "trainer.max_epochs=1",
                f"hydra.run.dir=r{i}",
            ],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for i in range(4)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, outputs
    db = tmp_path / "mlflow.db"
    runs = mlflow_runs(db)
    assert len(runs) == 4 and all(r.info.status == "FINISHED" for r in runs)
    assert_store_intact(db)


def test_submitit_local_launcher_runs_jobs_through_submitit(tmp_path):
    proc = run_module(
        "lmexp.train",
        "-m",
        "hydra/launcher=submitit_local",
        *SWEEP,
        "dropout.dp_keep_prob=0.5,0.8",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    folder = sweep_dir(tmp_path)
    assert list((folder / ".submitit").glob("*/*_result.pkl"))  # submitit ran and stored results
    _, children = split_runs(tmp_path / "mlflow.db")
    assert len(children) == 2 and all(r.info.status == "FINISHED" for r in children)


def test_optuna_search_trials_are_child_runs_and_best_is_recorded(tmp_path):
    proc = run_module(
        "lmexp.train", "hparams_search=ptb_optuna", "hydra.sweeper.n_trials=3",
        "hydra.sweeper.sampler.n_startup_trials=2", *SWEEP, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    parent, children = split_runs(tmp_path / "mlflow.db")
    assert len(children) == 3
    results = yaml.safe_load((sweep_dir(tmp_path) / "optimization_results.yaml").read_text())
    finished = [r for r in children if r.info.status == "FINISHED"]  # a diverged one FAILED
    best_child = min(finished, key=lambda r: r.data.metrics["best_valid_ppl"])
    assert results["best_value"] == pytest.approx(best_child.data.metrics["best_valid_ppl"])
    assert float(parent.data.tags["best_valid_ppl"]) == pytest.approx(results["best_value"])
    assert parent.data.tags["best_run_id"] == best_child.info.run_id
    assert set(json.loads((sweep_dir(tmp_path) / "mlflow_sweep.json").read_text())["swept_params"]) == {
        "dropout.dp_keep_prob", "lr_policy.lr",
    }  # fmt: skip


def test_a_diverging_job_fails_alone(tmp_path):
    proc = run_module(
        "lmexp.train", "-m", *SWEEP, "trainer.max_grad_norm=1e30", "trainer.log_every_n_batches=1",
        "lr_policy.lr=0.5,1e9,1.0", cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    parent, children = split_runs(tmp_path / "mlflow.db")
    status = {r.data.params["lr_policy.lr"]: r for r in children}
    assert status["1000000000.0"].info.status == "FAILED"
    assert "diverged" in status["1000000000.0"].data.tags["lmexp.failure_reason"]
    assert status["0.5"].info.status == status["1.0"].info.status == "FINISHED"
    assert parent.data.tags["n_finished"] == "2"


def test_a_bad_value_in_a_later_job_stops_the_sweep_before_any_job_runs(tmp_path):
    proc = run_module("lmexp.train", "-m", *SWEEP, "dropout.dp_keep_prob=0.5,2.0", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    output = proc.stdout + proc.stderr
    (line,) = [ln for ln in output.splitlines() if "Invalid config" in ln]
    assert "dropout.dp_keep_prob=2.0 must be in (0, 1]" in line and "Sweep not started" in line
    assert "Traceback" not in output
    assert not (tmp_path / "mlflow.db").exists()  # nothing ran, nothing was logged
    assert not list(tmp_path.glob("multirun/*/*/0"))


def test_an_optuna_interval_end_out_of_range_is_refused_up_front(tmp_path):
    proc = run_module(
        "lmexp.train", "hparams_search=ptb_optuna", "lr_policy.lr=interval(0,1)", *SWEEP,
        cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "lr_policy.lr=0.0 must be a positive number" in proc.stdout + proc.stderr
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (  # glob() over a config group needs Hydra's config loader to expand
            ["-m", "experiment=glob(*_tied)", "dropout.dp_keep_prob=2.0"],
            "dropout.dp_keep_prob=2.0 must be in (0, 1]",
        ),
        (
            ["hparams_search=ptb_optuna", "dropout.keep=interval(0.1,0.9)"],
            "Unknown config key 'dropout.keep'; did you mean dropout.kind or dropout.dp_keep_prob?",
        ),
        (
            ["-m", "logger.tracking_uri=http://127.0.0.1:9", "dropout.dp_keep_prob=0.5,0.6"],
            "Tracking server http://127.0.0.1:9 cannot be reached",
        ),
    ],
)
def test_a_sweep_that_cannot_run_is_one_sentence_before_any_job(tmp_path, overrides, fragment):
    started = time.monotonic()
    proc = run_module("lmexp.train", *overrides, *SWEEP, cwd=tmp_path, timeout=120)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output[-3000:]
    assert fragment in output and "Traceback" not in output and "Launching" not in output
    assert time.monotonic() - started < 60
    assert not list(tmp_path.glob("multirun/*/*/0"))


def test_sweep_crashing_in_a_later_job_closes_the_parent_as_failed_with_the_report(tmp_path):
    proc = run_module(
        "lmexp.train", "-m", *SWEEP, "data=tiny,ptb", f"data.root={tmp_path / 'missing'}",
        cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert (
        "missing" in proc.stdout + proc.stderr
    )  # the job's own one-sentence error names the folder
    parent, children = split_runs(tmp_path / "mlflow.db")
    (finished,) = children  # the ptb job failed before opening a run
    assert finished.info.status == "FINISHED"
    assert parent.info.status == "FAILED"  # not left RUNNING
    assert parent.data.tags["n_finished"] == "1"
    assert parent.data.tags["best_run_id"] == finished.info.run_id
    assert (sweep_dir(tmp_path) / "report" / "runs.csv").is_file()


def test_sweep_stopped_by_sigterm_closes_its_parent_and_resumes_in_the_same_folder(tmp_path):
    slow = ["model.hidden_size=128", "data.tiny_train_tokens=60000", "trainer.max_epochs=3"]
    args = [
        sys.executable, "-m", "lmexp.train", "-m", *TINY, *slow, "dropout.dp_keep_prob=0.5,0.7,0.9",
    ]  # fmt: skip
    proc = subprocess.Popen(
        args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"},
    )  # fmt: skip
    deadline = time.monotonic() + 240
    while not any("Epoch 1:" in p.read_text() for p in tmp_path.glob("multirun/*/*/1/train.log")):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()[-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # during the second job (the basic launcher runs it here)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]
    db = tmp_path / "mlflow.db"
    parent, children = split_runs(db)
    by_keep = {r.data.params["dropout.dp_keep_prob"]: r for r in children}
    assert {k: r.info.status for k, r in by_keep.items()} == {"0.5": "FINISHED", "0.7": "KILLED"}
    assert parent.info.status == "KILLED" and parent.data.tags["n_finished"] == "1"
    folder = sweep_dir(tmp_path)
    assert (folder / "report" / "runs.csv").is_file()

    # The same command into the same sweep folder finishes the sweep under the same parent.
    resumed = run_module(*args[2:], f"hydra.sweep.dir={folder}", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    text = resumed.stdout + resumed.stderr
    assert "Continuing the sweep" in text and "already finished all 3 epochs" in text
    again, children = split_runs(db)
    assert again.info.run_id == parent.info.run_id and again.info.status == "FINISHED"
    assert len(children) == 3 and all(r.info.status == "FINISHED" for r in children)
    for keep in ("0.5", "0.7"):  # the same runs as before, each epoch logged once
        (run,) = [r for r in children if r.data.params["dropout.dp_keep_prob"] == keep]
        assert run.info.run_id == by_keep[keep].info.run_id
        assert [s for s, _ in metric_history(db, run.info.run_id, "valid_ppl")] == [1, 2, 3]
    assert again.data.tags["n_finished"] == "3" and again.data.metrics == {}
    assert "lmexp.failure_reason" not in again.data.tags  # the KILLED reason went with the rerun


@pytest.mark.unit
def test_an_option_a_config_group_lacks_is_named_with_the_options_it_has():
    from hydra import compose, initialize_config_dir

    from lmexp.config import conf_dir
    from lmexp.orchestration.launch import register_configs
    from lmexp.orchestration.sweep import missing_option

    register_configs()
    with (
        initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"),
        pytest.raises(Exception) as err,
    ):
        compose("train", ["dropout=foo"])
    assert missing_option(err.value) == (
        "dropout=foo is not an option of the config group dropout (it has none, standard, "
        "variational, weight_drop)."
    )
    assert missing_option(ValueError("another error")) is None


def test_slurm_launcher_preset_composes_with_cluster_settings():
    from hydra import compose, initialize_config_dir

    from lmexp.config import conf_dir
    from lmexp.orchestration.launch import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose(
            "train",
            ["hydra/launcher=slurm", "hydra.launcher.partition=a100"],
            return_hydra_config=True,
        )
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (launcher.partition, launcher.gpus_per_node, launcher.array_parallelism) == (
        "a100",
        1,
        8,
    )
    assert launcher.signal_delay_s > 0 and launcher.max_num_timeout > 0 and launcher.mem_gb > 0


def _sweep_proc(cwd: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "lmexp.train", "-m", *args], cwd=cwd,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"},
    )  # fmt: skip


def test_two_sweeps_launched_together_keep_their_folders_and_jobs_apart(tmp_path):
    """Started in the same second from one folder into a fresh store: each sweep gets its own
    multirun folder, its parent has exactly its own children, and its report only those."""
    procs = {
        name: _sweep_proc(tmp_path, *SWEEP, f"trainer.seed={seed}", "dropout.dp_keep_prob=0.5,0.9")
        for name, seed in (("a", 1), ("b", 2))
    }
    outs = {name: p.communicate(timeout=400)[0] for name, p in procs.items()}
    assert all(p.returncode == 0 for p in procs.values()), outs
    runs = mlflow_runs(tmp_path / "mlflow.db")
    parents = [r for r in runs if r.data.tags.get("lmexp.kind") == "sweep"]
    assert len(parents) == 2 and len({p.data.tags["sweep_dir"] for p in parents}) == 2
    for parent in parents:
        children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        assert len(children) == 2 and all(c.info.status == "FINISHED" for c in children)
        seed = {c.data.params["trainer.seed"] for c in children}
        assert len(seed) == 1  # one sweep's jobs, not a mix
        folder = Path(parent.data.tags["sweep_dir"])
        assert {Path(c.data.tags["output_dir"]).parent for c in children} == {folder}
        rows = list(csv.DictReader((folder / "report" / "runs.csv").read_text().splitlines()))
        assert sorted(r["run_id"] for r in rows) == sorted(c.info.run_id for c in children)
    assert_store_intact(tmp_path / "mlflow.db")


def test_a_sweep_folder_held_by_a_live_sweep_is_refused(tmp_path):
    slow = ["model.hidden_size=128", "data.tiny_train_tokens=150000", "trainer.max_epochs=3"]
    first = _sweep_proc(
        tmp_path, *TINY, *slow, "dropout.dp_keep_prob=0.5,0.9", "hydra.sweep.dir=sw"
    )
    deadline = time.monotonic() + 120
    while not (tmp_path / "sw" / "mlflow_sweep.json").is_file():
        assert first.poll() is None and time.monotonic() < deadline, first.stdout.read()
        time.sleep(0.05)
    record = (tmp_path / "sw" / "mlflow_sweep.json").read_text()
    second = run_module(
        "lmexp.train", "-m", *SWEEP, "dropout.dp_keep_prob=0.3", "hydra.sweep.dir=sw", cwd=tmp_path
    )
    assert second.returncode == 2
    text = second.stdout + second.stderr
    assert f"Folder {tmp_path / 'sw'} is in use by another live lmexp sweep" in text, text[-3000:]
    assert "Traceback" not in text and "Launching" not in text
    assert (tmp_path / "sw" / "mlflow_sweep.json").read_text() == record
    first.send_signal(signal.SIGTERM)
    first.communicate(timeout=120)


def _joblib_sweep_mid_run(tmp_path: Path) -> tuple[subprocess.Popen, list[str], list[Path]]:
    """A 3-job joblib sweep with 2 workers, returned once both workers have trained an epoch:
    the process, its arguments, and the two running jobs' logs."""
    slow = ["model.hidden_size=128", "data.tiny_train_tokens=150000", "trainer.max_epochs=3"]
    args = [
        "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", *TINY, *slow,
        "dropout.dp_keep_prob=0.5,0.7,0.9",
    ]  # fmt: skip
    proc = _sweep_proc(tmp_path, *args)
    deadline = time.monotonic() + 240
    logs = lambda: list(tmp_path.glob("multirun/*/*/[01]/train.log"))  # noqa: E731
    while not (len(logs()) == 2 and all("Epoch 1:" in p.read_text() for p in logs())):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()[-3000:]
        time.sleep(0.05)
    return proc, args, logs()


def test_sigterm_to_a_joblib_sweep_ends_every_child_and_a_rerun_logs_nothing_twice(tmp_path):
    proc, args, _ = _joblib_sweep_mid_run(tmp_path)
    proc.send_signal(signal.SIGTERM)  # both workers are mid-run
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]
    db = tmp_path / "mlflow.db"
    parent, children = split_runs(db)
    assert parent.info.status == "KILLED"
    assert len(children) == 2 and all(r.info.status == "KILLED" for r in children), [
        (r.info.status, r.data.tags.get("lmexp.failure_reason")) for r in children
    ]
    assert all("SIGTERM" in r.data.tags["lmexp.failure_reason"] for r in children)

    folder = sweep_dir(tmp_path)
    rerun = run_module("lmexp.train", "-m", *args, f"hydra.sweep.dir={folder}", cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    again, children = split_runs(db)
    assert again.info.run_id == parent.info.run_id and again.info.status == "FINISHED"
    assert len(children) == 3 and all(r.info.status == "FINISHED" for r in children)
    assert again.data.metrics == {} and again.data.tags["n_finished"] == "3"
    for run in children:  # every epoch logged once, the resumed ones included
        for key in ("valid_ppl", "train_ppl", "test_ppl"):
            steps = [s for s, _ in metric_history(db, run.info.run_id, key)]
            assert len(steps) == len(set(steps)), (key, steps)


def test_report_closes_a_sweep_whose_sweeper_was_killed(tmp_path):
    slow = [
        "model.hidden_size=128", "data.tiny_train_tokens=150000", "trainer.max_epochs=3",
        "trainer.progress=true", "trainer.log_every_n_batches=20",
    ]  # fmt: skip
    proc = _sweep_proc(tmp_path, *TINY, *slow, "dropout.dp_keep_prob=0.5,0.9")
    deadline = time.monotonic() + 240
    while not any("epoch 1/" in p.read_text() for p in tmp_path.glob("multirun/*/*/0/train.log")):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()[-3000:]
        time.sleep(0.05)
    proc.kill()  # SIGKILL: no handler runs, the parent and the job's run stay RUNNING
    proc.communicate(timeout=60)
    db = tmp_path / "mlflow.db"
    parent, (child,) = split_runs(db)
    assert parent.info.status == "RUNNING" and child.info.status == "RUNNING"

    folder = sweep_dir(tmp_path)
    report = run_module("lmexp.report", "--sweep-dir", str(folder), "--out", "rep", cwd=tmp_path)
    assert report.returncode == 0, report.stderr[-3000:]
    assert f"closed the sweep's parent run {parent.info.run_id} as KILLED" in report.stdout
    parent, (child,) = split_runs(db)
    assert parent.info.status == "KILLED" and child.info.status == "KILLED"
    assert "sweeping process ended" in parent.data.tags["lmexp.failure_reason"]
    assert "process ended" in child.data.tags["lmexp.failure_reason"]
    again = run_module("lmexp.report", "--sweep-dir", str(folder), "--out", "rep2", cwd=tmp_path)
    assert again.returncode == 0 and "closed the sweep" not in again.stdout


def test_a_seed_sweep_reports_groups_with_intervals_and_a_verdict(tmp_path):
    """dp_keep_prob x 3 seeds: grouped by dp_keep_prob, each group's mean, std and 95% interval
    equal to a hand computation from the runs MLflow holds; on the parent too; as DataFrames."""
    import math

    from lmexp.reporting.summary import sweep_frame

    proc = run_module(
        "lmexp.train", "-m", *TINY, "trainer.max_epochs=1", "dropout.dp_keep_prob=0.5,0.9",
        "trainer.seed=1,2,3", cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    parent, children = split_runs(tmp_path / "mlflow.db")
    assert len(children) == 6 and parent.data.tags["swept_params"].split(",") == [
        "dropout.dp_keep_prob",
        "trainer.seed",
    ]
    expected = {}
    for keep in ("0.5", "0.9"):
        values = [
            r.data.metrics["best_valid_ppl"]
            for r in children
            if r.data.params["dropout.dp_keep_prob"] == keep
        ]
        mean = sum(values) / 3
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / 2)
        expected[f"dropout.dp_keep_prob={keep}"] = (mean, std, 4.302652729911275 * std / 3**0.5)
    folder = sweep_dir(tmp_path)
    table = (folder / "report" / "groups.md").read_text()
    verdict = parent.data.tags["groups.verdict"]
    assert verdict.splitlines()[-1] in table
    assert "cannot be judged" not in verdict and "Welch's t-test" in verdict
    assert "**Over seeds**" in parent.data.tags["mlflow.note.content"]
    assert (folder / "report" / "final_ppl_groups.png").is_file()
    assert (folder / "report" / "learning_curves_groups.png").is_file()
    runs, groups = sweep_frame(
        sweep_dir_uri(tmp_path), parent.info.run_id,
        ["dropout.dp_keep_prob", "trainer.seed"],
    )  # fmt: skip
    assert len(runs) == 6 and set(runs["dropout.dp_keep_prob"]) == {"0.5", "0.9"}
    for row in groups.to_dict("records"):
        mean, std, ci = expected[row["group"]]
        assert row["n"] == 3 and row["failed"] == 0
        assert row["valid_mean"] == pytest.approx(mean)
        assert row["valid_std"] == pytest.approx(std)
        assert row["valid_ci95"] == pytest.approx(ci)


def test_two_presets_over_seeds_are_grouped_by_the_swept_config_group(tmp_path):
    """The docs' Transformer-vs-LSTM command on the tiny corpus: each run logs the experiment it
    ran as a param, and the report groups the seeds of each preset (which differ in arch and lr,
    set by the preset, not swept) instead of refusing them as a mix of recipes."""
    proc = run_module(
        "lmexp.train", "-m", "data=tiny", "experiment=transformer,examples_lstm",
        "trainer.seed=0,1", "trainer.max_epochs=1", "model.hidden_size=32", "model.num_layers=1",
        "trainer.threads=1", "trainer.progress=false", cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    parent, children = split_runs(tmp_path / "mlflow.db")
    assert parent.data.tags["swept_params"].split(",") == ["experiment", "trainer.seed"]
    valid: dict[str, list[float]] = {}
    for r in children:
        arch = {"transformer": "transformer", "examples_lstm": "rnn"}[r.data.params["experiment"]]
        assert r.data.params["model.arch"] == arch
        valid.setdefault(r.data.params["experiment"], []).append(r.data.metrics["best_valid_ppl"])
    assert sorted(len(v) for v in valid.values()) == [2, 2]
    table = (sweep_dir(tmp_path) / "report" / "groups.md").read_text()
    for experiment, values in valid.items():
        (row,) = [r for r in table.splitlines() if r.startswith(f"| experiment={experiment} |")]
        assert f"{sum(values) / 2:.2f}" in row.split("|")[4], row
    assert "with 2 and 2 runs that cannot be judged" in parent.data.tags["groups.verdict"]


def sweep_dir_uri(cwd: Path) -> str:
    return f"sqlite:///{cwd / 'mlflow.db'}"


def test_optuna_trials_over_several_seeds_optimise_the_mean(tmp_path):
    """trainer.seeds_per_job=2: each trial trains two seeds (two child runs) and Optuna gets
    their mean; the report groups each trial's seeds."""
    proc = run_module(
        "lmexp.train", "hparams_search=ptb_optuna", "hydra.sweeper.n_trials=2",
        "hydra.sweeper.sampler.n_startup_trials=2", "trainer.seeds_per_job=2",
        "hydra.sweeper.pruner=none", *SWEEP,
        cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    parent, children = split_runs(tmp_path / "mlflow.db")
    assert len(children) == 4 and all(r.info.status == "FINISHED" for r in children)
    trials: dict[tuple, list] = {}
    for r in children:
        key = (r.data.params["dropout.dp_keep_prob"], r.data.params["lr_policy.lr"])
        trials.setdefault(key, []).append(r)
    assert sorted(len(v) for v in trials.values()) == [2, 2]
    assert all({r.data.params["trainer.seed"] for r in v} == {"0", "1"} for v in trials.values())
    means = [sum(r.data.metrics["best_valid_ppl"] for r in v) / 2 for v in trials.values()]
    results = yaml.safe_load((sweep_dir(tmp_path) / "optimization_results.yaml").read_text())
    assert results["best_value"] == pytest.approx(min(means))
    assert parent.data.tags["swept_params"].endswith(",trainer.seed")
    assert "cannot be judged" in parent.data.tags["groups.verdict"]  # 2 seeds per trial
    assert all(", seed=" in r.info.run_name for r in children)


def test_slurm_sweep_without_sbatch_stops_before_any_job(tmp_path):
    """hydra/launcher=slurm on a machine without SLURM's client: one sentence, no job, no run."""
    bare = tmp_path / "bin"  # a PATH with nothing of SLURM's on it
    bare.mkdir()
    proc = run_module(
        "lmexp.train", "-m", "hydra/launcher=slurm", *TINY, "dropout.dp_keep_prob=0.5,0.9",
        cwd=tmp_path, env={"PATH": str(bare)},
    )  # fmt: skip
    expect_sweep_refused(
        proc,
        "hydra/launcher=slurm submits jobs with SLURM's sbatch, which is not on this machine's "
        "PATH; launch the sweep from a SLURM login node, or pick a local launcher",
        tmp_path,
    )


def test_slurm_cpu_preset_asks_for_no_gpu():
    from hydra import compose, initialize_config_dir

    from lmexp.config import conf_dir
    from lmexp.orchestration.launch import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose("train", ["hydra/launcher=slurm_cpu"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert launcher.gpus_per_node is None and launcher.partition == "cpu"
    assert launcher.max_num_timeout > 0  # requeued on time limits like the GPU preset
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        shared = compose(  # the README's several-jobs-per-GPU settings
            "train",
            ["hydra/launcher=slurm", "hydra.launcher.gpus_per_node=null", "hydra.launcher.gres=shard:1",
             "hydra.launcher.account=lab", "+hydra.launcher.additional_parameters.mail-type=END"],
            return_hydra_config=True,
        ).hydra.launcher  # fmt: skip
    assert (shared.gpus_per_node, shared.gres, shared.account) == (None, "shard:1", "lab")
    assert shared.additional_parameters == {"mail-type": "END"}


def test_sigkill_of_a_joblib_sweeper_ends_its_workers_and_their_runs(tmp_path):
    """SIGKILL to the sweeper while both workers train: the workers see it gone, stop their
    jobs as SIGTERM would (checkpointed, KILLED, resumable) and end, instead of idling on for
    minutes; the report then closes the parent KILLED, since a job never ran."""
    import psutil

    proc, _, logs = _joblib_sweep_mid_run(tmp_path)
    workers = psutil.Process(proc.pid).children(recursive=True)
    assert workers
    proc.kill()
    proc.communicate(timeout=60)
    gone, alive = psutil.wait_procs(workers, timeout=90)
    assert not alive, [(p.pid, p.cmdline()[:4]) for p in alive]
    db = tmp_path / "mlflow.db"
    parent, children = split_runs(db)
    assert len(children) == 2 and all(r.info.status == "KILLED" for r in children), [
        (r.info.status, r.data.tags.get("lmexp.failure_reason")) for r in children
    ]
    assert all("SIGTERM" in r.data.tags["lmexp.failure_reason"] for r in children)
    assert all((p.parent / "checkpoints" / "last.pt").is_file() for p in logs)
    report = run_module("lmexp.report", "--sweep-dir", str(sweep_dir(tmp_path)), cwd=tmp_path)
    assert report.returncode == 0, report.stderr[-3000:]
    assert f"closed the sweep's parent run {parent.info.run_id} as KILLED" in report.stdout
    assert split_runs(db)[0].info.status == "KILLED"


def test_sigkill_of_one_joblib_worker_is_one_sentence_and_leaves_no_run_running(tmp_path):
    """SIGKILL to the worker process of one job (as the out-of-memory killer sends): joblib
    ends the other worker too. The sweep says so in one sentence with the way on, instead of
    joblib's TerminatedWorkerError traceback, exits 1, and leaves no run RUNNING."""
    proc, _, logs = _joblib_sweep_mid_run(tmp_path)
    lock = logs[0].parent / ".lmexp.lock"
    pid = int(lock.read_text().split()[1])  # "pid <n> on <host>": the worker running that job
    os.kill(pid, signal.SIGKILL)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 1, out[-3000:]
    folder = sweep_dir(tmp_path)
    sentence = (
        "A joblib worker process of this sweep was killed (exit codes {SIGKILL(-9)}; SIGKILL, "
        "or out of memory) and joblib ended the others; rerun the same command with "
        f"hydra.sweep.dir={folder.resolve()} to resume its jobs from their checkpoints and run "
        "the rest."
    )
    assert sentence in out, out[-3000:]
    assert "Traceback" not in out and "TerminatedWorkerError" not in out, out[-3000:]
    parent, children = split_runs(tmp_path / "mlflow.db")
    states = [(r.info.status, r.data.tags.get("lmexp.failure_reason")) for r in children]
    assert parent.info.status != "RUNNING" and all(s != "RUNNING" for s, _ in states), states


def test_a_sweep_whose_jobs_all_ended_is_closed_finished_not_killed(tmp_path):
    """The sweeper killed after its last job but before closing the parent (here: the parent
    set RUNNING again, as it then is): the report closes it FINISHED, as its jobs are."""
    from mlflow.tracking import MlflowClient

    proc = run_module("lmexp.train", "-m", *SWEEP, "dropout.dp_keep_prob=0.5,0.9", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    db = tmp_path / "mlflow.db"
    parent, children = split_runs(db)
    assert len(children) == 2 and all(r.info.status == "FINISHED" for r in children)
    MlflowClient(tracking_uri=f"sqlite:///{db}").update_run(parent.info.run_id, "RUNNING")
    report = run_module("lmexp.report", "--sweep-dir", str(sweep_dir(tmp_path)), cwd=tmp_path)
    assert report.returncode == 0, report.stderr[-3000:]
    assert f"closed the sweep's parent run {parent.info.run_id} as FINISHED" in report.stdout
    again = split_runs(db)[0]
    assert again.info.status == "FINISHED" and "lmexp.failure_reason" not in again.data.tags
