"""Live terminal view of a running pipeline (`tickbridge status`, and the screen of `make demo`).

It reads the servers directly (stream lengths, consumer-group lag, rows in QuestDB), the simulator's
counters and Prometheus' firing alerts, so it shows the truth even when a role is down.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from typing import Any

import redis
from rich.console import Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table

from tickbridge.core import keys
from tickbridge.core.settings import load_settings


@dataclass
class Endpoints:
    vps_redis_url: str
    brain_redis_url: str
    vps_questdb_url: str
    brain_questdb_url: str
    stream_key: str = keys.DEFAULT_STREAM_KEY
    group: str = keys.DEFAULT_CONSUMER_GROUP
    sim_url: str | None = None
    prometheus_url: str | None = None
    processes: dict[str, Any] = field(default_factory=dict)  # name -> object with .alive()


def _http_json(url: str, timeout: float = 2.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read())


def _sql_scalar(base: str, sql: str) -> Any:
    doc = _http_json(f"{base}/exec?" + urllib.parse.urlencode({"query": sql}), timeout=5)
    if "error" in doc:
        return None
    dataset = doc.get("dataset") or [[None]]
    return dataset[0][0]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass
class Snapshot:
    at: float
    values: dict[str, Any]


class StatusReader:
    """Collects one snapshot of the pipeline; rates come from the difference of two snapshots."""

    def __init__(self, ep: Endpoints) -> None:
        self.ep = ep
        self.vps = redis.Redis.from_url(ep.vps_redis_url, socket_timeout=2, socket_connect_timeout=2)
        self.brain = redis.Redis.from_url(ep.brain_redis_url, socket_timeout=2, socket_connect_timeout=2)
        self.prev: Snapshot | None = None
        self.started = time.monotonic()

    def read(self) -> Snapshot:
        v: dict[str, Any] = {}
        with contextlib.suppress(Exception):
            v["vps_stream_len"] = self.vps.xlen(self.ep.stream_key)
        with contextlib.suppress(Exception):
            raw: dict[Any, Any] = self.vps.hgetall(keys.FORWARDER_STATE)
            v["forwarder_state"] = {_text(k): _text(x) for k, x in raw.items()}
        with contextlib.suppress(Exception):
            v["brain_stream_len"] = self.brain.xlen(self.ep.stream_key)
        with contextlib.suppress(Exception):
            for group in self.brain.xinfo_groups(self.ep.stream_key):
                name = group["name"]
                if _text(name) == self.ep.group:
                    v["lag"] = group.get("lag")
                    v["pending"] = group.get("pending")
        with contextlib.suppress(Exception):
            v["trades_rows"] = _sql_scalar(self.ep.brain_questdb_url, "SELECT count() FROM trades")
        with contextlib.suppress(Exception):
            v["buffer_rows"] = _sql_scalar(self.ep.vps_questdb_url, "SELECT count() FROM vps_buffer")
        if self.ep.sim_url:
            with contextlib.suppress(Exception):
                stats = _http_json(f"{self.ep.sim_url}/_sim/stats")
                per = stats.get("symbols", {})
                v["sim_trades"] = sum(int(s.get("trades", 0)) for s in per.values() if isinstance(s, dict))
                v["symbols"] = len(per)
        if self.ep.prometheus_url:
            with contextlib.suppress(Exception):
                alerts = _http_json(f"{self.ep.prometheus_url}/api/v1/alerts")["data"]["alerts"]
                # The watchdogs fire by design (the alert pipeline works): not news for the status line.
                v["alerts"] = [
                    a["labels"].get("alertname", "?") for a in alerts
                    if a.get("state") == "firing" and not a["labels"].get("alertname", "").endswith("Watchdog")
                ]  # fmt: skip
        v["processes"] = {name: proc.alive() for name, proc in self.ep.processes.items()}
        snap = Snapshot(time.monotonic(), v)
        return snap

    def rate(self, snap: Snapshot, key: str) -> float | None:
        if self.prev is None or key not in snap.values or key not in self.prev.values:
            return None
        dt = snap.at - self.prev.at
        a, b = self.prev.values[key], snap.values[key]
        if dt <= 0 or a is None or b is None:
            return None
        return (float(b) - float(a)) / dt

    def render(self, title: str = "tickbridge") -> Panel:
        snap = self.read()
        v = snap.values
        table = Table(show_header=True, header_style="bold", expand=True)
        table.add_column("hop")
        table.add_column("figure", justify="right")
        table.add_column("rate /s", justify="right")

        def fmt(x: Any) -> str:
            return "-" if x is None else (f"{x:,}" if isinstance(x, int) else str(x))

        def rate(key: str) -> str:
            r = self.rate(snap, key)
            return "-" if r is None else f"{r:,.0f}"

        table.add_row("exchange (simulator) trades emitted", fmt(v.get("sim_trades")), rate("sim_trades"))
        table.add_row("symbols", fmt(v.get("symbols")), "")
        table.add_row("VPS stream length", fmt(v.get("vps_stream_len")), "")
        state = v.get("forwarder_state") or {}
        mode = state.get("mode", "-")
        table.add_row("forwarder mode", mode, "")
        table.add_row("forwarder confirmed ID", state.get("confirmed_id", "-"), "")
        table.add_row("VPS QuestDB buffer rows", fmt(v.get("buffer_rows")), "")
        table.add_row("Brain stream length", fmt(v.get("brain_stream_len")), rate("brain_stream_len"))
        table.add_row("Brain consumer lag / pending", f"{fmt(v.get('lag'))} / {fmt(v.get('pending'))}", "")
        table.add_row("Brain QuestDB trades rows", fmt(v.get("trades_rows")), rate("trades_rows"))
        procs = v.get("processes", {})
        proc_line = "  ".join(f"[{'green' if up else 'red'}]{name}[/]" for name, up in procs.items())
        alerts = v.get("alerts")
        alert_line = ("[green]none firing[/]" if alerts == [] else
                      ("-" if alerts is None else "[red]" + ", ".join(alerts) + "[/]"))  # fmt: skip
        uptime = time.monotonic() - self.started
        self.prev = snap
        return Panel(
            Group(table, f"processes: {proc_line or '-'}", f"alerts: {alert_line}"),
            title=f"{title} — up {uptime:,.0f}s — Ctrl-C stops everything",
        )


def watch(ep: Endpoints, *, title: str = "tickbridge", duration: float | None = None, interval: float = 1.0) -> None:
    """Refresh the view every `interval` seconds until Ctrl-C (or `duration`)."""
    reader = StatusReader(ep)
    deadline = None if duration is None else time.monotonic() + duration
    with Live(reader.render(title), refresh_per_second=4, screen=False) as live:
        while deadline is None or time.monotonic() < deadline:
            time.sleep(interval)
            live.update(reader.render(title))


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="tickbridge status", description=__doc__)
    parser.add_argument("--sim-url", help="simulator base URL, e.g. http://127.0.0.1:9443")
    parser.add_argument("--prometheus-url", help="Prometheus base URL for firing alerts")
    parser.add_argument("--duration", type=float, help="stop after this many seconds")
    args = parser.parse_args(argv)
    s = load_settings()
    ep = Endpoints(s.vps_redis_url, s.brain_redis_url, s.vps_questdb_url, s.brain_questdb_url, s.stream_key,
                   s.consumer_group, args.sim_url, args.prometheus_url)  # fmt: skip
    with contextlib.suppress(KeyboardInterrupt):
        watch(ep, duration=args.duration)
