"""lmexp.engine.runtime in-process, with real signals sent to this process: preemption and Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess

import pytest
import torch

from lmexp.engine.runtime import Preemption

# Fast, in-process tests of the library: the unit lane (pytest -m unit).
pytestmark = pytest.mark.unit


@pytest.mark.parametrize("sig", Preemption.SIGNALS, ids=lambda s: signal.Signals(s).name)
def test_a_stop_signal_is_a_flag_the_loop_polls_and_the_handlers_come_back(sig):
    before = signal.getsignal(sig)
    preemption = Preemption()
    with preemption.installed():
        assert not preemption.requested()
        os.kill(os.getpid(), sig)
        assert preemption.requested() and preemption.signum == sig
    assert signal.getsignal(sig) is before


def test_a_second_ctrl_c_raises_keyboard_interrupt_at_once():
    preemption = Preemption()
    with preemption.installed():
        os.kill(os.getpid(), signal.SIGINT)  # the first: checkpoint at the next batch
        assert preemption.requested()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)  # the second: now


def test_hand_over_runs_the_previous_handler_but_not_pythons_keyboard_interrupt():
    seen = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: seen.append(signum))
    try:
        usr1 = Preemption()
        with usr1.installed():
            os.kill(os.getpid(), signal.SIGUSR1)
        usr1.hand_over()
        assert seen == [signal.SIGUSR1]
    finally:
        signal.signal(signal.SIGUSR1, previous)
    # Python's own Ctrl-C handler, set here: a shell that starts pytest in the background
    # leaves SIGINT ignored, and then Python never installs it.
    interactive = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        ctrl_c = Preemption()
        with ctrl_c.installed():
            os.kill(os.getpid(), signal.SIGINT)
        assert ctrl_c.previous[signal.SIGINT] is signal.default_int_handler
        try:
            ctrl_c.hand_over()
        except KeyboardInterrupt:
            pytest.fail("hand_over ran Python's SIGINT handler, undoing the clean stop")
    finally:
        signal.signal(signal.SIGINT, interactive)


@pytest.mark.parametrize(
    ("script", "ends"),
    [
        ('kill -TERM "$$"', SystemExit),  # SLURM's requeue signalled scontrol: it was accepted
        ("exit 1", subprocess.CalledProcessError),  # scontrol refused: the error stands
    ],
)
def test_a_requeue_whose_scontrol_the_requeue_itself_killed_ends_the_job_as_requeued(
    tmp_path, monkeypatch, script, ends
):
    """submitit's handler runs `scontrol requeue <job>` with check_call; SLURM accepts it and
    SIGTERMs the job's processes, scontrol too when it has not exited yet. A real scontrol
    stand-in on PATH, killed by a real SIGTERM, makes check_call fail as it does on a cluster."""
    (tmp_path / "scontrol").write_text(f"#!/bin/sh\n{script}\n")
    (tmp_path / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")

    def submitit_requeue(signum, frame):  # submitit's SlurmJobEnvironment._requeue
        subprocess.check_call(["scontrol", "requeue", "5"], timeout=60)

    previous = signal.signal(signal.SIGUSR2, submitit_requeue)
    try:
        usr2 = Preemption()
        with usr2.installed():
            os.kill(os.getpid(), signal.SIGUSR2)
        with pytest.raises(ends) as stopped:
            usr2.hand_over()
        if ends is SystemExit:
            assert stopped.value.code == -1  # as submitit exits after a requeue
    finally:
        signal.signal(signal.SIGUSR2, previous)


def test_local_jobs_at_once_follow_the_launcher():
    from lmexp.engine.runtime import local_jobs_at_once

    joblib = "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"
    assert local_jobs_at_once(joblib, 3, 8) == 3 and local_jobs_at_once(joblib, 3, 2) == 2
    assert local_jobs_at_once(joblib, -1, 64) == os.cpu_count()
    assert (
        local_jobs_at_once("hydra._internal.core_plugins.basic_launcher.BasicLauncher", None, 8)
        == 1
    )
    local = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher"
    slurm = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert local_jobs_at_once(local, None, 4) == 4 and local_jobs_at_once(slurm, None, 4) == 1


def test_threads_unset_share_the_cores_among_local_jobs(monkeypatch):
    from lmexp.engine.runtime import LOCAL_JOBS_ENV, configure_threads, physical_cores

    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
        monkeypatch.setenv(LOCAL_JOBS_ENV, "2")
        assert configure_threads(0) == max(1, physical_cores() // 2) == torch.get_num_threads()
        monkeypatch.setenv(LOCAL_JOBS_ENV, "64")
        assert configure_threads(0) == 1
        assert configure_threads(3) == 3  # an explicit trainer.threads wins
        monkeypatch.delenv(LOCAL_JOBS_ENV)
        assert configure_threads(0) == physical_cores()
    finally:
        torch.set_num_threads(before)


KEPT_PROBE = """
import ctypes, sys
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
if sys.argv[1] == "keep":
    from lmexp.engine.runtime import keep_freed_memory
    assert keep_freed_memory()
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
before = rss()
for _ in range(3):  # what a step does: logits, their gradient and more (16 MB each), freed
    bufs = [libc.malloc(16 << 20) for _ in range(3)]
    for buf in bufs:
        ctypes.memset(buf, 1, 16 << 20)
    for buf in bufs:
        libc.free(ctypes.c_void_p(buf))
print(rss() - before)
"""


@pytest.mark.skipif(
    not os.path.exists("/proc/self/statm") or os.uname().sysname != "Linux", reason="glibc only"
)
def test_keep_freed_memory_keeps_a_steps_freed_buffers_for_the_next_step():
    """With glibc's defaults the buffers a step frees (48 MB here) go back to the kernel, and
    the next step maps fresh zeroed pages; after keep_freed_memory the process keeps them."""
    import subprocess
    import sys

    kept = {
        how: int(subprocess.run([sys.executable, "-c", KEPT_PROBE, how], capture_output=True,
                                text=True, check=True).stdout)
        for how in ("default", "keep")
    }  # fmt: skip
    assert kept["default"] < 8 << 20, kept  # handed back
    assert kept["keep"] >= 40 << 20, kept  # kept for the next step
