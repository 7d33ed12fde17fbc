"""A throwaway Postgres cluster for the test session.

`pg_cluster` (a session-scoped pytest fixture) starts a real cluster in a temp
directory, listening on 127.0.0.1 on a free port with `trust` auth, and stops
it at the end. Postgres refuses to run as root, so under root the cluster
belongs to an unprivileged system user (created with useradd when missing)
and every server command runs through `runuser`. When no Postgres is
installed and we are root, `install_postgres()` installs Debian's package.

Set SIMZMQ_TEST_PG_DSN to use an existing server instead (each test then
creates its own database on it).
"""

from __future__ import annotations

import atexit
import glob
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass, field

import pytest

PG_OS_USER = "simzmq-pg"
PG_SUPERUSER = "postgres"
START_TIMEOUT_S = 60
APT_TIMEOUT_S = 900


class ClusterUnavailable(Exception):
    pass


def _version_key(bindir: str) -> tuple:
    version = os.path.basename(os.path.dirname(bindir))
    return tuple(int(p) if p.isdigit() else 0 for p in version.split("."))


def find_pg_bindir() -> str | None:
    """Directory holding initdb and pg_ctl: Debian's newest, else from PATH."""
    debian = [
        d for d in glob.glob("/usr/lib/postgresql/*/bin")
        if os.path.exists(os.path.join(d, "initdb")) and os.path.exists(os.path.join(d, "pg_ctl"))
    ]
    if debian:
        return max(debian, key=_version_key)
    initdb = shutil.which("initdb")
    if initdb:
        # e.g. /usr/local/bin/initdb may be a symlink into the real bin dir,
        # where pg_ctl and postgres live beside it.
        bindir = os.path.dirname(os.path.realpath(initdb))
        if os.path.exists(os.path.join(bindir, "pg_ctl")):
            return bindir
    return None


