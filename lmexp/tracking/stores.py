"""Which tracking store a run logs to, and whether it can: the URI (relative sqlite paths made
absolute, passwords hidden in all output), the checks made before any work (reachable, a
database or sqlite file that opens and is writable, a server that accepts the login) and the
locks that serialise the creation of a new store. No MLflow here (SQLAlchemy, lazily, for
database stores): lmexp.tracking.runs writes the runs, lmexp.tracking.queries reads them."""

from __future__ import annotations

import base64
import contextlib
import fcntl
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from lmexp.config import LmexpError, first_line


class TrackingError(LmexpError):
    """The tracking store cannot be reached or opened."""


class LoginError(TrackingError):
    """The server refuses the login, or the URI carries one: the user's to fix, never a reason
    to log elsewhere (logger.fallback_uri is for a store that is down)."""


def resolve_tracking_uri(configured: str | None, launch_dir: Path) -> str:
    """logger.tracking_uri, else $MLFLOW_TRACKING_URI, else sqlite:///<launch dir>/mlflow.db.

    A relative sqlite path is made absolute against the launch folder, so jobs that run in other
    folders (Hydra job dirs, submitit workers) all write to the same store.
    """
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        path = Path(uri[len("sqlite:///") :])
        if not path.is_absolute():
            uri = f"sqlite:///{(launch_dir / path).resolve()}"
    return uri


# user:password@ in a URI (or in text holding one, such as Hydra's overrides, which escape ':'
# as '\:'): the password is never logged or recorded.
_PASSWORD = re.compile(r"(\b[a-z][a-z0-9+.-]*\\?://[^:/@\s]*\\?:)[^@\s]+@", re.IGNORECASE)
_QUERY_PASSWORD = re.compile(r"([?&]password=)[^&\s]+", re.IGNORECASE)


def redact(text: str) -> str:
    """`text` with the password of every URI in it replaced by ***."""
    return _QUERY_PASSWORD.sub(r"\1***", _PASSWORD.sub(r"\1***@", text))


def sqlite_path(uri: str) -> Path | None:
    return Path(uri[len("sqlite:///") :]) if uri.startswith("sqlite:///") else None


def check_store(uri: str, timeout: float = 5.0, read_only: bool = False) -> None:
    """Fail within `timeout` seconds, naming the URI, when the store cannot be used. read_only:
    for reports, which only read: a sqlite store must already exist (else reading would create
    an empty one, and its folder), and need not be writable."""
    scheme = urllib.parse.urlparse(uri).scheme
    db = sqlite_path(uri)
    if db is not None:
        check_sqlite_store(uri, db, timeout, read_only)
    elif is_database(uri):
        check_database(uri, timeout)
    elif scheme in ("http", "https"):
        check_server(uri, timeout, read_only)
    elif scheme in ("", "file"):
        raise TrackingError(
            f"Tracking URI {redact(uri)!r} is a file store, which MLflow 3 no longer supports; use "
            "logger.tracking_uri=sqlite:///mlflow.db (or an http:// server)."
        )


def check_sqlite_store(uri: str, db: Path, timeout: float, read_only: bool) -> None:
    """A sqlite store: for reading, an existing store; for a run, a writable folder and, where
    the file exists, a store sqlite can open and lock."""
    if read_only:
        if not db.is_file() or db.stat().st_size == 0:
            what = (
                "is a folder"
                if db.is_dir()
                else "holds no store"
                if db.exists()
                else "does not exist"
            )
            raise TrackingError(
                f"Tracking store {redact(uri)}: {db} {what}, so there are no runs to read; pass "
                "--tracking-uri (or set MLFLOW_TRACKING_URI) to the store the runs were logged to."
            )
        check_sqlite(uri, db, timeout, write=False)
        return
    if not db.parent.is_dir():
        raise TrackingError(
            f"Tracking store {redact(uri)}: folder {db.parent} does not exist; create it or set "
            "logger.tracking_uri to another sqlite:///path/mlflow.db."
        )
    if not os.access(db.parent, os.W_OK):
        raise TrackingError(f"Tracking store {redact(uri)}: folder {db.parent} is not writable.")
    if db.exists() and db.stat().st_size > 0:
        check_sqlite(uri, db, timeout)


def check_server(uri: str, timeout: float, read_only: bool) -> None:
    """A tracking server: its address without a login, reachable, and the login accepted."""
    if "@" in urllib.parse.urlparse(uri).netloc:
        raise LoginError(
            f"Tracking URI {redact(uri)} holds a login; give the server's address alone and "
            f"the login in the environment ({USER_VAR} and {PASSWORD_VAR}), where it stays "
            "out of the run's params, logs and shell history."
        )
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout):
            pass
    except urllib.error.HTTPError:
        pass  # the server answered: it is reachable
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        how = (
            "start it, or pass --tracking-uri (or set MLFLOW_TRACKING_URI) to the store the "
            "runs were logged to"
            if read_only
            else "start it, fix logger.tracking_uri, or set "
            "logger.fallback_uri=sqlite:///mlflow.db to train anyway"
        )
        raise TrackingError(
            f"Tracking server {redact(uri)} cannot be reached ({reason}); {how}."
        ) from err
    check_login(uri, timeout)


