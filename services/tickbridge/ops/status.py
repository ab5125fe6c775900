"""Live terminal view of a running pipeline (`tickbridge status`, and the screen of `make demo`).

It reads the servers directly (stream lengths, consumer-group lag, rows in QuestDB), the simulator's
counters and Prometheus' firing alerts, so it shows the truth even when a role is down. It speaks what a
deployed host speaks: Redis over TLS with client certificates (`rediss://`, REDIS_TLS_*) as an ACL user
(e.g. `monitor`; the password in the URL or in VPS_REDIS_PASSWORD_FILE / BRAIN_REDIS_PASSWORD_FILE),
QuestDB with its login (QUESTDB_USER/QUESTDB_PASSWORD over HTTP; on the Brain the read-only
QUESTDB_READER_USER/PASSWORD over PG wire when set). What it cannot read is said, one line per source
with the reason, never left blank.

    tickbridge status                         live view of both hosts (Ctrl-C stops)
    tickbridge status --host brain --once     one table of the Brain's figures; exit 1 if a source failed
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError
from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table

from tickbridge.brain.books import invalid_books
from tickbridge.brain.catchup import CatchUp, parse_catchup
from tickbridge.core import keys
from tickbridge.core.questdb_io import QuestDBHttp, QuestDBReader
from tickbridge.core.redis_io import make_client
from tickbridge.core.settings import Settings, load_settings, redact_secrets

HOSTS = ("vps", "brain")
#: How long one read of a source may take before it counts as failed.
SOURCE_TIMEOUT_S = 5.0


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
    #: TLS files and QuestDB logins (None: plain servers without logins, as in the native stack).
    settings: Settings | None = None
    #: The hosts whose servers are read ("vps", "brain"); a compose host reaches only its own.
    hosts: tuple[str, ...] = HOSTS
    #: Symbols whose Brain order books are counted (issue 17); empty: `settings.symbols`, or none.
    symbols: tuple[str, ...] = ()
    #: Exchanges shown one line each (issue 18: each has its own stream, forwarder and consumer group); empty:
    #: the single-exchange table only.
    exchanges: tuple[str, ...] = ()
    #: The exchange whose pipeline the table shows (its forwarder state and buffer table; issue 18).
    exchange: str = keys.EXCHANGE


def _http_json(url: str, timeout: float = 2.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read())


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def reason(exc: BaseException) -> str:
    """One line saying why a read failed (credentials in URLs redacted)."""
    if isinstance(exc, TimeoutError | asyncio.TimeoutError) and not str(exc):
        return f"no answer within {SOURCE_TIMEOUT_S:g} s"
    if isinstance(exc, urllib.error.HTTPError):
        text = f"HTTP {exc.code} {exc.reason}"
    else:
        text = " ".join(str(exc).split()) or "(no message)"
    return redact_secrets(f"{type(exc).__name__}: {text}")[:300]


#: (source prefix, pattern in the reason, what to check): the settings behind a refusal.
HINTS: tuple[tuple[str, str, str], ...] = (
    ("VPS Redis", "password|auth", "the user and password of VPS_REDIS_URL / VPS_REDIS_PASSWORD_FILE"),
    ("Brain Redis", "password|auth", "the user and password of BRAIN_REDIS_URL / BRAIN_REDIS_PASSWORD_FILE"),
    ("Brain Redis", "certificate required|unknown ca|alert", "the client certificate: REDIS_TLS_CERT, REDIS_TLS_KEY"),
    ("", "certificate verify failed", "REDIS_TLS_CA and the server certificate's name"),
    ("", "HTTP 401", "the login QUESTDB_USER / QUESTDB_PASSWORD(_FILE)"),
    (
        "Brain QuestDB",
        "password authentication|invalid username",
        "QUESTDB_READER_USER / QUESTDB_READER_PASSWORD(_FILE)",
    ),
    ("", "NOPERM", "the ACL of the user (e.g. `monitor`)"),
)


def hint(source: str, why: str) -> str:
    """`why`, followed by the settings to check when the reason is a known refusal."""
    for prefix, pattern, check in HINTS:
        if source.startswith(prefix) and re.search(pattern, why, re.IGNORECASE):
            return f"{why} (check {check})"
    return why


class SourceProblem(Exception):
    """A source answered, but not with the figure (a missing stream, group or state)."""


@dataclass
class Snapshot:
    at: float
    values: dict[str, Any]
    #: source name -> why it could not be read; one line each under the table.
    problems: dict[str, str] = field(default_factory=dict)


class StatusReader:
    """Collects one snapshot of the pipeline; rates come from the difference of two snapshots."""

    def __init__(self, ep: Endpoints) -> None:
        self.ep = ep
        self.prev: Snapshot | None = None
        self.started = time.monotonic()
        self.loop = asyncio.new_event_loop()
        s = ep.settings
        self.vps: aioredis.Redis | None = None
        self.brain: aioredis.Redis | None = None
        self.vps_sql: QuestDBHttp | None = None
        self.brain_sql: QuestDBHttp | QuestDBReader | None = None
        #: source -> address shown with a problem (credentials redacted).
        self.addresses: dict[str, str] = {}
        if "vps" in ep.hosts:
            self.vps = make_client(ep.vps_redis_url, s, timeout=SOURCE_TIMEOUT_S)
            self.vps_sql = QuestDBHttp(ep.vps_questdb_url, s, timeout=SOURCE_TIMEOUT_S)
            self.addresses["VPS Redis"] = ep.vps_redis_url
            self.addresses["VPS QuestDB"] = ep.vps_questdb_url
        if "brain" in ep.hosts:
            self.brain = make_client(ep.brain_redis_url, s, timeout=SOURCE_TIMEOUT_S)
            self.addresses["Brain Redis"] = ep.brain_redis_url
            if s is not None and s.questdb_reader_user and s.questdb_reader_password:
                # The least rights that read the figure: QuestDB's read-only PG-wire login.
                self.brain_sql = QuestDBReader(s.brain_questdb_pg_url, s.questdb_reader_user,
                                               s.questdb_reader_password, timeout=SOURCE_TIMEOUT_S)  # fmt: skip
                self.addresses["Brain QuestDB"] = f"{s.brain_questdb_pg_url} as {s.questdb_reader_user}"
            else:
                self.brain_sql = QuestDBHttp(ep.brain_questdb_url, s, timeout=SOURCE_TIMEOUT_S)
                self.addresses["Brain QuestDB"] = ep.brain_questdb_url
        if ep.sim_url:
            self.addresses["simulator"] = ep.sim_url
        if ep.prometheus_url:
            self.addresses["Prometheus"] = ep.prometheus_url

    def close(self) -> None:
        """Close every client and the loop (also after a Ctrl-C cut a read short)."""

        async def close_all() -> None:
            pending = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            for client in (self.vps, self.brain):
                if client is not None:
                    with contextlib.suppress(Exception):
                        await client.aclose()
            for sql in (self.vps_sql, self.brain_sql):
                if sql is not None:
                    with contextlib.suppress(Exception):
                        await sql.close()

        try:
            self.loop.run_until_complete(close_all())
        finally:
            self.loop.close()

    # ---- one read per source ------------------------------------------------------------------------

    async def _vps_redis(self, v: dict[str, Any]) -> None:
        assert self.vps is not None
        v["vps_stream_len"] = await self.vps.xlen(self.ep.stream_key)
        state_key = keys.for_exchange(keys.FORWARDER_STATE, self.ep.exchange)
        raw: dict[Any, Any] = await self.vps.hgetall(state_key)
        if not raw:
            raise SourceProblem(f"the forwarder state {state_key} is empty (no forwarder has run here)")
        v["forwarder_state"] = {_text(k): _text(x) for k, x in raw.items()}

    async def _brain_redis(self, v: dict[str, Any]) -> None:
        assert self.brain is not None
        v["brain_stream_len"] = await self.brain.xlen(self.ep.stream_key)
        symbols = self.ep.symbols or (self.ep.settings.symbols if self.ep.settings is not None else ())
        if symbols:  # order books (issue 17): how many are valid, which are not
            bad = await invalid_books(self.brain, symbols)
            v["books"] = f"{len(symbols) - len(bad)} / {len(symbols)}" + (
                f" (not: {','.join(bad[:3])}{'…' if len(bad) > 3 else ''})" if bad else ""
            )
        catchup = await self.brain.hgetall(keys.catchup_key(self.ep.exchange))
        v["catchup"] = catchup_line(parse_catchup(catchup))
        v["live_lane"] = live_lane_line(catchup)
        try:
            groups = await self.brain.xinfo_groups(self.ep.stream_key)
        except ResponseError as exc:
            if "no such key" in str(exc).lower():
                raise SourceProblem(f"no stream {self.ep.stream_key} (nothing forwarded yet)") from None
            raise
        for group in groups:
            if _text(group["name"]) == self.ep.group:
                lag = group.get("lag")
                v["lag"] = "n/a" if lag is None else int(lag)  # nil: Redis cannot tell (entries deleted)
                v["pending"] = int(group.get("pending") or 0)
                return
        raise SourceProblem(f"no consumer group {self.ep.group} on {self.ep.stream_key} (the consumer makes it)")

    async def _vps_questdb(self, v: dict[str, Any]) -> None:
        assert self.vps_sql is not None
        v["buffer_rows"] = await self.vps_sql.scalar(f"SELECT count() FROM {keys.buffer_table_for(self.ep.exchange)}")

    async def _brain_questdb(self, v: dict[str, Any]) -> None:
        assert self.brain_sql is not None
        v["trades_rows"] = await self.brain_sql.scalar("SELECT count() FROM trades")

    async def _simulator(self, v: dict[str, Any]) -> None:
        stats = await asyncio.to_thread(_http_json, f"{self.ep.sim_url}/_sim/stats")
        per = stats.get("symbols", {})
        v["sim_trades"] = sum(int(s.get("trades", 0)) for s in per.values() if isinstance(s, dict))
        v["symbols"] = len(per)

    async def _exchanges(self, v: dict[str, Any]) -> None:
        """Per exchange: its VPS and Brain stream, its consumer group's lag, its rows in `trades` and its own
        catch-up hash (`keys.catchup_key`)."""
        for exchange in self.ep.exchanges:
            stream = keys.stream_key_for(exchange)
            if self.vps is not None:
                v[f"{exchange}:vps_len"] = await self.vps.xlen(stream)
            if self.brain is not None:
                v[f"{exchange}:brain_len"] = await self.brain.xlen(stream)
                catchup = await self.brain.hgetall(keys.catchup_key(exchange))
                v[f"{exchange}:catchup"] = catchup_line(parse_catchup(catchup))
                v[f"{exchange}:live_lane"] = live_lane_line(catchup)
                with contextlib.suppress(ResponseError):  # no stream yet: lag unknown
                    for group in await self.brain.xinfo_groups(stream):
                        if _text(group["name"]) == self.ep.group:
                            v[f"{exchange}:lag"] = group.get("lag")
        # QuestDB last: the Redis figures above (catch-ups included) are shown even when it does not answer.
        if self.brain_sql is not None:
            sql = "SELECT exchange, count() FROM trades GROUP BY exchange"
            rows = {str(exchange): int(count) for exchange, count in await self.brain_sql.rows(sql)}
            for exchange in self.ep.exchanges:
                v[f"{exchange}:rows"] = rows.get(exchange, 0)

    async def _prometheus(self, v: dict[str, Any]) -> None:
        doc = await asyncio.to_thread(_http_json, f"{self.ep.prometheus_url}/api/v1/alerts")
        alerts = doc["data"]["alerts"]
        # The watchdogs fire by design (the alert pipeline works): not news for the status line.
        v["alerts"] = [
            a["labels"].get("alertname", "?") for a in alerts
            if a.get("state") == "firing" and not a["labels"].get("alertname", "").endswith("Watchdog")
        ]  # fmt: skip

    async def _read(self) -> tuple[dict[str, Any], dict[str, str]]:
        v: dict[str, Any] = {}
        problems: dict[str, str] = {}
        reads: dict[str, Callable[[dict[str, Any]], Awaitable[None]]] = {}
        if self.vps is not None:
            reads["VPS Redis"] = self._vps_redis
            reads["VPS QuestDB"] = self._vps_questdb
        if self.brain is not None:
            reads["Brain Redis"] = self._brain_redis
            reads["Brain QuestDB"] = self._brain_questdb
        if self.ep.sim_url:
            reads["simulator"] = self._simulator
        if self.ep.prometheus_url:
            reads["Prometheus"] = self._prometheus
        if self.ep.exchanges:
            reads["exchanges"] = self._exchanges

        async def one(name: str, read: Callable[[dict[str, Any]], Awaitable[None]]) -> None:
            try:
                await asyncio.wait_for(read(v), SOURCE_TIMEOUT_S + 1)
            except SourceProblem as exc:
                problems[name] = str(exc)
            except Exception as exc:  # every failure is shown, with its reason, never swallowed
                problems[name] = hint(name, reason(exc))

        await asyncio.gather(*(one(name, read) for name, read in reads.items()))
        return v, problems

    def read(self) -> Snapshot:
        values, problems = self.loop.run_until_complete(self._read())
        values["processes"] = {name: proc.alive() for name, proc in self.ep.processes.items()}
        return Snapshot(time.monotonic(), values, problems)

    def rate(self, snap: Snapshot, key: str) -> float | None:
        if self.prev is None or key not in snap.values or key not in self.prev.values:
            return None
        dt = snap.at - self.prev.at
        a, b = self.prev.values[key], snap.values[key]
        if dt <= 0 or a is None or b is None:
            return None
        return (float(b) - float(a)) / dt

    # ---- rendering ------------------------------------------------------------------------------------

    def problem_lines(self, snap: Snapshot) -> list[str]:
        """`could not read <source> (<address>): <reason>`, one per failed source."""
        return [
            f"could not read {name} ({redact_secrets(self.addresses.get(name, '?'))}): {why}"
            for name, why in sorted(snap.problems.items())
        ]

    def table(self, snap: Snapshot) -> Table:
        v = snap.values
        table = Table(show_header=True, header_style="bold", expand=True)
        table.add_column("hop")
        table.add_column("figure", justify="right")
        table.add_column("rate /s", justify="right")

        def fmt(x: Any) -> str:
            # Unknown: the source failed (its line under the table says why).
            return "?" if x is None else (f"{x:,}" if isinstance(x, int) else str(x))

        def rate(key: str) -> str:
            if self.prev is None:
                return "…"
            r = self.rate(snap, key)
            return "?" if r is None else f"{r:,.0f}"

        if self.ep.sim_url:
            table.add_row("exchange (simulator) trades emitted", fmt(v.get("sim_trades")), rate("sim_trades"))
            table.add_row("symbols", fmt(v.get("symbols")), "")
        if "vps" in self.ep.hosts:
            state = v.get("forwarder_state") or {}
            table.add_row("VPS stream length", fmt(v.get("vps_stream_len")), rate("vps_stream_len"))
            table.add_row("forwarder mode", fmt(state.get("mode")), "")
            table.add_row("forwarder confirmed ID", fmt(state.get("confirmed_id")), "")
            table.add_row("VPS QuestDB buffer rows", fmt(v.get("buffer_rows")), "")
        if "brain" in self.ep.hosts:
            table.add_row("Brain stream length", fmt(v.get("brain_stream_len")), rate("brain_stream_len"))
            table.add_row("Brain order books valid", fmt(v.get("books")), "")
            table.add_row("Brain consumer lag / pending", f"{fmt(v.get('lag'))} / {fmt(v.get('pending'))}", "")
            table.add_row("catch-up (fast-forward)", fmt(v.get("catchup")), "")
            table.add_row("forwarder live lane", fmt(v.get("live_lane")), "")
            table.add_row("Brain QuestDB trades rows", fmt(v.get("trades_rows")), rate("trades_rows"))
        for exchange in self.ep.exchanges:  # one line per exchange: its own lane end to end
            figure = (f"VPS {fmt(v.get(f'{exchange}:vps_len'))} · Brain {fmt(v.get(f'{exchange}:brain_len'))} · "
                      f"lag {fmt(v.get(f'{exchange}:lag'))} · rows {fmt(v.get(f'{exchange}:rows'))}")  # fmt: skip
            table.add_row(f"{exchange}: streams, lag, QuestDB", figure, rate(f"{exchange}:rows"))
            if "brain" in self.ep.hosts:
                table.add_row(f"{exchange}: catch-up", fmt(v.get(f"{exchange}:catchup")), "")
                table.add_row(f"{exchange}: live lane", fmt(v.get(f"{exchange}:live_lane")), "")
        return table

    def render(self, title: str = "tickbridge", *, footer: str = "Ctrl-C stops everything") -> Panel:
        snap = self.read()
        v = snap.values
        parts: list[Any] = [self.table(snap)]
        procs = v.get("processes", {})
        if procs:
            parts.append("processes: " + "  ".join(f"[{'green' if up else 'red'}]{n}[/]" for n, up in procs.items()))
        if self.ep.prometheus_url:
            alerts = v.get("alerts")
            alert_line = ("[green]none firing[/]" if alerts == [] else
                          ("?" if alerts is None else "[red]" + ", ".join(alerts) + "[/]"))  # fmt: skip
            parts.append(f"alerts: {alert_line}")
        parts += [f"[red]{line}[/]" for line in self.problem_lines(snap)]
        uptime = time.monotonic() - self.started
        self.prev = snap
        return Panel(Group(*parts), title=f"{title} — up {uptime:,.0f}s — {footer}")


def catchup_line(state: CatchUp) -> str:
    """One line of `catch_up()`'s figures: "none", or the backlog, its age, rate, ETA and the gap's length."""
    if not state.active:
        return "none"
    eta = "unknown" if state.eta_s is None or state.eta_s < 0 else f"{state.eta_s:,.0f}s"
    text = (f"ACTIVE: backlog {state.backlog:,} (VPS {state.vps_backlog:,}, buffer {state.buffer_rows:,}; "
            f"Brain lag {state.brain_lag:,}), oldest {state.oldest_age_s:,.0f}s, {state.rate:,.0f}/s, "
            f"ETA {eta}")  # fmt: skip
    if state.missing is not None:
        text += f", gap {(state.missing[1] - state.missing[0]) / 1e6:,.0f}s below the live view"
    if state.vps_age_s is not None and state.vps_age_s > 5:
        text += f", VPS last reported {state.vps_age_s:,.0f}s ago"
    return text


def live_lane_line(fields: dict[Any, Any], now: float | None = None) -> str:
    """The forwarder's live lane (FORWARDER_LANE=live or both) from its `live_*` fields in its catch-up hash:
    on (and how far its cursor is behind), idle, or not reporting (process down, or the link)."""
    f = {_text(k): _text(x) for k, x in fields.items()}
    now = time.time() if now is None else now
    try:
        updated = float(f.get("live_updated") or 0)
    except ValueError:
        updated = 0.0
    if not updated:
        return "no report yet (not running, or an older forwarder)"
    age = now - updated
    if age > 5:
        return f"NOT REPORTING for {age:,.0f}s (its process is down, or the Brain link)"
    cursor = f.get("live_cursor", "")
    if not cursor:
        return "idle (the ordered path is live)"
    behind = now - int(cursor.split("-")[0]) / 1000 if cursor.split("-")[0].isdigit() else float("nan")
    return f"ON: newest entries go to the Brain live stream, cursor {cursor} ({behind:,.1f}s behind)"


def watch(ep: Endpoints, *, title: str = "tickbridge", duration: float | None = None, interval: float = 1.0) -> None:
    """Refresh the view every `interval` seconds until Ctrl-C (or `duration`)."""
    reader = StatusReader(ep)
    deadline = None if duration is None else time.monotonic() + duration
    try:
        with Live(reader.render(title), refresh_per_second=4, screen=False) as live:
            while deadline is None or time.monotonic() < deadline:
                time.sleep(interval)
                live.update(reader.render(title))
    finally:
        reader.close()


def once(ep: Endpoints, *, interval: float = 1.0, console: Console | None = None) -> int:
    """Print the table once (two reads `interval` apart, for the rates); 1 if a source could not be read."""
    reader = StatusReader(ep)
    try:
        reader.prev = reader.read()
        time.sleep(max(interval, 0.0))
        snap = reader.read()
        out = console or Console(width=max(100, Console().width), highlight=False)
        out.print(Panel(reader.table(snap), title="tickbridge status"))
        for line in reader.problem_lines(snap):
            out.print(line, markup=False, soft_wrap=True)
        return 1 if snap.problems else 0
    finally:
        reader.close()


def endpoints_from(settings: Settings, args: argparse.Namespace) -> Endpoints:
    hosts = HOSTS if args.host == "both" else (args.host,)
    return Endpoints(settings.vps_redis_url, settings.brain_redis_url, settings.vps_questdb_url,
                     settings.brain_questdb_url, settings.stream_key, settings.consumer_group, args.sim_url,
                     args.prometheus_url, settings=settings, hosts=hosts,
                     exchanges=tuple(e.strip() for e in (args.exchanges or "").split(",") if e.strip()),
                     exchange=settings.exchange)  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `tickbridge status` (the CLI's sub-parser, which keeps the docstring's layout)."""
    parser.description = __doc__
    parser.add_argument("--host", choices=("vps", "brain", "both"), default="both",
                        help="whose servers to read (a compose host reaches only its own; default both)")  # fmt: skip
    parser.add_argument("--once", action="store_true", help="print the table once and exit (1: a source failed)")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between reads (rates)")
    parser.add_argument("--sim-url", help="simulator base URL, e.g. http://127.0.0.1:9443")
    parser.add_argument("--prometheus-url", help="Prometheus base URL for firing alerts")
    parser.add_argument("--duration", type=float, help="stop after this many seconds")
    parser.add_argument("--exchanges", help="one line per exchange, e.g. binance_spot,coinbase,kraken (issue 18)")


def run_command(args: argparse.Namespace) -> None:
    """Show the table (live, or once with --once) from the settings' endpoints."""
    ep = endpoints_from(load_settings(), args)
    if args.once:
        sys.exit(once(ep, interval=args.interval))
    with contextlib.suppress(KeyboardInterrupt):
        watch(ep, duration=args.duration, interval=args.interval)
