"""lmexp.report on real runs in a real sqlite store: grouping, no silent overwrite, clear errors."""

from __future__ import annotations

import csv

import pytest
from conftest import TINY, mlflow_runs, run_module


@pytest.mark.slow
def test_report_without_arguments_groups_by_experiment_and_recipe_and_keeps_old_reports(tmp_path):
    for extra in (["trainer.max_epochs=1"], ["trainer.max_epochs=2", "logger.experiment_name=b"]):
        assert run_module("lmexp.train", *TINY, *extra, cwd=tmp_path).returncode == 0
    proc = run_module("lmexp.report", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (
        "== lmexp: tiny-tiny (1 runs)" in proc.stdout and "== b: tiny-tiny (1 runs)" in proc.stdout
    )
    runs = {r.info.run_id for r in mlflow_runs(tmp_path / "mlflow.db")}
    table = (tmp_path / "report" / "lmexp" / "tiny-tiny" / "runs.csv").read_text()
    rows = list(csv.DictReader(table.splitlines()))
    assert len(rows) == 1 and rows[0]["run_id"] in runs  # the full id, not 8 characters
    md = (tmp_path / "report" / "lmexp" / "tiny-tiny" / "runs.md").read_text()
    assert rows[0]["run_id"] in md and "| run | run_id |" in md
    before = (tmp_path / "report" / "lmexp" / "tiny-tiny" / "runs.csv").read_bytes()
    again = run_module("lmexp.report", cwd=tmp_path)
    assert again.returncode == 2
    assert "report already holds files (an earlier report?); pass --out" in again.stderr
    assert (tmp_path / "report" / "lmexp" / "tiny-tiny" / "runs.csv").read_bytes() == before
    assert run_module("lmexp.report", "--force", cwd=tmp_path).returncode == 0


def test_report_of_a_store_without_runs_is_one_sentence(tmp_path):
    from mlflow.tracking import MlflowClient

    MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}").search_experiments()
    proc = run_module("lmexp.report", "--out", "rep", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().endswith(
        "holds no lmexp runs; train one (python -m lmexp.train) or pass --tracking-uri for the "
        "store that has them."
    ), proc.stderr
    assert "Traceback" not in proc.stderr


def test_report_of_a_missing_or_damaged_store_is_one_sentence_and_creates_nothing(tmp_path):
    """A store path in a folder that does not exist is not created (with an empty store in it);
    a truncated store is named, not 80 lines of SQLAlchemy."""
    from mlflow.tracking import MlflowClient

    missing = tmp_path / "nope" / "mlflow.db"
    proc = run_module(
        "lmexp.report", "--tracking-uri", f"sqlite:///{missing}", "--out", "rep", cwd=tmp_path
    )
    assert proc.returncode == 2 and proc.stderr.strip() == (
        f"lmexp.report: error: Tracking store sqlite:///{missing}: {missing} does not exist, so "
        "there are no runs to read; pass --tracking-uri (or set MLFLOW_TRACKING_URI) to the "
        "store the runs were logged to."
    ), proc.stderr
    assert not (tmp_path / "nope").exists() and not (tmp_path / "rep").exists()

    db = tmp_path / "mlflow.db"
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    run = client.create_run(client.create_experiment("lmexp"))
    for step in range(200):
        client.log_metric(run.info.run_id, "valid_ppl", 100.0 + step, step=step)
    with open(db, "r+b") as f:
        f.truncate(db.stat().st_size // 3)
    proc = run_module("lmexp.report", "--out", "rep", cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.strip().startswith(
        f"lmexp.report: error: Tracking store sqlite:///{db} is unreadable (database disk image "
        f"is malformed"
    ), proc.stderr
    assert proc.stderr.strip().endswith(
        f"restore {db} from a backup, or pass --tracking-uri of another store."
    )
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "rep").exists()


@pytest.mark.slow
def test_a_sweeps_report_is_brought_up_to_date_in_its_folder_as_often_as_asked(tmp_path):
    """lmexp.report --sweep-dir rewrites the report the sweep wrote into its folder, rather than
    a second copy here and then a refusal the next time."""
    sweep = run_module(
        "lmexp.train", "-m", *TINY, "trainer.max_epochs=1", "dropout.dp_keep_prob=0.5,0.9",
        cwd=tmp_path,
    )  # fmt: skip
    assert sweep.returncode == 0, sweep.stderr[-3000:]
    (folder,) = [p.parent for p in (tmp_path / "multirun").glob("*/*/mlflow_sweep.json")]
    written = (folder / "report" / "runs.csv").read_text()
    for _ in range(2):
        again = run_module("lmexp.report", "--sweep-dir", str(folder), cwd=tmp_path)
        assert again.returncode == 0, again.stderr
        assert f"wrote {folder / 'report' / 'runs.csv'}" in again.stdout
    assert (folder / "report" / "runs.csv").read_text() == written
    assert not (tmp_path / "report").exists()
