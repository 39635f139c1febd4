"""A throwaway PostgreSQL server for tests and the coordinator simulation: Debian's
`postgresql` package, `initdb` into a temporary directory, `pg_ctl` start listening on a
Unix socket only (no TCP port: nothing outside this machine can reach it), removed
afterwards whatever happens.

PostgreSQL refuses to run as root, so under root the cluster belongs to the `postgres`
account the package made (the directory is handed to it). Authentication is `trust` on
the socket, whose directory only that account and root can enter.

    with TemporaryPostgres() as pg:
        dsn = pg.create_database("t1")   # postgresql://postgres@/t1?host=/tmp/...
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType

#: Where Debian puts the server programs (one directory per major version).
BIN_GLOB = "/usr/lib/postgresql/*/bin"
START_TIMEOUT = 30  # seconds pg_ctl waits for the server to accept connections


class PostgresUnavailable(RuntimeError):
    """PostgreSQL's server programs are not installed (Debian: apt-get install postgresql)."""


def server_bin() -> Path:
    """The newest installed PostgreSQL's bin directory."""
    found = sorted(glob.glob(BIN_GLOB), key=lambda path: int(Path(path).parent.name.split(".")[0]))
    if not found or not (Path(found[-1]) / "initdb").exists():
        raise PostgresUnavailable("PostgreSQL's server is not installed: apt-get install --no-install-recommends "
                                  "postgresql (tools/setup.sh does)")
    return Path(found[-1])


class TemporaryPostgres:
    """One PostgreSQL cluster in a temporary directory, for as long as the `with` lasts.
    `durable=False` (tests) turns fsync off: the cluster dies with the test anyway."""

    def __init__(self, *, durable: bool = False, max_connections: int = 200) -> None:
        self.bin = server_bin()
        self.durable = durable
        self.max_connections = max_connections
        self.root = Path(tempfile.mkdtemp(prefix="tm-pg-"))
        self.data = self.root / "data"
        self.socket_dir = self.root  # the socket: <root>/.s.PGSQL.5432
        self._owner = pwd.getpwnam("postgres") if os.geteuid() == 0 else None
        self._started = False

    def _run(self, *argv: str) -> None:
        user = ["runuser", "-u", "postgres", "--"] if self._owner is not None else []
        done = subprocess.run([*user, *argv], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=START_TIMEOUT + 30)
        if done.returncode != 0:
            raise RuntimeError(f"{Path(argv[0]).name} failed ({done.returncode}): {(done.stderr or done.stdout)[-2000:]}")

    def start(self) -> TemporaryPostgres:
        try:
            if self._owner is not None:
                os.chown(self.root, self._owner.pw_uid, self._owner.pw_gid)
            os.chmod(self.root, 0o700)
            self._run(str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust",
                      "-E", "UTF8", "--locale=C", "--no-sync")
            options = (f"-c listen_addresses='' -c unix_socket_directories='{self.socket_dir}' "
                       f"-c max_connections={self.max_connections} -c shared_buffers=32MB")
            if not self.durable:
                options += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
            self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.root / "server.log"),
                      "-o", options, "-w", "-t", str(START_TIMEOUT), "start")
            self._started = True
        except BaseException:
            self.stop()
            raise
        return self

    def dsn(self, database: str = "postgres") -> str:
        """A connection string for `database` (asyncpg and libpq read it alike)."""
        return f"postgresql://postgres@/{database}?host={self.socket_dir}"

    def create_database(self, name: str) -> str:
        """A new empty database; its connection string."""
        self._run(str(self.bin.parent / "bin" / "createdb"), "-h", str(self.socket_dir), "-U", "postgres", name)
        return self.dsn(name)

    def log_tail(self, size: int = 4000) -> str:
        try:
            return (self.root / "server.log").read_text(errors="replace")[-size:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self._started:
            self._started = False
            try:
                self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")
            except (RuntimeError, subprocess.TimeoutExpired):
                pass  # removed below all the same; a server left running has lost its directory
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> TemporaryPostgres:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.stop()
