"""Comparing runs: the table of a sweep's or an experiment's runs, its plots, a run's results
record, and a sweep's summary on its MLflow parent run. lmexp.report is its command line; the
sweep callback summarises each sweep with it."""

from __future__ import annotations

import csv
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lmexp.config import BOOKKEEPING, RECIPE, SHAPE, LmexpError, keys_with_role
from lmexp.reporting.names import short_keys
from lmexp.reporting.stats import METRICS as STAT_METRICS
from lmexp.reporting.stats import (
    SEED_KEY,
    Group,
    check_comparable,
    group_runs,
    verdict,
    words_per_second,
)
from lmexp.tracking.base import EPOCH_METRICS, adapted_metrics
from lmexp.tracking.queries import RunRecord, experiment_names, fetch_run, fetch_runs
from lmexp.tracking.stores import redact
from lmexp.tracking.views import ui_url

HISTORY_KEYS = EPOCH_METRICS
# The run's training speed is train_wps_mean (total words over total training time, logged at the
# end), never train_wps, which is one epoch's.
RESULT_COLUMNS = (
    "train_ppl", "valid_ppl", "best_valid_ppl", "test_ppl", "train_wps_mean", "epochs", "status"
)  # fmt: skip
# Params that differ between runs but say nothing about the experiment (config.py's roles).
IGNORED_PARAMS = frozenset(keys_with_role(BOOKKEEPING))
FIGSIZE, DPI = (8, 5), 120  # 960 x 600 pixels


def short(value: str | None) -> str:
    """A parameter value for tables and legends: long floats (Optuna's) to 4 significant digits."""
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return str(value)
    return f"{number:.4g}" if len(str(value)) > 6 else str(value)


def _last(record: RunRecord, key: str) -> float:
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
        "train_ppl": _last(record, "train_ppl"),
        "valid_ppl": _last(record, "valid_ppl"),
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


