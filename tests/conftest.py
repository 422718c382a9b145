"""Shared fixtures: the real PTB copy, and running the real entry points as subprocesses."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# In-process tests train tiny models: one thread each, as the subprocess runs get
# (trainer.threads=1 in TINY). Torch's default, a thread per core, only contends: for the two
# cores with each other, and with anything else the machine runs (3 minutes, not 10 seconds,
# for one bf16 test beside a training run).
torch.set_num_threads(1)

# The runs the tests start are to meet Ctrl-C as a user's terminal sends it. A shell that
# starts pytest in the background (CI may) leaves SIGINT ignored, which every child would
# inherit; with Python's handler here, each child starts with the default one instead.
signal.signal(signal.SIGINT, signal.default_int_handler)

REPO = Path(__file__).resolve().parents[1]
PTB_DIR = Path(os.environ.get("LMEXP_PTB_DIR", REPO.parent / "shared" / "data" / "ptb"))

# Fast, deterministic settings for end-to-end runs on the tiny corpus.
TINY = ["data=tiny", "model=tiny", "trainer.threads=1", "trainer.progress=false"]


def run_module(
    module: str, *args: str, cwd: Path, timeout: float = 300, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run `python -m module args...` in cwd, as a user would, and capture its output."""
    full_env = {**os.environ, "HYDRA_FULL_ERROR": "0", **(env or {})}
    full_env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_without_lmexp(
    script: str, *args: str, cwd: Path, scratch: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run a Python script where `import lmexp` fails, as on a machine without lmexp: a folder
    first on PYTHONPATH (in scratch) holds an lmexp package that raises ImportError."""
    blocker = scratch / "no_lmexp"
    (blocker / "lmexp").mkdir(parents=True, exist_ok=True)
    (blocker / "lmexp" / "__init__.py").write_text('raise ImportError("lmexp is not here")\n')
    (scratch / "script.py").write_text(script)
    full_env = {**os.environ, "PYTHONPATH": str(blocker), **(env or {})}
    return subprocess.run(
        [sys.executable, str(scratch / "script.py"), *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def expect_sweep_refused(proc: subprocess.CompletedProcess, sentence: str, cwd: Path) -> None:
    """A sweep stopped before any job: exit 2, the sentence, no traceback, no job line from
    Hydra's launcher, and no tracking store created in its folder."""
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    assert sentence in out, out[-3000:]
    assert "Traceback" not in out and "#0 :" not in out
    assert not (cwd / "mlflow.db").exists()


def mlflow_runs(db: Path, experiment: str = "lmexp") -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"experiment {experiment} missing in {db}"
    return client.search_runs([exp.experiment_id], "", max_results=1000)


def split_runs(db: Path) -> tuple[object, list]:
    """A sweep's parent run and its children, from a sqlite store that holds only that sweep."""
    runs = mlflow_runs(db)
    (parent,) = [r for r in runs if r.data.tags.get("lmexp.kind") == "sweep"]
    children = [r for r in runs if r is not parent]
    assert all(r.data.tags.get("mlflow.parentRunId") == parent.info.run_id for r in children)
    return parent, children


def metric_history(db: Path, run_id: str, key: str) -> list[tuple[int, float]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


@pytest.fixture
def ptb_dir() -> Path:
    if not all((PTB_DIR / f"ptb.{s}.txt").is_file() for s in ("train", "valid", "test")):
        pytest.skip(f"no PTB copy at {PTB_DIR}")
    return PTB_DIR


def text_folder(root: Path, names: dict[str, str], words: int = 3000, seed: int = 5) -> Path:
    """A folder of plain-text splits (from the tiny chain's words, 12 a line)."""
    root.mkdir(parents=True)
    from lmexp.data import tiny_corpus

    corpus = tiny_corpus(30, words, words // 5, seed)
    for split, name in names.items():
        tokens = [
            corpus.vocab[i] for i in corpus.split(split).tolist() if corpus.vocab[i] != "<eos>"
        ]
        lines = [" ".join(tokens[i : i + 12]) for i in range(0, len(tokens), 12)]
        (root / name).write_text("\n".join(lines) + "\n")
    return root


@contextlib.contextmanager
def read_only(path: Path):
    """`path` read-only for this user: chmod for a user, the immutable attribute for root (which
    writes through file modes), as for a store that belongs to someone else."""
    if os.geteuid() != 0:
        path.chmod(0o444)
        yield
        path.chmod(0o644)
        return
    if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i does not work here, and root writes to any file")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)
