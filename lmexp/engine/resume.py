"""Where a run starts: afresh, from its own last checkpoint, from a checkpoint given as
trainer.ckpt_path, or from the weights of an exported model.pt; and which settings must agree."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lmexp.config import BOOKKEEPING, EXECUTION, SHAPE, TrainerConfig, flatten, keys_with_role
from lmexp.engine import checkpoint

# Derived from the schema's roles (config.py): the keys any checkpoint must agree on, and those
# a run may change when it continues in its own folder.
SHAPE_KEYS = frozenset(keys_with_role(SHAPE))
FREE_ON_RESUME = frozenset(keys_with_role(EXECUTION) | keys_with_role(BOOKKEEPING))
EXECUTION_KEYS = frozenset(keys_with_role(EXECUTION))
# In a run folder: the tracking run its first attempt opened, so that a rerun that finds no
# checkpoint (killed before its first) continues that run instead of leaving it orphaned.
RUN_FILE = "tracking_run.json"


def remember_run(output_dir: Path, run_id: str, store: str) -> None:
    (output_dir / RUN_FILE).write_text(json.dumps({"run_id": run_id, "store": store}))


def remembered_run(output_dir: Path, store: str) -> str | None:
    """The run an earlier attempt in this folder opened in this store (store: redacted URI)."""
    try:
        record = json.loads((output_dir / RUN_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("store") != store:
        return None
    return str(record["run_id"]) if record.get("run_id") else None


def changed_on_resume(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, tuple]:
    """The execution settings a resumed run changed (trainer.max_epochs raised, threads,
    precision): allowed, and recorded, since the run's params still show the first values."""
    old, new = flatten(saved), flatten(current)
    return {
        k: (old[k], new[k])
        for k in sorted(EXECUTION_KEYS & old.keys() & new.keys())
        if old[k] != new[k]
    }


def is_exported_model(state: dict[str, Any]) -> bool:
    """An exported model (model.pt with config.json and vocab.json beside it) holds weights,
    config and vocabulary but no training position."""
    return "history" not in state and "model" in state


def find_resume(
    trainer: TrainerConfig, ckpt_dir: Path, resolved: dict[str, Any], vocab: list[str]
) -> dict[str, Any] | None:
    """The verified checkpoint to start from, or None for a fresh start.

    A run's own last.pt continues it, its MLflow run too (its settings must match). Otherwise
    trainer.ckpt_path names where a new run starts: another run's checkpoint, whose position,
    weights and history it continues as a run of its own (`state["fork"]`: the other run and
    its MLflow run are left as they are), or an exported model.pt, whose weights start it
    (`state["init_only"]`). Once this run has its own last.pt, a rerun continues from that.
    """
    own = ckpt_dir / "last.pt"
    given = Path(trainer.ckpt_path).expanduser() if trainer.ckpt_path else None
    if trainer.resume and own.exists():
        path, same_run = own, True
        state = checkpoint.load(path)
    elif given is not None:
        path, same_run = given, given.resolve() == own.resolve()
        state = checkpoint.load_any(path)
        if is_exported_model(state):
            return _initial_weights(path, state, vocab)
        state["fork"] = not same_run
    else:
        return None
    check_same_experiment(path, flatten(state.get("config", {})), flatten(resolved), same_run)
    if "vocab" in state and state["vocab"] != vocab:
        # data.root is a location for PTB, but for data=text it chooses the corpus itself.
        raise checkpoint.CheckpointError(
            f"{path} was trained on another vocabulary than this run's data; resume it on the "
            "corpus it was trained on (data.name, data.root), or start a new run."
        )
    state["path"] = str(path)
    return state


def _initial_weights(path: Path, state: dict[str, Any], vocab: list[str]) -> dict[str, Any]:
    if state.get("vocab") != vocab:
        raise checkpoint.CheckpointError(
            f"{path} was trained on another vocabulary than this run's data; start from a model "
            "trained on the same corpus (data.name, data.root) or leave trainer.ckpt_path unset."
        )
    return {"model": state["model"], "path": str(path), "init_only": True}


def check_same_experiment(
    path: Path, saved: dict[str, Any], current: dict[str, Any], same_run: bool
) -> None:
    """Refuse a checkpoint whose settings differ where continuing it would mix two experiments."""
    for key in sorted(current):
        if key not in saved or saved[key] == current[key]:
            continue
        if key in SHAPE_KEYS:
            raise checkpoint.CheckpointError(
                f"{path} was trained with {key}={saved[key]!r} but the config has "
                f"{current[key]!r}; resume with the same settings or start a new run."
            )
        if same_run and key not in FREE_ON_RESUME:
            raise checkpoint.CheckpointError(
                f"{path} belongs to a run with {key}={saved[key]!r}, not {current[key]!r}: this "
                "folder holds another experiment; give this one its own hydra.run.dir (or "
                "hydra.sweep.dir), or rerun that one with its own settings."
            )
