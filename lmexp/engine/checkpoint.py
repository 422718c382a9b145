"""Atomic checkpoint writes and safe loads; the exported model's standard format.

A checkpoint file is a short header (magic line, SHA-256 of the payload) followed by the payload
`torch.save` wrote. Loading checks the header and the digest before unpickling, so a truncated,
altered or foreign file is refused with one line naming it, and unpickles with
`weights_only=True`, so a file crafted to run code is refused too. Only tensors and plain data
(dicts, lists, numbers, strings) are stored; the vocabulary is a list of strings.

An exported model is a folder anyone can read without lmexp: model.pt is a plain state_dict
(`torch.load(path, weights_only=True)`), config.json the resolved config, vocab.json the words
(index = token id).
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import random
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmexp.config import DropoutConfig, LmexpError, ModelConfig, first_line
from lmexp.files import atomic_write_bytes
from lmexp.models import MODELS, LanguageModel, build_model
from lmexp.models.rnn import CELLS

MAGIC = b"LMEXP-CHECKPOINT v1\n"
FORMAT = "lmexp-checkpoint"
# How torch's weights-only unpickler names a refused global ("GLOBAL posix.system whose module
# posix is blocked", "Unsupported global: GLOBAL collections.OrderedDict was not an allowed ...").
UNSAFE_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


class CheckpointError(LmexpError):
    """A checkpoint file is missing, corrupt, foreign or incompatible."""


def save(path: Path, payload: dict[str, Any]) -> None:
    """Write payload atomically: a kill mid-write leaves the previous file intact."""
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, **payload}, buffer)
    body = buffer.getvalue()
    digest = hashlib.sha256(body).hexdigest().encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, MAGIC + digest + b"\n" + body)


def load(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Verify and load a checkpoint; raise CheckpointError saying what is wrong with which file."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(
            f"Checkpoint {path} is a folder; pass a file in it (checkpoints/last.pt or best.pt, "
            "or model/model.pt)."
        )
    if not path.is_file():
        raise CheckpointError(f"Checkpoint {path} does not exist; check trainer.ckpt_path.")
    raw = path.read_bytes()
    if not raw.startswith(MAGIC):
        raise CheckpointError(
            f"{path} is not an lmexp checkpoint (no lmexp header); pass a checkpoint written by "
            "lmexp.train (checkpoints/last.pt or best.pt)."
        )
    header_end = len(MAGIC) + 65
    digest, body = raw[len(MAGIC) : header_end - 1], raw[header_end:]
    if hashlib.sha256(body).hexdigest().encode() != digest:
        raise CheckpointError(
            f"{path} is corrupt (its checksum does not match: truncated or altered); resume from "
            "another checkpoint, e.g. checkpoints/best.pt, or start afresh."
        )
    obj = _torch_load(io.BytesIO(body), path, map_location)
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an lmexp checkpoint (unexpected contents).")
    return obj


def _torch_load(source: Any, path: Path, map_location: str | torch.device) -> Any:
    """torch.load with weights_only=True; a refusal becomes one sentence naming path."""
    try:
        return torch.load(source, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as err:
        # torch's text advises retrying with weights_only=False, i.e. running the code just
        # refused: pass on only the global it names, never the text.
        found = UNSAFE_GLOBAL.search(str(err))
        detail = f" (it would import {found.group(1)})" if found else ""
        raise CheckpointError(
            f"{path} was refused: it holds something other than tensors and plain data{detail}; "
            "pass a checkpoint or model.pt written by lmexp.train."
        ) from err


def export(
    folder: Path, state_dict: dict[str, torch.Tensor], config: dict, vocab: list[str]
) -> None:
    """Write the standard format: model.pt (a plain state_dict on the CPU), config.json, vocab.json."""
    folder.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in state_dict.items()}, buffer)
    atomic_write_bytes(folder / "model.pt", buffer.getvalue())
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "vocab.json").write_text(json.dumps(vocab))


def load_any(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A checkpoint, or an exported model.pt with the config.json and vocab.json beside it: either
    way a dict holding "model" (the state_dict), "config" and "vocab"."""
    path = Path(path)
    if path.is_file():
        with open(path, "rb") as f:
            headered = f.read(len(MAGIC)) == MAGIC
        if not headered:
            return _load_exported(path, map_location)
    return load(path, map_location)  # a missing file gets load's sentence


