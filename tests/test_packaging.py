"""conf/ ships inside the wheel: an installed (non-editable) lmexp runs from any folder."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import REPO

pytest.importorskip("setuptools")


@pytest.mark.slow
def test_installed_wheel_finds_its_configs_from_another_folder(tmp_path):
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(
        [
            *pip,
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path / "dist"),
            str(REPO),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = (tmp_path / "dist").glob("lmexp-*.whl")
    target = tmp_path / "site"
    subprocess.run(
        [*pip, "install", "--no-deps", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target)}
    args = ["data=tiny", "model=tiny", "logger=none", "trainer.max_epochs=1", "trainer.threads=1"]
    proc = subprocess.run(
        [sys.executable, "-m", "lmexp.train", *args, "hydra/launcher=slurm", "--cfg", "hydra"],
        cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "SlurmLauncher" in proc.stdout  # a nested config group shipped too
    proc = subprocess.run(
        [sys.executable, "-c", "import lmexp.config as c; print(c.conf_dir())"],
        cwd=elsewhere, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert proc.stdout.strip() == str(target / "lmexp" / "conf")
    proc = subprocess.run(
        [sys.executable, "-m", "lmexp.train", *args],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Test perplexity" in proc.stdout + proc.stderr
    # The Optuna sweeper is a Hydra plugin that Hydra's own scan of hydra_plugins finds.
    scan = (
        "from hydra.core.plugins import Plugins; from hydra.plugins.sweeper import Sweeper; "
        "print([c.__module__ + '.' + c.__name__ for c in Plugins.instance().discover(Sweeper)])"
    )
    proc = subprocess.run(
        [sys.executable, "-c", scan], cwd=elsewhere, env=env, capture_output=True, text=True
    )
    assert "lmexp_optuna_sweeper.optuna_sweeper.LmexpOptunaSweeper" in proc.stdout, proc.stderr


def test_every_entry_point_has_a_console_script():
    """Each module a user runs (`python -m lmexp.X`) is also an `lmexp-X` command."""
    import tomllib

    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    runnable = {
        p.stem
        for p in (REPO / "lmexp").glob("*.py")
        if 'if __name__ == "__main__":' in p.read_text()
    }
    assert runnable == {"train", "bench", "report", "evaluate", "generate", "adapt"}
    assert scripts == {f"lmexp-{name}": f"lmexp.{name}:main" for name in runnable}
