"""Real team components for tests, started and stopped by the test run itself: munge and a
single-node SLURM cluster on this machine, a PostgreSQL cluster in a temp folder on a loopback
port, and an `mlflow server` over it that serves the artifacts (jobs need no access to the
artifact folder). Each is a context manager that stops what it started, also when a test fails.

Run by hand to poke at the same setup: `python tests/services.py` starts everything, prints how
to reach it, and stops it all on Enter.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

SLURM_PROGRAMS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scancel", "sinfo")
POSTGRES_PROGRAMS = ("initdb", "pg_ctl", "psql")


def pg_program(name: str) -> str | None:
    """A PostgreSQL server program: on PATH, or where Debian's postgresql package puts it."""
    found = shutil.which(name)
    if found is None:
        versions = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))
        found = str(versions[-1]) if versions else None
    return found


def missing_programs() -> list[str]:
    """What this machine lacks to run the cluster tests (empty when they can run)."""
    missing = [p for p in SLURM_PROGRAMS if shutil.which(p) is None]
    missing += [p for p in POSTGRES_PROGRAMS if pg_program(p) is None]
    if os.geteuid() != 0:
        missing.append("root (slurmd and munged run as root here)")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        missing.append("psycopg (pip install 'lmexp[server]')")
    return missing


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what: str, ready, timeout: float, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        time.sleep(0.5)
    tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
    raise RuntimeError(f"{what}: not there after {timeout:.0f} s\n{tail}")


def _stop(proc: subprocess.Popen, timeout: float = 20) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --- munge + SLURM ----------------------------------------------------------------------------

MUNGE_SOCKET = Path("/run/munge/munge.socket.2")  # where SLURM's auth/munge looks by default


def _munge_works() -> bool:
    if shutil.which("munge") is None:
        return False
    enc = subprocess.run(["munge", "-n"], capture_output=True)
    if enc.returncode != 0:
        return False
    return subprocess.run(["unmunge"], input=enc.stdout, capture_output=True).returncode == 0


