"""The benchmark runs and writes valid JSON with every field (tiny sizes: a check, not a timing)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO, mlflow_runs, run_module

from lmexp.bench import CellLoopLM
from lmexp.config import DropoutConfig
from lmexp.engine.runtime import cpu_bf16_lstm_supported
from lmexp.models.rnn import RNNLanguageModel


def test_bench_writes_json_with_every_field(tmp_path):
    proc = run_module(
        "lmexp.bench", "data=tiny", "model=tiny", "trainer.threads=1", "bench.batches=4",
        "bench.warmup_batches=1", "bench.eval_batches=3", "bench.output=bench.json",
        "bench.log_mlflow=true", cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "bench.json").read_text())
    assert result["device"].startswith("cpu") and result["torch_version"] == torch.__version__
    assert result["config"]["model.hidden_size"] == 32 and result["config"]["bench.repeats"] == 3
    assert set(result["variants"]) == {
        "lmexp", "stock", "port", "cell_loop", "stock_alloc", "port_alloc",
    }  # fmt: skip
    for variant in result["variants"].values():
        assert set(variant) == {
            "wps_median", "wps_min", "wps_max", "ratio_vs_port", "ratio_vs_port_alloc",
            "keeps_freed_memory",
        }  # fmt: skip
        assert variant["ratio_vs_port_alloc"] == pytest.approx(
            variant["wps_median"] / result["variants"]["port_alloc"]["wps_median"]
        )
        assert 0 < variant["wps_min"] <= variant["wps_median"] <= variant["wps_max"]
    assert result["variants"]["port"]["ratio_vs_port"] == 1.0
    # lmexp and the _alloc twins run with lmexp's allocator setting, the baselines without it
    allocator = {name: v["keeps_freed_memory"] for name, v in result["variants"].items()}
    assert allocator == {
        "lmexp": True, "stock": False, "port": False, "cell_loop": False, "stock_alloc": True,
        "port_alloc": True,
    }  # fmt: skip
    ratio = result["variants"]["lmexp"]["wps_median"] / result["variants"]["port"]["wps_median"]
    assert abs(result["variants"]["lmexp"]["ratio_vs_port"] - ratio) < 1e-9
    assert result["eval"]["lmexp"]["wps_median"] > 0
    assert isinstance(result["warnings"], list)  # each a reason the ratios mean nothing
    assert "vs port" in proc.stdout and "cell_loop" in proc.stdout
    (run,) = mlflow_runs(tmp_path / "mlflow.db")  # the same figures, logged to MLflow
    assert run.data.tags["lmexp.kind"] == "bench" and run.info.status == "FINISHED"
    assert run.data.metrics["lmexp.wps_median"] == result["variants"]["lmexp"]["wps_median"]


def test_a_store_the_bench_cannot_log_to_is_refused_before_it_benchmarks(tmp_path):
    """The store is checked before the benchmark's first step, loading the corpus: a data.root
    that is no PTB folder is never looked at."""
    proc = run_module(
        "lmexp.bench", "data=ptb", f"data.root={tmp_path / 'not_ptb'}", "model=tiny",
        "trainer.threads=1", "bench.batches=4", "bench.output=bench.json",
        "bench.log_mlflow=true", "logger.tracking_uri=sqlite:///no_such_folder/mlflow.db",
        cwd=tmp_path,
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-2000:]
    assert "folder " in out and "no_such_folder does not exist; create it" in out, out[-2000:]
    assert "not_ptb" not in out and not (tmp_path / "bench.json").exists()


def test_bench_rejects_unknown_variant(tmp_path):
    proc = run_module(
        "lmexp.bench", "data=tiny", "model=tiny", "bench.variants=[lmexp,tf]", cwd=tmp_path
    )
    assert proc.returncode == 2
    assert (
        "Invalid config: bench.variants=['lmexp', 'tf'] has unknown ['tf']; choose from lmexp, "
        "stock, port, cell_loop, stock_alloc, port_alloc." in proc.stdout + proc.stderr
    )


def test_bench_times_a_transformer_with_lmexps_step_and_refuses_the_lstm_baselines(tmp_path):
    args = ["data=tiny", "experiment=transformer", "model.hidden_size=32", "trainer.threads=1"]
    proc = run_module("lmexp.bench", *args, cwd=tmp_path)
    assert proc.returncode == 2
    assert (
        "Invalid config: bench.variants=['lmexp', 'stock', 'port', 'cell_loop', 'stock_alloc', "
        "'port_alloc'] holds stock, port, cell_loop, stock_alloc, port_alloc: the 2017 ways of "
        "training an LSTM, not model.arch=transformer; use bench.variants=[lmexp]."
        in proc.stdout
        + proc.stderr
    )
    ok = run_module(
        "lmexp.bench", *args, "bench.variants=[lmexp]", "bench.repeats=1", "bench.batches=5",
        "bench.warmup_batches=1", "bench.output=bench.json", cwd=tmp_path,
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr[-3000:]
    record = json.loads((tmp_path / "bench.json").read_text())
    assert record["config"]["model.arch"] == "transformer"
    assert list(record["variants"]) == ["lmexp"] and record["variants"]["lmexp"]["wps_median"] > 0


def test_bench_refuses_the_lstm_cell_loop_for_a_gru(tmp_path):
    args = ["data=tiny", "model=tiny", "model.cell=gru", "bench.variants=[lmexp,cell_loop]"]
    proc = run_module("lmexp.bench", *args, cwd=tmp_path)
    assert proc.returncode == 2
    out = proc.stdout + proc.stderr
    assert "holds cell_loop, TF's LSTMCell loop, not model.cell=gru; leave cell_loop out" in out
    assert "Traceback" not in out
    ok = run_module(
        "lmexp.bench", *args[:3], "bench.variants=[lmexp,port]", "bench.repeats=1", cwd=tmp_path
    )
    assert ok.returncode == 0, ok.stderr[-3000:]  # the other variants time a GRU


def test_cell_loop_computes_the_same_function_as_the_fused_lstm():
    torch.manual_seed(0)
    fused = RNNLanguageModel(30, 12, 2, 0.1, DropoutConfig(kind="none")).eval()
    cells = CellLoopLM(fused).eval()
    tokens = torch.randint(0, 30, (7, 3))
    a, (ha, ca) = fused(tokens, fused.init_state(3))
    b, (hb, cb) = cells(tokens, cells.init_state(3))
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(ha, hb)
    torch.testing.assert_close(ca, cb)


@pytest.mark.slow
@pytest.mark.parametrize(
    "extra_env",
    [
        pytest.param({}, id="this-cpu"),
        pytest.param(
            {"ONEDNN_MAX_CPU_ISA": "AVX2"},
            id="avx2-only",
            marks=pytest.mark.skipif(
                not cpu_bf16_lstm_supported(), reason="this CPU is AVX2-only: the case above"
            ),
        ),
    ],
)
def test_gpu_script_runs_every_step_at_toy_sizes_without_mlflow(tmp_path, extra_env):
    """scripts/gpu_bench.sh in SMOKE mode: the shell logic, the overrides of every preset and the
    merged JSON are checked here, so a GPU session's few minutes are not spent finding a typo.
    MLflow is made unimportable, as on the bare GPU machine."""
    blocker = tmp_path / "no_mlflow" / "mlflow"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('mlflow is not on the GPU machine')\n")
    env = {
        **os.environ,
        "SMOKE": "1",
        "OUT": str(tmp_path / "out"),
        "PYTHON": sys.executable,
        "PYTHONPATH": str(blocker.parent),
        "TMPDIR": str(tmp_path),
        **extra_env,
    }
    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / "gpu_bench.sh")],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = (tmp_path / "out" / "gpu_bench.log").read_text()
    assert "FAILED" not in log and "Traceback" not in log, log[-3000:]
    assert "Test perplexity" in log  # the end-to-end lmexp.train step ran
    runs = json.loads((tmp_path / "out" / "gpu_bench.json").read_text())
    presets = ("large", "pytorch_port", "medium", "small")
    bf16 = cpu_bf16_lstm_supported() and "ONEDNN_MAX_CPU_ISA" not in extra_env
    assert ("SKIPPED the bf16 steps" in log) != bf16
    grid = {f"{p}_{prec}" for p in presets for prec in ("fp32", "bf16")[: 1 + bf16]}
    assert set(runs) == grid | {"medium_weight_drop", "transformer"}
    assert runs["transformer"]["config"]["model.arch"] == "transformer"
    assert set(runs["transformer"]["variants"]) == {"lmexp"}
    for name in grid:
        assert runs[name]["config"]["trainer.precision"] == name.rsplit("_", 1)[1]
        assert set(runs[name]["variants"]) == {"lmexp", "stock", "port", "cell_loop"}
        assert runs[name]["variants"]["port"]["ratio_vs_port"] == 1.0
    assert set(runs["medium_weight_drop"]["variants"]) == {"lmexp", "port"}
    assert runs["medium_weight_drop"]["config"]["dropout.weight_drop"] == 0.5
    for preset in ("large", "medium", "small"):
        assert runs[f"{preset}_fp32"]["config"]["model.name"] == preset


@pytest.mark.unit
def test_a_spread_from_a_busy_machine_or_a_single_repeat_is_not_a_result():
    """The busy machine's table (lmexp 8566 median, 142 to 15765 words/s) and repeats=1 are
    said to mean nothing. A committed record keeps the verdict the bench gave it (this AMD EPYC
    drifts by 20-38% within minutes, so its records carry warnings), and the page quoting a
    record with warnings says that its repeats spread more than 20%."""
    from lmexp.bench import judge

    quiet = {"lmexp": {"wps_median": 10000.0, "wps_min": 9700.0, "wps_max": 10300.0}}
    assert judge(quiet, 5) == []
    busy = {**quiet, "port": {"wps_median": 8566.0, "wps_min": 142.0, "wps_max": 15765.0}}
    assert judge(busy, 5) == [
        "port's repeats spread 182% of its median (142 to 15765 words/s; a quiet machine stays "
        "under 20%): something else ran on these cores, so the ratios mean nothing; rerun on a "
        "quiet machine."
    ]
    assert judge(quiet, 1)[0].startswith("bench.repeats=1: too few repeats")
    page = " ".join((REPO / "docs" / "benchmarks.md").read_text().split())
    for record in sorted((REPO / "results").glob("bench_cpu_*.json")):
        saved = json.loads(record.read_text())
        verdict = judge(saved["variants"], saved["config"]["bench.repeats"])
        assert saved["warnings"] == verdict, record.name
        assert not verdict or "repeats spread more than 20% of its median" in page, record.name
