"""evaluate and generate on a model trained by the real entry point (tiny corpus)."""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import REPO, TINY, mlflow_runs, run_module, run_without_lmexp
from mlflow.tracking import MlflowClient

from lmexp.data import tokenize


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, str, float]:
    cwd = tmp_path_factory.mktemp("trained")
    proc = run_module("lmexp.train", *TINY, "trainer.max_epochs=2", "hydra.run.dir=run", cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = mlflow_runs(cwd / "mlflow.db")
    return cwd, run.info.run_id, run.data.metrics["test_ppl"]


def ppl(stdout: str) -> float:
    return float(re.search(r"perplexity ([0-9.]+)", stdout).group(1))


def split_text(cwd: Path, split: str) -> str:
    """A split of the trained run's corpus, written as the text file it would be read from."""
    from lmexp.config import DataConfig
    from lmexp.data import load_corpus

    config = json.loads((cwd / "run" / "model" / "config.json").read_text())
    corpus = load_corpus(DataConfig(**config["data"]))
    return " ".join(corpus.vocab[i] for i in corpus.split(split).tolist()).replace("<eos>", "\n")


def readme_snippet(heading: str) -> str:
    """The first Python block after a heading of docs/using-a-model.md, verbatim."""
    section = (REPO / "docs" / "using-a-model.md").read_text().split(f"\n## {heading}\n", 1)[1]
    return section.split("```python\n", 1)[1].split("\n```", 1)[0]


def test_readme_snippet_scores_the_exported_model_without_lmexp_as_lmexp_does(trained, tmp_path):
    cwd, _, _ = trained
    run = cwd / "run"
    blocked = run_without_lmexp("import lmexp\n", cwd=run, scratch=tmp_path)
    assert blocked.returncode == 1 and "ImportError: lmexp is not here" in blocked.stderr
    (run / "sample.txt").write_text(split_text(cwd, "valid") + "\nw1 zebra w2\n")
    snippet = run_without_lmexp(readme_snippet("Without lmexp"), cwd=run, scratch=tmp_path)
    assert snippet.returncode == 0, snippet.stderr
    own = run_module("lmexp.evaluate", "model/model.pt", "--text", "sample.txt", cwd=run)
    assert own.returncode == 0, own.stderr
    tokens = re.search(r"over (\d+) tokens", own.stdout).group(1)
    assert snippet.stdout == f"perplexity {ppl(snippet.stdout):.4f} over {tokens} tokens\n"
    assert ppl(snippet.stdout) == pytest.approx(ppl(own.stdout), rel=1e-5)  # 4 decimals printed


def test_evaluate_reproduces_logged_test_ppl_from_run_id_and_from_path(trained):
    cwd, run_id, logged = trained
    by_id = run_module("lmexp.evaluate", run_id, cwd=cwd)
    assert by_id.returncode == 0, by_id.stderr
    assert ppl(by_id.stdout) == pytest.approx(logged, rel=1e-4)
    by_path = run_module("lmexp.evaluate", "run/model/model.pt", cwd=cwd)
    assert ppl(by_path.stdout) == pytest.approx(logged, rel=1e-4)


def test_evaluate_by_run_id_from_another_folder_writes_nothing_there(trained, tmp_path):
    """MLflow resolves a run's logged model in its default store (./mlflow.db), not the one given."""
    cwd, run_id, logged = trained
    store = f"sqlite:///{cwd / 'mlflow.db'}"
    proc = run_module("lmexp.evaluate", run_id, "--tracking-uri", store, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert ppl(proc.stdout) == pytest.approx(logged, rel=1e-4)
    assert list(tmp_path.iterdir()) == []


def test_evaluate_text_file_maps_unknown_words_to_unk(trained):
    cwd, _, _ = trained
    (cwd / "sample.txt").write_text("w1 w2 w3 zebra\nw4 w5 quux w6\n")
    proc = run_module("lmexp.evaluate", "run/model/model.pt", "--text", "sample.txt", cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    assert "over 9 tokens (2 out-of-vocabulary words mapped to <unk>)" in proc.stdout


def test_evaluate_text_file_that_is_not_utf8_is_one_sentence(trained):
    cwd, _, _ = trained
    (cwd / "latin1.txt").write_bytes("w1 w2\nw3 caf\u00e9 w4\n".encode("latin-1"))
    proc = run_module("lmexp.evaluate", "run/model/model.pt", "--text", "latin1.txt", cwd=cwd)
    assert proc.returncode == 2
    assert proc.stderr == (
        "lmexp.evaluate: error: latin1.txt is not UTF-8: the byte at offset 12 (0xe9) is "
        "invalid; re-save it as UTF-8.\n"
    )


@pytest.mark.parametrize("value", ["0", "-3", "two"])
def test_evaluate_refuses_a_batch_size_that_is_not_positive(trained, value):
    cwd, _, _ = trained
    proc = run_module("lmexp.evaluate", "run/model/model.pt", "--batch-size", value, cwd=cwd)
    assert proc.returncode == 2
    assert proc.stderr.splitlines()[-1] == (
        "python -m lmexp.evaluate: error: argument --batch-size: must be a positive integer, "
        f"not {value!r}"
    )
    assert "Traceback" not in proc.stderr


def test_evaluate_names_a_bad_model_source(trained, tmp_path):
    cwd, _, _ = trained
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    proc = run_module("lmexp.evaluate", str(tmp_path / "junk.pt"), cwd=cwd)
    assert proc.returncode == 2 and "is not an lmexp checkpoint" in proc.stderr
    proc = run_module("lmexp.evaluate", "0123456789abcdef0123456789abcdef", cwd=cwd)
    assert proc.returncode == 2 and "has no model/model.pt artifact" in proc.stderr


def test_a_folder_given_for_a_file_is_called_a_folder(trained, monkeypatch, capsys):
    from lmexp.evaluate import main

    cwd, _, _ = trained
    monkeypatch.chdir(cwd)
    assert main(["run/model/model.pt", "--text", "run"]) == 2
    assert (
        capsys.readouterr().err
        == "lmexp.evaluate: error: --text run is a folder; pass a text file.\n"
    )
    assert main(["run/model"]) == 2
    assert capsys.readouterr().err == (
        "lmexp.evaluate: error: run/model is a folder; pass the model.pt (or checkpoint) inside "
        "it, or an MLflow run id.\n"
    )


PYFUNC_SCRIPT = """
import json, sys

import mlflow

model = mlflow.pyfunc.load_model(sys.argv[1])
scores = model.predict([open("test.txt").read(), open("rows.txt").read()])
generated = model.predict(["w1 w2 zebra"], params={"mode": "generate", "words": 40, "seed": 7})
print(json.dumps({**scores.to_dict(orient="list"), "text": generated["text"][0]}))
"""


def pyfunc_predictions(cwd: Path, run_id: str, test_text: str, rows: str, scratch: Path) -> dict:
    """PYFUNC_SCRIPT's output for runs:/<run id>/model, run where lmexp cannot be imported."""
    (cwd / "test.txt").write_text(test_text)
    (cwd / "rows.txt").write_text(rows)
    store = {"MLFLOW_TRACKING_URI": f"sqlite:///{cwd / 'mlflow.db'}"}
    proc = run_without_lmexp(
        PYFUNC_SCRIPT, f"runs:/{run_id}/model", cwd=cwd, scratch=scratch, env=store
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])


def test_mlflow_pyfunc_model_loads_without_lmexp_and_agrees_with_lmexp(trained, tmp_path):
    """runs:/<run id>/model: a pyfunc model from code, so neither lmexp nor a pickle is needed."""
    cwd, run_id, logged = trained
    test_text = split_text(cwd, "test")
    out = pyfunc_predictions(cwd, run_id, test_text, "w1 w2 w3 zebra\nw4 w5 quux w6\n", tmp_path)
    # The test split as one row is the stream the run's test_ppl was measured on (tiny:
    # trainer.test_batch_size=1), read in other windows: equal up to float rounding.
    assert out["tokens"][0] == len(tokenize(test_text)) - 1 and out["unknown"][0] == 0
    assert out["perplexity"][0] == pytest.approx(logged, rel=1e-4)
    # A row is scored as `lmexp.evaluate --text` scores a file holding it.
    own = run_module("lmexp.evaluate", "run/model/model.pt", "--text", "rows.txt", cwd=cwd)
    assert (out["tokens"][1], out["unknown"][1]) == (9, 2)
    assert out["perplexity"][1] == pytest.approx(ppl(own.stdout), rel=1e-5)  # 4 decimals printed
    # Generation samples as lmexp.generate does.
    args = ["--prompt", "w1 w2 zebra", "--words", "40", "--seed", "7"]
    generate = run_module("lmexp.generate", "run/model/model.pt", *args, cwd=cwd)
    assert generate.stdout == out["text"] + "\n"
    # From code: the logged model holds lmexp/tracking/pyfunc_model.py and no pickle.
    (folder,) = (cwd / "mlartifacts" / "models").glob("m-*/artifacts")
    assert "model_code_path" in (folder / "MLmodel").read_text()
    assert (folder / "pyfunc_model.py").read_text() == (
        REPO / "lmexp" / "tracking" / "pyfunc_model.py"
    ).read_text()
    assert not [p for p in folder.rglob("*") if p.suffix in (".pkl", ".pickle")]


@pytest.mark.parametrize("missing", ["config.json", "vocab.json"])
def test_an_exported_model_without_its_json_files_is_one_sentence(trained, tmp_path, missing):
    cwd, _, _ = trained
    shutil.copytree(cwd / "run" / "model", tmp_path / "model")
    (tmp_path / "model" / missing).unlink()
    proc = run_module("lmexp.evaluate", str(tmp_path / "model" / "model.pt"), cwd=cwd)
    assert proc.returncode == 2
    assert proc.stderr == (
        f"lmexp.evaluate: error: {tmp_path / 'model' / missing} is missing: an exported model.pt "
        f"needs the {missing} lmexp.train wrote beside it; copy the whole model/ folder.\n"
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without a GPU")
@pytest.mark.parametrize("module", ["lmexp.evaluate", "lmexp.generate"])
def test_cuda_device_without_a_gpu_is_one_sentence(trained, module):
    cwd, _, _ = trained
    proc = run_module(module, "run/model/model.pt", "--device", "cuda", cwd=cwd)
    assert proc.returncode == 2
    assert proc.stderr == (
        f"{module}: error: --device cuda needs a visible CUDA device, but this machine has none; "
        "use --device cpu.\n"
    )


def test_device_that_is_not_one_or_not_visible_is_one_sentence(trained, monkeypatch, capsys):
    cwd, _, _ = trained
    proc = run_module("lmexp.evaluate", "run/model/model.pt", "--device", "gpu", cwd=cwd)
    assert proc.returncode == 2
    assert proc.stderr == (
        "lmexp.evaluate: error: --device gpu is not a device; use cpu, cuda or cuda:N.\n"
    )
    # On a machine with two GPUs (faked: nothing reaches CUDA before the check), cuda:3 is refused.
    from lmexp.evaluate import main

    monkeypatch.chdir(cwd)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert main(["run/model/model.pt", "--device", "cuda:3"]) == 2
    assert capsys.readouterr().err == (
        "lmexp.evaluate: error: --device cuda:3 needs CUDA device 3, but only cuda:0 to cuda:1 "
        "are visible; pick one of those or use --device cpu.\n"
    )


@pytest.mark.parametrize("temperature", ["nan", "inf", "0"])
def test_generate_refuses_a_temperature_that_is_not_a_finite_positive_number(trained, temperature):
    cwd, _, _ = trained
    proc = run_module("lmexp.generate", "run/model/model.pt", "--temperature", temperature, cwd=cwd)
    assert proc.returncode == 2
    assert proc.stderr == (
        "lmexp.generate: error: --words must be >= 1, --temperature a finite number > 0 and "
        "--top-k >= 0.\n"
    )


def test_generate_is_deterministic_per_seed_and_emits_only_vocabulary(trained):
    cwd, run_id, _ = trained
    args = ["run/model/model.pt", "--prompt", "w1 w2 zebra", "--words", "40", "--seed", "7"]
    first, again = (
        run_module("lmexp.generate", *args, cwd=cwd),
        run_module("lmexp.generate", *args, cwd=cwd),
    )
    assert first.returncode == 0, first.stderr
    assert first.stdout == again.stdout
    assert "not in the vocabulary, fed as <unk>: zebra" in first.stderr
    other = run_module("lmexp.generate", *args[:-1], "8", cwd=cwd)
    assert other.stdout != first.stdout
    vocab = set(json.loads((cwd / "run" / "model" / "vocab.json").read_text()))
    text = first.stdout.rstrip("\n")
    generated = text.split()[3:]
    # 3 prompt words + 40 sampled ones; each sampled <eos> is printed as a line break.
    assert len(text.split()) + text.count("\n") == 43
    assert set(generated) <= vocab
    by_id = run_module("lmexp.generate", run_id, *args[1:], cwd=cwd)
    assert by_id.stdout == first.stdout
    by_short_id = run_module("lmexp.generate", run_id[:8], *args[1:], cwd=cwd)  # as tables show it
    assert by_short_id.stdout == first.stdout, by_short_id.stderr
    other = "0" if run_id[0] != "0" else "1"
    nobody = run_module("lmexp.generate", other * 8, *args[1:], cwd=cwd)
    assert nobody.returncode == 2
    assert f"has an id starting with {other * 8}; check the run id" in nobody.stderr


def test_report_record_of_a_run_matches_its_mlflow_metrics(trained):
    cwd, run_id, logged = trained
    proc = run_module("lmexp.report", "--run", run_id, "--record", "rec.json", cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    record = json.loads((cwd / "rec.json").read_text())
    assert record["run_id"] == run_id and record["status"] == "FINISHED"
    assert [e["epoch"] for e in record["epochs"]] == [1, 2]
    assert record["final"]["test_ppl"] == logged
    assert record["final"]["valid_ppl"] == record["epochs"][-1]["valid_ppl"]
    assert record["config"]["model.name"] == "tiny" and len(record["git_commit"]) == 40


def test_report_of_one_run_covers_only_that_run(trained, tmp_path):
    cwd, run_id, _ = trained
    # A store with a second run beside the trained one: a report of every run would list both.
    shutil.copy(cwd / "mlflow.db", tmp_path / "mlflow.db")
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    other = client.create_run(client.get_experiment_by_name("lmexp").experiment_id)
    client.log_metric(other.info.run_id, "valid_ppl", 50.0, step=1)
    proc = run_module("lmexp.report", "--run", run_id, "--out", "one", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    with open(tmp_path / "one" / "runs.csv") as f:
        assert [row["run_id"] for row in csv.DictReader(f)] == [run_id]
    proc = run_module("lmexp.report", "--run", "deadbeef", "--out", "none", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr == (
        f"lmexp.report: error: No run in sqlite:///{tmp_path / 'mlflow.db'} has an id starting "
        "with deadbeef; check the run id and --tracking-uri.\n"
    )
    assert not (tmp_path / "none").exists()


@pytest.fixture(scope="module")
def trained_gru(tmp_path_factory) -> tuple[Path, str, float]:
    cwd = tmp_path_factory.mktemp("trained_gru")
    args = [*TINY, "model.cell=gru", "lr_policy.lr=0.3", "trainer.max_epochs=2"]
    proc = run_module("lmexp.train", *args, "hydra.run.dir=run", cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = mlflow_runs(cwd / "mlflow.db")
    return cwd, run.info.run_id, run.data.metrics["test_ppl"]


def test_a_gru_model_evaluates_generates_and_serves_without_lmexp(trained_gru, tmp_path):
    """model.cell=gru goes through export, lmexp.evaluate, lmexp.generate and the logged pyfunc
    model (torch and MLflow only) as an LSTM does."""
    cwd, run_id, logged = trained_gru
    assert json.loads((cwd / "run" / "model" / "config.json").read_text())["model"]["cell"] == "gru"
    assert any(k.startswith("gru.") for k in torch.load(cwd / "run" / "model" / "model.pt"))
    by_path = run_module("lmexp.evaluate", "run/model/model.pt", cwd=cwd)
    assert by_path.returncode == 0, by_path.stderr
    assert ppl(by_path.stdout) == pytest.approx(logged, rel=1e-4)
    out = pyfunc_predictions(cwd, run_id, split_text(cwd, "test"), "w1 w2 w3 zebra\n", tmp_path)
    assert out["perplexity"][0] == pytest.approx(logged, rel=1e-4)
    args = ["--prompt", "w1 w2 zebra", "--words", "40", "--seed", "7"]
    generate = run_module("lmexp.generate", "run/model/model.pt", *args, cwd=cwd)
    assert generate.returncode == 0, generate.stderr
    assert generate.stdout == out["text"] + "\n"