@contextlib.contextmanager
def munge() -> Iterator[None]:
    """munged, unless one already answers (then it is left as it is)."""
    if _munge_works():
        yield
        return
    MUNGE_SOCKET.parent.mkdir(parents=True, exist_ok=True)
    shutil.chown(MUNGE_SOCKET.parent, "munge", "munge")
    proc = subprocess.Popen(
        ["runuser", "-u", "munge", "--", "munged", "--foreground"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for("munged", _munge_works, 20)
        yield
    finally:
        _stop(proc)


SLURM_CONF = """\
ClusterName=lmexptest
SlurmctldHost={host}
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
ReturnToService=2
# Finished jobs leave squeue after 5 s (300 by default): the sweeps must not depend on seeing
# a job's last state there.
MinJobAge=5
KillWait=30
SchedulerType=sched/builtin
# A requeued job waits cred_expire + 1 s before it may start again (120 s by default) and the
# scheduler's periodic pass (60 s): short here, so that the time-limit test requeues quickly.
AuthInfo=cred_expire=10
SchedulerParameters=sched_interval=2
NodeName={host} CPUs={cpus} RealMemory={mem_mb} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
PartitionName=cpu Nodes={host} MaxTime=INFINITE State=UP
"""


@dataclass
class Slurm:
    """A running single-node cluster: `env` holds SLURM_CONF for its clients (sbatch, squeue)."""

    root: Path
    env: dict[str, str]
    host: str

    def run(self, *cmd: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            list(cmd), env={**os.environ, **self.env}, capture_output=True, text=True, timeout=30
        )

    def jobs(self) -> dict[str, str]:
        """Job id -> state of every job the controller still knows (finished ones included)."""
        out = self.run("squeue", "-h", "-t", "all", "-o", "%i %T").stdout
        return dict(line.split() for line in out.splitlines() if line.strip())

    def submitted(self) -> set[str]:
        """Every job id the controller accepted since it started, from its log: unlike squeue,
        which forgets an ended job MinJobAge (5 s here) later, this never loses one."""
        log = (self.root / "slurmctld.log").read_text(errors="replace")
        return set(re.findall(r"_slurm_rpc_submit_batch_job: JobId=(\d+)", log))

    def log(self) -> str:
        return "\n".join(
            (self.root / name).read_text(errors="replace")[-4000:]
            for name in ("slurmctld.log", "slurmd.log")
            if (self.root / name).exists()
        )


def _node_memory_mb() -> int:
    with open("/proc/meminfo") as f:
        total_kb = int(next(line for line in f if line.startswith("MemTotal")).split()[1])
    return total_kb // 1024 - 512  # slurmd refuses a node that claims more than it has


@contextlib.contextmanager
def slurm_cluster(root: Path) -> Iterator[Slurm]:
    """munge + slurmctld + slurmd for this host, in the foreground as our children."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "state").mkdir(exist_ok=True)
    (root / "spool").mkdir(exist_ok=True)
    host = socket.gethostname().split(".")[0]
    conf = root / "slurm.conf"
    conf.write_text(
        SLURM_CONF.format(
            host=host,
            root=root,
            ctld_port=free_port(),
            slurmd_port=free_port(),
            cpus=os.cpu_count(),
            mem_mb=_node_memory_mb(),
        )
    )
    env = {"SLURM_CONF": str(conf)}
    full_env = {**os.environ, **env}
    with munge():
        ctld = subprocess.Popen(
            ["slurmctld", "-D", "-i", "-f", str(conf)],
            env=full_env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        slurmd = subprocess.Popen(
            ["slurmd", "-D", "-f", str(conf)],
            env=full_env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        cluster = Slurm(root=root, env=env, host=host)
        try:

            def idle() -> bool:
                out = cluster.run("sinfo", "-h", "-o", "%T").stdout.split()
                return bool(out) and all(s == "idle" for s in out)

            wait_for("SLURM", idle, 60, root / "slurmctld.log")
            yield cluster
        finally:
            cluster.run("scancel", "--full", "--user", "root")
            deadline = time.monotonic() + 40
            while time.monotonic() < deadline and any(
                state in ("RUNNING", "COMPLETING", "PENDING", "CONFIGURING")
                for state in cluster.jobs().values()
            ):
                time.sleep(1)
            _stop(slurmd)
            _stop(ctld)


# --- PostgreSQL + mlflow server ---------------------------------------------------------------


@dataclass
class Postgres:
    root: Path
    port: int
    user: str = "lmexp"
    password: str = "s3cret-pw"

    def uri(self, database: str, password: str | None = None) -> str:
        pw = self.password if password is None else password
        return f"postgresql://{self.user}:{pw}@127.0.0.1:{self.port}/{database}"

    def psql(self, sql: str) -> str:
        proc = subprocess.run(
            [
                "runuser",
                "-u",
                "postgres",
                "--",
                pg_program("psql") or "psql",
                "-h",
                str(self.root),
                "-p",
                str(self.port),
            ]
            + ["-d", "postgres", "-tAc", sql],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"psql {sql!r}: {proc.stderr}")
        return proc.stdout.strip()

    def create_database(self, name: str) -> str:
        """A fresh, empty database owned by our user; returns its URI."""
        self.psql(f'CREATE DATABASE "{name}" OWNER {self.user}')
        return self.uri(name)


@contextlib.contextmanager
def postgres(parent: Path | None = None) -> Iterator[Postgres]:
    """A PostgreSQL cluster of its own on a loopback port, password auth over TCP."""
    root = Path(tempfile.mkdtemp(prefix="lmexp-pg-", dir=parent))
    root.chmod(0o755)
    shutil.chown(root, "postgres", "postgres")
    data = root / "data"
    pg = Postgres(root=root, port=free_port())

    def as_postgres(program: str, *args: str) -> subprocess.CompletedProcess:
        cmd = ["runuser", "-u", "postgres", "--", pg_program(program) or program, *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120)

    try:
        init = as_postgres(
            "initdb", "-D", str(data), "-U", "postgres", "--auth-local=trust",
            "--auth-host=scram-sha-256",
        )  # fmt: skip
        if init.returncode != 0:
            raise RuntimeError(f"initdb failed: {init.stderr}")
        options = f"-p {pg.port} -k {root} -c listen_addresses=127.0.0.1 -c max_connections=200"
        start = as_postgres(
            "pg_ctl", "-D", str(data), "-o", options, "-l", str(root / "postgres.log"), "-w",
            "start",
        )  # fmt: skip
        if start.returncode != 0:
            raise RuntimeError(f"pg_ctl start failed: {start.stderr}{start.stdout}")
        pg.psql(f"CREATE ROLE {pg.user} LOGIN PASSWORD '{pg.password}'")
        yield pg
    finally:
        if (data / "postmaster.pid").exists():
            as_postgres("pg_ctl", "-D", str(data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)


@dataclass
class MlflowServer:
    """`mlflow server` over a PostgreSQL database, serving artifacts itself; restartable."""

    backend_uri: str
    artifacts: Path
    log_path: Path
    port: int = 0
    proc: subprocess.Popen | None = None
    options: tuple[str, ...] = ()  # more `mlflow server` options, such as --app-name basic-auth
    env: dict[str, str] | None = None  # more environment for the server

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def start(self, timeout: float = 120) -> None:
        self.port = self.port or free_port()
        cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", self.backend_uri]
        cmd += ["--artifacts-destination", str(self.artifacts), "--serve-artifacts"]
        cmd += ["--host", "127.0.0.1", "--port", str(self.port), "--workers", "1", *self.options]
        log = open(self.log_path, "a")  # noqa: SIM115 - the server's whole life
        self.proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, **(self.env or {})},
        )
        wait_for(f"mlflow server on {self.url}", self.healthy, timeout, self.log_path)

    def stop(self) -> None:
        """Stop the server and its workers (it runs in a process group of its own)."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None


@contextlib.contextmanager
def mlflow_server(backend_uri: str, folder: Path) -> Iterator[MlflowServer]:
    folder.mkdir(parents=True, exist_ok=True)
    server = MlflowServer(backend_uri, folder / "artifacts", folder / "mlflow-server.log")
    try:
        server.start()
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def auth_mlflow_server(
    backend_uri: str, users_uri: str, folder: Path, admin: tuple[str, str]
) -> Iterator[MlflowServer]:
    """`mlflow server --app-name basic-auth`, as the README's team recipe runs it: its users in
    users_uri (a database of their own), default permission READ, `admin` the administrator,
    --allowed-hosts its own loopback names (a foreign Host header is refused)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "auth.ini").write_text(
        "[mlflow]\ndefault_permission = READ\n"
        f"database_uri = {users_uri}\nadmin_username = {admin[0]}\n"
    )
    port = free_port()
    server = MlflowServer(
        backend_uri, folder / "artifacts", folder / "mlflow-server.log", port=port,
        options=("--app-name", "basic-auth", "--allowed-hosts", f"127.0.0.1:{port},localhost:{port}"),
        env={
            "MLFLOW_AUTH_CONFIG_PATH": str(folder / "auth.ini"),
            "MLFLOW_AUTH_ADMIN_PASSWORD": admin[1],
            "MLFLOW_FLASK_SERVER_SECRET_KEY": "lmexp-test-csrf-key",
        },
    )  # fmt: skip
    try:
        server.start()
        yield server
    finally:
        server.stop()


def add_team(
    url: str, admin: tuple[str, str], experiment: str, writers: dict[str, str],
    readers: dict[str, str],
) -> str:  # fmt: skip
    """As the admin, with MLflow's own client (the README's recipe): create the users and the
    experiment, and grant the writers EDIT on it (the readers keep the default READ). Returns
    the experiment's id."""
    from unittest import mock

    from mlflow.server import get_app_client
    from mlflow.tracking import MlflowClient

    login = {"MLFLOW_TRACKING_USERNAME": admin[0], "MLFLOW_TRACKING_PASSWORD": admin[1]}
    with mock.patch.dict(os.environ, login):
        users = get_app_client("basic-auth", tracking_uri=url)
        for name, password in {**writers, **readers}.items():
            users.create_user(name, password)
        experiment_id = MlflowClient(url).create_experiment(experiment)
        for name in writers:
            users.grant_user_permission(name, "experiment", experiment_id, "EDIT")
    return experiment_id


if __name__ == "__main__":
    with (
        tempfile.TemporaryDirectory(prefix="lmexp-services-") as tmp,
        slurm_cluster(Path(tmp) / "slurm") as cluster,
        postgres() as pg,
        mlflow_server(pg.create_database("mlflow"), Path(tmp) / "server") as server,
    ):
        print(f"export SLURM_CONF={cluster.env['SLURM_CONF']}")
        print(f"MLflow server: {server.url} (backend {pg.uri('mlflow', '***')})")
        input("Running; press Enter to stop everything. ")


# --- a file server: the mirrors a download is tried against -------------------------------------


class FileHandler(http.server.BaseHTTPRequestHandler):
    def __init__(self, *args, routes, **kwargs):
        self.routes = routes
        super().__init__(*args, **kwargs)

    def do_GET(self):  # noqa: N802 (http.server's name)
        body = self.routes.get(self.path)
        self.routes.setdefault("_hits", []).append(self.path)
        if body is None:
            self.send_error(404)
            return
        announced = len(body)
        if isinstance(body, tuple):  # (announced length, bytes): breaks off mid-download
            announced, body = body
        self.send_response(200)
        self.send_header("Content-Length", str(announced))
        self.end_headers()
        self.wfile.write(body)
        self.close_connection = True

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def serving(routes: dict[str, bytes]):
    """A real HTTP server on a free loopback port, in a thread; its base URL."""
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(FileHandler, routes=routes)
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
