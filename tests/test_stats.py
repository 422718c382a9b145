"""Seed groups, their statistics and the verdict, checked against a hand computation."""

from __future__ import annotations

import math

import pytest

from lmexp.config import LmexpError
from lmexp.reporting.stats import Stat, check_comparable, group_runs, verdict, words_per_second

# Fast, in-process tests of the library: the unit lane (pytest -m unit).
pytestmark = pytest.mark.unit

T975 = {2: 4.302652729911275, 3: 3.182446305284263}  # Student's t, 97.5% quantile, by df


def run(keep: str, seed: int, valid: float, status: str = "FINISHED") -> dict:
    params = {"dropout.dp_keep_prob": keep, "trainer.seed": str(seed), "data.name": "ptb"}
    metrics = {"best_valid_ppl": valid, "test_ppl": valid - 4.0, "train_wps_mean": 1000.0}
    return {"params": params, "status": status, "metrics": metrics}


SWEPT = ["dropout.dp_keep_prob", "trainer.seed"]


def test_a_runs_speed_is_its_words_over_its_time_not_the_mean_of_its_epochs_rates():
    # The rates from issue 22: a slow long epoch, then two short fast ones.
    epochs = [(1_863.0, 100.0), (10_188.0, 10.0), (55_652.0, 1.0)]
    words = 1_863 * 100 + 10_188 * 10 + 55_652 * 1
    assert words_per_second(epochs) == pytest.approx(words / 111)  # 3,097, not 22,568
    assert math.isnan(words_per_second([])) and math.isnan(words_per_second([(5.0, 0.0)]))


def test_mean_std_and_interval_match_a_hand_computation():
    values = [110.0, 112.0, 117.0]
    mean = (110 + 112 + 117) / 3
    std = math.sqrt(((110 - mean) ** 2 + (112 - mean) ** 2 + (117 - mean) ** 2) / 2)
    s = Stat.of(values)
    assert (s.n, s.mean, s.std) == (3, pytest.approx(mean), pytest.approx(std))
    assert s.ci95 == pytest.approx(T975[2] * std / math.sqrt(3))
    one = Stat.of([100.0])
    assert one.n == 1 and one.mean == 100.0 and math.isnan(one.std) and math.isnan(one.ci95)


def test_groups_by_everything_but_the_seed_best_first_failures_counted():
    runs = [run("0.5", s, v) for s, v in ((1, 110), (2, 112), (3, 111))]
    runs += [run("0.9", s, v) for s, v in ((1, 120), (2, 119), (3, 121))]
    runs.append(run("0.9", 4, math.nan, status="FAILED"))
    groups = group_runs(runs, SWEPT)
    assert [g.label for g in groups] == ["dropout.dp_keep_prob=0.5", "dropout.dp_keep_prob=0.9"]
    assert [g.stat("best_valid_ppl").n for g in groups] == [3, 3]
    assert [g.failed for g in groups] == [0, 1]  # shown, not dropped


def test_welch_verdict_matches_a_hand_computation():
    a, b = [110.0, 112.0, 111.0], [120.0, 118.0, 122.0]  # unequal spreads: Welch differs
    runs = [run("0.5", i, v) for i, v in enumerate(a)] + [run("0.9", i, v) for i, v in enumerate(b)]
    judged = verdict(group_runs(runs, SWEPT))
    ma, mb = sum(a) / 3, sum(b) / 3
    va = sum((x - ma) ** 2 for x in a) / 2
    vb = sum((x - mb) ** 2 for x in b) / 2
    t = (mb - ma) / math.sqrt(va / 3 + vb / 3)
    df = (va / 3 + vb / 3) ** 2 / ((va / 3) ** 2 / 2 + (vb / 3) ** 2 / 2)
    from scipy import stats

    p = 2 * stats.t.sf(abs(t), df)
    assert judged.p_value == pytest.approx(p)
    assert judged.text.startswith(
        "dropout.dp_keep_prob=0.5 leads dropout.dp_keep_prob=0.9 by 9.00"
    )  # 120 - 111
    assert "larger than the noise" in judged.text


def test_a_small_difference_is_within_the_noise_and_too_few_seeds_cannot_be_judged():
    noisy = [run("0.5", i, v) for i, v in enumerate((110.0, 118.0, 114.0))]
    noisy += [run("0.9", i, v) for i, v in enumerate((113.0, 117.0, 115.0))]
    assert "within the noise" in verdict(group_runs(noisy, SWEPT)).text
    two = [run("0.5", 1, 110.0), run("0.5", 2, 111.0), run("0.9", 1, 120.0), run("0.9", 2, 121)]
    text = verdict(group_runs(two, SWEPT)).text
    assert text.endswith(
        "with 2 and 2 runs that cannot be judged (Welch's t-test needs at least 3 seeds per group)."
    )


def test_mixing_recipes_in_one_group_is_refused_with_the_keys():
    runs = [run("0.5", 1, 110.0), run("0.5", 2, 111.0)]
    runs[1]["params"]["data.name"] = "tiny"
    with pytest.raises(LmexpError, match=r"differ in data\.name, which the sweep did not vary"):
        check_comparable(runs, SWEPT, {"data.name", "dropout.dp_keep_prob"})


def test_a_swept_config_group_may_set_other_keys_but_each_group_must_not_mix_them():
    """experiment=transformer,examples_lstm: the groups differ in model.arch and lr (the preset
    sets them), which is the comparison; runs inside one group that differ are still refused."""
    swept = ["experiment", "trainer.seed"]
    runs = []
    for experiment, arch, lr in (("transformer", "transformer", "5.0"), ("lstm", "rnn", "20.0")):
        for seed in (0, 1, 2):
            r = run("0.8", seed, 110.0 + seed + (5 if arch == "rnn" else 0))
            r["params"].update({"experiment": experiment, "model.arch": arch, "lr_policy.lr": lr})
            runs.append(r)
    recipe = {"data.name", "model.arch", "lr_policy.lr", "dropout.dp_keep_prob"}
    check_comparable(runs, swept, recipe)
    assert [g.label for g in group_runs(runs, swept)] == [
        "experiment=transformer",
        "experiment=lstm",
    ]
    runs[4]["params"]["lr_policy.lr"] = "30.0"
    with pytest.raises(LmexpError, match=r"differ in lr_policy\.lr, which the sweep did not vary"):
        check_comparable(runs, swept, recipe)


def test_one_seed_per_group_gives_n_1_and_no_interval_not_an_error():
    groups = group_runs([run("0.5", 1, 110.0), run("0.9", 1, 120.0)], SWEPT)
    stat = groups[0].stat("best_valid_ppl")
    assert stat.n == 1 and math.isnan(stat.ci95)
    assert verdict(groups).text.endswith(
        "with 1 and 1 runs that cannot be judged (Welch's t-test needs at least 3 seeds per group)."
    )
