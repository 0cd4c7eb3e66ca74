"""Finding, starting and stopping the database server (DESIGN.md, "Storage").

The database is always a real MongoDB-compatible server:

1. ``MONGODB_URI`` in the environment: use it, start nothing;
2. else ``mongod`` on ``PATH``: start it;
3. else the embedded server built by ``make setup``: ``.build/bin/cm-ferretdb``
   (FerretDB with its SQLite backend, see ``cm/cluster/ferretdb/``), or the
   binary named by ``CM_FERRETDB_BIN``.

A server started here listens on a Unix socket only, ``DATA_DIR/db.sock``,
and the data directory is made 0700: only its owner (root, for a cluster)
can connect. FerretDB's SQLite backend has no authentication, and a TCP port
on loopback is open to every local user, so the socket's directory is the
lock (docs/SECURITY.md).

``python -m cm.cluster.db --data-dir D --pidfile F`` runs a server in the
foreground (the Python process execs the server binary, so the pid in the
pidfile is the server's pid and SIGTERM stops it cleanly).

This module does not import mongoengine; pymongo is imported lazily, only to
check that a server answers.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Self
from urllib.parse import quote

REPO_ROOT = Path(__file__).resolve().parents[2]
EMBEDDED_BIN = REPO_ROOT / ".build" / "bin" / "cm-ferretdb"
BUILD_HINT = "run `make setup` (it builds .build/bin/cm-ferretdb with cm/cluster/ferretdb/build.sh)"

SOCKET_NAME = "db.sock"
MAX_SOCKET_PATH = 100  # sun_path holds 107 bytes
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0


class DatabaseError(RuntimeError):
    """Base class of this module's errors."""


class DatabaseUnavailable(DatabaseError):
    """No database server is configured, installed or built."""


class DatabaseStartError(DatabaseError):
    """The database server did not start or does not answer."""


@dataclass(frozen=True)
class DatabasePlan:
    """Which database to use: an existing server (``uri``) or a binary to run."""

    kind: str  # "uri", "mongod" or "ferretdb"
    uri: str | None = None
    binary: Path | None = None

    @property
    def starts_server(self) -> bool:
        return self.kind != "uri"

    def describe(self) -> str:
        if self.kind == "uri":
            return f"existing server at MONGODB_URI ({redact(self.uri or '')})"
        if self.kind == "mongod":
            return f"mongod ({self.binary})"
        return f"embedded FerretDB/SQLite ({self.binary})"

    def command(self, data_dir: Path) -> list[str]:
        """The command line that runs this server in the foreground, on socket_path(data_dir) alone."""
        if self.binary is None:
            raise DatabaseError(f"nothing to run for {self.describe()}")
        sock = str(socket_path(data_dir))
        if self.kind == "mongod":  # a socket path as the only bind address: no TCP listener
            return [str(self.binary), "--dbpath", str(data_dir), "--bind_ip", sock, "--nounixsocket", "--quiet"]
        return [str(self.binary), "-listen-unix", sock, "-dir", str(data_dir)]


def socket_path(data_dir: Path) -> Path:
    """Where a server started here listens: in its own data directory, which only its owner may enter."""
    return Path(data_dir) / SOCKET_NAME


def socket_uri(path: Path) -> str:
    """The mongodb:// URI of a server on a Unix socket (the path goes percent-encoded in the host part)."""
    return f"mongodb://{quote(str(path), safe='')}/"


