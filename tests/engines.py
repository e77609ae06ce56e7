"""Real engines started from the installed packages, for tests/test_engines.py: a 3-node
RabbitMQ cluster and a Postgres primary with a synchronous streaming standby.

Everything lives under one temporary directory, on ports the OS picks, with node names of
this process's own, and is stopped and deleted at the end, also when a test fails. The
machine's own RabbitMQ (5672) and Postgres (5432) are never touched. A missing program is a
failure, not a skip: ./scripts/test.sh installs them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import psycopg
import pytest

from tests.support import free_port, wait_until

RABBITMQ_BIN = Path("/usr/lib/rabbitmq/bin")


def _postgres_bin() -> Path:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"),
                   key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0)
    if not found:
        pytest.fail("no Postgres server programs in /usr/lib/postgresql/*/bin: install the "
                    "postgresql package (./scripts/test.sh does)", pytrace=False)
    return found[-1].parent


def _require(path: Path, package: str) -> None:
    if not path.exists():
        pytest.fail(f"{path} is missing: install the {package} package (./scripts/test.sh does)",
                    pytrace=False)


class RabbitNode:
    def __init__(self, base: Path, name: str, environment: dict[str, str]) -> None:
        self.name = name
        self.port = free_port()
        self.directory = base / name.split("@")[0]
        self.directory.mkdir()
        self.env = {**environment,
                    "RABBITMQ_NODENAME": name,
                    "RABBITMQ_NODE_PORT": str(self.port),
                    "RABBITMQ_DIST_PORT": str(free_port()),
                    "RABBITMQ_MNESIA_BASE": str(self.directory / "mnesia"),
                    "RABBITMQ_LOG_BASE": str(self.directory / "log"),
                    "RABBITMQ_PID_FILE": str(self.directory / "pid"),
                    "RABBITMQ_CONFIG_FILE": str(self.directory / "rabbitmq.conf")}
        (self.directory / "rabbitmq.conf").write_text(
            f"listeners.tcp.local = 127.0.0.1:{self.port}\nloopback_users = none\n")
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/%2F"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [str(RABBITMQ_BIN / "rabbitmq-server")], env=self.env, cwd=self.directory,
            stdout=open(self.directory / "server.out", "ab"), stderr=subprocess.STDOUT,
            start_new_session=True)
        # `wait` (not await_startup): it waits for the pid file, then for the app to run.
        self.ctl("wait", str(self.directory / "pid"), "--timeout", "120", timeout=130)

    def ctl(self, *args: str, timeout: float = 60) -> str:
        done = subprocess.run([str(RABBITMQ_BIN / "rabbitmqctl"), "-n", self.name, *args],
                              env=self.env, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise AssertionError(f"rabbitmqctl -n {self.name} {' '.join(args)}: "
                                 f"{done.stderr.strip() or done.stdout.strip()}")
        return done.stdout

    def stop(self) -> None:
        """The whole node, as an operator's `rabbitmqctl stop` (its clients see it close)."""
        if self.process is None or self.process.poll() is not None:
            return
        try:
            self.ctl("stop", timeout=60)
        except (AssertionError, subprocess.TimeoutExpired):
            pass
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, 9)
            self.process.wait(timeout=10)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, 9)
            self.process.wait(timeout=10)


class RabbitCluster:
    """Three nodes of the installed rabbitmq-server on ports of their own, one cluster."""

    def __init__(self, base: Path) -> None:
        _require(RABBITMQ_BIN / "rabbitmq-server", "rabbitmq-server")
        home = base / "home"
        home.mkdir()
        cookie = home / ".erlang.cookie"
        cookie.write_text(f"SMSQTEST{os.getpid()}{int(time.time())}")
        cookie.chmod(0o400)
        (base / "enabled_plugins").write_text("[].\n")  # no management UI on 15672
        (base / "rabbitmq-env.conf").write_text("")  # not the machine's (its NODENAME)
        environment = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home),
            "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
            "RABBITMQ_CONF_ENV_FILE": str(base / "rabbitmq-env.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(base / "enabled_plugins"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(base / "advanced.config"),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "ERL_FLAGS": "-kernel inet_dist_use_interface {127,0,0,1}",
        }
        self.nodes = [RabbitNode(base, f"smsq{os.getpid()}n{i}@localhost", environment)
                      for i in (1, 2, 3)]

    def start(self) -> None:
        for node in self.nodes:
            node.start()
        first = self.nodes[0]
        for node in self.nodes[1:]:
            node.ctl("stop_app")
            node.ctl("join_cluster", first.name)
            node.ctl("start_app")
        running = first.ctl("cluster_status", "--formatter", "json")
        missing = [node.name for node in self.nodes if node.name not in running]
        assert not missing, f"nodes not in the cluster: {missing}"

    @property
    def amqp_url(self) -> str:
        return ",".join(node.url for node in self.nodes)

    def node_on_port(self, port: int) -> RabbitNode:
        return next(node for node in self.nodes if node.port == port)

    def close(self) -> None:
        for node in reversed(self.nodes):
            node.kill()  # the data goes with the directory: no need for a clean stop


