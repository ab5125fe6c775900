"""Probes and fault injectors over a running `NativeStack`, shared by the load and chaos runs.

Probes read the servers directly (stream counters, QuestDB counts, process CPU/RSS), so they tell the truth
whatever the roles report about themselves. Injectors do one fault each and say what they did.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil  # type: ignore[import-untyped]
import redis
from prometheus_client.parser import text_string_to_metric_families

from tickbridge.core import keys
from tickbridge.core.settings import DEFAULT_SYMBOLS
from tickbridge.core.wire import parse_stream_id
from tickbridge_dev.devstack import oracle
from tickbridge_dev.devstack.servers import ManagedProcess
from tickbridge_dev.devstack.stack import NativeStack


def stack_symbols(stack: NativeStack) -> tuple[str, ...]:
    return stack.config.symbols or DEFAULT_SYMBOLS


def sim_trades_total(stats: dict[str, Any]) -> int:
    """Trades the simulator emitted (contiguous ID span per symbol, as the oracle expects them)."""
    return sum(last - first + 1 for first, last in oracle.expected_from_sim_stats(stats).values())


def _int(value: Any) -> int:
    return int(value.decode() if isinstance(value, bytes) else value)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def parse_questdb_ts(value: Any) -> float | None:
    """QuestDB's ISO timestamp (`2026-11-24T03:00:00.123456Z`) as epoch seconds."""
    if not value:
        return None
    text = str(value).rstrip("Z")
    with contextlib.suppress(ValueError):
        return dt.datetime.fromisoformat(text).replace(tzinfo=dt.UTC).timestamp()
    return None


def scrape_metrics(port: int, timeout: float = 2.0) -> dict[str, float]:
    """A role's `/metrics` as `name{labels} -> value` (tickbridge_* series only)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if not sample.name.startswith("tickbridge_") or sample.name.endswith(("_bucket", "_created")):
                continue
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}" if labels else sample.name] = float(sample.value)
    return out


def metric_sum(metrics: dict[str, float], name: str) -> float:
    """Sum of every labelled series of one metric."""
    return sum(v for k, v in metrics.items() if k == name or k.startswith(name + "{"))


@dataclass
class LatencySample:
    """One trade seen in a Brain per-symbol stream, with every hop's time (ms since the epoch)."""

    symbol: str
    exchange_ms: float
    collector_ms: float
    vps_ms: float
    brain_ms: float


