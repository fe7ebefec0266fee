"""The annotation store's databases for tests: a SQLite file, or a database on a throwaway
PostgreSQL server that this test session starts and deletes.

``db`` (parametrized) gives each test a fresh, empty database of each kind; ``postgres_db`` a
PostgreSQL one only. The server is started once per session, on first use: ``initdb`` into a
temporary folder and ``pg_ctl start`` listening on a Unix socket in that folder only (no TCP
port, so nothing else on the machine can collide with it or reach it). Debian puts the binaries
in /usr/lib/postgresql/<version>/bin (``make postgres`` installs them). ``initdb`` refuses to run
as root, so under root the server runs as the ``postgres`` system user (or ``nobody``), which
owns the folder. Where no server can be started, the PostgreSQL tests are skipped with one line
saying why.
"""

from __future__ import annotations

import glob
import os
import pwd
import re
import shlex
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest

# Settings for a server whose data is thrown away: no waiting for the disk
# (https://www.postgresql.org/docs/current/non-durability.html), and room for several app
# processes' connection pools at once.
SERVER_SETTINGS = {
    "listen_addresses": "''",
    "max_connections": "300",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
}
# Superuser postgres, no password on the private socket; C collation: text sorts as in SQLite.
INITDB_OPTIONS = ("-U", "postgres", "-A", "trust", "-E", "UTF8", "--locale=C", "--no-sync")
SOCKET_PORT = 5432  # only names the socket file, inside the server's private folder
SKIPPED = "PostgreSQL tests skipped: "


class PostgresUnavailable(Exception):
    """Why no throwaway server could be started (the skip line)."""


def postgres_bin_dir() -> Path:
    """The folder of ``initdb`` and ``pg_ctl``: Debian's newest version, else the PATH's."""
    found = sorted(
        (Path(p) for p in glob.glob("/usr/lib/postgresql/*/bin") if (Path(p) / "initdb").is_file()),
        key=lambda p: [int(x) for x in re.findall(r"\d+", p.parent.name)],
    )
    if found:
        return found[-1]
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).parent
    raise PostgresUnavailable("no PostgreSQL server binaries (initdb); `make postgres` installs them")


class ThrowawayPostgres:
    """A PostgreSQL server in a temporary folder, reached through its Unix socket."""

    def __init__(self):
        self.bin = postgres_bin_dir()
        self.user = self._server_user()
        # Under /tmp: a Unix socket path must stay short (about 100 bytes), and the server's user
        # must be able to reach the folder (pytest's own temp folders are private to root).
        self.dir = Path(tempfile.mkdtemp(prefix="rlhf-pg-", dir="/tmp" if Path("/tmp").is_dir() else None))
        self.data = self.dir / "data"
        self.log = self.dir / "server.log"

    @staticmethod
    def _server_user() -> str | None:
        """None: run as this user; under root, a system user (initdb refuses to run as root)."""
        if os.geteuid() != 0:
            return None
        for name in ("postgres", "nobody"):
            try:
                pwd.getpwnam(name)
                return name
            except KeyError:
                continue
        raise PostgresUnavailable("running as root and there is no postgres or nobody user to run the server")

    def _run(self, *args: str) -> None:
        cmd = [str(self.bin / args[0]), *args[1:]]
        if self.user is not None:
            if shutil.which("runuser"):
                cmd = ["runuser", "-u", self.user, "--", *cmd]
            else:
                cmd = ["su", self.user, "-s", "/bin/sh", "-c", shlex.join(cmd)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            log = self.log.read_text(errors="replace").strip().splitlines()[-1:] if self.log.exists() else []
            raise PostgresUnavailable(f"{args[0]} failed: {(log or tail)[0]}")

    def start(self) -> None:
        if self.user is not None:
            user = pwd.getpwnam(self.user)
            os.chown(self.dir, user.pw_uid, user.pw_gid)
        os.chmod(self.dir, 0o700)
        self._run("initdb", "-D", str(self.data), *INITDB_OPTIONS)
        options = f"-k {self.dir} -p {SOCKET_PORT} " + " ".join(
            f"-c {k}={v}" for k, v in SERVER_SETTINGS.items()
        )
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "start")

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@/{dbname}?host={self.dir}&port={SOCKET_PORT}"

    def admin(self, statement: str) -> None:
        import psycopg  # the app extra; without it postgres_server says so and nothing gets here

        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(statement)

    def stop(self) -> None:
        try:
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "stop")
        except PostgresUnavailable:
            pass  # it never started
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server():
    """The session's throwaway server, or the reason there is none (a string)."""
    try:
        import psycopg  # noqa: F401 - the PostgreSQL store's driver (the app extra)
    except ImportError:
        yield "psycopg is not installed (pip install 'rlhf-lab[app]')"
        return
    try:
        server = ThrowawayPostgres()
    except PostgresUnavailable as err:
        yield str(err)
        return
    try:
        server.start()
    except (PostgresUnavailable, OSError, subprocess.SubprocessError) as err:
        server.stop()
        yield str(err)
        return
    yield server
    server.stop()


@pytest.fixture()
def postgres_db(postgres_server) -> str:
    """The URL of a new, empty database on the throwaway server (dropped after the test)."""
    if isinstance(postgres_server, str):
        pytest.skip(SKIPPED + postgres_server)
    name = f"t_{uuid.uuid4().hex[:16]}"
    postgres_server.admin(f"CREATE DATABASE {name}")
    yield postgres_server.url(name)
    postgres_server.admin(f"DROP DATABASE {name} WITH (FORCE)")  # whatever connections are left


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request, tmp_path) -> str:
    """A fresh, empty store database: a SQLite file, then a PostgreSQL database."""
    if request.param == "sqlite":
        return str(tmp_path / "lab.db")
    return request.getfixturevalue("postgres_db")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Report every PostgreSQL skip at this file rather than at each test, so that ``-ra`` folds
    them into one line: the reason, and how many tests it skipped."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and isinstance(report.longrepr, tuple) and SKIPPED in report.longrepr[2]:
        report.longrepr = (str(Path(__file__)), None, report.longrepr[2])