def prepare_data_dir(data_dir: Path) -> Path:
    """Make data_dir (0700, whatever it was) and clear a stale socket (one a live server still serves is an
    error); return the socket's path."""
    data_dir = Path(data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    data_dir.chmod(0o700)
    sock = socket_path(data_dir)
    if len(str(sock)) > MAX_SOCKET_PATH:
        raise DatabaseError(f"the database socket {sock} is longer than {MAX_SOCKET_PATH} bytes: "
                            "use a shorter data directory")
    if sock.is_socket():
        with socket.socket(socket.AF_UNIX) as probe:
            try:
                probe.connect(str(sock))
            except OSError:  # nobody serves it: left by a server that died
                sock.unlink()
            else:
                raise DatabaseError(f"a database server already serves {sock}")
    return sock


def embedded_binary(env: Mapping[str, str] = os.environ) -> Path:
    """Path of the embedded server binary (``CM_FERRETDB_BIN`` overrides)."""
    override = env.get("CM_FERRETDB_BIN", "").strip()
    return Path(override) if override else EMBEDDED_BIN


def ferretdb_plan(env: Mapping[str, str] = os.environ) -> DatabasePlan:
    """The embedded server, or DatabaseUnavailable if it is not built."""
    binary = embedded_binary(env)
    if not (binary.is_file() and os.access(binary, os.X_OK)):
        where = "CM_FERRETDB_BIN=" + str(binary) if env.get("CM_FERRETDB_BIN", "").strip() else str(binary)
        raise DatabaseUnavailable(f"the embedded database server {where} is missing or not executable; {BUILD_HINT}")
    return DatabasePlan("ferretdb", binary=binary)


def server_plan(env: Mapping[str, str] = os.environ) -> DatabasePlan:
    """A server to run, ignoring MONGODB_URI: mongod on PATH, else the embedded one."""
    mongod = shutil.which("mongod", path=env.get("PATH", os.defpath))
    if mongod:
        return DatabasePlan("mongod", binary=Path(mongod))
    try:
        return ferretdb_plan(env)
    except DatabaseUnavailable as e:
        raise DatabaseUnavailable(f"mongod is not on PATH and {e}") from None


def resolve_database(env: Mapping[str, str] = os.environ) -> DatabasePlan:
    """MONGODB_URI if set, else mongod on PATH, else the embedded server."""
    uri = env.get("MONGODB_URI", "").strip()
    if uri:
        return DatabasePlan("uri", uri=uri)
    try:
        return server_plan(env)
    except DatabaseUnavailable as e:
        raise DatabaseUnavailable(f"no database server: MONGODB_URI is not set, {e}") from None


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free now on host (for the head's and other daemons' ports; the database needs none)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def ping(uri: str, timeout: float = 2.0) -> None:
    """Raise (pymongo's error) unless the server at uri answers ``ping``."""
    import pymongo  # lazily: `python -m cm.cluster.db` does not need it

    ms = max(int(timeout * 1000), 100)
    client: pymongo.MongoClient = pymongo.MongoClient(
        uri, serverSelectionTimeoutMS=ms, connectTimeoutMS=ms, socketTimeoutMS=ms
    )
    try:
        client.admin.command("ping")
    finally:
        client.close()


class DatabaseServer:
    """A database server for cm: started by :meth:`start`, stopped by :meth:`stop`.

    With a ``uri`` plan (MONGODB_URI) nothing is started: :meth:`start` checks
    that the server answers and returns its URI.
    """

    def __init__(
        self,
        plan: DatabasePlan | None = None,
        *,
        start_timeout: float = START_TIMEOUT,
        stop_timeout: float = STOP_TIMEOUT,
    ) -> None:
        self.plan = plan if plan is not None else resolve_database()
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.log_path: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._uri: str | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def uri(self) -> str | None:
        return self._uri

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, data_dir: Path, log_path: Path | None = None) -> str:
        """Start the server (data and socket in data_dir) and return its mongodb:// URI once it answers."""
        if self._proc is not None or self._uri is not None:
            raise DatabaseError("database server already started")
        if not self.plan.starts_server:
            assert self.plan.uri is not None
            self._wait_ready(self.plan.uri, None, time.monotonic() + self.start_timeout)
            self._uri = self.plan.uri
            return self._uri

        data_dir = Path(data_dir).resolve()
        sock = prepare_data_dir(data_dir)
        self.log_path = Path(log_path) if log_path is not None else data_dir / "server.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        uri = socket_uri(sock)
        self._spawn(self.plan.command(data_dir))
        try:
            self._wait_ready(uri, self._proc, time.monotonic() + self.start_timeout, sock)
        except DatabaseStartError:
            self.stop()
            raise
        self._uri = uri
        return uri

    def stop(self) -> None:
        """Stop the server: SIGTERM, then SIGKILL after stop_timeout. Idempotent."""
        proc, self._proc = self._proc, None
        self._uri = None
        try:
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(self.stop_timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        finally:
            if self._log is not None:
                self._log.close()
                self._log = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _spawn(self, cmd: list[str]) -> None:
        assert self.log_path is not None
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed by stop()
        self._log.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} starting: {' '.join(cmd)}\n".encode())
        self._log.flush()
        try:
            self._proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT, close_fds=True
            )
        except OSError as e:
            self._log.close()
            self._log = None
            raise DatabaseStartError(f"cannot run {self.plan.describe()}: {e}") from e

    def _wait_ready(
        self,
        uri: str,
        proc: subprocess.Popen[bytes] | None,
        deadline: float,
        sock: Path | None = None,
    ) -> None:
        last_error: Exception | None = None
        while True:
            if proc is not None and proc.poll() is not None:
                raise DatabaseStartError(
                    f"{self.plan.describe()} exited with status {proc.returncode} at start"
                    f"{self._log_tail_text()}"
                )
            if sock is not None and not sock.is_socket():  # cheap check first: pymongo waits its whole timeout
                last_error = DatabaseStartError(f"no socket {sock} yet")
            else:
                try:
                    ping(uri, timeout=min(2.0, max(deadline - time.monotonic(), 0.1)))
                    return
                except Exception as e:  # noqa: BLE001 - pymongo errors, connection refused, ...
                    last_error = e
            if time.monotonic() >= deadline:
                what = self.plan.describe()
                raise DatabaseStartError(
                    f"{what} does not answer ping at {redact(uri)} after {self.start_timeout:g} s: "
                    f"{last_error}{self._log_tail_text()}"
                )
            time.sleep(0.05)

    def _log_tail_text(self) -> str:
        if self._log is not None:
            self._log.flush()
        tail = log_tail(self.log_path) if self.log_path is not None else ""
        if not tail:
            return ""
        return f"\n--- last lines of {self.log_path}:\n{tail}"


