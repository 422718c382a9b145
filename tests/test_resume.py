"""Interrupted runs, with real processes and real signals: kill, preemption, divergence, bad stores."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY, metric_history, mlflow_runs, run_module, text_folder

from lmexp.engine import checkpoint

pytestmark = pytest.mark.slow  # real processes, real signals: seconds to a minute each

# Epochs of a couple of seconds, so a signal can land where the test wants it.
SLOW_TINY = [*TINY, "model.hidden_size=128", "data.tiny_train_tokens=60000", "trainer.max_epochs=4"]
COMPARED = ("train_ppl", "valid_ppl", "lr")


def start(args: list[str], cwd: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return subprocess.Popen(
        [sys.executable, "-m", "lmexp.train", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def wait_for_line(log: Path, needle: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.exists() and needle in log.read_text():
            return
        assert proc.poll() is None, f"process ended before {needle!r}: {proc.stdout.read()[-3000:]}"
        time.sleep(0.02)
    raise AssertionError(f"{needle!r} not seen in {log} within {timeout}s")


def histories(db: Path, run_id: str) -> dict[str, list[tuple[int, float]]]:
    return {key: metric_history(db, run_id, key) for key in COMPARED}


def test_sigkill_after_second_checkpoint_then_resume_equals_uninterrupted_run(tmp_path):
    reference = run_module("lmexp.train", *SLOW_TINY, "hydra.run.dir=ref", cwd=tmp_path)
    assert reference.returncode == 0, reference.stderr[-3000:]

    args = [*SLOW_TINY, "hydra.run.dir=killed"]
    proc = start(args, tmp_path)
    wait_for_line(tmp_path / "killed" / "train.log", "Epoch 2:", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    saved = checkpoint.load(tmp_path / "killed" / "checkpoints" / "last.pt")
    assert saved["epoch"] in (2, 3)  # killed during epoch 3 (or just after its checkpoint)

    resumed = run_module("lmexp.train", *args, cwd=tmp_path)  # the same command, the same folder
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resumed from" in (tmp_path / "killed" / "train.log").read_text()

    db = tmp_path / "mlflow.db"
    runs = {r.data.tags["output_dir"].rsplit("/", 1)[-1]: r for r in mlflow_runs(db)}
    assert set(runs) == {"ref", "killed"}  # the resume reused its run: no third run
    ref, killed = runs["ref"], runs["killed"]
    assert killed.info.run_id == saved["mlflow_run_id"] and killed.info.status == "FINISHED"
    got, want = histories(db, killed.info.run_id), histories(db, ref.info.run_id)
    for key in COMPARED:
        assert [s for s, _ in got[key]] == [1, 2, 3, 4], key  # each epoch once, no gaps
    assert got == want  # bit-for-bit the same per-epoch metrics on CPU
    assert killed.data.metrics["test_ppl"] == ref.data.metrics["test_ppl"]
    for key in ("train_wps", "epoch_time_s"):
        assert [s for s, _ in metric_history(db, killed.info.run_id, key)] == [1, 2, 3, 4]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_sigterm_or_ctrl_c_mid_epoch_checkpoints_exits_cleanly_and_resume_finishes(tmp_path, sig):
    """A first Ctrl-C is a SIGTERM: a checkpoint at the next batch, one line, exit 128 + signal,
    the run KILLED and resumable; resumed, it is the uninterrupted run, train_ppl included (the
    stop falls between two log lines, which once regrouped the epoch's float32 loss sum)."""
    common = [
        *SLOW_TINY,
        "trainer.max_epochs=2",
        "trainer.progress=true",
        "trainer.log_every_n_batches=20",
    ]
    reference = run_module("lmexp.train", *common, "hydra.run.dir=ref", cwd=tmp_path)
    assert reference.returncode == 0, reference.stderr[-3000:]
    args = [*common, "hydra.run.dir=run"]
    proc = start(args, tmp_path)
    wait_for_line(tmp_path / "run" / "train.log", "epoch 1/", proc)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=60)
    name = signal.Signals(sig).name
    assert proc.returncode == 128 + sig, out[-3000:]
    assert f"{name} received: checkpoint saved at epoch 1" in out and "Traceback" not in out
    assert "KeyboardInterrupt" not in out
    saved = checkpoint.load(tmp_path / "run" / "checkpoints" / "last.pt")
    assert saved["epoch"] == 0 and saved["progress"]["batch"] > 0  # mid-epoch position
    db = tmp_path / "mlflow.db"
    runs = {r.data.tags["output_dir"].rsplit("/", 1)[-1]: r for r in mlflow_runs(db)}
    assert runs["run"].info.status == "KILLED"
    assert name in runs["run"].data.tags["lmexp.failure_reason"]

    resumed = run_module("lmexp.train", *args, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    runs = {r.data.tags["output_dir"].rsplit("/", 1)[-1]: r for r in mlflow_runs(db)}
    run, ref = runs["run"], runs["ref"]
    assert run.info.status == "FINISHED"
    got, want = histories(db, run.info.run_id), histories(db, ref.info.run_id)
    assert [s for s, _ in got["valid_ppl"]] == [1, 2]
    assert got == want  # train_ppl too: equal numbers
    assert run.data.metrics["test_ppl"] == ref.data.metrics["test_ppl"]


def test_the_advice_after_sigterm_resumes_and_another_folder_forks_a_run_of_its_own(tmp_path):
    """The stopped run prints the exact command that resumes it. Its checkpoint given to a run
    in another folder, with other settings, starts a new MLflow run with those settings as its
    params; the stopped run's MLflow run is not touched, and the advised command then finishes
    it with each of its epochs logged once."""
    args = [*SLOW_TINY, "trainer.max_epochs=2", "trainer.progress=true",
            "trainer.log_every_n_batches=20"]  # fmt: skip
    proc = start([*args, "hydra.run.dir=A"], tmp_path)
    wait_for_line(tmp_path / "A" / "train.log", "epoch 1/", proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]
    (advice,) = [ln.split("To resume: run ", 1)[1] for ln in out.splitlines() if "To resume" in ln]
    command = shlex.split(advice.removesuffix("."))
    assert command == ["python", "-m", "lmexp.train", *args, f"hydra.run.dir={tmp_path / 'A'}"]

    last = tmp_path / "A" / "checkpoints" / "last.pt"
    fork = run_module(
        "lmexp.train", *args, "lr_policy.lr=0.5", "optimizer=sgd", f"trainer.ckpt_path={last}",
        "hydra.run.dir=B", cwd=tmp_path,
    )  # fmt: skip
    assert fork.returncode == 0, fork.stderr[-3000:]
    db = tmp_path / "mlflow.db"
    runs = {r.data.tags["output_dir"].rsplit("/", 1)[-1]: r for r in mlflow_runs(db)}
    a, b = runs["A"], runs["B"]
    assert a.info.status == "KILLED" and "valid_ppl" not in a.data.metrics  # left as it was
    assert b.info.status == "FINISHED" and b.info.run_id != a.info.run_id
    assert (b.data.params["lr_policy.lr"], b.data.params["optimizer.kind"]) == ("0.5", "sgd")
    assert b.data.tags["lmexp.started_from"] == f"{last} (MLflow run {a.info.run_id})"

    resumed = run_module(*command[2:], cwd=tmp_path)  # the advice, as printed
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    runs = {r.data.tags["output_dir"].rsplit("/", 1)[-1]: r for r in mlflow_runs(db)}
    assert set(runs) == {"A", "B"} and runs["A"].info.status == "FINISHED"
    for run in runs.values():
        for key in COMPARED:
            assert [s for s, _ in metric_history(db, run.info.run_id, key)] == [1, 2], key
    assert runs["A"].data.params["lr_policy.lr"] == "1.0"


def test_divergence_fails_the_run_and_keeps_the_good_checkpoint(tmp_path):
    good = run_module(
        "lmexp.train", *TINY, "trainer.max_epochs=1", "hydra.run.dir=run", cwd=tmp_path
    )
    assert good.returncode == 0, good.stderr[-3000:]
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    before = last.read_bytes()
    bad = run_module(  # a run of its own from that checkpoint, with a diverging lr
        "lmexp.train", *TINY, "trainer.max_epochs=3", "lr_policy.lr=1e9", "trainer.max_grad_norm=1e30",
        "trainer.log_every_n_batches=1", f"trainer.ckpt_path={last}", "hydra.run.dir=bad", cwd=tmp_path,
    )  # fmt: skip
    assert bad.returncode == 1  # a chain of commands stops (a sweep's job returns +inf instead)
    assert "Run diverged" in bad.stdout + bad.stderr
    runs = {
        r.data.tags["output_dir"].rsplit("/", 1)[-1]: r for r in mlflow_runs(tmp_path / "mlflow.db")
    }
    assert runs["run"].info.status == "FINISHED" and runs["bad"].info.status == "FAILED"
    assert "diverged" in runs["bad"].data.tags["lmexp.failure_reason"]
    assert last.read_bytes() == before  # the good checkpoint is untouched
    assert not (tmp_path / "bad" / "checkpoints" / "last.pt").exists()  # and no NaN one written


def test_a_finite_but_hopeless_perplexity_fails_the_run_as_diverged(tmp_path):
    """lr=25 on the tiny corpus: finite losses, validation perplexity far above the 50-word
    vocabulary's. The run ends FAILED with the reason, not FINISHED as a result."""
    proc = run_module(
        "lmexp.train", *TINY, "trainer.max_epochs=2", "lr_policy.lr=25.0", "hydra.run.dir=run",
        cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-3000:]  # a sweep's job returns +inf instead
    (run,) = mlflow_runs(tmp_path / "mlflow.db")
    assert run.info.status == "FAILED"
    reason = run.data.tags["lmexp.failure_reason"]
    assert "diverged: validation perplexity" in reason and "1000x a uniform guess" in reason
    assert "test_ppl" not in run.data.metrics


def test_unreachable_tracking_server_fails_within_seconds_naming_it(tmp_path):
    started = time.monotonic()
    proc = run_module(
        "lmexp.train", *TINY, "logger.tracking_uri=http://127.0.0.1:9", cwd=tmp_path, timeout=60
    )
    assert proc.returncode == 2
    assert "Tracking server http://127.0.0.1:9 cannot be reached" in proc.stdout + proc.stderr
    assert "Epoch 1" not in proc.stdout + proc.stderr
    assert time.monotonic() - started < 30
    assert list((tmp_path / "outputs").rglob("*")) == []  # no folder of a run that never ran


def test_unreachable_tracking_server_with_fallback_trains_and_says_where(tmp_path):
    proc = run_module(
        "lmexp.train", *TINY, "trainer.max_epochs=1", "logger.tracking_uri=http://127.0.0.1:9",
        "logger.fallback_uri=sqlite:///fallback.db", cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Logging to the fallback" in proc.stdout + proc.stderr
    (run,) = mlflow_runs(tmp_path / "fallback.db")
    assert run.info.status == "FINISHED"


@pytest.mark.parametrize(
    "extra",
    # Every optimizer, cell and schedule is stopped mid-epoch and resumed in-process by
    # test_registries; these are the cases whose checkpoint differs in shape, killed for real.
    [
        ["model.cell=gru", "lr_policy.lr=0.3"],
        # its state is the last model.context token ids: a checkpoint mid-epoch holds them
        [
            "model.arch=transformer",
            "model.hidden_size=64",
            "model.context=12",
            "optimizer=adam",
            "lr_policy.lr=0.003",
        ],  # fmt: skip
        ["trainer.bptt_jitter=true", "trainer.loss_reduction=mean", "lr_policy.lr=10"],
        [  # the whole AWD-LSTM recipe at a tiny size: its 3 layers of two sizes, tied, every
            # regulariser, random BPTT lengths and NT-ASGD (averaging from the first epoch)
            "experiment=awd_lstm",
            "model.hidden_size=48",
            "model.embedding_size=24",
            "trainer.num_steps=20",
            "trainer.batch_size=10",
            "trainer.eval_num_steps=35",
            "lr_policy.lr=10",
            "optimizer.nonmono=1",
            "trainer.max_epochs=4",
            "trainer.seed=0",
        ],  # fmt: skip
    ],
    ids=["gru", "transformer", "bptt_jitter", "awd_lstm"],
)
def test_sigkill_mid_epoch_resumes_bit_identically_whatever_the_optimizer_or_cell(tmp_path, extra):
    """A GRU's one-tensor state, the Transformer's token memory with Adam's moments, the random
    BPTT lengths and NT-ASGD's average are in the mid-epoch checkpoint: the resumed run is the
    uninterrupted one, epoch for epoch and its test too."""
    args = [*SLOW_TINY, *extra, "trainer.ckpt_every_n_batches=10"]
    reference = run_module("lmexp.train", *args, "hydra.run.dir=ref", cwd=tmp_path)
    assert reference.returncode == 0, reference.stderr[-3000:]

    proc = start([*args, "hydra.run.dir=killed"], tmp_path)
    wait_for_line(tmp_path / "killed" / "train.log", "Epoch 1:", proc)
    time.sleep(0.5)  # into epoch 2, past a mid-epoch checkpoint or two
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    saved = checkpoint.load(tmp_path / "killed" / "checkpoints" / "last.pt")
    assert saved["progress"], "killed at an epoch's end, not inside one"
    lstm = not any(e.startswith(("model.cell=", "model.arch=")) for e in extra)
    assert len(saved["state"]) == (2 if lstm else 1)  # h and c; h; the Transformer's memory
    assert saved["step"]["optimizer"]["state"] or not any("optimizer=" in e for e in extra)

    resumed = run_module("lmexp.train", *args, "hydra.run.dir=killed", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resumed from" in (tmp_path / "killed" / "train.log").read_text()
    db = tmp_path / "mlflow.db"
    runs = {r.data.tags["output_dir"].rsplit("/", 1)[-1]: r for r in mlflow_runs(db)}
    ref, killed = runs["ref"], runs["killed"]
    assert histories(db, killed.info.run_id) == histories(db, ref.info.run_id)
    assert killed.data.metrics["test_ppl"] == ref.data.metrics["test_ppl"]
    # ASGD's average does not steer the weights, so it is compared where it lives: the final
    # optimizer state, tensor for tensor (step count, eta, mu, ax; Adam's step and moments).
    want, got = (
        checkpoint.load(tmp_path / run / "checkpoints" / "last.pt")["step"]["optimizer"]["state"]
        for run in ("ref", "killed")
    )
    assert want.keys() == got.keys()
    for index, values in want.items():
        for key, value in values.items():
            assert torch.equal(value, got[index][key]), (index, key)


def test_resuming_on_another_text_corpus_is_refused(tmp_path):
    """For data=text, data.root chooses the corpus: a run continued on another folder's text
    is refused in one sentence, before any training, and its checkpoint is left as it was."""
    names = {"train": "train.txt", "valid": "valid.txt", "test": "test.txt"}
    first, other = (text_folder(tmp_path / n, names, seed=s) for n, s in (("a", 1), ("b", 2)))
    args = [*TINY, "data=text", "hydra.run.dir=run"]
    proc = run_module(
        "lmexp.train", *args, f"data.root={first}", "trainer.max_epochs=1", cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    before = last.read_bytes()
    proc = run_module(
        "lmexp.train", *args, f"data.root={other}", "trainer.max_epochs=2", cwd=tmp_path
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    assert "last.pt was trained on another vocabulary than this run's data" in out
    assert "Traceback" not in out and last.read_bytes() == before
    again = run_module(
        "lmexp.train", *args, f"data.root={first}", "trainer.max_epochs=2", cwd=tmp_path
    )
    assert again.returncode == 0 and "Resumed from" in (tmp_path / "run" / "train.log").read_text()


@pytest.mark.parametrize("where", ["hydra.run.dir=afile/run", "hydra.run.dir=/proc/lmexp-run"])
def test_unwritable_output_folder_fails_at_start(tmp_path, where):
    (tmp_path / "afile").write_text("not a folder")
    proc = run_module("lmexp.train", *TINY, where, cwd=tmp_path, timeout=60)
    assert proc.returncode == 2
    text = proc.stdout + proc.stderr
    assert "is not writable" in text and "hydra.run.dir" in text and "Traceback" not in text
    assert not (tmp_path / "mlflow.db").exists()


def test_resume_with_different_model_is_refused(tmp_path):
    first = run_module(
        "lmexp.train", *TINY, "trainer.max_epochs=1", "hydra.run.dir=run", cwd=tmp_path
    )
    assert first.returncode == 0
    proc = run_module(
        "lmexp.train", *TINY, "model.hidden_size=64", "hydra.run.dir=run", cwd=tmp_path
    )
    assert proc.returncode == 2
    assert (
        "was trained with model.hidden_size=32 but the config has 64" in proc.stdout + proc.stderr
    )


def test_resuming_in_a_run_folder_with_other_hyperparameters_is_refused(tmp_path):
    """The same folder means the same experiment: a different lr or dropout (e.g. an Optuna
    trial rerun into an old sweep folder) must not silently continue another run's weights."""
    first = run_module(
        "lmexp.train", *TINY, "trainer.max_epochs=1", "hydra.run.dir=run", cwd=tmp_path
    )
    assert first.returncode == 0
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    before = last.read_bytes()
    proc = run_module(
        "lmexp.train", *TINY, "trainer.max_epochs=2", "dropout.dp_keep_prob=0.5",
        "hydra.run.dir=run", cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 2
    text = proc.stdout + proc.stderr
    assert "belongs to a run with dropout.dp_keep_prob=1.0, not 0.5" in text
    assert "Traceback" not in text and "Epoch 2" not in text
    assert last.read_bytes() == before
    # Extending the same run (more epochs, another thread count) is still a resume.
    more = run_module(
        "lmexp.train", *TINY, "trainer.max_epochs=2", "trainer.threads=2", "hydra.run.dir=run",
        cwd=tmp_path,
    )  # fmt: skip
    assert more.returncode == 0 and "Resumed from" in more.stdout + more.stderr
    # Its params keep the first values (MLflow cannot change a param); a tag says what changed.
    (run,) = mlflow_runs(tmp_path / "mlflow.db")
    assert run.data.params["trainer.max_epochs"] == "1"
    assert "trainer.max_epochs=2 (was 1)" in run.data.tags["lmexp.changed_at_epoch_1"]
    assert "trainer.threads=2 (was " in run.data.tags["lmexp.changed_at_epoch_1"]


def test_a_rerun_after_a_kill_before_the_first_checkpoint_continues_the_same_mlflow_run(tmp_path):
    """SIGKILL in epoch 1, before any checkpoint: the same command starts over, says so in one
    line, and does it in the run the killed attempt opened: one job stays one MLflow run."""
    args = [*SLOW_TINY, "trainer.max_epochs=1", "trainer.progress=true", "hydra.run.dir=run"]
    proc = start(args, tmp_path)
    wait_for_line(tmp_path / "run" / "train.log", "epoch 1/", proc)  # a tenth of epoch 1 done
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert not (tmp_path / "run" / "checkpoints" / "last.pt").exists()
    (killed,) = mlflow_runs(tmp_path / "mlflow.db")
    assert killed.info.status == "RUNNING"  # SIGKILL: nobody could close it

    rerun = run_module("lmexp.train", *args, cwd=tmp_path)
    text = rerun.stdout + rerun.stderr
    assert rerun.returncode == 0, text[-3000:]
    assert (
        f"No checkpoint in {tmp_path / 'run' / 'checkpoints'}: MLflow run {killed.info.run_id}, "
        "interrupted before its first checkpoint, starts again." in text
    )
    (run,) = mlflow_runs(tmp_path / "mlflow.db")
    assert run.info.run_id == killed.info.run_id and run.info.status == "FINISHED"
    assert [s for s, _ in metric_history(tmp_path / "mlflow.db", run.info.run_id, "valid_ppl")] == [
        1
    ]


def test_resume_false_in_a_folder_with_a_run_keeps_that_runs_checkpoints(tmp_path):
    args = [*TINY, "trainer.max_epochs=1", "hydra.run.dir=run"]
    first = run_module("lmexp.train", *args, cwd=tmp_path)
    assert first.returncode == 0
    saved = {p.name: p.read_bytes() for p in (tmp_path / "run" / "checkpoints").iterdir()}
    again = run_module("lmexp.train", *args, "trainer.resume=false", cwd=tmp_path)
    text = again.stdout + again.stderr
    assert again.returncode == 0, text[-3000:]
    (kept,) = (tmp_path / "run").glob("earlier-*")
    assert (
        f"trainer.resume=false: a new run in {tmp_path / 'run'}; the earlier run's checkpoints "
        f"and model are kept in {kept}, not overwritten." in text
    )
    assert {p.name: p.read_bytes() for p in (kept / "checkpoints").iterdir()} == saved
    assert (kept / "model" / "model.pt").is_file()
    assert "the earlier MLflow run" in text and "stays FINISHED" in text
    runs = mlflow_runs(tmp_path / "mlflow.db")
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)


def test_tampered_checkpoint_passed_by_path_is_refused(tmp_path):
    first = run_module(
        "lmexp.train", *TINY, "trainer.max_epochs=1", "hydra.run.dir=run", cwd=tmp_path
    )
    assert first.returncode == 0
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    raw = bytearray(last.read_bytes())
    raw[-50] ^= 1
    last.write_bytes(bytes(raw))
    proc = run_module("lmexp.train", *TINY, f"trainer.ckpt_path={last}", cwd=tmp_path)
    assert proc.returncode == 2
    assert f"{last} is corrupt" in proc.stdout + proc.stderr


def test_sigusr2_checkpoints_then_hands_over_to_the_previous_handler(tmp_path):
    """Under submitit the handler installed before ours requeues the job: it must run, after our checkpoint."""
    args = [
        *SLOW_TINY,
        "trainer.max_epochs=2",
        "trainer.progress=true",
        "trainer.log_every_n_batches=20",
        "hydra.run.dir=run",
    ]
    wrapper = tmp_path / "wrapper.py"
    wrapper.write_text(
        "import pathlib, signal, sys\n"
        "def requeue(signum, frame):\n"
        "    ckpt = pathlib.Path('run/checkpoints/last.pt').exists()\n"
        "    pathlib.Path('requeued').write_text(f'{signum} {ckpt}')\n"
        "    sys.exit(0)\n"
        "signal.signal(signal.SIGUSR2, requeue)\n"
        f"sys.argv = ['lmexp.train', *{args!r}]\n"
        "from lmexp.train import main\n"
        "main()\n"
    )
    proc = subprocess.Popen(
        [sys.executable, str(wrapper)],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    wait_for_line(tmp_path / "run" / "train.log", "epoch 1/", proc)
    proc.send_signal(signal.SIGUSR2)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out[-3000:]
    assert (tmp_path / "requeued").read_text() == f"{int(signal.SIGUSR2)} True"
    saved = checkpoint.load(tmp_path / "run" / "checkpoints" / "last.pt")
    assert saved["progress"]["batch"] > 0


def test_rerunning_a_finished_run_changes_nothing(tmp_path):
    args = [*TINY, "trainer.max_epochs=2", "hydra.run.dir=run"]
    assert run_module("lmexp.train", *args, cwd=tmp_path).returncode == 0
    again = run_module("lmexp.train", *args, cwd=tmp_path)
    assert again.returncode == 0 and "already finished all 2 epochs" in again.stdout + again.stderr
    db = tmp_path / "mlflow.db"
    (run,) = mlflow_runs(db)
    assert run.info.status == "FINISHED"
    assert len(metric_history(db, run.info.run_id, "test_ppl")) == 1
    assert [s for s, _ in metric_history(db, run.info.run_id, "valid_ppl")] == [1, 2]


def test_ckpt_path_to_an_exported_model_starts_a_new_run_from_its_weights(tmp_path):
    """The exported model/model.pt (what a user reaches for to fine-tune) starts a new run from
    those weights; one that does not fit the config is refused before any run is created."""
    first = run_module(
        "lmexp.train", *TINY, "trainer.max_epochs=3", "hydra.run.dir=base", cwd=tmp_path
    )
    assert first.returncode == 0, first.stderr[-3000:]
    exported = tmp_path / "base" / "model" / "model.pt"
    db = tmp_path / "mlflow.db"
    (base,) = mlflow_runs(db)

    misfit = run_module(
        "lmexp.train", *TINY, "model.hidden_size=64", f"trainer.ckpt_path={exported}",
        "hydra.run.dir=misfit", cwd=tmp_path,
    )  # fmt: skip
    assert misfit.returncode == 2
    text = misfit.stdout + misfit.stderr
    assert f"{exported} does not fit model=tiny with dropout=standard" in text, text[-3000:]
    assert "Traceback" not in text and "KeyError" not in text
    assert len(mlflow_runs(db)) == 1  # no run created

    tuned = run_module(
        "lmexp.train", *TINY, "trainer.max_epochs=1", f"trainer.ckpt_path={exported}",
        "hydra.run.dir=tuned", cwd=tmp_path,
    )  # fmt: skip
    assert tuned.returncode == 0, tuned.stderr[-3000:]
    assert f"Starting a new run from the weights of {exported}" in tuned.stdout + tuned.stderr
    (run,) = [r for r in mlflow_runs(db) if r.info.run_id != base.info.run_id]
    assert run.info.status == "FINISHED" and run.data.tags["init_from"] == str(exported)
    # Its first epoch starts where the exported model ended, not from scratch.
    tuned_first = metric_history(db, run.info.run_id, "valid_ppl")[0][1]
    base_curve = [v for _, v in metric_history(db, base.info.run_id, "valid_ppl")]
    assert tuned_first < base_curve[0] and tuned_first < 1.2 * base_curve[-1], (
        tuned_first,
        base_curve,
    )
