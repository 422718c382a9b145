"""The tables that compare runs: one row per run (its final and best perplexities, speed and
the params that differ), one per seed group, as CSV, Markdown (with links to the runs' pages)
and console text."""

from __future__ import annotations

import csv
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lmexp.config import BOOKKEEPING, keys_with_role
from lmexp.reporting.names import short_keys
from lmexp.reporting.stats import Group, verdict, words_per_second
from lmexp.tracking.base import adapted_metrics
from lmexp.tracking.queries import RunRecord

# The run's training speed is train_wps_mean (total words over total training time, logged at the
# end), never train_wps, which is one epoch's.
RESULT_COLUMNS = (
    "train_ppl", "valid_ppl", "best_valid_ppl", "test_ppl", "train_wps_mean", "epochs", "status"
)  # fmt: skip


# Params that differ between runs but say nothing about the experiment (config.py's roles).
IGNORED_PARAMS = frozenset(keys_with_role(BOOKKEEPING))


def short(value: str | None) -> str:
    """A parameter value for tables and legends: long floats (Optuna's) to 4 significant digits."""
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return str(value)
    return f"{number:.4g}" if len(str(value)) > 6 else str(value)


def last_value(record: RunRecord, key: str) -> float:
    history = record.history.get(key)
    if history:
        return history[-1][1]
    return record.metrics.get(key, math.nan)


def train_speed(record: RunRecord) -> float:
    """Total training words over total training time, from the epochs' history when it holds
    both (runs logged before lmexp summarised them so carry the mean of per-epoch rates as their
    train_wps_mean metric), else that metric."""
    seconds = dict(record.history.get("epoch_time_s", []))
    epochs = [(wps, seconds.get(step)) for step, wps in record.history.get("train_wps", [])]
    if epochs and all(t is not None for _, t in epochs):
        return words_per_second(epochs)
    return record.metrics.get("train_wps_mean", math.nan)


def summarize(record: RunRecord) -> dict[str, Any]:
    return {
        "run_id": record.run_id,
        "run": record.run_name,
        "train_ppl": last_value(record, "train_ppl"),
        "valid_ppl": last_value(record, "valid_ppl"),
        "best_valid_ppl": record.metrics.get("best_valid_ppl", math.nan),
        "test_ppl": record.metrics.get("test_ppl", math.nan),
        "train_wps_mean": train_speed(record),
        "epochs": len(record.history.get("valid_ppl", [])),
        "status": record.status,
    }


def differing_params(records: list[RunRecord]) -> list[str]:
    keys = sorted({k for r in records for k in r.params if k not in IGNORED_PARAMS})
    return [k for k in keys if len({r.params.get(k) for r in records}) > 1]


def build_table(
    records: list[RunRecord], swept: list[str] | None = None
) -> tuple[list[str], list[dict[str, Any]]]:
    """Columns and rows, best validation perplexity first (failed and unfinished runs last): the
    objective a search minimizes and the parent's best_run_id is chosen by, so the first row is
    the study's best trial and the parent's best run, even where the last epoch was not the best."""
    params = list(swept or []) + [k for k in differing_params(records) if k not in (swept or [])]
    # lmexp.adapt's scores, beside test_ppl, where any run has one
    adapted = adapted_metrics({k for r in records for k in r.metrics})
    rows = []
    for record in records:
        summary = summarize(record)
        row = {"run": summary["run"], "run_id": record.run_id}
        row.update({k: short(record.params.get(k, "")) for k in params})
        row.update({k: v for k, v in summary.items() if k in RESULT_COLUMNS})
        row.update({k: record.metrics.get(k, math.nan) for k in adapted})
        rows.append(row)

    def key(row: dict[str, Any]) -> tuple[int, float]:
        v = row["best_valid_ppl"]
        v = v if v is not None and math.isfinite(v) else row["valid_ppl"]  # unfinished: no best
        return (row["status"] != "FINISHED", v if math.isfinite(v) else math.inf)

    rows.sort(key=key)
    results = list(RESULT_COLUMNS)
    results[results.index("test_ppl") + 1 : results.index("test_ppl") + 1] = adapted
    return ["run", "run_id", *params, *results], rows


def fmt(value: Any) -> str:
    if isinstance(value, float):
        return (
            "nan" if math.isnan(value) else f"{value:.2f}" if abs(value) < 1e6 else f"{value:.3g}"
        )
    return str(value)


def format_markdown(
    columns: list[str], rows: list[dict[str, Any]], run_url: Callable[[str], str] | None = None
) -> str:
    """A Markdown table; headers by the keys' last parts, run ids in full (links to the runs'
    pages in the MLflow UI when run_url is given)."""
    headers = list(short_keys(columns).values())
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        cells = [fmt(row[c]) for c in columns]
        if run_url is not None:
            cells[columns.index("run_id")] = f"[{row['run_id']}]({run_url(row['run_id'])})"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def format_text(columns: list[str], rows: list[dict[str, Any]]) -> str:
    """A console table; run ids cut to 8 characters to keep it narrow."""
    cells = [columns] + [
        [fmt(row[c])[:8] if c == "run_id" else fmt(row[c]) for c in columns] for row in rows
    ]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    return (
        "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in cells)
        + "\n"
    )


def write_table(
    columns: list[str],
    rows: list[dict[str, Any]],
    out: Path,
    run_url: Callable[[str], str] | None = None,
) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "runs.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    (out / "runs.md").write_text(format_markdown(columns, rows, run_url))
    return [out / "runs.csv", out / "runs.md"]


def group_table(groups: list[Group]) -> tuple[list[str], list[dict[str, Any]]]:
    """One row per group: n finished (and failed), mean, std and 95% interval of best valid and
    test perplexity, mean words/s."""
    columns = ["group", "n", "failed", "valid_mean", "valid_std", "valid_ci95", "test_mean"]
    columns += ["test_std", "test_ci95", "train_wps_mean"]
    rows = []
    for g in groups:
        valid, test = g.stat("best_valid_ppl"), g.stat("test_ppl")
        rows.append(
            {
                "group": g.label, "n": valid.n, "failed": g.failed,
                "valid_mean": valid.mean, "valid_std": valid.std, "valid_ci95": valid.ci95,
                "test_mean": test.mean, "test_std": test.std, "test_ci95": test.ci95,
                "train_wps_mean": g.stat("train_wps_mean").mean,
            }
        )  # fmt: skip
    return columns, rows


def verdict_text(groups: list[Group]) -> str:
    judged = verdict(groups)
    return judged.text if judged else "No group has a finished run."
