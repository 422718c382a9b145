"""How a sweep ends in its tracking store: its summary (report, best run, seed verdict) written to
the parent run, which closes with the sweep's status, and the runs whose process died closed as
KILLED. Orchestration decides outcomes; reporting only formats them (lmexp.reporting.summary)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from lmexp.config import LmexpError
from lmexp.files import folder_in_use
from lmexp.reporting.stats import SEED_KEY
from lmexp.reporting.summary import HISTORY_KEYS, fitted_note, report, seed_groups, state_counts
from lmexp.reporting.tables import format_markdown, group_table, summarize, verdict_text
from lmexp.tracking.base import FAILURE_TAG, NOTE_TAG
from lmexp.tracking.queries import RunRecord, fetch_run, fetch_runs
from lmexp.tracking.runs import end_run, set_run_outcome


def close_dead_runs(uri: str, records: list[RunRecord], reason: str) -> None:
    """Mark KILLED the runs MLflow still shows RUNNING whose process is gone: no live process
    holds their run folder's lock (a job killed with its sweeper, or with SIGKILL)."""
    for record in records:
        folder = record.tags.get("output_dir")
        if record.status == "RUNNING" and folder and not folder_in_use(Path(folder)):
            end_run(uri, record.run_id, "KILLED", reason)
            record.status = "KILLED"


def summarize_sweep(
    uri: str,
    experiment: str,
    parent_run_id: str,
    swept: list[str],
    sweep_dir: Path,
    status: str | None = "FINISHED",
    reason: str | None = None,
) -> None:
    """Called when a multirun ends: table and plots into the sweep folder and onto the parent run,
    which ends with `status`. None means the sweep ended early: KILLED if a job was stopped (by
    a signal or Ctrl-C), else FAILED. The summary numbers are tags, which a rerun of the sweep
    overwrites rather than logging twice."""
    try:
        records = fetch_runs(uri, experiment, parent_run_id, HISTORY_KEYS)
        close_dead_runs(uri, records, "its process ended without closing the run; rerun the sweep")
        text, files, _ = report(
            uri, experiment, sweep_dir / "report", parent_run_id, swept, records
        )
    except LmexpError:
        set_run_outcome(uri, parent_run_id, {"best_run_id": "none"}, [], status=status or "FAILED")
        return
    if status is None:
        status = "KILLED" if any(r.status == "KILLED" for r in records) else "FAILED"
    finished = [summarize(r) for r in records if r.status == "FINISHED"]
    best = min(finished, key=lambda s: s["best_valid_ppl"], default=None)
    tags: dict[str, Any] = {"n_runs": len(records), "n_finished": len(finished)}
    tags.update({f"n_{state.lower()}": n for state, n in state_counts(records).items()})
    tags["epochs_trained"] = sum(len(r.history.get("valid_ppl", [])) for r in records)
    if reason:
        tags[FAILURE_TAG] = reason
    if best is not None:
        tags["best_valid_ppl"] = best["best_valid_ppl"]
        if math.isfinite(best["test_ppl"]):
            tags["best_test_ppl"] = best["test_ppl"]
        tags["best_run_id"] = best["run_id"]
        by_id = {r.run_id: r for r in records}
        tags.update({f"best.{k}": by_id[best["run_id"]].params.get(k, "") for k in swept})
    groups_part = ""
    if SEED_KEY in swept:
        groups = seed_groups(records, swept)
        tags["groups.verdict"] = verdict_text(groups)
        columns, rows = group_table(groups)
        groups_part = "\n\n**Over seeds**\n\n" + format_markdown(columns, rows)
        groups_part += "\n" + tags["groups.verdict"]
    tags[NOTE_TAG] = fitted_note(records, swept, best, status, groups_part)
    set_run_outcome(uri, parent_run_id, tags, files, status=status)
    print(text, end="")


def close_stale_sweep(uri: str, sweep: dict[str, Any], sweep_dir: Path) -> bool:
    """A sweep whose parent is still RUNNING though no process holds its folder (the sweeper was
    killed with SIGKILL): close it, and its dead jobs' runs, with the report so far. FINISHED
    when every run the sweep was to make ended (finished, failed or pruned), as a sweeper alive
    at the end would have closed it; else KILLED, resumable. Returns the status, or None."""
    if folder_in_use(sweep_dir) or fetch_run(uri, sweep["parent_run_id"]).status != "RUNNING":
        return None
    records = fetch_runs(uri, sweep["experiment"], sweep["parent_run_id"])
    ended = [r for r in records if r.status in ("FINISHED", "FAILED", "PRUNED")]
    complete = bool(sweep.get("runs")) and len(ended) == len(records) >= sweep["runs"]
    summarize_sweep(
        uri,
        sweep["experiment"],
        sweep["parent_run_id"],
        sweep["swept_params"],
        sweep_dir,
        status="FINISHED" if complete else "KILLED",
        reason=None
        if complete
        else "the sweeping process ended without closing the sweep; rerun it to finish",
    )
    return "FINISHED" if complete else "KILLED"
