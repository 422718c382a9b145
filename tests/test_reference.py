"""The generated configuration reference (docs/reference/configuration.md) is current and
complete: every schema key and every config choice has a description."""

from __future__ import annotations

import copy
import importlib.util
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest

from lmexp.config import ModelConfig, TrainConfig, conf_dir, schema_fields

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "config_reference.py"


def _reference():
    spec = importlib.util.spec_from_file_location("config_reference", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_committed_reference_is_what_the_schema_and_conf_give():
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--check"], capture_output=True, text=True, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.unit
def test_every_key_is_in_the_reference_with_its_default_and_role():
    page = (ROOT / "docs" / "reference" / "configuration.md").read_text()
    for key, f in schema_fields(TrainConfig).items():
        row = next((line for line in page.splitlines() if line.startswith(f"| `{key}` |")), None)
        assert row is not None, key
        assert f"| {f.metadata['role']} |" in row, (key, row)


@pytest.mark.unit
def test_a_key_without_a_description_stops_the_reference(monkeypatch):
    ref = _reference()
    undescribed = copy.copy(ModelConfig.__dataclass_fields__["hidden_size"])
    undescribed.metadata = types.MappingProxyType({"role": "shape"})  # no help
    monkeypatch.setitem(ModelConfig.__dataclass_fields__, "hidden_size", undescribed)
    with pytest.raises(ref.MissingDescription, match=r"model\.hidden_size has no description"):
        ref.render()


@pytest.mark.unit
def test_a_config_choice_without_a_description_stops_the_reference(tmp_path):
    ref = _reference()
    conf = tmp_path / "conf"
    shutil.copytree(conf_dir(), conf)
    path = conf / "lr_policy" / "constant.yaml"
    path.write_text("kind: constant\n")
    with pytest.raises(ref.MissingDescription, match=r"lr_policy/constant.yaml has no description"):
        ref.group_rows(conf)
    assert ("lr_policy", "zaremba") in {(g, c) for g, c, _ in ref.group_rows(conf_dir())}


def _catalogue(root: Path | None = None):
    spec = importlib.util.spec_from_file_location(
        "error_catalogue", ROOT / "scripts" / "error_catalogue.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if root is not None:
        module.ROOT, module.PAGE = root, root / "docs" / "troubleshooting.md"
    return module


def test_the_troubleshooting_page_lists_every_error_the_code_raises():
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "error_catalogue.py"), "--check"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.unit
def test_an_error_added_to_the_code_but_not_to_the_page_fails_the_check(tmp_path, capsys):
    shutil.copytree(
        ROOT / "lmexp", tmp_path / "lmexp", ignore=shutil.ignore_patterns("__pycache__")
    )
    (tmp_path / "docs").mkdir()
    shutil.copy(ROOT / "docs" / "troubleshooting.md", tmp_path / "docs")
    catalogue = _catalogue(tmp_path)
    assert catalogue.main(["--check"]) == 0  # the copy is current
    (tmp_path / "lmexp" / "data" / "extra.py").write_text(
        "from lmexp.data.corpus import DataError\n\n\n"
        "def check(path):\n"
        '    raise DataError(f"{path} is gone; restore it from the archive.")\n'
    )
    data = catalogue.render().split("### Data\n", 1)[1].split("\n### ", 1)[0]
    assert "- ‹path› is gone; restore it from the archive." in data
    assert catalogue.main(["--check"]) == 1
    assert "does not list the errors the code raises" in capsys.readouterr().err
