"""Private PostgreSQL, Redis, NATS and RabbitMQ servers on free ports of 127.0.0.1, which a test may stop
and start again.

The shared servers on the standard ports are never stopped: tests that take a server away use one of
these. PostgreSQL exits when started as root, so as root its programs run as the ``postgres`` OS user, in a
folder that user owns; RabbitMQ runs as the ``rabbitmq`` OS user for the same reason. Every wait is
bounded, and ``close`` stops the server and removes its folder.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

from _support_core import closed_port

START_TIMEOUT = 30.0
"""Seconds a server gets to accept connections after it is started."""


def _accepts_connections(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _postgres_bin() -> Path:
    """Return the folder of the newest installed PostgreSQL's programs."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(Path(p).parts[-3]))
    if found:
        return Path(found[-1]).parent
    pg_ctl = shutil.which("pg_ctl")
    if pg_ctl is None:
        raise AssertionError("no PostgreSQL server programs found (pg_ctl), which the outage tests need")
    return Path(pg_ctl).parent


class PrivatePostgres:
    """A PostgreSQL cluster of its own in a temporary folder, listening on 127.0.0.1 on a free port.

    Local and 127.0.0.1 connections are trusted, except for the role ``PASSWORD_ROLE``, which must give
    its password ``PASSWORD`` (SCRAM), so tests can check what a wrong password does. That role owns
    the database of the same name.
    """

    PASSWORD_ROLE = "pikku_pw"
    PASSWORD = "right-horse-battery"

    def __init__(self) -> None:
        self.bin = _postgres_bin()
        self.port = closed_port()
        self.as_postgres = os.geteuid() == 0
        self.folder = Path(tempfile.mkdtemp(prefix="pikku-pg-"))
        self.data = self.folder / "data"
        self.log = self.folder / "server.log"
        self.running = False
        if self.as_postgres:
            shutil.chown(self.folder, user="postgres", group="postgres")

    def dsn(self, database: str = "postgres", user: str = "postgres", password: str | None = None) -> str:
        userinfo = f"{user}:{password}" if password is not None else user
        return f"postgresql://{userinfo}@127.0.0.1:{self.port}/{database}"

    def _run_program(self, *args: str, timeout: float = START_TIMEOUT) -> None:
        command = [str(self.bin / args[0]), *args[1:]]
        if self.as_postgres:
            command = ["runuser", "-u", "postgres", "--", *command]
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
        if result.returncode != 0:
            raise AssertionError(f"{args[0]} failed with {result.returncode}:\n{result.stdout}\n{result.stderr}")

    def create(self) -> None:
        """Create the cluster, start it and add the password role."""
        self._run_program("initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust", "--no-sync", "-E", "UTF8")
        hba = self.data / "pg_hba.conf"
        hba.write_text(
            "local all all trust\n"
            f"host all {self.PASSWORD_ROLE} 127.0.0.1/32 scram-sha-256\n"
            "host all all 127.0.0.1/32 trust\n"
        )
        if self.as_postgres:
            shutil.chown(hba, user="postgres", group="postgres")
        self.start()
        self._run_program(
            "psql",
            "-h",
            str(self.folder),
            "-p",
            str(self.port),
            "-U",
            "postgres",
            "-d",
            "postgres",
            "-v",
            "ON_ERROR_STOP=1",
            "-c",
            f"CREATE ROLE {self.PASSWORD_ROLE} LOGIN PASSWORD '{self.PASSWORD}'",
            "-c",
            f"CREATE DATABASE {self.PASSWORD_ROLE} OWNER {self.PASSWORD_ROLE}",
        )

    def start(self) -> float:
        """Start the server on its port and return the time.monotonic() at which it accepted connections."""
        options = (
            f"-c listen_addresses=127.0.0.1 -c port={self.port} -c unix_socket_directories={self.folder} "
            "-c fsync=off -c full_page_writes=off -c max_connections=50"
        )
        self._run_program("pg_ctl", "start", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "30", "-o", options)
        self.running = True
        deadline = time.monotonic() + START_TIMEOUT
        while not _accepts_connections(self.port):
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"PostgreSQL on port {self.port} did not accept connections within {START_TIMEOUT} s:\n"
                    f"{self.log.read_text()}"
                )
            time.sleep(0.01)
        return time.monotonic()

    def stop(self) -> None:
        """Stop the server at once, without a clean shutdown, as if it crashed."""
        self.running = False
        self._run_program("pg_ctl", "stop", "-D", str(self.data), "-m", "immediate", "-w", "-t", "30")

    def close(self) -> None:
        """Stop the server if it runs, by signal if pg_ctl fails, and remove its folder."""
        try:
            # The PID file also covers a start that failed after the server was launched.
            if self.running or (self.data / "postmaster.pid").exists():
                try:
                    self.stop()
                except (AssertionError, subprocess.TimeoutExpired):
                    self._kill_postmaster()
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)

    def _kill_postmaster(self) -> None:
        pid_file = self.data / "postmaster.pid"
        with contextlib.suppress(OSError, ValueError):
            os.kill(int(pid_file.read_text().split()[0]), signal.SIGKILL)

    def __enter__(self) -> Self:
        try:
            self.create()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class PrivateRedis:
    """A redis-server of its own on a free port of 127.0.0.1, with no persistence: it restarts empty.

    ``password`` turns on ``requirepass``.
    """

    def __init__(self, password: str | None = None) -> None:
        self.port = closed_port()
        self.password = password
        self.folder = Path(tempfile.mkdtemp(prefix="pikku-redis-"))
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def url(self, password: str | None = None) -> str:
        auth = f":{password}@" if password is not None else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> float:
        """Start the server on its port and return the time.monotonic() at which it accepted connections."""
        assert self.process is None, "this redis-server is already running"
        # 'redis-server -' reads the configuration from standard input, so the password is on no command line.
        config = f'port {self.port}\nbind 127.0.0.1\nsave ""\nappendonly no\ndaemonize no\ndir {self.folder}\n'
        if self.password is not None:
            config += f"requirepass {self.password}\n"
        if self._log is None:
            self._log = (self.folder / "server.log").open("ab")
        self.process = subprocess.Popen(
            ["redis-server", "-"], stdin=subprocess.PIPE, stdout=self._log, stderr=subprocess.STDOUT
        )
        assert self.process.stdin is not None
        self.process.stdin.write(config.encode())
        self.process.stdin.close()
        deadline = time.monotonic() + START_TIMEOUT
        while not _accepts_connections(self.port):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(
                    f"redis-server on port {self.port} did not accept connections within {START_TIMEOUT} s:\n"
                    f"{(self.folder / 'server.log').read_text()}"
                )
            time.sleep(0.01)
        return time.monotonic()

    def stop(self) -> None:
        """Kill the server with SIGKILL, as if it crashed, and reap it."""
        process, self.process = self.process, None
        if process is not None:
            process.kill()
            process.wait(timeout=10)

    def close(self) -> None:
        try:
            self.stop()
        finally:
            if self._log is not None:
                self._log.close()
            shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


