"""Readable run names, set explicitly (never MLflow's random ones): a sweep's child by the values
it sweeps, a single run by its recipe and overrides, a sweep's parent by what it sweeps."""

from __future__ import annotations

from lmexp.config import BOOKKEEPING, EXECUTION, keys_with_role

# Overrides that say how or where a run ran, not what it is: left out of its name.
_NOT_NAMED = keys_with_role(BOOKKEEPING) | keys_with_role(EXECUTION) - {"trainer.max_epochs"}
MAX_VALUE_CHARS = 8
MAX_NAME_CHARS = 80


def short_keys(keys: list[str]) -> dict[str, str]:
    """Each key by its last part (dp_keep_prob), or in full where two share a last part."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last, strict=True)}


def short_value(value: str) -> tuple[str, bool]:
    """A value as typed when short; a long number (an Optuna sample) to 4 significant digits.
    Returns the text and whether it was shortened (then two values may print alike)."""
    if len(value) <= MAX_VALUE_CHARS:
        return value, False
    try:
        return f"{float(value):.4g}", True
    except ValueError:
        return value[: MAX_VALUE_CHARS - 1] + "…", True


def _values(overrides: list[str]) -> dict[str, str]:
    pairs = (o.lstrip("+~").split("=", 1) for o in overrides if "=" in o)
    return {key: value for key, value in pairs}


def child_name(swept: list[str], overrides: list[str], job_num: int | None) -> str:
    """`dp_keep_prob=0.7`, several keys joined by ', '; values that had to be shortened get the
    job number (` #3`), so that names stay unique within the sweep."""
    values, short = _values(overrides), short_keys(swept)
    parts, shortened = [], False
    for key in swept:
        text, cut = short_value(values.get(key, "?"))
        shortened |= cut
        parts.append(f"{short[key]}={text}")
    name = ", ".join(parts) or "job"
    return f"{name} #{job_num}" if shortened or not parts else name


def single_name(recipe: str, overrides: list[str], folder: str) -> str:
    """`small dp_keep_prob=0.8 lr_policy=plateau (16-39-15)`: the recipe, what the command
    changed, and its run folder, so that two runs of one command have names of their own."""
    values = _values(overrides)
    named = [
        k for k in values if k not in _NOT_NAMED and k != "model" and not k.startswith("hydra")
    ]
    short = short_keys(named)
    parts = [recipe, *(f"{short[k]}={short_value(values[k])[0]}" for k in named)]
    name, end = " ".join(parts), f" ({folder})"
    room = MAX_NAME_CHARS - len(end)
    return (name if len(name) <= room else name[: room - 1] + "…") + end


def parent_name(swept: list[str], folder: str) -> str:
    """`sweep dp_keep_prob (02-39-35)`: what the sweep varies and its folder."""
    keys = ", ".join(short_keys(swept).values()) or "nothing"
    return f"sweep {keys} ({folder})"
