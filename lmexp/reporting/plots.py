"""The plots that compare runs: final perplexity against the swept value, learning curves per
run and per seed group, each setting in the same colour wherever it is drawn."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from lmexp.reporting.stats import SEED_KEY, Group
from lmexp.reporting.tables import short, summarize
from lmexp.tracking.queries import RunRecord

FIGSIZE, DPI = (8, 5), 120  # 960 x 600 pixels


def number(value: str | None) -> float | None:
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def plain_axes(ax: Any, log_y: bool) -> None:
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
    values = {r.run_id: number(r.params.get(param)) if param else None for r in records}
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
    plain_axes(ax, log_y=True)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=9, title=param if numeric else None)
    fig.tight_layout()
    fig.savefig(out / "learning_curves.png", dpi=DPI)
    plt.close(fig)
    paths.append(out / "learning_curves.png")
    return paths


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
    xs = {g.label: number(g.values[keys[0]]) if keys else None for g in groups}
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
    plain_axes(ax, log_y=True)
    ylabel = "validation perplexity (mean; band: lowest to highest seed; log scale)"
    path = out / "learning_curves_groups.png"
    return _save(fig, ax, path, "epoch", ylabel, "Learning curves over seeds")