def _load_exported(path: Path, map_location: str | torch.device) -> dict[str, Any]:
    weights = _torch_load(path, path, map_location) if zipfile.is_zipfile(path) else None
    if not isinstance(weights, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in weights.items()
    ):
        raise CheckpointError(
            f"{path} is not an lmexp checkpoint or an exported model.pt (a state_dict of "
            "tensors); pass a checkpoint or model/model.pt written by lmexp.train."
        )
    state: dict[str, Any] = {"model": weights}
    for key in ("config", "vocab"):
        beside = path.with_name(f"{key}.json")
        if not beside.is_file():
            raise CheckpointError(
                f"{beside} is missing: an exported model.pt needs the {key}.json lmexp.train "
                "wrote beside it; copy the whole model/ folder."
            )
        try:
            state[key] = json.loads(beside.read_text())
        except (ValueError, UnicodeDecodeError) as err:
            raise CheckpointError(
                f"{beside} is not valid JSON ({first_line(err)}); copy it again from the "
                "model/ folder lmexp.train wrote."
            ) from None
    return state


def rng_state() -> dict[str, Any]:
    """Python, NumPy, torch CPU and CUDA generator states, as plain data and tensors."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def load_model(
    path: Path, device: str | torch.device = "cpu"
) -> tuple[LanguageModel, list[str], dict[str, Any]]:
    """Rebuild a trained model from an lmexp checkpoint or an exported model.pt (safely loaded).

    Returns the model in eval mode, its vocabulary and the resolved config it was trained with.
    """
    state = load_any(path, map_location=device)
    missing = [k for k in ("model", "vocab", "config") if k not in state]
    if missing:
        raise CheckpointError(
            f"{path} has no {', '.join(missing)}; pass a checkpoint or model.pt written by lmexp."
        )
    config, vocab = state["config"], state["vocab"]
    if not isinstance(vocab, list) or not all(isinstance(w, str) for w in vocab):
        raise CheckpointError(
            f"{path}: its vocabulary is not a list of words; pass a model written by "
            "lmexp.train, with its own vocab.json."
        )
    model_cfg = config.get("model") if isinstance(config, dict) else None
    # configs from before GRU had no cell (an LSTM), from before the Transformer no arch (rnn)
    for key, choices, default in (("arch", MODELS, "rnn"), ("cell", CELLS, "lstm")):
        value = model_cfg.get(key, default) if isinstance(model_cfg, dict) else default
        if value not in choices:
            raise CheckpointError(
                f"{path}: its config's model.{key}={value!r} is not one of "
                f"{', '.join(choices)}; pass a model written by lmexp.train, with its own "
                "config.json."
            )
    try:
        model = build_model(
            ModelConfig(**config["model"]), DropoutConfig(**config["dropout"]), len(vocab)
        )
    except (TypeError, ValueError, KeyError, AttributeError) as err:
        # A hand-edited config.json: a key missing or unknown, a number written as text.
        raise CheckpointError(
            f"{path}: its config does not describe an lmexp model ({type(err).__name__}: "
            f"{first_line(err)}); pass a model written by lmexp.train, with its own config.json."
        ) from None
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:
        raise CheckpointError(
            f"{path}: weights do not fit its own config ({state_dict_mismatch(err)})."
        ) from err
    return model.to(device).eval(), vocab, config


def state_dict_mismatch(err: RuntimeError, limit: int = 3) -> str:
    """torch's load_state_dict error without its header line: which tensors are missing,
    unexpected or of another shape (the first `limit` of them, and how many more)."""
    lines = [ln.strip() for ln in str(err).splitlines()[1:] if ln.strip()]
    if not lines:
        return first_line(err)
    more = f"; and {len(lines) - limit} more" if len(lines) > limit else ""
    return "; ".join(ln.rstrip(".") for ln in lines[:limit]) + more
