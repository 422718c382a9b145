"""Sweeps on SLURM through Hydra's submitit launcher: checks before any job is submitted, and a
console that says what the jobs do.

check_cluster runs in the sweeping process before the parent run: sbatch must be on PATH, the
controller must answer, and the partition asked for must exist; each failure is one sentence
naming the setting. follow_jobs replaces submitit's job-state poller with one that reads squeue
when the cluster keeps no accounting (sacct then fails, and submitit warns on every poll while
it knows no state), and logs one line per job state change either way.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import time

from omegaconf import DictConfig, OmegaConf

from lmexp.config import LmexpError

log = logging.getLogger("lmexp.slurm")

TIMEOUT_S = 20.0  # for sinfo/squeue/sacct calls: a controller slower than this is unreachable
# The longest gap between two polls of the jobs' states (submitit's own is 600 s): shorter than
# SLURM's MinJobAge (300 s by default), after which squeue forgets a finished job.
POLL_S = 60


def uses_slurm(config: DictConfig) -> bool:
    """Whether the sweep's launcher submits its jobs to SLURM."""
    return "Slurm" in str(OmegaConf.select(config, "hydra.launcher._target_"))


def _run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=TIMEOUT_S)


def check_cluster(launcher: DictConfig) -> None:
    """sbatch present, the controller answering, hydra.launcher.partition known to it."""
    if shutil.which("sbatch") is None:
        raise LmexpError(
            "hydra/launcher=slurm submits jobs with SLURM's sbatch, which is not on this "
            "machine's PATH; launch the sweep from a SLURM login node, or pick a local launcher "
            "(hydra/launcher=joblib)."
        )
    try:
        proc = _run("sinfo", "--all", "--noheader", "--format=%P")  # hidden ones too
    except (OSError, subprocess.TimeoutExpired) as err:
        proc = subprocess.CompletedProcess([], 1, "", str(err))
    if proc.returncode != 0:
        reason = (proc.stderr.strip().splitlines() or ["no answer"])[-1]
        raise LmexpError(
            f"SLURM's controller does not answer (sinfo: {reason}); check that slurmctld is "
            "up and SLURM_CONF points at this cluster's slurm.conf, then launch again."
        )
    partitions = list(dict.fromkeys(p.rstrip("*") for p in proc.stdout.split()))
    wanted = OmegaConf.select(launcher, "partition")
    unknown = [p for p in str(wanted).split(",") if p not in partitions] if wanted else []
    if unknown:  # sbatch takes a list: the job runs in whichever has room first
        raise LmexpError(
            f"hydra.launcher.partition={wanted} is not a partition of this SLURM cluster (it has "
            f"{', '.join(partitions) or 'none'}); set hydra.launcher.partition to one of them."
        )


def accounting_works() -> bool:
    """Whether sacct answers here (clusters without accounting storage refuse every query)."""
    try:
        return _run("sacct", "--noheader", "--allocations", "--jobs=1").returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def follow_jobs() -> None:
    """Make submitit read job states from squeue where sacct cannot answer, and log each job's
    state changes once (submitit's own sacct poller stays where sacct works)."""
    from submitit.slurm import slurm

    if isinstance(slurm.SlurmJob.watcher, StateLogger):
        return
    base = slurm.SlurmInfoWatcher if accounting_works() else squeue_watcher(slurm.SlurmInfoWatcher)
    watcher = type("LmexpSlurmWatcher", (StateLogger, base), {})
    slurm.SlurmJob.watcher = watcher(delay_s=POLL_S)


class StateLogger:
    """Mixin for submitit's watchers: one log line per job state change."""

    def read_info(self, string: bytes | str) -> dict[str, dict[str, str]]:
        info = super().read_info(string)  # type: ignore[misc]
        seen = self.__dict__.setdefault("_lmexp_seen", {})
        for job_id, stats in sorted(info.items()):
            state = (stats.get("State") or "").split(" ")[0]
            if state and seen.get(job_id) != state and job_id in self._registered:  # type: ignore[attr-defined]
                seen[job_id] = state
                node = stats.get("NodeList", "")
                log.info("SLURM job %s: %s%s", job_id, state, f" on {node}" if node else "")
        return info


def squeue_watcher(base: type) -> type:
    """submitit's SLURM watcher asking squeue, which needs no accounting, instead of sacct.
    squeue's `%i|%T|%N` lines read as sacct's JobID|State|NodeList. A job squeue no longer
    lists has ended and been purged (MinJobAge): it becomes GONE, a state submitit counts as
    done, so the sweep reads its result file, or reports that it left none, instead of waiting
    forever for a job that will not write one (one ended by scancel, say)."""

    class SqueueWatcher(base):  # type: ignore[valid-type, misc]
        def _make_command(self) -> list[str] | None:
            to_check = sorted({x.split("_")[0] for x in self._registered - self._finished})
            if not to_check:
                return None
            return ["squeue", "--noheader", "--states=all", "--array", "--format=%i|%T|%N"] + [
                f"--jobs={','.join(to_check)}"
            ]

        def read_info(self, string: bytes | str) -> dict[str, dict[str, str]]:
            text = string.decode() if isinstance(string, bytes) else string
            return super().read_info("JobID|State|NodeList\n" + text)

        def update(self) -> None:
            command = self._make_command()
            if command is None:
                return
            self._num_calls += 1
            try:
                out = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S)
            except (OSError, subprocess.TimeoutExpired) as err:
                log.warning("squeue did not answer (%s); asking again at the next poll", err)
            else:
                # squeue exits 1 when none of the ids is known any more, 0 when some are.
                answered = out.returncode == 0 or "Invalid job id" in out.stderr
                info = self.read_info(out.stdout) if answered else {}
                for job_id in self._registered - self._finished:
                    if answered and job_id not in info:
                        info[job_id] = {"JobID": job_id, "State": "GONE", "NodeList": ""}
                        log.info("SLURM job %s: GONE (ended; squeue no longer lists it)", job_id)
                self._info_dict.update(info)
            self._last_status_check = time.time()
            for job_id in self._registered - self._finished:
                if self.is_done(job_id, mode="cache"):
                    self._finished.add(job_id)

    return SqueueWatcher
