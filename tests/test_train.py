"""End-to-end runs of `python -m lmexp.train` as a user runs it: real Hydra, real MLflow sqlite store."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY, metric_history, mlflow_runs, read_only, run_module, text_folder

from lmexp.engine import checkpoint

EPOCH_METRICS = ("train_ppl", "valid_ppl", "lr", "train_wps", "epoch_time_s")


def test_tiny_run_logs_every_metric_every_epoch_and_learns(tmp_path):
    proc = run_module(
        "lmexp.train", *TINY, "trainer.max_epochs=4", "hydra.run.dir=out/run", cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    db = tmp_path / "mlflow.db"  # in the launch folder, not Hydra's job folder
    (run,) = mlflow_runs(db)
    assert run.info.status == "FINISHED"
    for key in EPOCH_METRICS:
        assert [step for step, _ in metric_history(db, run.info.run_id, key)] == [1, 2, 3, 4], key
    valid = [v for _, v in metric_history(db, run.info.run_id, "valid_ppl")]
    assert valid[-1] < 0.5 * valid[0], valid
    assert math.isfinite(run.data.metrics["test_ppl"]) and run.data.metrics["test_ppl"] < 10
    lrs = [v for _, v in metric_history(db, run.info.run_id, "lr")]
    assert lrs == [1.0, 1.0, 1.0, 1.0]  # tiny recipe: max_epoch=4
    params = run.data.params
    assert params["model.hidden_size"] == "32" and params["dropout.dp_keep_prob"] == "1.0"
    assert params["data.name"] == "tiny"
    tags = run.data.tags
    assert tags["mlflow.source.git.commit"] and tags["torch_version"]
    assert tags["device"].startswith("cpu") and "data=tiny" in tags["hydra_overrides"]
    # Artifacts: the final model in the standard format, which needs no lmexp to read: a plain
    # state_dict of CPU tensors, the resolved config and the vocabulary as JSON.
    artifacts = Path(run.info.artifact_uri.removeprefix("file://"))
    vocab = json.loads((artifacts / "model" / "vocab.json").read_text())
    assert "<unk>" in vocab and len(vocab) == 46
    config = json.loads((artifacts / "model" / "config.json").read_text())
    assert config["model"]["hidden_size"] == 32 and config["data"]["name"] == "tiny"
    weights = torch.load(artifacts / "model" / "model.pt", weights_only=True)
    lstm = [
        f"lstm.{kind}_l{i}"
        for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
        for i in (0, 1)
    ]
    assert sorted(weights) == sorted(["embedding.weight", "decoder.weight", "decoder.bias", *lstm])
    assert all(type(t) is torch.Tensor and t.device.type == "cpu" for t in weights.values())
    assert weights["embedding.weight"].shape == (46, 32)
    exported = tmp_path / "out" / "run" / "model" / "model.pt"
    assert exported.read_bytes() == (artifacts / "model" / "model.pt").read_bytes()
    assert (tmp_path / "out" / "run" / "checkpoints" / "last.pt").is_file()
    assert (tmp_path / "out" / "run" / "checkpoints" / "best.pt").is_file()
    # Named by its recipe and what the command changed; its mean speed under its own name.
    assert run.info.run_name == "tiny data=tiny max_epochs=4 (run)"  # and its folder
    wps = [v for _, v in metric_history(db, run.info.run_id, "train_wps")]
    seconds = [v for _, v in metric_history(db, run.info.run_id, "epoch_time_s")]
    words = sum(w * t for w, t in zip(wps, seconds, strict=True))  # all words over all time
    assert run.data.metrics["train_wps_mean"] == pytest.approx(words / sum(seconds))
    assert not any(k.startswith("system/") for k in run.data.metrics)  # tiny: off by default


def test_log_model_false_keeps_the_model_out_of_mlflow_but_exports_it(tmp_path):
    from mlflow.tracking import MlflowClient

    proc = run_module(
        "lmexp.train", *TINY, "trainer.max_epochs=1", "logger.log_model=false",
        "hydra.run.dir=run", cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = mlflow_runs(tmp_path / "mlflow.db")
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert client.search_logged_models([run.info.experiment_id]) == []
    assert not (Path(run.info.artifact_uri.removeprefix("file://")) / "model").exists()
    assert sorted(p.name for p in (tmp_path / "run" / "model").iterdir()) == [
        "config.json", "metrics.json", "model.pt", "vocab.json",
    ]  # fmt: skip


@pytest.mark.slow
def test_debug_run_on_real_ptb(tmp_path, ptb_dir):
    proc = run_module(
        "lmexp.train",
        f"data.root={ptb_dir}",
        "trainer=debug",
        "trainer.threads=1",
        cwd=tmp_path,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    db = tmp_path / "mlflow.db"
    (run,) = mlflow_runs(db)
    assert run.info.status == "FINISHED"
    assert (
        run.data.params["model.name"] == "small"
        and run.data.params["trainer.limit_train_batches"] == "20"
    )
    for key in EPOCH_METRICS:
        assert len(metric_history(db, run.info.run_id, key)) == 2
    valid = [v for _, v in metric_history(db, run.info.run_id, "valid_ppl")]
    assert valid[1] < valid[0] < 10000  # learning from a uniform start (ppl 10000)
    assert math.isfinite(run.data.metrics["test_ppl"])


def _expect_user_error(proc, *fragments: str) -> None:
    assert proc.returncode != 0
    text = proc.stdout + proc.stderr
    for fragment in fragments:
        assert fragment in text, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    assert "Epoch 1" not in text  # stopped before any training


@pytest.mark.parametrize(
    ("override", "fragments"),
    [
        (
            "model.hiden_size=3",
            (
                "Unknown config key 'model.hiden_size'; did you mean model.hidden_size or model.ffn_size?",
            ),
        ),
        (
            "trainer.max_epoch=1",
            ("Unknown config key 'trainer.max_epoch'; did you mean trainer.max_epochs?",),
        ),
        ("dropout.dp_keep_prob=1.5", ("dropout.dp_keep_prob=1.5 must be in (0, 1]",)),
        ("model.hidden_size=-3", ("model.hidden_size=-3 must be a positive integer",)),
        ("trainer.max_epochs=two", ("trainer.max_epochs", "two")),
    ],
)
def test_bad_config_fails_before_training_naming_the_key(tmp_path, override, fragments):
    started = time.monotonic()
    proc = run_module("lmexp.train", *TINY, override, cwd=tmp_path, timeout=60)
    _expect_user_error(proc, *fragments)
    assert time.monotonic() - started < 30
    assert not (tmp_path / "mlflow.db").exists()  # nothing half-created


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without a GPU")
@pytest.mark.parametrize(
    ("module", "override", "fragment"),
    [
        ("lmexp.train", "trainer.cuda_graphs=true", "trainer.cuda_graphs=True needs a CUDA device"),
        ("lmexp.train", "trainer.precision=fp16", "trainer.precision='fp16' is a CUDA path"),
        ("lmexp.bench", "trainer.precision=fp16", "trainer.precision='fp16' is a CUDA path"),
    ],
)
def test_gpu_only_settings_on_a_cpu_machine_are_one_sentence(tmp_path, module, override, fragment):
    proc = run_module(module, *TINY, "logger=none", override, cwd=tmp_path, timeout=60)
    assert proc.returncode == 2
    _expect_user_error(proc, fragment)


def _ptb_copy(ptb_dir: Path, dest: Path) -> Path:
    dest.mkdir()
    for split in ("train", "valid", "test"):
        shutil.copy(ptb_dir / f"ptb.{split}.txt", dest)
    return dest


@pytest.mark.parametrize("damage", ["missing", "empty", "corrupt"])
def test_bad_data_root_fails_naming_the_file(tmp_path, ptb_dir, damage):
    root = _ptb_copy(ptb_dir, tmp_path / "ptb")
    target = root / ("ptb.valid.txt" if damage != "empty" else "ptb.train.txt")
    if damage == "missing":
        target.unlink()
    elif damage == "empty":
        target.write_text("")
    else:
        raw = bytearray(target.read_bytes())
        raw[1000] = ord("#")
        target.write_bytes(bytes(raw))
    before = {p.name: p.read_bytes() for p in root.iterdir()}
    proc = run_module("lmexp.train", f"data.root={root}", "trainer=debug", cwd=tmp_path, timeout=60)
    message = {"missing": "is missing", "empty": "is empty", "corrupt": "has MD5"}[damage]
    _expect_user_error(proc, str(target), message)
    assert {p.name: p.read_bytes() for p in root.iterdir()} == before  # the user's files untouched


@pytest.mark.parametrize(
    ("verify_md5", "message"),
    [
        ("true", "has MD5"),  # checked on the bytes, before anything decodes them
        ("false", "is not UTF-8: the byte at offset 1000 (0xff) is invalid; re-save it as UTF-8."),
    ],
)
def test_non_utf8_byte_in_a_split_is_one_sentence(tmp_path, ptb_dir, verify_md5, message):
    root = _ptb_copy(ptb_dir, tmp_path / "ptb")
    target = root / "ptb.valid.txt"
    raw = target.read_bytes()
    target.write_bytes(raw[:1000] + b"\xff" + raw[1000:])
    proc = run_module(
        "lmexp.train",
        f"data.root={root}",
        f"data.verify_md5={verify_md5}",
        "logger=none",
        "trainer=debug",
        "trainer.threads=1",
        cwd=tmp_path,
        timeout=60,
    )
    assert proc.returncode == 2
    _expect_user_error(proc, f"{target} {message}")


def test_parallel_jobs_spread_over_visible_gpus(monkeypatch):
    import torch

    from lmexp.engine.runtime import select_device

    assert select_device("auto", 3).type == "cpu" or torch.cuda.is_available()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert [str(select_device("auto", n)) for n in (0, 1, 5, None)] == [
        "cuda:0",
        "cuda:1",
        "cuda:1",
        "cuda:0",
    ]
    assert str(select_device("cuda:2", 7)) == "cuda:2"  # an explicit device is kept


AVX2_ONLY = {"ONEDNN_MAX_CPU_ISA": "AVX2"}  # oneDNN as on a CPU without AVX-512: no bf16 LSTM


@pytest.mark.parametrize("module", ["lmexp.train", "lmexp.bench"])
def test_bf16_on_a_cpu_without_a_bf16_lstm_is_one_sentence_and_no_run(tmp_path, module):
    proc = run_module(
        module, *TINY, "trainer.device=cpu", "trainer.precision=bf16", cwd=tmp_path, env=AVX2_ONLY
    )
    assert proc.returncode == 2
    _expect_user_error(
        proc,
        "trainer.precision='bf16' needs oneDNN's bf16 LSTM, which this CPU",
        "use trainer.precision=fp32 here",
    )
    assert "primitive descriptor" not in proc.stdout + proc.stderr
    assert not (tmp_path / "mlflow.db").exists()  # no store, no run


def test_a_train_split_shorter_than_one_window_is_refused_before_a_run(tmp_path):
    proc = run_module(
        "lmexp.train", *TINY, "data.tiny_train_tokens=400", "trainer.batch_size=20",
        "trainer.num_steps=20", cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 2
    _expect_user_error(
        proc,
        "The train split has 400 tokens, too few for one window of trainer.batch_size=20 x "
        "trainer.num_steps=20 (it needs at least 420)",
    )
    assert not (tmp_path / "mlflow.db").exists()


def _launch(tmp_path: Path, *args: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return subprocess.Popen(
        [sys.executable, "-m", "lmexp.train", *TINY, *args],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


@pytest.mark.slow
def test_two_runs_launched_together_get_their_own_folders(tmp_path):
    """Launched in the same second from one folder into a fresh store: Hydra's ${now:} folder
    would be shared; each run must keep its own folder, checkpoints and weights."""
    procs = [_launch(tmp_path, "trainer.max_epochs=2", f"trainer.seed={seed}") for seed in (1, 2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    runs = mlflow_runs(tmp_path / "mlflow.db")
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
    folders = {r.data.tags["output_dir"] for r in runs}
    assert len(folders) == 2
    for run in runs:
        folder = Path(run.data.tags["output_dir"])
        saved = checkpoint.load(folder / "checkpoints" / "last.pt")
        assert saved["mlflow_run_id"] == run.info.run_id
        assert saved["config"]["trainer"]["seed"] == int(run.data.params["trainer.seed"])
        assert (
            f"trainer.seed={run.data.params['trainer.seed']}"
            in (folder / ".hydra" / "overrides.yaml").read_text()
        )


@pytest.mark.slow
def test_a_run_folder_held_by_a_live_run_is_refused_before_anything_is_written(tmp_path):
    first = _launch(
        tmp_path, "model.hidden_size=128", "data.tiny_train_tokens=150000", "trainer.max_epochs=3",
        "trainer.progress=true", "trainer.log_every_n_batches=10", "hydra.run.dir=run",
    )  # fmt: skip
    log = tmp_path / "run" / "train.log"
    deadline = time.monotonic() + 120
    while not (log.is_file() and "epoch 1/" in log.read_text()):
        assert first.poll() is None and time.monotonic() < deadline, first.stdout.read()
        time.sleep(0.05)
    overrides = (tmp_path / "run" / ".hydra" / "overrides.yaml").read_text()
    second = run_module(
        "lmexp.train", *TINY, "trainer.seed=7", "hydra.run.dir=run", cwd=tmp_path, timeout=60
    )
    assert second.returncode == 2
    _expect_user_error(second, f"Folder {tmp_path / 'run'} is in use by another live lmexp run")
    assert (tmp_path / "run" / ".hydra" / "overrides.yaml").read_text() == overrides
    out, _ = first.communicate(timeout=300)
    assert first.returncode == 0, out[-3000:]
    (run,) = mlflow_runs(tmp_path / "mlflow.db")
    assert run.info.status == "FINISHED" and run.data.params["trainer.seed"] == "0"


def _corrupt_pages(db: Path) -> None:
    raw = bytearray(db.read_bytes())
    for offset in range(4096 * 2, len(raw) - 4096, 4096):  # every page after the first two
        raw[offset : offset + 64] = b"\xa5" * 64
    db.write_bytes(bytes(raw))


@pytest.mark.parametrize("sweep", [False, True])
def test_a_corrupt_store_stops_a_run_or_sweep_in_one_sentence_and_is_left_as_it_was(
    tmp_path, sweep
):
    assert run_module("lmexp.train", *TINY, "trainer.max_epochs=1", cwd=tmp_path).returncode == 0
    db = tmp_path / "mlflow.db"
    _corrupt_pages(db)
    before = db.read_bytes()
    args = ["-m", *TINY, "dropout.dp_keep_prob=0.5,0.9"] if sweep else TINY
    proc = run_module("lmexp.train", *args, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    _expect_user_error(
        proc, f"Tracking store sqlite:///{db} is unusable (", f"restore {db} from a backup"
    )
    assert "Launching" not in proc.stdout + proc.stderr  # no sweep job started
    assert db.read_bytes() == before


def test_a_read_only_store_stops_a_run_in_one_sentence(tmp_path):
    assert run_module("lmexp.train", *TINY, "trainer.max_epochs=1", cwd=tmp_path).returncode == 0
    db = tmp_path / "mlflow.db"
    before = db.read_bytes()
    with read_only(db):
        proc = run_module("lmexp.train", *TINY, "hydra.run.dir=ro-run", cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    _expect_user_error(
        proc,
        f"Tracking store sqlite:///{db} is unusable (attempt to write a readonly database)",
        "writable",
    )
    assert db.read_bytes() == before


@pytest.mark.slow
def test_debug_preset_says_its_test_ppl_covers_part_of_the_split(tmp_path):
    proc = run_module("lmexp.train", *TINY, "trainer=debug", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Not the full test split: valid_ppl and test_ppl cover only the first 10 windows" in (
        proc.stdout + proc.stderr
    )
    (run,) = mlflow_runs(tmp_path / "mlflow.db")
    assert "trainer.limit_eval_batches=10" in run.data.tags["lmexp.eval_scope"]
    full = run_module("lmexp.train", *TINY, "trainer.max_epochs=1", cwd=tmp_path)
    runs = mlflow_runs(tmp_path / "mlflow.db")
    assert full.returncode == 0 and sum("lmexp.eval_scope" in r.data.tags for r in runs) == 1


def test_system_metrics_are_logged_when_asked_and_the_run_name_can_be_set(tmp_path):
    proc = run_module(
        "lmexp.train", *TINY, "model.hidden_size=128", "data.tiny_train_tokens=60000",
        "trainer.max_epochs=2", "logger.system_metrics=true", "logger.system_metrics_every_s=0.2",
        "logger.run_name=my run", cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = mlflow_runs(tmp_path / "mlflow.db")
    assert run.info.run_name == "my run"
    for key in ("system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"):
        assert key in run.data.metrics, sorted(run.data.metrics)
    cpu = metric_history(
        tmp_path / "mlflow.db", run.info.run_id, "system/cpu_utilization_percentage"
    )
    assert len(cpu) >= 2 and all(0 <= v <= 100 * os.cpu_count() for _, v in cpu)


def test_a_postgres_store_without_its_driver_names_the_extra_to_install(tmp_path):
    """Where psycopg is not installed (here: hidden by a module that fails to import), a
    postgresql:// store says which extra to install, before any training, and never shows the
    URI's password."""
    blocker = tmp_path / "no_psycopg" / "psycopg"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text(
        'raise ImportError("psycopg is not here", name="psycopg")\n'
    )
    uri = "postgresql://team:hunter2-pw@127.0.0.1:5432/mlflow"
    proc = run_module(
        "lmexp.train", *TINY, f"logger.tracking_uri={uri}", cwd=tmp_path,
        env={"PYTHONPATH": str(blocker.parent)},
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    _expect_user_error(
        proc,
        "Tracking store postgresql://team:***@127.0.0.1:5432/mlflow needs the Python driver "
        "'psycopg', which is not installed; pip install 'lmexp[server]'",
    )
    assert "hunter2-pw" not in proc.stdout + proc.stderr


@pytest.mark.slow
def test_data_text_on_ptbs_files_trains_to_data_ptbs_numbers(ptb_dir, tmp_path):
    """The real entry point, trainer=debug on PTB: data=text over PTB's renamed files logs the
    same perplexities as data=ptb, to the last bit."""
    root = tmp_path / "corpus"
    root.mkdir()
    for split in ("train", "valid", "test"):
        shutil.copy(ptb_dir / f"ptb.{split}.txt", root / f"{split}.txt")
    args = ["trainer=debug", "trainer.threads=1", "trainer.progress=false", "logger=none"]
    for name, data in (("ptb", f"data.root={ptb_dir}"), ("text", f"data.root={root}")):
        proc = run_module(
            "lmexp.train", *args, f"data={name}", data, f"hydra.run.dir={name}", cwd=tmp_path
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
    ppls = {
        name: re.findall(
            r"ppl [0-9.]+|perplexity [0-9.]+", (tmp_path / name / "train.log").read_text()
        )
        for name in ("ptb", "text")
    }
    assert len(ppls["ptb"]) == 5 and ppls["text"] == ppls["ptb"], ppls  # 2 epochs x 2, test
    weights = {n: torch.load(tmp_path / n / "model" / "model.pt") for n in ("ptb", "text")}
    assert all(torch.equal(weights["ptb"][k], weights["text"][k]) for k in weights["ptb"])


def test_a_corpus_whose_valid_words_train_never_has_says_so_and_logs_the_share(tmp_path):
    """data=text with validation words the train split lacks: the run says what share of each
    split is read as <unk> that training never sees, and logs it as a param."""
    root = text_folder(
        tmp_path / "corpus", {"train": "train.txt", "valid": "valid.txt", "test": "test.txt"}
    )
    (root / "valid.txt").write_text((root / "valid.txt").read_text() + "zebra quokka\n")
    valid_tokens = len((root / "valid.txt").read_text().replace("\n", " <eos> ").split())
    proc = run_module(
        "lmexp.train", "data=text", f"data.root={root}", "model=tiny", "trainer.threads=1",
        "trainer.progress=false", "trainer.max_epochs=1", cwd=tmp_path,
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    share = 2 / valid_tokens
    assert (
        f"{100 * share:.2f}% of the valid split's words never occur in the train split and are "
        "read as <unk>, which the train split never holds" in out
    )
    assert "of the test split's words" not in out
    assert " INFO mlflow" not in out  # a fresh store: MLflow's own table-creation lines are quiet
    assert re.search(r"Test perplexity [\d.]+ of the final model \(best valid [\d.]+\)", out)
    (run,) = mlflow_runs(tmp_path / "mlflow.db")
    assert float(run.data.params["data.unseen_valid"]) == pytest.approx(share, rel=1e-5)
    assert float(run.data.params["data.unseen_test"]) == 0.0
