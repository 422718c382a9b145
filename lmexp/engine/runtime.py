"""Where and how a run executes: device, precision support, threads, seeds, provenance and
signals (preemption, SLURM's requeue). No Hydra, no MLflow; the files and folder locks a run
writes through are lmexp.files."""

from __future__ import annotations

import functools
import os
import platform
import random
import signal
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmexp.config import ConfigError, LmexpError, TrainerConfig


def select_device(requested: str, job_num: int | None = None) -> torch.device:
    """auto: CUDA when present, else CPU. Parallel sweep jobs are spread over the visible GPUs."""
    if requested == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        index = (job_num or 0) % torch.cuda.device_count()
        return torch.device("cuda", index)
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LmexpError(
            f"trainer.device={requested} but no CUDA device is visible; use trainer.device=auto or cpu."
        )
    return device


@functools.cache
def cpu_bf16_lstm_supported() -> bool:
    """Whether this CPU's oneDNN has a bf16 LSTM (AVX-512 BF16 / AMX CPUs do, AVX2-only ones not).

    Asked of the machine itself: one forward and backward of a 4-unit LSTM under bf16 autocast
    (about a millisecond). oneDNN honours ONEDNN_MAX_CPU_ISA, so `ONEDNN_MAX_CPU_ISA=AVX2` gives
    an AVX-512 machine the answer of an AVX2-only one (the tests use it to check both paths).
    """
    lstm = torch.nn.LSTM(4, 4)
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, _ = lstm(torch.randn(2, 1, 4))
        out.float().sum().backward()
    except RuntimeError:
        return False
    return True


def check_device_support(trainer: TrainerConfig, device_type: str) -> None:
    """Refuse, in one sentence, trainer settings the chosen device cannot run (before any work)."""
    if trainer.cuda_graphs and device_type != "cuda":
        raise ConfigError(
            f"Invalid config: trainer.cuda_graphs=True needs a CUDA device, but this run is on "
            f"{device_type} (no GPU visible); leave it off."
        )
    if trainer.precision == "fp16" and device_type != "cuda":
        raise ConfigError(
            f"Invalid config: trainer.precision='fp16' is a CUDA path (fp16 LSTM kernels and a "
            f"grad scaler), not {device_type}; use bf16 or fp32."
        )
    if trainer.precision == "bf16" and device_type == "cpu" and not cpu_bf16_lstm_supported():
        raise ConfigError(
            "Invalid config: trainer.precision='bf16' needs oneDNN's bf16 LSTM, which this CPU "
            f"({cpu_description()}) does not have (it needs AVX-512 BF16 or AMX); use "
            "trainer.precision=fp32 here, or run bf16 on a GPU."
        )


