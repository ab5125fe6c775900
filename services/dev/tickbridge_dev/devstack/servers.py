"""Start and stop real `redis-server`, QuestDB, Prometheus, redis_exporter, toxiproxy and link-proxy processes.

Every server gets free loopback ports and its own directory, is polled until ready, and is stopped
by PID (SIGTERM, then SIGKILL). `kill9()`, `pause()`/`resume()` and `restart()` exist for fault tests.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[4]
#: The committed Alertmanager config, run as is by compose and by the native stack.
ALERTMANAGER_CONFIG = REPO_ROOT / "alertmanager" / "alertmanager.yml"
CACHE_DIR = Path(os.environ.get("TICKBRIDGE_CACHE", REPO_ROOT / ".cache"))
QUESTDB_VERSION = "9.3.4"
#: QuestDB's log configuration on both hosts (compose mounts it; `QuestDBServer` copies it into its conf/).
QUESTDB_LOG_CONF = REPO_ROOT / "questdb" / "log.conf"
QUESTDB_JAR = Path(os.environ.get("QUESTDB_JAR", CACHE_DIR / f"questdb-{QUESTDB_VERSION}.jar"))
TOXIPROXY_BIN = Path(os.environ.get("TOXIPROXY_BIN", CACHE_DIR / "bin" / "toxiproxy-server"))


class ServerError(RuntimeError):
    """A server did not start or answer in time."""


#: Ports this process handed out lately. A port is chosen long before its server binds it (a stack picks
#: the simulator's port, then starts four servers), and the kernel may offer the same free port again.
_ISSUED: collections.deque[int] = collections.deque(maxlen=2000)


def _port_share() -> tuple[int, int]:
    """(index, count) of this process's share of the ports: under pytest-xdist (`make test` runs two workers)
    each worker and the processes it starts take only the ports `(port >> 1) % count == index` (Linux hands
    out odd ports for a bind to port 0, so the parity alone would split nothing), so two workers never pick
    the same free port before its server binds it; (0, 1) otherwise."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    count = os.environ.get("PYTEST_XDIST_WORKER_COUNT", "")
    if worker.startswith("gw") and worker[2:].isdigit() and count.isdigit() and int(count) > 1:
        return int(worker[2:]) % int(count), int(count)
    return 0, 1


def free_port() -> int:
    """A free loopback port that this process has not handed out lately (of its share: `_port_share`)."""
    index, count = _port_share()
    for _ in range(100 * count):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if (port >> 1) % count == index and port not in _ISSUED:
            _ISSUED.append(port)
            return port
    raise ServerError(f"no free loopback port found in {100 * count} tries")


def find_java() -> str:
    """A Java 17+ runtime for QuestDB 9.3.4 (JAVA_HOME, then PATH)."""
    home = os.environ.get("JAVA_HOME")
    if home and (Path(home) / "bin" / "java").exists():
        return str(Path(home) / "bin" / "java")
    java = shutil.which("java")
    if not java:
        raise ServerError("java not found: run `make deps`")
    return java


def wait_until(check: object, timeout: float, what: str, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise ServerError(f"{what}: process exited with {proc.returncode}")
        try:
            if check():  # type: ignore[operator]
                return
        except Exception:
            pass
        time.sleep(0.05)
    raise ServerError(f"{what}: not ready after {timeout:.0f}s")


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def stop_on_signals() -> None:
    """SIGTERM and SIGHUP (the terminal closed) unwind like Ctrl-C, so the `finally` that stops every child
    runs. The children are in their own sessions (they must not get the terminal's Ctrl-C before the
    roles drain), so without this a closed terminal left the whole stack running. SIGINT is set too: a
    process started in the background by a non-interactive shell (a CI runner, `cmd &` in a script) inherits
    SIGINT *ignored*, and Python then never installs its Ctrl-C handler, so a SIGINT did nothing."""
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, _interrupt)


