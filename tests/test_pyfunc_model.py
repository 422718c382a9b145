"""The served model's code: lmexp's own models, shipped with the logged model, standing alone."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lmexp.models import MODELS
from lmexp.tracking import pyfunc_model
from lmexp.tracking.runs import model_code

# Fast, in-process tests of the library: the unit lane (pytest -m unit).
pytestmark = pytest.mark.unit

# Run with nothing but the shipped package on the path (python -I: no site-packages of the
# user's, no PYTHONPATH): it must build every architecture and import nothing but torch.
STANDALONE = """
import sys
from lmexp.config import DropoutConfig, ModelConfig
from lmexp.models import MODELS, build_model
model = build_model(ModelConfig(arch=sys.argv[1], hidden_size=8, num_heads=2), DropoutConfig(), 11)
logits, state = model(__import__("torch").zeros(3, 2, dtype=__import__("torch").long),
                      model.init_state(2))
assert tuple(logits.shape) == (3, 2, 11), logits.shape
loaded = {m.split(".")[0] for m in sys.modules}
print(sorted(loaded & {"pandas", "omegaconf", "hydra", "mlflow", "optuna"}))
print(sorted(m for m in sys.modules if m.startswith("lmexp")))
"""


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_the_shipped_model_code_builds_every_architecture_on_its_own(arch, tmp_path):
    """model_code's package (what the logged model's code/ folder holds) builds and runs each
    registered architecture with only torch besides it: no second copy of a network exists,
    and nothing else of lmexp is needed."""
    package = model_code(tmp_path / "code")
    site = subprocess.run(
        [
            sys.executable,
            "-c",
            "import torch, os; print(os.path.dirname(os.path.dirname(torch.__file__)))",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    proc = subprocess.run(
        [
            sys.executable,
            "-I",
            "-c",
            f"import sys; sys.path[:0] = [{str(package.parent)!r}, {site!r}]; exec({STANDALONE!r})",
            arch,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    libraries, lmexp_modules = proc.stdout.splitlines()
    assert libraries == "[]"
    assert all(
        m in ("lmexp", "lmexp.config") or m.startswith("lmexp.models") for m in eval(lmexp_modules)
    )
    assert (package / "models" / "__init__.py").is_file()


@pytest.mark.parametrize("temperature", [float("nan"), float("inf"), 0.0, -1.0])
def test_a_temperature_that_is_not_a_finite_positive_number_is_refused(temperature):
    with pytest.raises(ValueError, match=r"^words must be >= 1, temperature a finite number > 0"):
        pyfunc_model.generation({"temperature": temperature})
    assert pyfunc_model.generation({"temperature": 0.5})["temperature"] == 0.5
