"""The whole pipeline as native processes on this machine: what `make demo`, the load and chaos runs,
the dashboard test and the end-to-end tests start.

VPS: redis-server (AOF everysec), QuestDB (spill buffer), `tickbridge collector`, `tickbridge forwarder` (the
ordered half, FORWARDER_LANE=ordered, and the live lane, FORWARDER_LANE=live, as `forwarder-live`).
Brain: redis-server, QuestDB, `tickbridge consumer`, `tickbridge writer`. Plus the simulator (unless the
source is the real exchange), Prometheus scraping every role, and optionally toxiproxy on the VPS->Brain link,
with the link proxy (resets, refused connects, segment loss) in front of it: forwarder -> link proxy ->
toxiproxy -> Brain Redis. With Prometheus, a redis_exporter next to each Redis (jobs `redis-vps`,
`redis-brain`, as in compose).
Each process gets free loopback ports and its own directory and is stopped by PID.

Several exchanges (issue 18, `StackConfig.venues`): beside Binance, each venue (`coinbase`, `kraken`) gets
its own simulator (`tickbridge sim --venue`) and its own collector, forwarder and consumer (`EXCHANGE=<venue>`,
stream `market:vps:stream:<venue>` on both hosts), named `collector-<venue>` ... in `roles`; the one writer
serves every exchange.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tickbridge.core import keys
from tickbridge_dev.devstack.servers import (
    REPO_ROOT,
    AlertmanagerServer,
    LinkProxyServer,
    ManagedProcess,
    PrometheusServer,
    QuestDBServer,
    RedisExporterServer,
    RedisServer,
    ToxiproxyServer,
    free_port,
)

#: `forwarder-live` is `tickbridge forwarder` with FORWARDER_LANE=live (the fast-forward lane as a process of its
#: own, issue 16); when the stack runs it, the forwarder gets FORWARDER_LANE=ordered, else `both`.
ROLES = ("collector", "forwarder", "forwarder-live", "consumer", "writer")
LIVE_ROLE = "forwarder-live"
#: Its nice value (compose: cpu_shares 2048, twice the others' weight; nice -3 is about that much weight).
LIVE_NICE = -3
#: The roles each exchange runs for itself (the writer is shared; a venue's forwarder runs both lanes).
VENUE_ROLES = ("consumer", "forwarder", "collector")
#: The WebSocket path of each venue simulator.
VENUE_WS_PATH = {"coinbase": "/", "kraken": "/v2"}


def role_name(role: str, venue: str | None = None) -> str:
    """`collector` (Binance) or `collector-coinbase`: the key in `NativeStack.roles` and the process's folder."""
    return role if venue is None else f"{role}-{venue}"


class RoleProcess(ManagedProcess):
    """`python -m tickbridge <role> [args]` with an explicit environment; ready when /metrics answers."""

    startup_timeout = 60.0

    def __init__(self, role: str, env: dict[str, str], metrics_port: int, args: list[str] | None = None,
                 *, workdir: Path) -> None:  # fmt: skip
        self.name = role
        super().__init__(workdir)
        self.role = role
        self.role_env = env
        self.metrics_port = metrics_port
        self.args = args or []

    def command(self) -> list[str]:
        if self.role == "reader":  # trading-code stand-in, not a deployable role
            return [sys.executable, "-m", "tickbridge_dev.devstack.reader", *self.args]
        if self.role == LIVE_ROLE:  # FORWARDER_LANE=live in its env (`NativeStack.env_for`)
            return [sys.executable, "-m", "tickbridge", "forwarder", *self.args]
        return [sys.executable, "-m", "tickbridge", self.role, *self.args]

    def env(self) -> dict[str, str]:
        base = {k: v for k, v in os.environ.items() if not k.startswith(("SYMBOLS", "METRICS_PORT"))}
        return {**base, **self.role_env, "METRICS_PORT": str(self.metrics_port), "PYTHONUNBUFFERED": "1"}

    def spawn(self) -> None:
        super().spawn()
        if self.role == LIVE_ROLE and self.proc is not None:
            # As compose's `cpu_shares: 2048` for forwarder-live: its few entries/s must not wait behind a replay
            # burst of the processes beside it (a higher priority needs root; without it the lane runs as is).
            with contextlib.suppress(OSError):
                os.setpriority(os.PRIO_PROCESS, self.proc.pid, LIVE_NICE)

    def ready(self) -> bool:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=1) as resp:
            return int(resp.status) == 200

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@dataclass
class StackConfig:
    """What to run: the simulator (or the real exchange), its rate, symbols, budgets, extras."""

    source: str = "sim"  # "sim" or "binance"
    symbols: tuple[str, ...] = ()
    rate: float = 1200.0
    seed: int = 1
    ram_buffer_bytes: int | None = None
    disk_buffer_bytes: int | None = None
    with_prometheus: bool = True
    with_toxiproxy: bool = False
    #: `LinkProxy` in front of the VPS->Brain link (faults toxiproxy cannot make: RST, refused, segment loss).
    with_link_proxy: bool = False
    #: Also run a process embedding TieredMarketData (a trading-code stand-in) so tier metrics exist.
    with_reader: bool = False
    workdir: Path | None = None
    extra_env: dict[str, str] = field(default_factory=dict)
    sim_args: list[str] = field(default_factory=list)
    #: Exchanges run beside Binance (`coinbase`, `kraken`), each with its own simulator and roles; SOURCE=sim.
    venues: tuple[str, ...] = ()
    #: Trades/s of each venue simulator (None: `rate`).
    venue_rate: float | None = None