def _fmt(value: Any) -> str:
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
        cells = [_fmt(row[c]) for c in columns]
        if run_url is not None:
            cells[columns.index("run_id")] = f"[{row['run_id']}]({run_url(row['run_id'])})"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def format_text(columns: list[str], rows: list[dict[str, Any]]) -> str:
    """A console table; run ids cut to 8 characters to keep it narrow."""
    cells = [columns] + [
        [_fmt(row[c])[:8] if c == "run_id" else _fmt(row[c]) for c in columns] for row in rows
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


def _number(value: str | None) -> float | None:
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def _plain_axes(ax: Any, log_y: bool) -> None:
    """Whole-number epoch ticks and plain tick labels (matplotlib's log axis writes 1.9x10^3)."""
    from matplotlib.ticker import MaxNLocator, ScalarFormatter

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if log_y:  # perplexities span a factor of ten over a run: said on the axis, not hidden
        ax.set_yscale("log")
        ax.set_ylabel(f"{ax.get_ylabel()} (log scale)")
        for axis_formatter in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
            formatter = ScalarFormatter()
            formatter.set_scientific(False)
            axis_formatter(formatter)
    ax.grid(alpha=0.3, which="both")


def setting_colours(settings: list[str]) -> dict[str, Any]:
    """A colour per setting ("dropout.dp_keep_prob=0.5") from its text alone, a stable hash into
    matplotlib's tab10, so that a setting has the same colour in a sweep's report, the
    all-experiments report and any other; a setting whose colour another in the same plot took
    gets the next free one (with over 10 settings, colours repeat)."""
    import zlib

    import matplotlib

    palette = matplotlib.colormaps["tab10"].colors
    colours: dict[str, Any] = {}
    for setting in sorted(set(settings)):
        index = zlib.crc32(setting.encode()) % len(palette)
        taken = {id(c) for c in colours.values()}
        for step in range(len(palette)):
            if id(palette[(index + step) % len(palette)]) not in taken:
                index = (index + step) % len(palette)
                break
        colours[setting] = palette[index]
    return colours


def _setting(r: RunRecord, params: list[str]) -> str:
    return ", ".join(f"{p}={short(r.params.get(p))}" for p in params) or r.run_name


def plot(records: list[RunRecord], params: list[str], out: Path) -> list[Path]:
    """final_ppl.png (final ppl against the first param) and learning_curves.png (valid ppl per
    epoch), each run listed by its value of that param and coloured by it (setting_colours)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    param = params[0] if params else None
    values = {r.run_id: _number(r.params.get(param)) if param else None for r in records}
    numeric = param is not None and all(v is not None for v in values.values())
    ordered = (
        sorted(records, key=lambda r: (values[r.run_id] or 0.0, r.run_name)) if numeric else records
    )
    if numeric:
        points = [(values[r.run_id], summarize(r)) for r in ordered]
        fig, ax = plt.subplots(figsize=FIGSIZE)
        for key, style in (("train_ppl", "o--"), ("valid_ppl", "s-"), ("test_ppl", "^:")):
            xs = [x for x, s in points if math.isfinite(s[key])]
            ax.plot(xs, [s[key] for _, s in points if math.isfinite(s[key])], style, label=key)
        ax.grid(alpha=0.3)
        title = f"Final perplexity against {param}"
        paths.append(_save(fig, ax, out / "final_ppl.png", param, "perplexity (final)", title))
    fig, ax = plt.subplots(figsize=FIGSIZE)
    colours = setting_colours([_setting(r, params) for r in ordered])
    for r in ordered:
        history = [(s, v) for s, v in r.history.get("valid_ppl", []) if math.isfinite(v)]
        if not history:
            continue
        # with one param the legend's title names it
        label = short(r.params.get(params[0])) if len(params) == 1 else _setting(r, params)
        colour = colours[_setting(r, params)]
        steps, ppls = zip(*history, strict=True)
        ax.plot(steps, ppls, marker="o", label=label or r.run_id[:8], color=colour)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation perplexity")
    ax.set_title("Learning curves")
    _plain_axes(ax, log_y=True)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=9, title=param if numeric else None)
    fig.tight_layout()
    fig.savefig(out / "learning_curves.png", dpi=DPI)
    plt.close(fig)
    paths.append(out / "learning_curves.png")
    return paths


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


def _save(fig: Any, ax: Any, path: Path, xlabel: str, ylabel: str, title: str) -> Path:
    """Label the axes, add the legend when there is one, write the PNG and close the figure."""
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def plot_groups(
    records: list[RunRecord], groups: list[Group], swept: list[str], out: Path
) -> list[Path]:
    """final_ppl_groups.png (when the first non-seed swept key is a number) and
    learning_curves_groups.png, the groups in the order of that value."""
    import matplotlib

    matplotlib.use("Agg")

    keys = [k for k in swept if k != SEED_KEY]
    xs = {g.label: _number(g.values[keys[0]]) if keys else None for g in groups}
    numeric = bool(keys) and all(x is not None for x in xs.values())
    ordered = sorted(groups, key=lambda g: xs[g.label]) if numeric else groups
    paths = [_plot_group_means(ordered, xs, keys[0], out)] if numeric else []
    return [*paths, _plot_group_curves(records, ordered, keys, out)]


def _plot_group_means(
    groups: list[Group], xs: dict[str, float | None], key: str, out: Path
) -> Path:
    """Mean best valid and test perplexity against the swept value, with 95% error bars."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=FIGSIZE)
    for metric, style in (("best_valid_ppl", "s-"), ("test_ppl", "^:")):
        stats_ = [g.stat(metric) for g in groups]
        ax.errorbar(
            [xs[g.label] for g in groups], [st.mean for st in stats_],
            yerr=[0 if math.isnan(st.ci95) else st.ci95 for st in stats_],
            fmt=style, capsize=4, label=f"{metric} (mean, 95% interval)",
        )  # fmt: skip
    ax.grid(alpha=0.3)
    title = f"Final perplexity against {key}, over seeds"
    return _save(fig, ax, out / "final_ppl_groups.png", key, "perplexity", title)


def _plot_group_curves(
    records: list[RunRecord], groups: list[Group], keys: list[str], out: Path
) -> Path:
    """Each group's mean validation curve, with a band from its lowest to its highest run."""
    import matplotlib.pyplot as plt

    by_group: dict[str, list[RunRecord]] = {}
    for r in records:  # the same label as the group's, from the same values
        label = Group({k: r.params.get(k, "") for k in keys}).label
        by_group.setdefault(label, []).append(r)
    fig, ax = plt.subplots(figsize=FIGSIZE)
    colours = setting_colours([g.label for g in groups])
    for g in groups:
        curves = [dict(r.history.get("valid_ppl", [])) for r in by_group.get(g.label, [])]
        epochs = sorted(set().union(*curves)) if curves else []
        if not epochs:
            continue
        per_epoch = [[c[e] for c in curves if e in c and math.isfinite(c[e])] for e in epochs]
        colour = colours[g.label]
        mean = [sum(v) / len(v) if v else math.nan for v in per_epoch]
        ax.plot(epochs, mean, marker="o", color=colour, label=f"{g.label} (n={len(curves)})")
        low = [min(v) if v else math.nan for v in per_epoch]
        high = [max(v) if v else math.nan for v in per_epoch]
        ax.fill_between(epochs, low, high, color=colour, alpha=0.2)
    _plain_axes(ax, log_y=True)
    ylabel = "validation perplexity (mean; band: lowest to highest seed; log scale)"
    path = out / "learning_curves_groups.png"
    return _save(fig, ax, path, "epoch", ylabel, "Learning curves over seeds")


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
            f"{best['best_valid_ppl']:.2f}, test ppl {_fmt(best['test_ppl'])}.",
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
            "train_ppl": _last(record, "train_ppl"),
            "valid_ppl": _last(record, "valid_ppl"),
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