class PostgresServer:
    """One cluster of the installed Postgres, run as the postgres user."""

    def __init__(self, directory: Path, name: str) -> None:
        self.bin = _postgres_bin()
        self.name = name
        self.directory = directory / name
        self.directory.mkdir()
        shutil.chown(self.directory, "postgres")
        self.data = self.directory / "data"
        self.port = free_port()

    @property
    def host_port(self) -> str:
        return f"127.0.0.1:{self.port}"

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@{self.host_port}/{database}"

    def run(self, program: str, *args: str) -> None:
        done = subprocess.run(["runuser", "-u", "postgres", "--", str(self.bin / program), *args],
                              capture_output=True, text=True, timeout=120, cwd=self.directory)
        if done.returncode != 0:
            raise AssertionError(f"{program} {' '.join(args)}: {done.stderr.strip()}")

    def initdb(self) -> None:
        self.run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "-E", "UTF8",
                 "--no-sync")
        self.configure(f"port = {self.port}", "listen_addresses = '127.0.0.1'",
                       f"unix_socket_directories = '{self.directory}'",
                       "wal_level = replica", "max_wal_senders = 5", "fsync = off")

    def configure(self, *lines: str) -> None:
        with open(self.data / "postgresql.auto.conf", "a") as conf:
            conf.write("\n".join(lines) + "\n")

    def start(self) -> None:
        self.run("pg_ctl", "-D", str(self.data), "-l", str(self.directory / "postgres.log"),
                 "-w", "-t", "60", "start")

    def stop(self, mode: str = "fast") -> None:
        self.run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()

    def execute(self, statement: str, database: str = "postgres") -> list[tuple]:
        with psycopg.connect(self.url(database), autocommit=True, connect_timeout=5) as conn:
            cursor = conn.execute(statement)
            return cursor.fetchall() if cursor.description else []


class PostgresPair:
    """A primary and a standby made with pg_basebackup, replicating synchronously."""

    STANDBY_NAME = "smsq_standby"

    def __init__(self, base: Path) -> None:
        shutil.chown(base, "postgres")
        self.primary = PostgresServer(base, "primary")
        self.standby = PostgresServer(base, "standby")

    def start(self) -> None:
        self.primary.initdb()
        self.primary.start()
        self.standby.run("pg_basebackup", "-h", "127.0.0.1", "-p", str(self.primary.port),
                         "-U", "postgres", "-D", str(self.standby.data), "-R", "-X", "stream")
        self.standby.configure(
            f"port = {self.standby.port}",
            f"unix_socket_directories = '{self.standby.directory}'",
            f"primary_conninfo = 'host=127.0.0.1 port={self.primary.port} user=postgres "
            f"application_name={self.STANDBY_NAME}'")
        self.standby.start()
        # Synchronous: a commit returns once the standby has it, so a failover loses none.
        self.primary.execute(f"ALTER SYSTEM SET synchronous_standby_names = '{self.STANDBY_NAME}'")
        self.primary.execute("SELECT pg_reload_conf()")
        wait_until(lambda: self.primary.execute(
            "SELECT sync_state FROM pg_stat_replication WHERE application_name = "
            f"'{self.STANDBY_NAME}'") == [("sync",)], timeout=30,
            message="the standby to replicate synchronously")

    def database_url(self, database: str) -> str:
        """libpq's multi-host form: whichever of the two accepts writes."""
        return (f"postgresql://postgres@{self.primary.host_port},{self.standby.host_port}/"
                f"{database}?target_session_attrs=read-write")

    def fail_over(self) -> None:
        """The primary dies (immediate stop, no checkpoint), the standby is promoted."""
        self.primary.stop("immediate")
        self.standby.run("pg_ctl", "-D", str(self.standby.data), "-w", "promote")

    def close(self) -> None:
        for server in (self.standby, self.primary):
            if server.running():
                try:
                    server.stop("immediate")
                except (AssertionError, subprocess.TimeoutExpired):
                    pass