class ManagedProcess:
    """A child process we own: stop by PID, kill -9, SIGSTOP/SIGCONT, restart with the same args."""

    name = "process"

    def __init__(self, workdir: Path | None = None) -> None:
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix=f"tb-{self.name}-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen[bytes] | None = None
        self._owns_dir = workdir is None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def log_path(self) -> Path:
        return self.workdir / f"{self.name}.log"

    def command(self) -> list[str]:
        raise NotImplementedError

    def ready(self) -> bool:
        raise NotImplementedError

    def env(self) -> dict[str, str] | None:
        return None

    startup_timeout = 30.0

    def start(self) -> ManagedProcess:
        self.spawn()
        return self.wait_ready()

    def spawn(self) -> None:
        """Start the process without waiting (pair with `wait_ready` to start several at once)."""
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.command(),
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                env=self.env(),
                start_new_session=True,
            )

    def wait_ready(self) -> ManagedProcess:
        assert self.proc is not None, "spawn() first"
        try:
            wait_until(self.ready, self.startup_timeout, self.name, self.proc)
        except ServerError as exc:
            tail = self.log_path.read_text(errors="replace")[-2000:]
            self.stop()
            raise ServerError(f"{exc}\n--- {self.log_path} ---\n{tail}") from None
        return self

    def stop(self, timeout: float = 20.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

    def kill9(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def pause(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)

    def restart(self) -> None:
        self.stop()
        self.start()

    def cleanup(self) -> None:
        self.stop()
        if self._owns_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> ManagedProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


class RedisServer(ManagedProcess):
    """Debian's `redis-server` on a free port. `appendonly=True` gives AOF `everysec` (the VPS setting)."""

    name = "redis"

    def __init__(
        self,
        port: int | None = None,
        *,
        appendonly: bool = False,
        appendfsync: str = "everysec",
        extra: list[str] | None = None,
        workdir: Path | None = None,
    ) -> None:
        super().__init__(workdir)
        self.port = port or free_port()
        self.appendonly = appendonly
        self.appendfsync = appendfsync
        self.extra = extra or []

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def command(self) -> list[str]:
        return [
            shutil.which("redis-server") or "redis-server",
            "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.workdir),
            "--save", "", "--appendonly", "yes" if self.appendonly else "no", "--appendfsync", self.appendfsync,
            "--maxmemory-policy", "noeviction", "--daemonize", "no", "--logfile", "",
            *self.extra,
        ]  # fmt: skip

    def ready(self) -> bool:
        with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            reply = sock.recv(64)
            return reply.startswith(b"+PONG") or b"NOAUTH" in reply


class RedisExporterServer(ManagedProcess):
    """Debian's `prometheus-redis-exporter` (redis_exporter 1.45, the compose image's version) for one Redis.

    As in compose: the ACL user (`monitor`) and its password from a `REDIS_PASSWORD_FILE`, a JSON map
    {address: password} (mode 0600, never in argv or the environment), the client certificate for a
    `rediss://` address, and `-check-single-streams` for the stream's length, top and groups.
    """

    name = "redis-exporter"

    def __init__(
        self,
        redis_addr: str,
        *,
        user: str | None = None,
        password: str | None = None,
        tls: tuple[Path, Path, Path] | None = None,
        streams: tuple[str, ...] = (),
        workdir: Path | None = None,
    ) -> None:
        super().__init__(workdir)
        self.redis_addr = redis_addr
        self.user = user
        self.password = password
        self.tls = tls  # (CA, client certificate, client key)
        self.streams = streams
        self.port = free_port()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def password_file(self) -> Path:
        return self.workdir / "redis-password.json"

    def command(self) -> list[str]:
        cmd = [
            shutil.which("prometheus-redis-exporter") or "/usr/bin/prometheus-redis-exporter",
            f"-web.listen-address=127.0.0.1:{self.port}",
            "-redis-only-metrics",
        ]
        if self.streams:
            cmd.append("-check-single-streams=" + ",".join(f"db0={key}" for key in self.streams))
        if self.tls is not None:
            ca, cert, key = self.tls
            cmd += [f"-tls-ca-cert-file={ca}", f"-tls-client-cert-file={cert}", f"-tls-client-key-file={key}"]
        return cmd

    def env(self) -> dict[str, str]:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "REDIS_ADDR": self.redis_addr}
        if self.user:
            env["REDIS_USER"] = self.user
        if self.password is not None:
            self.password_file.touch(mode=0o600, exist_ok=True)
            self.password_file.write_text(json.dumps({self.redis_addr: self.password}))
            env["REDIS_PASSWORD_FILE"] = str(self.password_file)
        return env

    def ready(self) -> bool:
        with urllib.request.urlopen(f"{self.url}/health", timeout=1) as resp:
            return int(resp.status) == 200


#: Worker pools and idle back-off for a 2-core host, the same lines as in questdb/vps/server.conf and
#: questdb/brain/server.conf (tests/test_ops_configs.py holds them equal). QuestDB 9 runs three pools
#: (network, query, write) of max(2, CPUs) threads each, plus WAL apply, and an idle worker spins, then
#: yields, then naps before it sleeps: on 2 cores that idle polling alone took ~7 % of a core
#: (`python -m tickbridge_dev.bench.questdb` measures idle CPU and core-µs per ILP row, A/B).
QUESTDB_TUNING: dict[str, str] = {
    "shared.network.worker.count": "1",
    "shared.query.worker.count": "1",
    "shared.write.worker.count": "1",
    "wal.apply.worker.count": "1",
    "shared.worker.yield.threshold": "10",
    "shared.worker.nap.threshold": "100",
    "shared.worker.sleep.threshold": "1000",
    # Each commit woke the WAL apply worker into ~900 naps: it now sleeps soon and polls every 1 ms asleep.
    "wal.apply.worker.nap.threshold": "20",
    "wal.apply.worker.sleep.threshold": "40",
    "wal.apply.worker.sleep.timeout": "1",
}


class QuestDBServer(ManagedProcess):
    """QuestDB from the Maven Central jar on Java 17, HTTP/PG/health on free loopback ports, with the
    committed 2-core tuning (`QUESTDB_TUNING`; `tuned=False` runs QuestDB's defaults, for A/B)."""

    name = "questdb"
    startup_timeout = 90.0

    def __init__(
        self, *, workdir: Path | None = None, extra_conf: dict[str, str] | None = None, tuned: bool = True
    ) -> None:
        super().__init__(workdir)
        self.tuned = tuned
        self.http_port = free_port()
        self.pg_port = free_port()
        self.min_port = free_port()
        self.extra_conf = extra_conf or {}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def write_conf(self) -> None:
        conf = {
            "http.net.bind.to": f"127.0.0.1:{self.http_port}",
            "http.min.net.bind.to": f"127.0.0.1:{self.min_port}",
            "pg.net.bind.to": f"127.0.0.1:{self.pg_port}",
            "line.tcp.enabled": "false",
            "line.udp.enabled": "false",
            "telemetry.enabled": "false",
            "metrics.enabled": "true",
            "http.min.worker.count": "1",
            "cairo.o3.column.memory.size": "256K",
            "cairo.writer.data.append.page.size": "1M",
            "cairo.wal.writer.data.append.page.size": "256K",
            "line.auto.create.new.columns": "false",
            "line.auto.create.new.tables": "false",
            **(QUESTDB_TUNING if self.tuned else {}),
            **self.extra_conf,
        }
        (self.workdir / "conf").mkdir(parents=True, exist_ok=True)
        (self.workdir / "db").mkdir(parents=True, exist_ok=True)
        (self.workdir / "conf" / "server.conf").write_text("".join(f"{k}={v}\n" for k, v in conf.items()))
        if self.tuned:  # INFO off: QuestDB's logging thread cost more than its commits (questdb/log.conf)
            shutil.copyfile(QUESTDB_LOG_CONF, self.workdir / "conf" / "log.conf")

    def command(self) -> list[str]:
        if not QUESTDB_JAR.exists():
            raise ServerError(f"{QUESTDB_JAR} missing: run `make deps`")
        self.write_conf()
        return [
            find_java(), "-Xms128m", "-Xmx512m",
            "-DQuestDB-Runtime-66535", "-Dcontainerized=false", "-ea", "-Dnoebug",
            f"-XX:ErrorFile={self.workdir}/db/hs_err_pid%p.log",
            "-XX:+UnlockExperimentalVMOptions", "-XX:+UseParallelGC",
            "--add-exports", "java.base/jdk.internal.math=io.questdb",
            "-p", str(QUESTDB_JAR), "-m", "io.questdb/io.questdb.ServerMain", "-d", str(self.workdir),
        ]  # fmt: skip

    def ready(self) -> bool:
        with urllib.request.urlopen(f"{self.url}/ping", timeout=1) as resp:
            return int(resp.status) == 204


class _PrometheusProjectServer(ManagedProcess):
    """A server of the Prometheus project (config file, free port, `/-/ready`)."""

    def __init__(self, config: Path, *, workdir: Path | None = None) -> None:
        super().__init__(workdir)
        self.config = config
        self.port = free_port()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def ready(self) -> bool:
        with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as resp:
            return int(resp.status) == 200


class PrometheusServer(_PrometheusProjectServer):
    """Debian's `prometheus` with a given config file, on a free port."""

    name = "prometheus"

    def __init__(self, config: Path, *, workdir: Path | None = None, extra: list[str] | None = None) -> None:
        super().__init__(config, workdir=workdir)
        self.extra = extra or []

    def command(self) -> list[str]:
        return [
            shutil.which("prometheus") or "/usr/bin/prometheus",
            f"--config.file={self.config}",
            f"--storage.tsdb.path={self.workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            *self.extra,
        ]


class AlertmanagerServer(_PrometheusProjectServer):
    """Debian's `prometheus-alertmanager` with the committed config, on a free port, without clustering."""

    name = "alertmanager"

    def __init__(self, config: Path = ALERTMANAGER_CONFIG, *, workdir: Path | None = None) -> None:
        super().__init__(config, workdir=workdir)

    def command(self) -> list[str]:
        return [
            shutil.which("prometheus-alertmanager") or "/usr/bin/prometheus-alertmanager",
            f"--config.file={self.config}",
            f"--storage.path={self.workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--cluster.listen-address=",  # one instance: no gossip port to collide with
        ]


class ToxiproxyServer(ManagedProcess):
    """toxiproxy (built from the Go module proxy by `make deps`) for link faults."""

    name = "toxiproxy"

    def __init__(self, *, workdir: Path | None = None) -> None:
        super().__init__(workdir)
        self.port = free_port()

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        if not TOXIPROXY_BIN.exists():
            raise ServerError(f"{TOXIPROXY_BIN} missing: run `make deps`")
        return [str(TOXIPROXY_BIN), "-host", "127.0.0.1", "-port", str(self.port)]

    def ready(self) -> bool:
        with urllib.request.urlopen(f"{self.api}/version", timeout=1) as resp:
            return int(resp.status) == 200


class LinkProxyServer(ManagedProcess):
    """`tickbridge_dev.devstack.linkproxy` as a process: resets, refused connects and segment loss on a link."""

    name = "linkproxy"

    def __init__(self, upstream: tuple[str, int], *, seed: int | None = None, workdir: Path | None = None) -> None:
        super().__init__(workdir)
        self.upstream = upstream
        self.seed = seed
        self.port = free_port()
        self.control_port = free_port()

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.control_port}"

    def command(self) -> list[str]:
        host, port = self.upstream
        cmd = [sys.executable, "-m", "tickbridge_dev.devstack.linkproxy", "--upstream", f"{host}:{port}",
               "--listen-port", str(self.port), "--control-port", str(self.control_port)]  # fmt: skip
        return cmd + (["--seed", str(self.seed)] if self.seed is not None else [])

    def ready(self) -> bool:
        with urllib.request.urlopen(f"{self.api}/stats", timeout=1) as resp:
            return int(resp.status) == 200
