"""Loading a trained model for evaluate and generate: from a checkpoint, an exported model.pt or
an MLflow run id, onto a device this machine has; and the command-line arguments that name one."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import torch

from lmexp.config import DataConfig, LmexpError
from lmexp.data import load_corpus
from lmexp.engine import checkpoint


def check_device(device: str) -> None:
    """Refuse a --device this machine lacks before loading (torch.load would blame the file)."""
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise LmexpError(f"--device {device} is not a device; use cpu, cuda or cuda:N.") from None
    index, count = parsed.index or 0, torch.cuda.device_count()
    if parsed.type == "cuda" and count == 0:
        raise LmexpError(
            f"--device {device} needs a visible CUDA device, but this machine has none; "
            "use --device cpu."
        )
    if parsed.type == "cuda" and index >= count:
        raise LmexpError(
            f"--device {device} needs CUDA device {index}, but only cuda:0 to cuda:{count - 1} "
            "are visible; pick one of those or use --device cpu."
        )


def resolve_model(
    source: str, tracking_uri: str | None, device: str
) -> tuple[Any, list[str], dict[str, Any]]:
    """Load MODEL: an existing file, else an MLflow run id in the tracking store."""
    check_device(device)
    path = Path(source)
    if path.is_file():
        return checkpoint.load_model(path, device)
    if path.is_dir():
        raise LmexpError(
            f"{source} is a folder; pass the model.pt (or checkpoint) inside it, or an MLflow "
            "run id."
        )
    if path.suffix or "/" in source:
        raise LmexpError(
            f"{source} does not exist; pass a model.pt or checkpoint path, or an MLflow run id."
        )
    from lmexp.tracking.queries import download_model
    from lmexp.tracking.stores import check_store, resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri, Path.cwd())
    check_store(uri, read_only=True)
    with tempfile.TemporaryDirectory() as tmp:
        return checkpoint.load_model(download_model(uri, source, Path(tmp)), device)


def positive_int(text: str) -> int:
    """argparse type for counts: 0 would otherwise fall back to the default unnoticed."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not {text!r}")
    return value


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="model.pt / checkpoint path, or an MLflow run id")
    parser.add_argument("--tracking-uri", help="store holding the run (default: as lmexp.train)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")


def split_tokens(
    config: dict[str, Any], split: str, data_root: str | None, vocab: list[str]
) -> tuple[torch.Tensor, str]:
    """A split of the corpus the model was trained on (from `data_root` if given), as token ids
    in the model's vocabulary, and its label ("ptb test")."""
    data_cfg = DataConfig(**{**config["data"], **({"root": data_root} if data_root else {})})
    corpus = load_corpus(data_cfg)
    if corpus.vocab != vocab:
        raise LmexpError(
            "The corpus's vocabulary differs from the model's; pass the corpus folder it was trained on "
            "(lmexp.evaluate --data-root, lmexp.adapt data_root=)."
        )
    return corpus.split(split), f"{data_cfg.name} {split}"