def cpu_description() -> str:
    """The CPU's model name and its vector extensions that matter for speed (for speed claims)."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and name in ("", platform.machine()):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")
    parts = [name, *(f for f in wanted if f in flags)]
    if os.environ.get("ONEDNN_MAX_CPU_ISA"):
        parts.append(f"oneDNN limited to ONEDNN_MAX_CPU_ISA={os.environ['ONEDNN_MAX_CPU_ISA']}")
    return ", ".join(parts)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({cpu_description()}; {torch.get_num_threads()} threads)"


# Set by a local parallel sweep for its jobs: how many of them train at once on this machine.
LOCAL_JOBS_ENV = "LMEXP_LOCAL_JOBS"
# And its own pid: a worker process whose parent is no longer that sweeper ends (lmexp.orchestration.jobs).
SWEEPER_PID_ENV = "LMEXP_SWEEPER_PID"


def physical_cores() -> int:
    try:
        import psutil

        return psutil.cpu_count(logical=False) or os.cpu_count() or 1
    except (
        ImportError
    ):  # psutil comes with lmexp; a bare GPU box running only the bench may lack it
        return os.cpu_count() or 1


def local_jobs_at_once(launcher: str, launcher_jobs: int | None, jobs: int) -> int:
    """How many of a sweep's `jobs` its launcher runs at once on this machine: joblib's n_jobs
    (-1: one per core), all of them for submitit's local launcher, one for the basic launcher
    (one after the other) and for SLURM (each job has a node's CPUs of its own)."""
    if "joblib" in launcher:
        n = launcher_jobs if launcher_jobs is not None and launcher_jobs > 0 else os.cpu_count()
        return max(1, min(n or 1, jobs))
    if "submitit" in launcher and "Local" in launcher:
        return max(1, jobs)
    return 1


def configure_threads(threads: int) -> int:
    """torch intra-op threads: the configured number, else the CPUs SLURM gave the job, else
    the physical cores shared among the local jobs that train at once (a local parallel sweep:
    cores // jobs, at least 1; all jobs on all cores made each of two jobs 2.4x slower), else
    one per physical core (a SLURM job sees the whole node's cores)."""
    if threads == 0 and os.environ.get("SLURM_CPUS_PER_TASK", "").isdigit():
        threads = int(os.environ["SLURM_CPUS_PER_TASK"])
    if threads == 0:
        at_once = os.environ.get(LOCAL_JOBS_ENV, "")
        threads = max(1, physical_cores() // (int(at_once) if at_once.isdigit() else 1))
    torch.set_num_threads(threads)
    return threads


# glibc's malloc serves each allocation above a threshold with its own mmap and gives freed heap
# back to the kernel above another: a training step frees its logits and gradients (tens of MB)
# and allocates them again, so with the defaults every step pays for fresh zeroed pages.
# Measured on PTB small (2 threads, docs/benchmarks.md): lmexp's step 8,491 -> 10,419 words/s.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (malloc.h)
MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # the most glibc accepts on a 64-bit machine


@functools.cache
def keep_freed_memory() -> bool:
    """Tell glibc's malloc to keep freed memory for reuse (no trimming, mmap only above 32 MiB)
    instead of handing it back to the kernel after each step; True if it took the settings.
    Once per process, before training on the CPU; a no-op where malloc is not glibc's."""
    import ctypes
    import ctypes.util

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(
            libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)
            and libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)
        )
    except (OSError, AttributeError):
        return False


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def git_commit(*folders: Path) -> str:
    for folder in folders:
        try:
            out = subprocess.run(
                ["git", "-C", str(folder), "rev-parse", "HEAD"],
                capture_output=True,
                text=True,
                timeout=5,
            )
        except (OSError, subprocess.SubprocessError):
            continue
        if out.returncode == 0:
            return out.stdout.strip()
    return "unknown"


# --- preemption --------------------------------------------------------------------------------


class Preemption:
    """Turns SIGTERM/SIGUSR1/SIGUSR2 (what SLURM sends before preemption or a time limit) and a
    first Ctrl-C (SIGINT) into a flag the loop polls between batches, so each is checkpointed
    and resumable; a second Ctrl-C raises KeyboardInterrupt at once. The previous handlers
    (submitit's requeue) run after the checkpoint is written, except Python's own for SIGINT,
    whose KeyboardInterrupt would only undo the clean stop."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT)

    def __init__(self) -> None:
        self.signum: int | None = None
        self.frame: Any = None
        self.previous: dict[int, Any] = {}

    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and self.signum is not None:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, not at the next batch
        self.signum = signum
        self.frame = frame

    @contextmanager
    def installed(self) -> Iterator[Preemption]:
        if threading.current_thread() is not threading.main_thread():
            yield self  # signals reach only the main thread; a threaded launcher handles them
            return
        for sig in self.SIGNALS:
            self.previous[sig] = signal.signal(sig, self._handle)
        try:
            yield self
        finally:
            for sig, handler in self.previous.items():
                signal.signal(sig, handler)

    def hand_over(self) -> None:
        """Run the handler that was installed before ours (submitit requeues the job there)."""
        handler = self.previous.get(self.signum)
        if callable(handler) and handler is not signal.default_int_handler:
            try:
                handler(self.signum, self.frame)
            except subprocess.CalledProcessError as err:
                if not requeue_under_way(err):
                    raise
                # What submitit does after a requeue it saw succeed: exit, for the requeued
                # job to resume from the checkpoint just written.
                raise SystemExit(-1) from None


def requeue_under_way(err: subprocess.CalledProcessError) -> bool:
    """Whether a failed command was `scontrol requeue` killed by SIGTERM. SLURM accepts the
    requeue, then signals every process of the job, scontrol among them when it has not exited
    yet; submitit's check_call then reports the accepted requeue as a failure, and the job would
    end with that error in its result file although SLURM runs it again. Only a requeue (or a
    cancel) sends the job SIGTERM at that moment, and either way the job is to end now."""
    cmd = err.cmd if isinstance(err.cmd, (list, tuple)) else str(err.cmd).split()
    return list(cmd[:2]) == ["scontrol", "requeue"] and err.returncode == -signal.SIGTERM