# What MLflow's client sends to a server with authentication (`mlflow server --app-name
# basic-auth`): the login comes from the environment, never from a URI or the command line.
USER_VAR, PASSWORD_VAR, TOKEN_VAR = (
    "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"
)  # fmt: skip


def _login_headers() -> dict[str, str]:
    user, password = os.environ.get(USER_VAR), os.environ.get(PASSWORD_VAR)
    if user and password:
        return {
            "Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        }
    token = os.environ.get(TOKEN_VAR)
    return {"Authorization": f"Bearer {token}"} if token else {}


def check_login(uri: str, timeout: float) -> None:
    """A server with authentication accepts the login in the environment: one read request,
    before any work (MLflow's own client would only fail at the first write, in one of its
    tracebacks)."""
    probe = uri.rstrip("/") + "/api/2.0/mlflow/experiments/search?max_results=1"
    try:
        with urllib.request.urlopen(
            urllib.request.Request(probe, headers=_login_headers()), timeout=timeout
        ):
            pass
    except urllib.error.HTTPError as err:
        if err.code == 401:
            raise LoginError(login_refused(uri)) from None
    except (urllib.error.URLError, OSError):
        pass  # reachable a moment ago; MLflow's client retries what follows


def login_refused(uri: str) -> str:
    user = os.environ.get(USER_VAR)
    if user and os.environ.get(PASSWORD_VAR):
        return (
            f"Tracking server {redact(uri)} refused the login of user {user!r} (HTTP 401): check "
            f"{USER_VAR} and {PASSWORD_VAR} in the environment."
        )
    return (
        f"Tracking server {redact(uri)} asks for a login (HTTP 401): set {USER_VAR} and "
        f"{PASSWORD_VAR} in the environment to a user of that server (not in the URI or on "
        "the command line)."
    )


def permission_refused(uri: str, experiment: str, what: str) -> str:
    """The sentence for a server's 403: who, what they may not do, the permission it needs."""
    user = os.environ.get(USER_VAR) or "this login"
    return (
        f"Tracking server {redact(uri)} does not let user {user!r} {what} experiment "
        f"{experiment!r} (HTTP 403, it needs EDIT permission there): ask the experiment's owner or "
        "the server's admin to grant it, or set logger.experiment_name to an experiment you may "
        "edit."
    )


def is_database(uri: str) -> bool:
    """Whether uri names a database server (PostgreSQL, MySQL, ...), which MLflow opens through
    SQLAlchemy, rather than a sqlite file or an http(s) tracking server."""
    scheme = urllib.parse.urlparse(uri).scheme.split("+")[0]
    return scheme in ("postgresql", "postgres", "mysql", "mssql")


def check_database(uri: str, timeout: float) -> None:
    """The database's driver is installed and it accepts our login, within `timeout` seconds;
    else one sentence (the password never shown)."""
    from sqlalchemy import create_engine
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError

    shown = redact(uri)
    try:
        url = make_url(uri)
        url.get_dialect().import_dbapi()
    except (ArgumentError, NoSuchModuleError) as err:
        raise TrackingError(
            f"Tracking store {shown} is not a database URI SQLAlchemy knows ({err}); write it as "
            "postgresql://user@host:port/database."
        ) from err
    except ImportError as err:
        module = err.name or str(err)
        raise TrackingError(
            f"Tracking store {shown} needs the Python driver {module!r}, which is not installed; "
            "pip install 'lmexp[server]' (psycopg, for postgresql:// URIs)."
        ) from err
    args = (
        {"connect_timeout": max(1, round(timeout))}
        if url.get_backend_name() == "postgresql"
        else {}
    )
    engine = create_engine(url, connect_args=args)
    try:
        with engine.connect():
            pass
    except DBAPIError as err:
        lines = [line.strip() for line in str(err.orig).strip().splitlines() if line.strip()]
        reason = redact(lines[-1] if lines else type(err.orig).__name__)
        if "password" in reason or "authentication" in reason:
            fix = "check the user and password (in the URI, $PGPASSWORD or ~/.pgpass)"
        elif "does not exist" in reason:
            fix = "create it (createdb) or fix the name in logger.tracking_uri"
        else:
            fix = "start the database server or fix the host and port in logger.tracking_uri"
        raise TrackingError(f"Tracking store {shown} cannot be opened ({reason}); {fix}.") from err
    finally:
        engine.dispose()


def sqlite_problem(db: Path, timeout: float = 10.0, write: bool = True) -> str | None:
    """What is wrong with an existing sqlite file (not a database, corrupt, read-only), or None:
    every page's structure is read and, with write, one write made and rolled back, as the
    libraries that use it (MLflow, Optuna) will, whose own errors are tracebacks or mislead."""
    import sqlite3

    with open(db, "rb") as f:
        if f.read(16) != b"SQLite format 3\x00":
            return "not an SQLite database"
    try:
        con = sqlite3.connect(db, timeout=max(timeout, 10.0), isolation_level=None)
        try:
            problems = [row[0] for row in con.execute("PRAGMA quick_check")]
            if problems != ["ok"]:
                lines = [ln for row in problems for ln in str(row).splitlines()]
                first = next((ln for ln in lines if not ln.startswith("***")), lines[0])
                return f"database disk image is malformed: {first}"
            if write:
                con.execute("BEGIN IMMEDIATE")
                con.execute("CREATE TABLE lmexp_write_probe (x INTEGER)")  # journaled, rolled back
                con.execute("ROLLBACK")
        finally:
            con.close()
    except sqlite3.Error as err:
        return str(err).splitlines()[0]
    return None


def lacks_write_access(reason: str) -> bool:
    """Whether sqlite_problem's reason is a file or folder this user may not write (the fix is
    the permissions), not a damaged database (the fix is a backup)."""
    return "readonly" in reason or "unable to open" in reason


def check_sqlite(uri: str, db: Path, timeout: float, write: bool = True) -> None:
    """A store that is not a database, corrupt or read-only fails here in one sentence, not in
    SQLAlchemy tracebacks (write=False, for reports: its structure only)."""
    reason = sqlite_problem(db, timeout, write)
    if reason == "not an SQLite database":
        raise TrackingError(
            f"Tracking store {redact(uri)}: {db} is not an SQLite database; move it away "
            "or point logger.tracking_uri elsewhere."
        )
    if reason is not None and not write:
        raise TrackingError(
            f"Tracking store {redact(uri)} is unreadable ({reason}); restore {db} from a backup, "
            "or pass --tracking-uri of another store."
        )
    if reason is not None:
        fix = (
            f"make {db} and its folder writable for this user"
            if lacks_write_access(reason)
            else f"restore {db} from a backup or move it away (a new store is then created)"
        )
        raise TrackingError(
            f"Tracking store {redact(uri)} is unusable ({reason}); {fix}, or point logger.tracking_uri "
            "elsewhere."
        )


@contextlib.contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """Serialise the creation and migration of a sqlite store across processes.

    Several processes opening a fresh sqlite store at once race in its Alembic migration and
    corrupt it; holding an exclusive file lock while the first ones open it prevents that.
    """
    db = sqlite_path(uri)
    if db is None:
        with database_lock(uri):
            yield
        return
    with open(f"{db}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@contextlib.contextmanager
def database_lock(uri: str) -> Iterator[None]:
    """The same for a PostgreSQL store, through a session-level advisory lock: jobs that start
    together on a fresh database would otherwise each create MLflow's tables and all but one
    fail (duplicate key value violates unique constraint "pg_type_typname_nsp_index")."""
    if not is_database(uri) or not uri.startswith(("postgresql", "postgres:")):
        yield
        return
    from sqlalchemy import create_engine, text
    from sqlalchemy.exc import SQLAlchemyError

    engine = create_engine(
        uri, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 10}
    )  # autocommit: not "idle in transaction" while the lock is held
    try:
        conn = engine.connect()
        deadline = time.monotonic() + STORE_LOCK_WAIT_S
        while not conn.execute(
            text("SELECT pg_try_advisory_lock(:k)"), {"k": STORE_LOCK_KEY}
        ).scalar():
            if time.monotonic() > deadline:
                raise TrackingError(
                    f"Tracking store {redact(uri)}: another process has held lmexp's store lock "
                    f"for {STORE_LOCK_WAIT_S:.0f} s while creating MLflow's tables; check for a "
                    "hung lmexp process (pg_stat_activity), then launch again."
                )
            time.sleep(0.2)
    except SQLAlchemyError as err:
        engine.dispose()
        reason = redact(first_line(getattr(err, "orig", err)))
        raise TrackingError(f"Tracking store {redact(uri)} cannot be opened ({reason}).") from err
    try:
        yield
    finally:
        with contextlib.suppress(SQLAlchemyError):  # closing the session releases it anyway
            conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": STORE_LOCK_KEY})
            conn.close()
        engine.dispose()


STORE_LOCK_KEY = 0x6C6D65787000  # "lmexp" + 0: the advisory lock lmexp's processes share
STORE_LOCK_WAIT_S = 300.0  # creating MLflow's tables takes seconds; minutes means a hung holder


def configured_store(
    tracking_uri: str | None, fallback_uri: str | None, launch_dir: Path, timeout: float
) -> tuple[str, str | None]:
    """usable_store for logger.tracking_uri and logger.fallback_uri, both resolved against the
    launch folder (see resolve_tracking_uri): the store to log to and the fallback's note."""
    fallback = fallback_uri and resolve_tracking_uri(fallback_uri, launch_dir)
    return usable_store(resolve_tracking_uri(tracking_uri, launch_dir), timeout, fallback)


def usable_store(
    uri: str, timeout: float = 5.0, fallback_uri: str | None = None
) -> tuple[str, str | None]:
    """The store to log to: uri when it works, else fallback_uri with a note saying so."""
    try:
        check_store(uri, timeout)
        return uri, None
    except TrackingError as err:
        if not fallback_uri or isinstance(err, LoginError):
            raise
        check_store(fallback_uri, timeout)
        return fallback_uri, f"{err} Logging to the fallback {redact(fallback_uri)} instead."