NATS_SERVER = "/usr/sbin/nats-server"


class PrivateNats:
    """A nats-server of this test on a free port, which the test may kill and start again.

    With ``store_dir`` it runs JetStream and keeps its streams in that folder, so they outlive a
    restart; without it, it runs no JetStream. ``max_payload`` (bytes) replaces the server's default
    of 1 MiB; nats-server takes it only from a configuration file, which is written beside the log.
    """

    def __init__(self, log_path: Path, store_dir: Path | None = None, max_payload: int | None = None) -> None:
        self.port = closed_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.store_dir = store_dir
        self.max_payload = max_payload
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> float:
        """Start the server on its port and return the time.monotonic() at which it accepted connections."""
        options = ["-js", "-sd", str(self.store_dir)] if self.store_dir is not None else []
        if self.max_payload is not None:
            config = self.log_path.with_suffix(".conf")
            config.write_text(f"max_payload: {self.max_payload}\n")
            options += ["-c", str(config)]
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [NATS_SERVER, "-a", "127.0.0.1", "-p", str(self.port), *options],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"nats-server exited: {self.log_path.read_text()}"
            if _accepts_connections(self.port):
                return time.monotonic()
            time.sleep(0.02)
        raise AssertionError(f"nats-server did not listen on {self.port} within {START_TIMEOUT} s")

    def stop(self) -> None:
        """Kill the server with SIGKILL, as if it crashed, and reap it."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)


RABBITMQ_SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"
"""The server script itself. Debian's /usr/sbin wrapper switches to the rabbitmq user with su, which sets
HOME, and so the Erlang cookie, to the shared node's."""

