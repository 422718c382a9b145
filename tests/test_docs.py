"""The documentation site: it builds strictly (a dead link fails it), and the console outputs
its pages show are what lmexp prints today: the sentences word for word, the tables' columns and
the files a report writes, with only ids, paths and numbers free."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest
from conftest import REPO, TINY, run_module

DOCS = REPO / "docs"


def console_blocks() -> list[tuple[str, list[str]]]:
    """(page, lines) of every ```console block in docs/."""
    blocks = []
    for page in sorted(DOCS.rglob("*.md")):
        for block in re.findall(r"```console\n(.*?)\n```", page.read_text(), re.S):
            blocks.append((page.relative_to(DOCS).as_posix(), block.splitlines()))
    return blocks


def pattern(line: str) -> re.Pattern:
    """A shown line as a pattern: run ids, sqlite paths, experiment numbers and timestamps free."""
    p = re.escape(line.removeprefix("[HYDRA] "))
    p = re.sub(r"[0-9a-f]{32}", "[0-9a-f]{32}", p)
    p = re.sub(r"sqlite:////\S+?/mlflow\\\.db", r"sqlite:////\\S+/mlflow\\.db", p)
    p = re.sub(r"experiments/\d+", r"experiments/\\d+", p)
    return re.compile(p)


def header(lines: list[str]) -> list[str]:
    """The column names of the runs table in some output."""
    return next(line.split() for line in lines if " run_id " in line and "status" in line)


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory):
    """A real sweep over dropout.dp_keep_prob on the tiny corpus, and its report."""
    cwd = tmp_path_factory.mktemp("sweep")
    sweep = run_module(
        "lmexp.train", "-m", *TINY, "trainer.max_epochs=2", "dropout.dp_keep_prob=0.5,0.9",
        "hydra.sweep.dir=multirun/s", cwd=cwd,
    )  # fmt: skip
    assert sweep.returncode == 0, sweep.stderr[-3000:]
    report = run_module("lmexp.report", "--sweep-dir", "multirun/s", "--out", "report-dp", cwd=cwd)
    assert report.returncode == 0, report.stderr[-3000:]
    return sweep.stdout + sweep.stderr, report.stdout + report.stderr


def test_the_site_builds_strictly_and_a_dead_link_fails_it(tmp_path):
    shutil.copytree(DOCS, tmp_path / "docs")
    shutil.copy(REPO / "mkdocs.yml", tmp_path)
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    build = [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", "mkdocs.yml", "-d", "site"]
    ok = subprocess.run(build, cwd=tmp_path, capture_output=True, text=True, env=env)
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert (tmp_path / "site" / "reference" / "configuration" / "index.html").is_file()
    with (tmp_path / "docs" / "sweeps.md").open("a") as page:
        page.write("\nSee [the old page](no-such-page.md) and [this](comparing.md#no-anchor).\n")
    dead = subprocess.run(build, cwd=tmp_path, capture_output=True, text=True, env=env)
    assert dead.returncode != 0
    assert "no-such-page.md" in dead.stderr and "#no-anchor" in dead.stderr, dead.stderr[-3000:]


def test_every_console_block_is_checked_here():
    """A console block added to the docs must be one the tests below know how to check (the
    failed-trials line by the real search that prints it, in tests/test_search.py, and the SLURM
    job lines by the real cluster sweep, in tests/test_cluster.py)."""
    known = {
        ("sweeps.md", "$ python -m lmexp.train -m dropout.dp_keep_prob=0.5,2.0"),
        ("sweeps.md", "$ python -m lmexp.train -m data.root=$PTB model=small trainer.max_epochs=3 \\"),
        ("searches.md", "$ python -m lmexp.train hparams_search=ptb_optuna 'lr_policy.lr=interval(2.0, 0.5)'"),
        ("searches.md", "$ python -m lmexp.train hparams_search=ptb_optuna 'model.hidden_size=interval(8, 32)'"),
        ("searches.md", "[HYDRA] 1 of 2 trials failed; the first, trial 1: diverged (its validation perplexity was not finite, or far worse than a uniform guess: its MLflow run says when); lower lr_policy.lr or trainer.max_grad_norm"),
        ("cluster.md", "[2026-11-29 05:38:40,964][HYDRA] Submitit 'slurm' sweep output dir : multirun/2026-11-29/05-38-39"),
        ("comparing.md", "[HYDRA] MLflow sweep parent run 38d7d957223d4cbe97158275751b0486 in sqlite:////tmp/rd/mlflow.db"),
    }  # fmt: skip
    assert {(page, lines[0]) for page, lines in console_blocks()} == known


REFUSED = [
    (page, lines)
    for page, lines in console_blocks()
    if lines[0].startswith("$ python -m lmexp.train") and "$PTB" not in lines[0]
]


@pytest.mark.parametrize(("page", "lines"), REFUSED, ids=[lines[0][2:60] for _, lines in REFUSED])
def test_a_refusal_shown_in_the_docs_is_what_the_command_prints(page, lines, tmp_path):
    command = shlex.split(lines[0].removeprefix("$ "))
    assert command[:3] == ["python", "-m", "lmexp.train"]
    result = run_module("lmexp.train", *command[3:], cwd=tmp_path)
    out = result.stdout + result.stderr
    assert result.returncode == 2, out[-3000:]
    for shown in lines[1:]:
        assert pattern(shown).search(out), f"{page} shows {shown!r}; the command printed:\n{out}"


def test_the_sweep_output_in_the_docs_has_the_columns_and_files_lmexp_prints(tiny_sweep):
    sweep_out, report_out = tiny_sweep
    (lines,) = [lines for page, lines in console_blocks() if "$PTB" in lines[0]]
    assert header(lines) == header(sweep_out.splitlines())
    wrote = next(line for line in lines if line.startswith("wrote "))
    real = next(line for line in report_out.splitlines() if line.startswith("wrote "))
    assert wrote == real
    for shown in lines:
        if shown.startswith("[HYDRA] MLflow sweep parent run"):
            assert pattern(shown).search(sweep_out), shown


def test_the_ui_link_in_the_docs_is_the_line_a_sweep_prints(tiny_sweep):
    sweep_out, _ = tiny_sweep
    (lines,) = [lines for page, lines in console_blocks() if page == "comparing.md"]
    for shown in lines:
        assert pattern(shown).search(sweep_out), f"comparing.md shows {shown!r}"
