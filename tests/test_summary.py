"""Run summaries, tables and plots built from run records (lmexp.reporting), in-process."""

from __future__ import annotations

import pytest

from lmexp.reporting.tables import build_table, summarize
from lmexp.tracking.queries import RunRecord

# Fast, in-process tests of the library: the unit lane (pytest -m unit).
pytestmark = pytest.mark.unit


def record(history: dict, metrics: dict | None = None) -> RunRecord:
    return RunRecord("r1", "run", "FINISHED", {}, metrics or {}, {}, history)


def test_a_runs_speed_comes_from_its_epochs_words_and_time():
    # An old run's train_wps_mean metric was the mean of its epochs' rates (22,568 here); the
    # summary recomputes total words over total time from the epochs whenever it has them.
    history = {
        "train_wps": [(1, 1_863.0), (2, 10_188.0), (3, 55_652.0)],
        "epoch_time_s": [(1, 100.0), (2, 10.0), (3, 1.0)],
        "valid_ppl": [(1, 300.0), (2, 200.0), (3, 150.0)],
    }
    summary = summarize(record(history, {"train_wps_mean": 22_567.7}))
    words = 1_863 * 100 + 10_188 * 10 + 55_652
    assert summary["train_wps_mean"] == pytest.approx(words / 111)
    assert summary["epochs"] == 3 and summary["valid_ppl"] == 150.0


def test_without_epoch_times_the_logged_speed_stands():
    history = {"train_wps": [(1, 1_000.0), (2, 3_000.0)]}
    assert summarize(record(history, {"train_wps_mean": 1_500.0}))["train_wps_mean"] == 1_500.0


def test_the_table_ranks_runs_by_best_validation_perplexity_the_searchs_objective():
    # b's last epoch is worse than a's, but its best epoch is better: b is the best run, as
    # the study (best valid ppl) and the parent's best_run_id have it.
    a = record({"valid_ppl": [(1, 130.0), (2, 120.0)]}, {"best_valid_ppl": 120.0})
    b = record({"valid_ppl": [(1, 110.0), (2, 125.0)]}, {"best_valid_ppl": 110.0})
    a.run_id, b.run_id = "a", "b"
    dead = record({"valid_ppl": [(1, 100.0)]})
    dead.run_id, dead.status = "dead", "KILLED"
    columns, rows = build_table([a, dead, b])
    assert [r["run_id"] for r in rows] == ["b", "a", "dead"]
    assert columns.index("best_valid_ppl") == columns.index("valid_ppl") + 1


def test_a_large_sweeps_description_fits_mlflows_limit_and_names_the_full_table():
    """196 runs made a description of 38,212 characters, which MLflow cut at 8,000 (the table
    lost). It keeps the best rows that fit, says how many, and where the rest are."""
    from lmexp.reporting.summary import NOTE_LIMIT, fitted_note

    records = []
    for i in range(196):
        r = record({"valid_ppl": [(1, 200.0 - i / 10)]}, {"best_valid_ppl": 200.0 - i / 10})
        r.run_id, r.run_name, r.experiment_id = f"{i:032x}", f"dp_keep_prob={i / 196:.4f}", "1"
        r.params = {"dropout.dp_keep_prob": f"{i / 196:.4f}"}
        records.append(r)
    best = summarize(records[-1])
    note = fitted_note(records, ["dropout.dp_keep_prob"], best, "FINISHED", "\n\n**Over seeds**")
    assert len(note) <= NOTE_LIMIT < 8_000
    shown = [line for line in note.splitlines() if line.startswith("| dp_keep_prob=")]
    assert 5 <= len(shown) < 196 and shown[0].startswith(f"| {records[-1].run_name} |")
    assert (
        f"The best {len(shown)} of 196 runs; all of them are in this run's artifact runs.md."
        in note
    )
    assert note.endswith("**Over seeds**")  # the groups part kept whole
    small = fitted_note(records[:3], ["dropout.dp_keep_prob"], None, "FINISHED")
    assert "The best" not in small and small.count("| dp_keep_prob=") == 3


def test_a_log_perplexity_axis_says_it_is_one():
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    from lmexp.reporting.plots import plain_axes

    fig, ax = plt.subplots()
    ax.set_ylabel("validation perplexity")
    plain_axes(ax, log_y=True)
    assert (ax.get_yscale(), ax.get_ylabel()) == ("log", "validation perplexity (log scale)")
    plt.close(fig)


def _keep_run(keep: str, seed: int) -> RunRecord:
    curve = [(e, 200.0 - 10 * e - 40 * float(keep)) for e in range(1, 4)]
    params = {"dropout.dp_keep_prob": keep, "trainer.seed": str(seed)}
    return RunRecord(
        f"{keep}-{seed}", f"keep {keep}", "FINISHED", params, {}, {}, {"valid_ppl": curve}
    )


def _has_colour(png, colour) -> bool:
    import matplotlib.image
    import numpy as np

    pixels = matplotlib.image.imread(png)[..., :3]
    return bool((np.abs(pixels - np.array(colour)).max(axis=-1) < 1.5 / 255).any())


def test_a_setting_has_the_same_colour_in_every_report_that_plots_it(tmp_path):
    """A sweep's report (its three values) and the all-experiments report (those runs among
    others) draw dp_keep_prob=0.5 in one colour, not a colour taken from its rank in each."""
    from lmexp.reporting.plots import plot, setting_colours

    sweep = [_keep_run(k, 0) for k in ("0.5", "0.7", "0.9")]
    everything = [_keep_run(k, 0) for k in ("0.3", "0.4")] + sweep
    key = ["dropout.dp_keep_prob"]
    plot(sweep, key, tmp_path / "sweep")
    plot(everything, key, tmp_path / "all")
    colours = setting_colours(
        [f"dropout.dp_keep_prob={k}" for k in ("0.3", "0.4", "0.5", "0.7", "0.9")]
    )
    for keep in ("0.5", "0.7", "0.9"):
        colour = colours[f"dropout.dp_keep_prob={keep}"]
        for folder in ("sweep", "all"):
            assert _has_colour(tmp_path / folder / "learning_curves.png", colour), (keep, folder)
    assert len({tuple(c) for c in colours.values()}) == 5  # one plot, five colours