def log_tail(path: Path, lines: int = 20, max_bytes: int = 8192) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read()
    except OSError:
        return ""
    return "\n".join(data.decode(errors="replace").splitlines()[-lines:])


def redact(uri: str) -> str:
    """Hide a password in a mongodb:// URI."""
    scheme, sep, rest = uri.partition("://")
    creds, at, hostpart = rest.rpartition("@")
    if not sep or not at or ":" not in creds:
        return uri
    return f"{scheme}://{creds.split(':', 1)[0]}:***@{hostpart}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cm.cluster.db",
        description="Run cm's database server in the foreground (mongod if on PATH, else the embedded "
        f"FerretDB), on the Unix socket DATA_DIR/{SOCKET_NAME} only. MONGODB_URI is ignored here: whoever "
        "runs this wants a server.",
    )
    parser.add_argument("--data-dir", required=True, type=Path, help="data directory (created if missing, made 0700)")
    parser.add_argument("--pidfile", type=Path, help="write the server's pid here")
    args = parser.parse_args(argv)

    try:
        plan = server_plan()
    except DatabaseError as e:
        print(f"cm.cluster.db: {e}", file=sys.stderr)
        return 1
    return serve(plan, args.data_dir, args.pidfile)


def serve(plan: DatabasePlan, data_dir: Path, pidfile: Path | None = None) -> int:
    """Exec plan's server on socket_path(data_dir) (`cmdaemon db`, `python -m cm.cluster.db`); 1 if it cannot."""
    try:
        data_dir = data_dir.resolve()
        sock = prepare_data_dir(data_dir)
    except (DatabaseError, OSError) as e:
        print(f"cm.cluster.db: {e}", file=sys.stderr)
        return 1
    cmd = plan.command(data_dir)
    if pidfile is not None:
        pidfile.parent.mkdir(parents=True, exist_ok=True)
        tmp = pidfile.with_name(pidfile.name + ".tmp")
        tmp.write_text(f"{os.getpid()}\n")
        tmp.replace(pidfile)  # exec keeps the pid: this is the server's pid
    print(f"cm.cluster.db: running {plan.describe()} on {socket_uri(sock)}, data in {data_dir}",
          file=sys.stderr, flush=True)
    sys.stdout.flush()
    os.execv(cmd[0], cmd)
    return 1  # not reached


if __name__ == "__main__":
    sys.exit(main())
