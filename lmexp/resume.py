"""Where a run starts: afresh, from its own last checkpoint, from a checkpoint given as
trainer.ckpt_path, or from the weights of an exported model.pt; and which settings must agree."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmexp import checkpoint
from lmexp.config import BOOKKEEPING, EXECUTION, SHAPE, TrainerConfig, flatten, keys_with_role

# Derived from the schema's roles (config.py): the keys any checkpoint must agree on, and those
# a run may change when it continues in its own folder.
SHAPE_KEYS = frozenset(keys_with_role(SHAPE))
FREE_ON_RESUME = frozenset(keys_with_role(EXECUTION) | keys_with_role(BOOKKEEPING))


def is_exported_model(state: dict[str, Any]) -> bool:
    """An exported model (model.pt with config.json and vocab.json beside it) holds weights,
    config and vocabulary but no training position."""
    return "history" not in state and "model" in state


def find_resume(
    trainer: TrainerConfig, ckpt_dir: Path, resolved: dict[str, Any], vocab: list[str]
) -> dict[str, Any] | None:
    """The verified checkpoint to start from, or None for a fresh start.

    trainer.ckpt_path names a checkpoint to continue (its settings must match) or an exported
    model.pt whose weights start a new run (`state["init_only"]`); once this run has its own
    last.pt, a rerun continues from that instead of starting over from the exported weights.
    """
    own = ckpt_dir / "last.pt"
    if trainer.ckpt_path:
        path, same_run = Path(trainer.ckpt_path).expanduser(), False
        state = checkpoint.load_any(path)
        if is_exported_model(state):
            if trainer.resume and own.exists():
                path, same_run, state = own, True, checkpoint.load(own)
            else:
                return _initial_weights(path, state, vocab)
    elif trainer.resume and own.exists():
        path, same_run = own, True
        state = checkpoint.load(path)
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