RABBITMQ_START_TIMEOUT = 60.0
"""Seconds a RabbitMQ node gets to accept connections. A boot took about 4 s on a 2-core test machine, and an
Erlang VM boots much slower under load."""


class PrivateRabbitMQ:
    """A RabbitMQ node of its own, with its own node name, ports, database, logs, plugins and Erlang cookie.

    Its configuration file sets only the AMQP listener, on a free port of 127.0.0.1, so ``guest`` logs in
    from there with its default password, to the default vhost ``/``. It registers its node name with
    the machine's epmd, as every Erlang node does, and shares nothing else with the shared node. ``stop``
    kills the node as if it crashed; ``start`` boots it again on the same ports and database.
    """

    def __init__(self) -> None:
        self.port = closed_port()
        self.dist_port = closed_port()
        self.nodename = f"pikku_test_{uuid.uuid4().hex[:10]}@localhost"
        self.folder = Path(tempfile.mkdtemp(prefix="pikku-rabbitmq-"))
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}/"
        self.as_rabbitmq = os.geteuid() == 0
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        (self.folder / "rabbitmq.conf").write_text(f"listeners.tcp.local = 127.0.0.1:{self.port}\n")
        (self.folder / "enabled_plugins").write_text("[].\n")
        if self.as_rabbitmq:
            for path in (self.folder, self.folder / "rabbitmq.conf", self.folder / "enabled_plugins"):
                shutil.chown(path, user="rabbitmq", group="rabbitmq")

    def _environment(self) -> dict[str, str]:
        return {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            # Erlang creates a cookie in a home of its own, so this node and the shared one cannot connect.
            "HOME": str(self.folder),
            "RABBITMQ_NODENAME": self.nodename,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(self.folder / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.folder / "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.folder / "enabled_plugins"),
            "RABBITMQ_CONFIG_FILE": str(self.folder / "rabbitmq.conf"),
            "RABBITMQ_PID_FILE": str(self.folder / "node.pid"),
        }

    def start(self) -> float:
        """Boot the node and return the time.monotonic() at which it accepted AMQP connections."""
        assert self.process is None or self.process.poll() is not None, "this RabbitMQ node is already running"
        command = ["env", *(f"{key}={value}" for key, value in self._environment().items()), RABBITMQ_SERVER]
        if self.as_rabbitmq:
            command = ["runuser", "-u", "rabbitmq", "--", *command]
        if self._log is None:
            self._log = (self.folder / "server.log").open("ab")
        self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + RABBITMQ_START_TIMEOUT
        while not _accepts_connections(self.port):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(
                    f"RabbitMQ node {self.nodename} did not accept connections on port {self.port} within "
                    f"{RABBITMQ_START_TIMEOUT} s:\n{(self.folder / 'server.log').read_text(errors='replace')[-3000:]}"
                )
            time.sleep(0.05)
        return time.monotonic()

    def stop(self) -> None:
        """Kill the node's Erlang VM with SIGKILL, as if it crashed, and reap the script that started it."""
        process, self.process = self.process, None
        if process is None:
            return
        pid_file = self.folder / "node.pid"
        with contextlib.suppress(OSError, ValueError):
            os.kill(int(pid_file.read_text().split()[0]), signal.SIGKILL)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
        with contextlib.suppress(OSError):
            pid_file.unlink()

    def close(self) -> None:
        try:
            self.stop()
        finally:
            if self._log is not None:
                self._log.close()
            shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


async def drop_subscription(client: Any, subscription: Any, prefix: str) -> None:
    """Unsubscribe a plain nats-py client, then wait until nats-server replies "no responders" on ``prefix``.

    nats-py (2.16) writes the PING of ``flush()`` ahead of an UNSUB still in its buffer, so a flush alone
    may return before the server has dropped the subscription.
    """
    import nats

    await subscription.unsubscribe()
    await client.flush()
    for _ in range(40):
        try:
            await client.request(f"{prefix}.probe", b"", timeout=0.25)
        except nats.errors.NoRespondersError:
            return
        except nats.errors.TimeoutError:
            continue
    raise AssertionError(f"NATS still routes requests on {prefix}.> after the unsubscription")