class Probe:
    """Cheap reads of a running stack: counters per hop, latency samples, resources, Redis memory."""

    def __init__(self, stack: NativeStack) -> None:
        self.stack = stack
        self.symbols = stack_symbols(stack)
        self.vps = redis.Redis.from_url(stack.vps_redis.url, socket_timeout=5, socket_connect_timeout=2)
        self.brain = redis.Redis.from_url(stack.brain_redis.url, socket_timeout=5, socket_connect_timeout=2)
        self.stream_key = keys.DEFAULT_STREAM_KEY
        self._seen: dict[str, bytes] = {}
        self._procs: dict[str, tuple[int, psutil.Process]] = {}
        self._wait: dict[str, tuple[int, float, int]] = {}
        #: Helper processes of the harness (hopwatch followers) whose CPU counts as `harness` too.
        self.harness_pids: list[int] = []
        self._helpers: dict[int, psutil.Process] = {}

    def close(self) -> None:
        self.vps.close()
        self.brain.close()

    # -- counters ---------------------------------------------------------------------------------
    def stream_added(self, client: redis.Redis) -> int | None:
        with contextlib.suppress(Exception):
            info = client.execute_command("XINFO", "STREAM", self.stream_key)  # type: ignore[no-untyped-call]
            return _int(info[b"entries-added"])
        return None

    def brain_trades_added(self) -> int | None:
        with contextlib.suppress(Exception):
            pipe = self.brain.pipeline(transaction=False)
            for sym in self.symbols:
                pipe.execute_command("XINFO", "STREAM", keys.trades_key(sym))  # type: ignore[no-untyped-call]
            total = 0
            for info in pipe.execute(raise_on_error=False):
                if isinstance(info, dict):
                    total += _int(info[b"entries-added"])
            return total
        return None

    def questdb_count_and_newest(self) -> tuple[int | None, float | None]:
        with contextlib.suppress(Exception):
            rows = self.stack.brain_sql("SELECT count(), max(timestamp) FROM trades")
            if rows:
                return int(rows[0][0]), parse_questdb_ts(rows[0][1])
        return None, None

    def sim_trades(self) -> int | None:
        with contextlib.suppress(Exception):
            return sim_trades_total(self.stack.sim_stats())
        return None

    def commandstats(self) -> dict[str, dict[str, tuple[int, int]]]:
        """`INFO commandstats` of both Redis servers: {server: {command: (calls, µs)}} (a server that does not
        answer is left out)."""
        out: dict[str, dict[str, tuple[int, int]]] = {}
        for name, client in (("vps-redis", self.vps), ("brain-redis", self.brain)):
            with contextlib.suppress(Exception):
                info = client.info("commandstats")
                out[name] = {
                    key.removeprefix("cmdstat_"): (int(v["calls"]), int(v["usec"]))
                    for key, v in info.items()
                    if isinstance(v, dict)
                }
        return out

    def counts(self) -> dict[str, Any]:
        qcount, newest = self.questdb_count_and_newest()
        return {
            "exchange": self.sim_trades(),
            "vps_stream": self.stream_added(self.vps),
            "brain_stream": self.stream_added(self.brain),
            "brain_trades": self.brain_trades_added(),
            "questdb": qcount,
            "questdb_newest": newest,
        }

    # -- latency ----------------------------------------------------------------------------------
    def latency_samples(self, per_symbol: int = 3) -> list[LatencySample]:
        """The newest few trades of every Brain per-symbol stream not seen before (one round trip)."""
        out: list[LatencySample] = []
        with contextlib.suppress(Exception):
            pipe = self.brain.pipeline(transaction=False)
            for sym in self.symbols:
                pipe.xrevrange(keys.trades_key(sym), count=per_symbol)
            for sym, entries in zip(self.symbols, pipe.execute(raise_on_error=False), strict=True):
                if not isinstance(entries, list):
                    continue
                last_seen = self._seen.get(sym)
                for entry_id, fields in entries:
                    if last_seen is not None and parse_stream_id(entry_id) <= parse_stream_id(last_seen):
                        break
                    sample = _latency_sample(sym, entry_id, fields)
                    if sample is not None:
                        out.append(sample)
                if entries:
                    self._seen[sym] = max((e[0] for e in entries), key=parse_stream_id)
        return out

    # -- resources --------------------------------------------------------------------------------
    def processes(self) -> dict[str, ManagedProcess]:
        st = self.stack
        procs: dict[str, ManagedProcess] = {}
        if st.sim is not None:
            procs["sim"] = st.sim
        procs.update(st.roles)
        procs.update({"vps-redis": st.vps_redis, "brain-redis": st.brain_redis, "vps-questdb": st.vps_questdb,
                      "brain-questdb": st.brain_questdb})  # fmt: skip
        return procs

    def resources(self) -> dict[str, tuple[float, float]]:
        """name -> (CPU % of one core since the previous call, RSS MiB); the harness itself as `harness`."""
        out: dict[str, tuple[float, float]] = {}
        targets: dict[str, int] = {}
        for name, proc in self.processes().items():
            if proc.proc is not None and proc.proc.poll() is None:
                targets[name] = proc.proc.pid
        targets["harness"] = psutil.Process().pid
        for name, pid in targets.items():
            cached = self._procs.get(name)
            if cached is None or cached[0] != pid:
                with contextlib.suppress(psutil.Error):
                    p = psutil.Process(pid)
                    p.cpu_percent(None)  # prime: the first call has no interval
                    self._procs[name] = (pid, p)
                continue
            with contextlib.suppress(psutil.Error):
                p = cached[1]
                out[name] = (p.cpu_percent(None), p.memory_info().rss / 2**20)
        if "harness" in out:  # its helper processes take CPU from the stack as much as the harness itself
            cpu, rss = out["harness"]
            for pid in self.harness_pids:
                with contextlib.suppress(psutil.Error):
                    helper = self._helpers.get(pid)
                    if helper is None:
                        helper = self._helpers[pid] = psutil.Process(pid)
                        helper.cpu_percent(None)
                        continue
                    cpu += helper.cpu_percent(None)
            out["harness"] = (cpu, rss)
        return out

    def runqueue_wait(self) -> dict[str, float]:
        """name -> % of one core its threads spent runnable but waiting for a CPU since the previous call
        (/proc/<pid>/task/*/schedstat): high = starved of CPU, low with low CPU% = waiting on I/O."""
        out: dict[str, float] = {}
        now = time.monotonic()
        for name, (pid, _) in list(self._procs.items()):
            total = 0
            with contextlib.suppress(OSError, ValueError):
                for task in Path(f"/proc/{pid}/task").iterdir():
                    with contextlib.suppress(OSError, ValueError, IndexError):
                        total += int((task / "schedstat").read_text().split()[1])
            prev = self._wait.get(name)
            self._wait[name] = (pid, now, total)
            if prev is not None and prev[0] == pid and now > prev[1]:
                out[name] = max(0.0, (total - prev[2]) / 1e9 / (now - prev[1]) * 100)
        return out

    def redis_memory_mb(self) -> dict[str, float | None]:
        out: dict[str, float | None] = {}
        for name, client in (("vps-redis", self.vps), ("brain-redis", self.brain)):
            out[name] = None
            with contextlib.suppress(Exception):
                out[name] = int(client.info("memory")["used_memory"]) / 2**20
        return out


