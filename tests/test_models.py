"""Every architecture in the registry, through every door a user has: trained by the real entry
point, scored by lmexp.evaluate, sampled by lmexp.generate, adapted by lmexp.adapt, and served as
the logged MLflow model where lmexp cannot be imported (pytorch/examples smoke-tests each
--model choice the same way). A new entry in lmexp.models.MODELS is covered here unasked."""

from __future__ import annotations

import re

import pytest
from conftest import TINY, mlflow_runs, run_module
from mlflow.tracking import MlflowClient
from test_evaluate import ppl, pyfunc_predictions, split_text

from lmexp.data import tokenize
from lmexp.models import MODELS


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_every_architecture_trains_evaluates_generates_adapts_and_serves(arch, tmp_path):
    cwd = tmp_path / "work"
    cwd.mkdir()
    train = run_module(
        "lmexp.train", *TINY, f"model.arch={arch}", "trainer.max_epochs=1", "hydra.run.dir=run",
        cwd=cwd,
    )  # fmt: skip
    assert train.returncode == 0, train.stderr[-3000:]
    (run,) = mlflow_runs(cwd / "mlflow.db")
    run_id, logged = run.info.run_id, run.data.metrics["test_ppl"]
    assert run.data.params["model.arch"] == arch

    evaluated = run_module("lmexp.evaluate", "run/model/model.pt", cwd=cwd)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert ppl(evaluated.stdout) == pytest.approx(logged, rel=1e-4)

    args = ["--prompt", "w1 w2 zebra", "--words", "30", "--seed", "3"]
    generated = run_module("lmexp.generate", "run/model/model.pt", *args, cwd=cwd)
    assert generated.returncode == 0, generated.stderr[-3000:]
    assert len(generated.stdout.split()) >= 30

    # the cache switched off scores as the run did, through the protocol alone
    off = run_module("lmexp.adapt", f"source={run_id}", "cache.lambd=0", cwd=cwd)
    assert off.returncode == 0, off.stderr[-3000:]
    metrics = MlflowClient(f"sqlite:///{cwd / 'mlflow.db'}").get_run(run_id).data.metrics
    assert metrics["test_ppl_cache"] == pytest.approx(logged, rel=1e-6)

    # served from the logged model, with only its own shipped code: the run's test perplexity
    # and lmexp.generate's text for the same prompt and seed
    test_text = split_text(cwd, "test")
    served = pyfunc_predictions(cwd, run_id, test_text, "w1 w2 w3\n", tmp_path)
    assert served["tokens"][0] == len(tokenize(test_text)) - 1
    assert served["perplexity"][0] == pytest.approx(logged, rel=1e-4)
    seven = run_module(
        "lmexp.generate", "run/model/model.pt", "--prompt", "w1 w2 zebra", "--words", "40",
        "--seed", "7", cwd=cwd,
    )  # fmt: skip
    assert seven.stdout == served["text"] + "\n"
    shipped = next((cwd / "mlartifacts" / "models").glob("m-*/artifacts/code/lmexp/models"))
    assert re.search(rf'"{arch}": \w+', (shipped / "__init__.py").read_text())


def test_a_sweep_over_a_transformer_key_is_an_ordinary_multirun(tmp_path):
    """Searchable like any model: Hydra's multirun over model.num_heads, one run per value."""
    proc = run_module(
        "lmexp.train", "-m", *TINY, "model.arch=transformer", "model.num_heads=1,4",
        "trainer.max_epochs=1", "logger.log_model=false", "hydra.sweep.dir=sweep", cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = [r for r in mlflow_runs(tmp_path / "mlflow.db") if "model.num_heads" in r.data.params]
    assert sorted(r.data.params["model.num_heads"] for r in runs) == ["1", "4"]
    assert all(r.info.status == "FINISHED" and r.data.metrics["test_ppl"] > 0 for r in runs)