class NativeStack:
    """Start/stop the full two-host pipeline on this machine (context manager)."""

    def __init__(self, config: StackConfig) -> None:
        self.config = config
        self.workdir = config.workdir or Path(tempfile.mkdtemp(prefix="tickbridge-stack-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.vps_redis = RedisServer(appendonly=True, workdir=self.workdir / "vps-redis")
        self.brain_redis = RedisServer(appendonly=True, workdir=self.workdir / "brain-redis")
        self.vps_questdb = QuestDBServer(workdir=self.workdir / "vps-questdb")
        self.brain_questdb = QuestDBServer(workdir=self.workdir / "brain-questdb")
        self.toxiproxy: ToxiproxyServer | None = None
        self.link_proxy: LinkProxyServer | None = None
        self.brain_link_port: int | None = None
        self.sim: RoleProcess | None = None
        self.sim_port = free_port()
        #: Venue simulators and their ports (issue 18).
        self.venue_sims: dict[str, RoleProcess] = {}
        self.venue_ports: dict[str, int] = {v: free_port() for v in config.venues}
        self.roles: dict[str, RoleProcess] = {}
        self.prometheus: PrometheusServer | None = None
        self.alertmanager: AlertmanagerServer | None = None
        self.redis_exporters: dict[str, RedisExporterServer] = {}
        self._started: list[ManagedProcess] = []
        #: The live lane runs as its own process (`forwarder-live`): the forwarder then runs only the ordered half.
        self.split_lane = False

    # -- addresses ---------------------------------------------------------------------------------
    @property
    def brain_redis_url_for_vps(self) -> str:
        """What the forwarder dials: through the link proxy and/or toxiproxy when enabled."""
        if self.link_proxy is not None:
            return f"redis://127.0.0.1:{self.link_proxy.port}/0"
        if self.brain_link_port is not None:
            return f"redis://127.0.0.1:{self.brain_link_port}/0"
        return self.brain_redis.url

    def env_for(self, role: str, venue: str | None = None) -> dict[str, str]:
        cfg = self.config
        on_vps = role in ("forwarder", LIVE_ROLE)  # they reach the Brain over the link
        env = {
            "VPS_REDIS_URL": self.vps_redis.url,
            "BRAIN_REDIS_URL": self.brain_redis_url_for_vps if on_vps else self.brain_redis.url,
            "VPS_QUESTDB_URL": self.vps_questdb.url,
            "BRAIN_QUESTDB_URL": self.brain_questdb.url,
            "METRICS_BIND": "127.0.0.1",
        }
        if cfg.symbols:
            env["SYMBOLS"] = ",".join(cfg.symbols)
        if cfg.source == "sim":
            env["BINANCE_WS_URL"] = f"ws://127.0.0.1:{self.sim_port}"
            env["BINANCE_REST_URL"] = f"http://127.0.0.1:{self.sim_port}"
        if cfg.ram_buffer_bytes is not None:
            env["RAM_BUFFER_BYTES"] = str(cfg.ram_buffer_bytes)
        if cfg.disk_buffer_bytes is not None:
            env["DISK_BUFFER_BYTES"] = str(cfg.disk_buffer_bytes)
        if role == "consumer":
            env["CONSUMER_NAME"] = "consumer-1"
        env.update(cfg.extra_env)
        if venue is not None:
            port = self.venue_ports[venue]
            env["EXCHANGE"] = venue
            env.pop("STREAM_KEY", None)  # the venue's own stream (market:vps:stream:<venue>)
            env[f"{venue.upper()}_WS_URL"] = f"ws://127.0.0.1:{port}{VENUE_WS_PATH[venue]}"
            env[f"{venue.upper()}_REST_URL"] = f"http://127.0.0.1:{port}"
            if role == "consumer":
                env["CONSUMER_NAME"] = f"consumer-{venue}"
            if role == "forwarder":
                env["FORWARDER_LANE"] = "both"  # no live-lane process of its own per venue
        elif role == LIVE_ROLE:
            env["FORWARDER_LANE"] = "live"
        elif role == "forwarder" and self.split_lane:
            env["FORWARDER_LANE"] = "ordered"
        return env

    # -- lifecycle ---------------------------------------------------------------------------------
    def _start(self, proc: ManagedProcess) -> None:
        self._started.append(proc)
        proc.start()

    def _start_all(self, procs: list[ManagedProcess]) -> None:
        """Spawn several processes at once, then wait for each to be ready."""
        for proc in procs:
            self._started.append(proc)
            proc.spawn()
        for proc in procs:
            proc.wait_ready()

    def start_servers(self) -> None:
        self._start_all([self.vps_redis, self.brain_redis, self.vps_questdb, self.brain_questdb])
        if self.config.with_toxiproxy:
            self.toxiproxy = ToxiproxyServer(workdir=self.workdir / "toxiproxy")
            self._start(self.toxiproxy)
            self.brain_link_port = free_port()
            self.toxi_request("POST", "/proxies", {
                "name": "brain_redis", "listen": f"127.0.0.1:{self.brain_link_port}",
                "upstream": f"127.0.0.1:{self.brain_redis.port}", "enabled": True,
            })  # fmt: skip
        if self.config.with_link_proxy:
            upstream = self.brain_link_port if self.brain_link_port is not None else self.brain_redis.port
            self.link_proxy = LinkProxyServer(("127.0.0.1", upstream), seed=self.config.seed,
                                              workdir=self.workdir / "linkproxy")  # fmt: skip
            self._start(self.link_proxy)

    def start_sim(self) -> None:
        cfg = self.config
        args = ["--host", "127.0.0.1", "--port", str(self.sim_port), "--rate", str(cfg.rate), "--seed", str(cfg.seed)]
        if cfg.symbols:
            args += ["--symbols", ",".join(cfg.symbols)]
        self.sim = RoleProcess("sim", {}, free_port(), args + cfg.sim_args, workdir=self.workdir / "sim")
        self._start(self.sim)

    def venue_sim(self, venue: str) -> RoleProcess:
        cfg = self.config
        rate = cfg.rate if cfg.venue_rate is None else cfg.venue_rate
        args = ["--venue", venue, "--host", "127.0.0.1", "--port", str(self.venue_ports[venue]), "--rate", str(rate),
                "--seed", str(cfg.seed)]  # fmt: skip
        if cfg.symbols:
            args += ["--symbols", ",".join(cfg.symbols)]
        proc = RoleProcess("sim", {}, free_port(), args, workdir=self.workdir / f"sim-{venue}")
        proc.name = f"sim-{venue}"
        return proc

    def venue_role(self, role: str, venue: str) -> RoleProcess:
        name = role_name(role, venue)
        proc = RoleProcess(role, self.env_for(role, venue), free_port(), workdir=self.workdir / name)
        proc.name = name
        return proc

    def start_role(self, role: str) -> RoleProcess:
        proc = self.roles.get(role)
        if proc is None:
            self.split_lane = self.split_lane or role == LIVE_ROLE
            proc = RoleProcess(role, self.env_for(role), free_port(), workdir=self.workdir / role)
            self.roles[role] = proc
        self._start(proc) if proc not in self._started else proc.start()
        return proc

    def redis_exporter(self, host: str) -> RedisExporterServer:
        """The exporter of `host`'s Redis ("vps" or "brain"), watching the VPS stream there (no ACL here)."""
        server = self.vps_redis if host == "vps" else self.brain_redis
        return RedisExporterServer(f"redis://127.0.0.1:{server.port}", streams=(self.stream_key,),
                                   workdir=self.workdir / f"{host}-redis-exporter")  # fmt: skip

    @property
    def stream_key(self) -> str:
        return self.config.extra_env.get("STREAM_KEY", keys.DEFAULT_STREAM_KEY)

    def start_redis_exporters(self) -> None:
        """One redis_exporter per Redis (compose runs one per host): Redis memory, AOF, clients, the stream."""
        for host in ("vps", "brain"):
            if host not in self.redis_exporters:
                self.redis_exporters[host] = self.redis_exporter(host)
        self._start_all([e for e in self.redis_exporters.values() if e not in self._started])

    def start_prometheus(self, rules: list[Path] | None = None) -> None:
        cfg_path = self.workdir / "prometheus.yml"
        self.start_redis_exporters()
        rule_files = rules if rules is not None else sorted((REPO_ROOT / "prometheus").glob("*rules*.yml"))
        # The committed Alertmanager config, as in compose: firing alerts reach it (UI, amtool, receivers).
        self.alertmanager = AlertmanagerServer(workdir=self.workdir / "alertmanager")
        self._start(self.alertmanager)
        cfg_path.write_text(self.prometheus_config(rule_files))
        self.prometheus = PrometheusServer(cfg_path, workdir=self.workdir / "prometheus")
        self._start(self.prometheus)

    def prometheus_config(self, rule_files: list[Path]) -> str:
        """Scrape config with the same job names as the compose Prometheus configs."""
        # Job = role, as in compose; each exchange's processes carry an `exchange` label (issue 18).
        jobs: dict[str, list[str]] = {}
        exchanges: dict[str, str] = {}
        procs = dict(self.roles)
        if self.sim is not None:
            procs["sim"] = self.sim
        procs.update(self.venue_sims)
        for name, p in procs.items():
            target = f"127.0.0.1:{p.metrics_port}"
            jobs.setdefault(p.role, []).append(target)
            venue = name.partition("-")[2]
            exchanges[target] = venue if venue in self.venue_ports else keys.EXCHANGE
        jobs["questdb-vps"] = [f"127.0.0.1:{self.vps_questdb.min_port}"]
        jobs["questdb-brain"] = [f"127.0.0.1:{self.brain_questdb.min_port}"]
        for host, exporter in self.redis_exporters.items():
            jobs[f"redis-{host}"] = [f"127.0.0.1:{exporter.port}"]
        lines = ["global:", "  scrape_interval: 2s", "  evaluation_interval: 2s"]
        if self.alertmanager is not None:
            lines += ["alerting:", "  alertmanagers:", "    - static_configs:",
                      f"        - targets: ['127.0.0.1:{self.alertmanager.port}']"]  # fmt: skip
        if rule_files:
            lines.append("rule_files:")
            lines += [f"  - {path}" for path in rule_files]
        lines.append("scrape_configs:")
        for job, targets in jobs.items():
            host = "brain" if job in ("consumer", "writer", "reader", "questdb-brain", "redis-brain") else "vps"
            lines += [f"  - job_name: {job}", "    static_configs:"]
            for target in targets:
                label = f", exchange: {exchanges[target]}" if target in exchanges and job != "writer" else ""
                lines += [f"      - targets: {json.dumps([target])}", f"        labels: {{host: {host}{label}}}"]
        return "\n".join(lines) + "\n"

    def start(self, roles: tuple[str, ...] = ROLES) -> NativeStack:
        try:
            self.start_servers()
            if self.config.source == "sim":
                self.start_sim()
            # Every role retries its servers by itself, so they can start together.
            procs: list[ManagedProcess] = []
            wanted = (*roles, "reader") if self.config.with_reader else roles
            self.split_lane = LIVE_ROLE in wanted
            for role in ("writer", "consumer", "forwarder", LIVE_ROLE, "collector", "reader"):
                if role in wanted:
                    self.roles[role] = RoleProcess(role, self.env_for(role), free_port(), workdir=self.workdir / role)
                    procs.append(self.roles[role])
            for venue in self.config.venues:  # each exchange's simulator and own roles (issue 18)
                if self.config.source == "sim":
                    self.venue_sims[venue] = self.venue_sim(venue)
                    procs.append(self.venue_sims[venue])
                for role in VENUE_ROLES:
                    if role in wanted:
                        proc = self.roles[role_name(role, venue)] = self.venue_role(role, venue)
                        procs.append(proc)
            self._start_all(procs)
            if self.config.with_prometheus:
                self.start_prometheus()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop roles first (they drain and flush), then the simulator, then the servers."""
        for proc in reversed(self._started):
            with contextlib.suppress(Exception):
                proc.stop(timeout=30)

    def cleanup(self) -> None:
        self.stop()
        if self.config.workdir is None:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> NativeStack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    # -- faults and queries -------------------------------------------------------------------------
    def toxi_request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        assert self.toxiproxy is not None, "stack started without toxiproxy"
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(f"{self.toxiproxy.api}{path}", data=data, method=method,
                                     headers={"Content-Type": "application/json"})  # fmt: skip
        with urllib.request.urlopen(req, timeout=5) as resp:
            raw = resp.read()
        return json.loads(raw) if raw else None

    def set_brain_link(self, enabled: bool) -> None:
        """Cut or restore the VPS->Brain link (toxiproxy)."""
        self.toxi_request("POST", "/proxies/brain_redis", {"enabled": enabled})

    def set_link_proxy(self, mode: str | None = None, *, refuse: bool = True, loss: float | None = None) -> Any:
        """Switch the link proxy: mode `pass`, `swallow` or `reset` (`refuse`: new connects refused rather than
        reset), and/or the segment loss probability (see `tickbridge_dev.devstack.linkproxy`)."""
        assert self.link_proxy is not None, "stack started without the link proxy"
        body: dict[str, Any] = {"refuse": refuse}
        if mode is not None:
            body["mode"] = mode
        if loss is not None:
            body["loss"] = loss
        return self._json_request(f"{self.link_proxy.api}/mode", "POST", body)

    def link_proxy_stats(self) -> dict[str, Any]:
        assert self.link_proxy is not None, "stack started without the link proxy"
        result: dict[str, Any] = self._json_request(f"{self.link_proxy.api}/stats", "GET", None)
        return result

    def _json_request(self, url: str, method: str, body: dict[str, Any] | None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            raw = resp.read()
        return json.loads(raw) if raw else None

    def sim_request(self, method: str, path: str, body: dict[str, Any] | None = None, venue: str | None = None) -> Any:
        """A request to the Binance simulator, or to `venue`'s."""
        data = json.dumps(body).encode() if body is not None else None
        port = self.sim_port if venue is None or venue == keys.EXCHANGE else self.venue_ports[venue]
        req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method,
                                     headers={"Content-Type": "application/json"})  # fmt: skip
        with urllib.request.urlopen(req, timeout=10) as resp:
            raw = resp.read()
        return json.loads(raw) if raw else None

    def sim_fault(self, action: str, venue: str | None = None, **params: Any) -> Any:
        return self.sim_request("POST", "/_sim/fault", {"action": action, **params}, venue)

    def sim_stats(self, venue: str | None = None) -> dict[str, Any]:
        result: dict[str, Any] = self.sim_request("GET", "/_sim/stats", venue=venue)
        return result

    @property
    def exchanges(self) -> tuple[str, ...]:
        """Every exchange this stack runs: Binance, then the venues."""
        return (keys.EXCHANGE, *self.config.venues)

    def brain_sql(self, sql: str) -> list[list[Any]]:
        url = f"{self.brain_questdb.url}/exec?" + urllib.parse.urlencode({"query": sql})
        with urllib.request.urlopen(url, timeout=30) as resp:
            doc = json.loads(resp.read())
        if "error" in doc:
            raise RuntimeError(doc["error"])
        rows: list[list[Any]] = doc.get("dataset", [])
        return rows

    def wait_for(self, check: Any, timeout: float, what: str, interval: float = 0.5) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                if check():
                    return
            time.sleep(interval)
        raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