def _latency_sample(symbol: str, entry_id: bytes, fields: dict[bytes, bytes]) -> LatencySample | None:
    try:
        ts = int(fields[b"timestamp"]) / 1000
        recv = int(fields[b"recv_ts"]) / 1000
        src = fields.get(b"src_id")
        vps_ms = float(parse_stream_id(src)[0]) if src else float("nan")
        return LatencySample(symbol, ts, recv, vps_ms, float(parse_stream_id(entry_id)[0]))
    except (KeyError, ValueError):
        return None


# -- fault injection -----------------------------------------------------------------------------------
@dataclass
class FaultEvent:
    """One injected fault: when (s since the scenario started), what, and how long recovery took."""

    t: float
    what: str
    recovery_s: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def wait_caught_up(stack: NativeStack, timeout: float, interval: float = 0.25,
                   on_poll: Callable[[], None] | None = None) -> float | None:  # fmt: skip
    """Seconds until the Brain's QuestDB holds every trade the exchanges (Binance and the stack's venues) had
    emitted when this was called; None on timeout. Includes the normal end-to-end latency. `on_poll` runs at
    every poll (the chaos harness checks there that no process exited on its own)."""
    started = time.monotonic()
    target: int | None = None
    deadline = started + timeout
    while target is None and time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            target = sum(sim_trades_total(stack.sim_stats(e)) for e in stack.exchanges)
        if target is None:
            time.sleep(interval)
    while target is not None and time.monotonic() < deadline:
        if on_poll is not None:
            on_poll()
        with contextlib.suppress(Exception):
            if oracle.count_trades(stack.brain_questdb.url) >= target:
                return time.monotonic() - started
        time.sleep(interval)
    return None


def restart_process(proc: ManagedProcess, attempts: int = 3) -> None:
    """Start a killed process again (same ports, same data directory)."""
    last: Exception | None = None
    for _ in range(attempts):
        try:
            proc.start()
            return
        except Exception as exc:  # a port still in TIME_WAIT or a slow JVM: try again
            last = exc
            time.sleep(1.0)
    raise RuntimeError(f"could not restart {proc.name}: {last}")


def kill9(proc: ManagedProcess) -> int | None:
    """SIGKILL; returns the PID killed (None if it was not running)."""
    if proc.proc is None or proc.proc.poll() is not None:
        return None
    pid = proc.proc.pid
    proc.kill9()
    return pid


def toxic(stack: NativeStack, name: str, kind: str, attributes: dict[str, Any], stream: str = "upstream") -> None:
    """Add a toxiproxy toxic on the VPS->Brain link (`upstream` = forwarder to Brain Redis)."""
    stack.toxi_request("POST", "/proxies/brain_redis/toxics", {
        "name": name, "type": kind, "stream": stream, "toxicity": 1.0, "attributes": attributes,
    })  # fmt: skip


def remove_toxic(stack: NativeStack, name: str) -> None:
    with contextlib.suppress(Exception):
        stack.toxi_request("DELETE", f"/proxies/brain_redis/toxics/{name}")


def vps_buffer_rows(stack: NativeStack) -> int | None:
    """Rows in the VPS spill buffer table (None if the table does not exist yet)."""
    with contextlib.suppress(Exception):
        return oracle.count_trades(stack.vps_questdb.url, table=keys.VPS_BUFFER_TABLE)
    return None


def role_metric(stack: NativeStack, role: str, name: str) -> float | None:
    proc = stack.roles.get(role)
    if proc is None:
        return None
    with contextlib.suppress(Exception):
        return metric_sum(scrape_metrics(proc.metrics_port), name)
    return None


def poll(check: Callable[[], bool], timeout: float, interval: float = 0.25,
         on_poll: Callable[[], None] | None = None) -> bool:  # fmt: skip
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if on_poll is not None:
            on_poll()
        with contextlib.suppress(Exception):
            if check():
                return True
        time.sleep(interval)
    return False


def start_load(stack: NativeStack, rate: float, timeout: float = 60.0, settle: float = 1.0) -> None:
    """Wait until the collector is connected to the exchange, then set the simulator's rate.

    The stack starts the simulator at rate 0, so every trade the exchange emits happens while the pipeline
    is up: the runs measure the steady state, not the cold start."""
    if not poll(lambda: int(stack.sim_stats().get("connections", 0)) >= 1, timeout):
        raise TimeoutError(f"the collector did not connect to the simulator within {timeout:.0f}s")
    time.sleep(settle)
    stack.sim_request("POST", "/_sim/rate", {"rate": rate})