def install_postgres() -> None:
    """Install the distribution's Postgres server (Debian/Ubuntu, as root)."""
    if os.geteuid() != 0:
        raise ClusterUnavailable("postgres is not installed and we are not root to install it")
    if shutil.which("apt-get") is None:
        raise ClusterUnavailable("postgres is not installed and there is no apt-get")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "--no-install-recommends", "postgresql"]):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=APT_TIMEOUT_S)
        if done.returncode != 0:
            raise ClusterUnavailable(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")


def ensure_os_user() -> str | None:
    """The unprivileged owner of the cluster when running as root, else None."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(PG_OS_USER)
    except KeyError:
        done = subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", PG_OS_USER],
            capture_output=True, text=True,
        )
        if done.returncode != 0 and "already exists" not in done.stderr:
            raise ClusterUnavailable(f"useradd {PG_OS_USER} failed: {done.stderr.strip()}")
    return PG_OS_USER


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class PgCluster:
    bindir: str
    os_user: str | None
    root: str = ""
    port: int = 0
    _db_counter: itertools.count = field(default_factory=lambda: itertools.count(1))

    @property
    def datadir(self) -> str:
        return os.path.join(self.root, "data")

    @property
    def logfile(self) -> str:
        return os.path.join(self.root, "server.log")

    def _run(self, *argv: str, timeout: float = START_TIMEOUT_S) -> subprocess.CompletedProcess:
        cmd = [os.path.join(self.bindir, argv[0]), *argv[1:]]
        if self.os_user:
            cmd = ["runuser", "-u", self.os_user, "--", *cmd]
        # The server inherits cwd; root's cwd may be unreadable to its owner.
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=self.root)

    def start(self) -> None:
        self.root = tempfile.mkdtemp(prefix="simzmq-pg-")
        if self.os_user:
            info = pwd.getpwnam(self.os_user)
            os.chown(self.root, info.pw_uid, info.pw_gid)
        done = self._run(
            "initdb", "-D", self.datadir, "-U", PG_SUPERUSER, "--auth=trust",
            "-E", "UTF8", "--locale=C", "--no-sync",
        )
        if done.returncode != 0:
            raise ClusterUnavailable(f"initdb failed:\n{done.stdout[-1500:]}\n{done.stderr[-1500:]}")
        last_error = ""
        for _attempt in range(3):  # another process may grab the port first
            self.port = free_port()
            options = (
                f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.root}"
                # A throwaway cluster: nothing in it must survive a power loss.
                " -c fsync=off -c full_page_writes=off"
                " -c max_connections=200 -c shared_buffers=64MB"
            )
            done = self._run("pg_ctl", "-D", self.datadir, "-l", self.logfile, "-o", options, "-w",
                             "-t", str(START_TIMEOUT_S), "start", timeout=START_TIMEOUT_S + 10)
            if done.returncode == 0:
                return
            last_error = done.stderr + self._log_tail()
        raise ClusterUnavailable(f"pg_ctl start failed:\n{last_error[-3000:]}")

    def _log_tail(self) -> str:
        try:
            with open(self.logfile) as f:
                return f.read()[-2000:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.root and os.path.exists(self.datadir):
            self._run("pg_ctl", "-D", self.datadir, "-m", "immediate", "-w", "stop")
        if self.root:
            shutil.rmtree(self.root, ignore_errors=True)

    def dsn(self, dbname: str = "postgres") -> str:
        return f"postgresql://{PG_SUPERUSER}@127.0.0.1:{self.port}/{dbname}"

    def create_database(self) -> str:
        """A fresh empty database; returns its DSN."""
        import psycopg

        name = f"t{os.getpid()}_{next(self._db_counter)}"
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.dsn(name)


@dataclass
class ExternalServer:
    """SIMZMQ_TEST_PG_DSN: a server someone else runs."""

    base_dsn: str
    _db_counter: itertools.count = field(default_factory=lambda: itertools.count(1))

    def create_database(self) -> str:
        import psycopg
        from psycopg.conninfo import conninfo_to_dict, make_conninfo

        name = f"simzmq_t{os.getpid()}_{next(self._db_counter)}"
        with psycopg.connect(self.base_dsn, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
            conn.execute(f'CREATE DATABASE "{name}"')
        params = conninfo_to_dict(self.base_dsn)
        params["dbname"] = name
        return make_conninfo(**params)

    def stop(self) -> None:
        pass


def start_cluster() -> PgCluster:
    bindir = find_pg_bindir()
    if bindir is None:
        install_postgres()
        bindir = find_pg_bindir()
        if bindir is None:
            raise ClusterUnavailable("postgresql installed, but no initdb/pg_ctl found")
    cluster = PgCluster(bindir=bindir, os_user=ensure_os_user())
    try:
        cluster.start()
    except BaseException:
        cluster.stop()
        raise
    return cluster


# The one server of this test process: started on first use, stopped at exit.
_shared: PgCluster | ExternalServer | None = None
_shared_error: str | None = None


def shared_server() -> PgCluster | ExternalServer:
    """The test process's Postgres (SIMZMQ_TEST_PG_DSN, or a throwaway cluster
    started now and stopped when the process exits); raises
    ClusterUnavailable when there is none to be had."""
    global _shared, _shared_error
    if _shared is not None:
        return _shared
    if _shared_error is not None:
        raise ClusterUnavailable(_shared_error)
    external = os.environ.get("SIMZMQ_TEST_PG_DSN")
    if external:
        _shared = ExternalServer(external)
        return _shared
    try:
        _shared = start_cluster()
    except (ClusterUnavailable, OSError, subprocess.SubprocessError) as exc:
        _shared_error = str(exc)
        raise ClusterUnavailable(_shared_error) from exc
    atexit.register(_shared.stop)
    return _shared


# SIMZMQ_TEST_STORE=postgres: every region a test starts (tests/region.py)
# keeps its store in a fresh database of the shared server, so the
# integration suite runs against Postgres as well as SQLite (bin/test).
STORE_ENV = "SIMZMQ_TEST_STORE"


def regions_on_postgres() -> bool:
    return os.environ.get(STORE_ENV, "sqlite").lower() in ("postgres", "postgresql")


def region_store() -> str:
    """A fresh database's DSN for one region; the test fails loudly when
    Postgres was asked for and cannot be had (never a silent SQLite run)."""
    return shared_server().create_database()


@pytest.fixture(scope="session")
def pg_cluster():
    try:
        yield shared_server()
    except ClusterUnavailable as exc:
        pytest.skip(f"!!! POSTGRES TESTS SKIPPED: cannot start a throwaway cluster: {exc}")


def fresh_store_url(request, tmp_path, kind: str) -> str:
    """A fresh store for a test parametrized over the back ends: an SQLite
    file in tmp_path ("sqlite"), else a new database on the shared throwaway
    Postgres (the pg_cluster fixture, so Postgres tests skip as it says)."""
    if kind == "sqlite":
        return f"sqlite:///{tmp_path}/im.db"
    return request.getfixturevalue("pg_cluster").create_database()
