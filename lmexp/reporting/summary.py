"""Comparing runs: a sweep's or an experiment's report (tables.py's table, plots.py's plots), a
run's results record, and a sweep's summary on its MLflow parent run. lmexp.report is its
command line; the sweep callback summarises each sweep with it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from lmexp.config import RECIPE, SHAPE, LmexpError, keys_with_role
from lmexp.reporting.plots import plot, plot_groups
from lmexp.reporting.stats import METRICS as STAT_METRICS
from lmexp.reporting.stats import SEED_KEY, Group, check_comparable, group_runs
from lmexp.reporting.tables import (
    build_table,
    differing_params,
    fmt,
    format_markdown,
    format_text,
    group_table,
    last_value,
    summarize,
    verdict_text,
    write_table,
)
from lmexp.tracking.base import EPOCH_METRICS, adapted_metrics
from lmexp.tracking.queries import RunRecord, experiment_names, fetch_run, fetch_runs
from lmexp.tracking.stores import redact
from lmexp.tracking.views import ui_url

HISTORY_KEYS = EPOCH_METRICS


def report(
    uri: str,
    experiment: str,
    out: Path,
    parent_run_id: str | None = None,
    swept: list[str] | None = None,
    records: list[RunRecord] | None = None,
) -> tuple[str, list[Path], list[RunRecord]]:
    """Fetch the runs (unless given), write the table and plots into out; return the text table,
    the files and the runs."""
    if records is None:
        records = fetch_runs(uri, experiment, parent_run_id, HISTORY_KEYS)
    if not records:
        raise LmexpError(f"No runs found in experiment {experiment!r} at {redact(uri)}.")
    columns, rows = build_table(records, swept)
    files = write_table(columns, rows, out, server_links(uri, records))
    files += plot(records, swept or differing_params(records)[:1], out)
    text = format_text(columns, rows)
    if swept and SEED_KEY in swept:
        groups = seed_groups(records, swept)
        group_columns, group_rows = group_table(groups)
        (out / "groups.md").write_text(
            format_markdown(group_columns, group_rows) + "\n" + verdict_text(groups) + "\n"
        )
        files += [out / "groups.md", *plot_groups(records, groups, swept, out)]
        text += "\n" + format_text(group_columns, group_rows) + verdict_text(groups) + "\n"
    return text, files, records


def _as_run(record: RunRecord) -> dict[str, Any]:
    summary = summarize(record)
    return {
        "params": record.params,
        "status": record.status,
        "metrics": {m: summary[m] for m in STAT_METRICS},
    }


def seed_groups(records: list[RunRecord], swept: list[str]) -> list[Group]:
    """A seed sweep's runs grouped by its other swept keys (stats.py), after checking that no
    group mixes recipes."""
    runs = [_as_run(r) for r in records]
    recipe = keys_with_role(SHAPE) | keys_with_role(RECIPE)
    check_comparable(runs, swept, recipe - {SEED_KEY})
    return group_runs(runs, swept)


def sweep_frame(uri: str, parent_run_id: str, swept: list[str]) -> tuple[Any, Any]:
    """A sweep's runs as a pandas DataFrame (params flattened as columns, final metrics, status),
    and its seed groups' statistics beside it (empty when the sweep has no trainer.seed axis).

        from lmexp.reporting.summary import sweep_frame
        from lmexp.tracking.queries import read_sweep
        sweep = read_sweep(Path("multirun/2026-11-29/10-00-00"))
        runs, groups = sweep_frame(sweep["tracking_uri"], sweep["parent_run_id"],
                                   sweep["swept_params"])
    """
    import pandas as pd

    records = fetch_runs(uri, _experiment_of(uri, parent_run_id), parent_run_id, HISTORY_KEYS)
    runs = pd.DataFrame([{**r.params, **summarize(r)} for r in records])
    if SEED_KEY not in swept or not records:
        return runs, pd.DataFrame()
    columns, rows = group_table(seed_groups(records, swept))
    return runs, pd.DataFrame(rows, columns=columns)


def _experiment_of(uri: str, run_id: str) -> str:
    from lmexp.tracking.queries import experiment_name_of

    return experiment_name_of(uri, run_id)


def server_links(uri: str, records: list[RunRecord]) -> Callable[[str], str] | None:
    """Links to the runs' pages when the store is a tracking server (a file store has no UI
    address until someone starts `mlflow ui` on it)."""
    if not uri.startswith(("http://", "https://")):
        return None
    experiment = {r.run_id: r.experiment_id for r in records}
    return lambda run_id: ui_url(uri, experiment[run_id], run_id=run_id)


def state_counts(records: list[RunRecord]) -> dict[str, int]:
    """How many runs ended in each state (an Optuna search's PRUNED apart from FAILED)."""
    seen = {r.status for r in records}
    order = [s for s in ("FINISHED", "PRUNED", "FAILED", "KILLED", "RUNNING") if s in seen]
    return {
        state: sum(r.status == state for r in records)
        for state in order + sorted(seen - set(order))
    }


# MLflow cuts a tag's value at 8,000 characters (a 196-run sweep's description lost its table):
# the parent's description stays under this, its full tables are artifacts.
NOTE_LIMIT = 7_500


def fitted_note(records: list[RunRecord], swept: list[str], best: dict[str, Any] | None,
                status: str, groups_part: str = "") -> str:  # fmt: skip
    """The parent's description within NOTE_LIMIT: the whole table when it fits, else the best
    rows that fit and a line naming the artifact that holds them all (the groups table, when
    there is one, is kept whole first; it has a row per setting, not per run)."""
    full = sweep_note(records, swept, best, status) + groups_part
    if len(full) <= NOTE_LIMIT:
        return full
    for rows in (50, 20, 10, 5, 0):
        note = sweep_note(records, swept, best, status, max_rows=rows) + groups_part
        if len(note) <= NOTE_LIMIT:
            return note
    return note[: NOTE_LIMIT - 80] + "\n\n(cut here: the full tables are runs.md and groups.md)"


def sweep_note(
    records: list[RunRecord],
    swept: list[str],
    best: dict[str, Any] | None,
    status: str,
    max_rows: int | None = None,
) -> str:
    """The parent run's description (its Overview page): the outcome, the best child, the table
    with links to each child's page (its best max_rows rows, when given)."""
    keys = ", ".join(f"`{k}`" for k in swept) or "nothing"
    counts = ", ".join(f"{n} {state.lower()}" for state, n in state_counts(records).items())
    lines = [f"**Sweep over {keys}**: {len(records)} runs, {counts or 'none'}; {status}.", ""]
    if best is not None:
        lines += [
            f"Best: **{best['run']}** (`{best['run_id']}`): best valid ppl "
            f"{best['best_valid_ppl']:.2f}, test ppl {fmt(best['test_ppl'])}.",
            "",
        ]
    columns, rows = build_table(records, swept)
    experiment = {r.run_id: r.experiment_id for r in records}
    link = lambda run_id: f"#/experiments/{experiment[run_id]}/runs/{run_id}"  # noqa: E731
    if max_rows is not None and len(rows) > max_rows:
        lines.append(
            f"The best {max_rows} of {len(rows)} runs; all of them are in this run's artifact "
            "runs.md."
        )
        lines.append("")
        rows = rows[:max_rows]
    lines.append(format_markdown(columns, rows, link))
    lines.append("The table and plots are this run's artifacts (runs.md, *.png).")
    return "\n".join(lines)


def report_all(uri: str, out: Path) -> tuple[str, list[Path]]:
    """Every experiment in the store, its runs grouped by corpus and model (a tiny test run and
    a PTB run in one table compare nothing): a table and plots per group, in
    out/<experiment>/<data>-<model>/."""
    text, files = [], []
    for experiment in experiment_names(uri):
        records = fetch_runs(uri, experiment, None, HISTORY_KEYS)
        groups: dict[str, list[RunRecord]] = {}
        for r in records:
            group = f"{r.params.get('data.name', '?')}-{r.params.get('model.name', '?')}"
            groups.setdefault(group, []).append(r)
        for group, members in sorted(groups.items()):
            folder = out / experiment / group
            table, written, _ = report(uri, experiment, folder, records=members)
            text.append(f"== {experiment}: {group} ({len(members)} runs)\n{table}")
            files += written
    if not text:
        raise LmexpError(
            f"{redact(uri)} holds no lmexp runs; train one (python -m lmexp.train) or pass "
            "--tracking-uri for the store that has them."
        )
    return "\n".join(text), files


def results_record(uri: str, run_id: str) -> dict[str, Any]:
    """One run's results as plain data: config, per-epoch ppl, test ppl, speed, provenance."""
    record = fetch_run(uri, run_id, HISTORY_KEYS)
    epochs = [
        {"epoch": step, **{k: dict(record.history[k]).get(step) for k in HISTORY_KEYS}}
        for step, _ in record.history.get("valid_ppl", [])
    ]
    return {
        "run_id": record.run_id,
        "run_name": record.run_name,
        "status": record.status,
        "config": dict(sorted(record.params.items())),
        "epochs": epochs,
        "final": {
            "train_ppl": last_value(record, "train_ppl"),
            "valid_ppl": last_value(record, "valid_ppl"),
            "best_valid_ppl": record.metrics.get("best_valid_ppl"),
            "test_ppl": record.metrics.get("test_ppl"),
        },
        # lmexp.adapt's scores of the run, each with the settings that gave it
        "adapted": {
            k: {"ppl": record.metrics[k], "settings": record.tags.get(f"lmexp.{k}")}
            for k in adapted_metrics(record.metrics)
        },
        "train_wps_mean": summarize(record)["train_wps_mean"],
        "train_time_s": sum(e["epoch_time_s"] or 0 for e in epochs),
        "device": record.tags.get("device"),
        "torch_version": record.tags.get("torch_version"),
        "git_commit": record.tags.get("mlflow.source.git.commit"),
        "hydra_overrides": record.tags.get("hydra_overrides"),
    }
