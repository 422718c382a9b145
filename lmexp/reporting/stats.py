"""Seeds and noise: a sweep's runs grouped by everything they sweep except the seed, each group's
mean, standard deviation and 95% confidence interval, and whether the best group's lead over the
runner-up is larger than the noise.

The interval is Student's t (n - 1 degrees of freedom) around the mean; the lead is judged by
Welch's t-test (two-sided, 5%), which does not assume the two groups vary alike: one setting of
dp_keep_prob can be noisier than another. With fewer than 3 runs in either group the verdict says
it cannot be judged rather than pretend (two points give an interval too wide to mean much, one
gives none).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

SEED_KEY = "trainer.seed"
METRICS = ("best_valid_ppl", "test_ppl", "train_wps_mean")
MIN_N = 3


def words_per_second(epochs: list[tuple[float, float]]) -> float:
    """A run's training speed from its epochs' (words/s, seconds): total words over total time.

    Not the mean of the epochs' rates, which a short fast epoch inflates (epochs at 1,863, 10,188
    and 55,652 words/s average to 22,568 while the run trained about 4,600 words a second)."""
    seconds = sum(t for _, t in epochs)
    return sum(r * t for r, t in epochs) / seconds if seconds > 0 else math.nan


@dataclass
class Stat:
    n: int
    mean: float
    std: float  # sample standard deviation (n - 1); nan for n = 1
    ci95: float  # half-width of the 95% interval; nan for n = 1

    @classmethod
    def of(cls, values: list[float]) -> Stat:
        from scipy import stats

        n = len(values)
        if n == 0:
            return cls(0, math.nan, math.nan, math.nan)
        mean = sum(values) / n
        if n == 1:
            return cls(1, mean, math.nan, math.nan)
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
        return cls(n, mean, std, float(stats.t.ppf(0.975, n - 1)) * std / math.sqrt(n))


@dataclass
class Group:
    """The runs that share every swept value but the seed."""

    values: dict[str, str]  # swept key -> value
    finished: list[dict[str, float]] = field(default_factory=list)  # each run's METRICS
    failed: int = 0  # runs that did not finish (FAILED, KILLED, still RUNNING)

    def stat(self, metric: str) -> Stat:
        return Stat.of([r[metric] for r in self.finished if math.isfinite(r[metric])])

    @property
    def label(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.values.items()) or "all runs"


def group_runs(runs: list[dict[str, Any]], swept: list[str]) -> list[Group]:
    """Group runs (dicts with params, status and METRICS) by the swept keys except the seed,
    in order of their mean best validation perplexity. Runs of one group that differ in any other
    recipe param (another dataset, say) are refused, naming the keys."""
    keys = [k for k in swept if k != SEED_KEY]
    groups: dict[tuple[str, ...], Group] = {}
    for run in runs:
        values = group_values(run, keys)
        group = groups.setdefault(tuple(values.values()), Group(values))
        if run["status"] == "FINISHED":
            group.finished.append({m: run["metrics"].get(m, math.nan) for m in METRICS})
        else:
            group.failed += 1
    return sorted(groups.values(), key=lambda g: _sort_key(g.stat("best_valid_ppl").mean))


def group_values(run: dict[str, Any], keys: list[str]) -> dict[str, str]:
    """The run's value of each swept key but the seed: what puts it in its group."""
    return {k: run["params"].get(k, "") for k in keys}


def _sort_key(mean: float) -> float:
    return mean if math.isfinite(mean) else math.inf


def check_comparable(runs: list[dict[str, Any]], swept: list[str], recipe: set[str]) -> None:
    """Refuse a group whose runs differ in a recipe key the sweep did not vary. Groups may differ
    from each other in such keys: a swept config group (experiment=a,b) sets many at once."""
    from lmexp.config import LmexpError

    keys = [k for k in swept if k != SEED_KEY]
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault(tuple(group_values(run, keys).values()), []).append(run)
    differing = sorted(
        k
        for members in groups.values()
        for k in recipe - set(swept)
        if len({run["params"].get(k) for run in members if k in run["params"]}) > 1
    )
    if differing:
        raise LmexpError(
            f"These runs differ in {', '.join(dict.fromkeys(differing))}, which the sweep did "
            "not vary: grouping them by seed would mix experiments; report them separately."
        )


@dataclass
class Verdict:
    best: str
    runner_up: str | None
    p_value: float
    text: str


def verdict(groups: list[Group], metric: str = "best_valid_ppl") -> Verdict | None:
    """Is the best group's lead over the runner-up larger than the noise (Welch, 5%)?"""
    ranked = [g for g in groups if g.stat(metric).n > 0]
    if not ranked:
        return None
    best = ranked[0]
    if len(ranked) == 1:
        return Verdict(best.label, None, math.nan, f"{best.label} is the only group.")
    second = ranked[1]
    a, b = best.stat(metric), second.stat(metric)
    lead = b.mean - a.mean
    head = f"{best.label} leads {second.label} by {lead:.2f} in mean {metric}"
    if min(a.n, b.n) < MIN_N:
        return Verdict(
            best.label,
            second.label,
            math.nan,
            f"{head}; with {a.n} and {b.n} runs that cannot be judged (Welch's t-test needs "
            f"at least {MIN_N} seeds per group).",
        )
    from scipy import stats

    values = [[r[metric] for r in g.finished if math.isfinite(r[metric])] for g in (best, second)]
    p = float(stats.ttest_ind(values[0], values[1], equal_var=False).pvalue)
    judged = "larger than the noise" if p < 0.05 else "within the noise"
    return Verdict(best.label, second.label, p, f"{head}: {judged} (Welch's t-test, p = {p:.3g}).")
