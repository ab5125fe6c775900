"""Core: settings errors, tick encoding/validation, packed pipelines and QuestDB helpers on real servers."""

from __future__ import annotations

import random

import pytest
from questdb.ingress import Sender, TimestampNanos

from tickbridge.core.backoff import Backoff
from tickbridge.core.questdb_io import QuestDBError, QuestDBHttp, ilp_conf
from tickbridge.core.redis_io import ensure_group, execute_packed, is_duplicate_id_error, make_client
from tickbridge.core.settings import Settings, load_settings
from tickbridge.core.tick import DepthDiff, TickError, Trade
from tickbridge.core.wire import decode_entry, encode_tick, parse_stream_id
from tickbridge_dev.devstack.servers import QuestDBServer, RedisServer, free_port

TS = 1_723_161_255_342_000


def trade(**overrides: object) -> Trade:
    base: dict[str, object] = dict(symbol="ETHUSDT", price="2600.01000000", volume="0.50000000", side="SELL",
                                   timestamp=TS, trade_id=1520538925, recv_ts=TS + 900)  # fmt: skip
    base.update(overrides)
    return Trade(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("name", "value", "needle"),
    [
        ("RAM_BUFFER_BYTES", "lots", "RAM_BUFFER_BYTES"),
        ("RAM_BUFFER_BYTES", "-1", "RAM_BUFFER_BYTES"),
        ("SYMBOLS", "BTC-USDT", "SYMBOLS"),
        ("SYMBOLS", "", "SYMBOLS"),
        ("VPS_REDIS_URL", "http://x", "VPS_REDIS_URL"),
        ("BINANCE_WS_URL", "stream.binance.com", "BINANCE_WS_URL"),
        ("LOG_LEVEL", "LOUD", "LOG_LEVEL"),
    ],
)
def test_bad_setting_exits_with_one_line_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], name: str, value: str, needle: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as exc:
        load_settings()
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith(f"config error: {needle}:"), err


def test_settings_read_dotenv_and_environment_wins(monkeypatch: pytest.MonkeyPatch, tmp_path: object) -> None:
    with open(".env", "w") as f:
        f.write("SYMBOLS=btcusdt,ethusdt\nRAM_BUFFER_BYTES=1000\n")
    monkeypatch.setenv("RAM_BUFFER_BYTES", "2000")
    s = load_settings()
    assert s.symbols == ("BTCUSDT", "ETHUSDT")
    assert s.ram_buffer_bytes == 2000
    assert s.metrics_port_for("forwarder") == 9102


def test_trade_round_trips_through_stream_encoding() -> None:
    t = trade()
    raw = [str(x).encode() for x in encode_tick(t)]
    assert raw[:6] == [b"symbol", b"ETHUSDT", b"exchange", b"binance_spot", b"type", b"TRADE"]
    assert decode_entry(raw) == t
    d = DepthDiff(symbol="ETHUSDT", timestamp=TS, first_update_id=35346513513, last_update_id=35346513520,
                  bids=(("2600.01", "1.5"),), asks=(("2600.02", "0.00000000"),), recv_ts=TS)  # fmt: skip
    assert decode_entry([str(x).encode() for x in encode_tick(d)]) == d


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"price": "nan"}, "price"),
        ({"price": "-1"}, "price"),
        ({"price": "0"}, "price"),
        ({"volume": "1e5"}, "volume"),
        ({"side": "HOLD"}, "side"),
        ({"trade_id": -5}, "trade_id"),
        ({"timestamp": 1723161255342}, "timestamp"),  # ms, not µs
        ({"symbol": "eth/usdt"}, "symbol"),
    ],
)
def test_invalid_trade_rejected_with_reason(overrides: dict[str, object], reason: str) -> None:
    with pytest.raises(TickError, match=reason):
        trade(**overrides)


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda f: f.pop("price"), "missing field 'price'"),
        (lambda f: f.update(type="KLINE"), "unknown"),
        (lambda f: f.update(trade_id="12x"), "trade_id"),
        (lambda f: f.update(symbol="\u00e9"), "symbol"),
    ],
)
def test_decode_entry_rejects_broken_entries(mutate: object, reason: str) -> None:
    fields = {k: str(v) for k, v in zip(encode_tick(trade())[::2], encode_tick(trade())[1::2], strict=True)}
    mutate(fields)  # type: ignore[operator]
    with pytest.raises(TickError, match=reason):
        decode_entry({k.encode(): v.encode() for k, v in fields.items()})


def test_decode_entry_rejects_invalid_utf8() -> None:
    raw = [str(x).encode() for x in encode_tick(trade())]
    raw[1] = b"\xff\xfe"
    with pytest.raises(TickError, match="UTF-8"):
        decode_entry(raw)


def test_stream_id_parsing() -> None:
    assert parse_stream_id(b"1723161255343-7") == (1723161255343, 7)
    assert parse_stream_id("5") == (5, 0)


def test_backoff_is_capped_jittered_and_resets() -> None:
    b = Backoff(base=0.1, cap=2.0, rng=random.Random(1))
    delays = [b.next() for _ in range(20)]
    assert all(0.05 <= d <= 2.0 for d in delays)
    assert max(delays[8:]) > 1.0  # grew to the cap
    b.reset()
    assert b.next() <= 0.1


async def test_packed_pipeline_reports_duplicate_ids_and_keeps_the_connection(redis_server: RedisServer) -> None:
    client = make_client(redis_server.url)
    try:
        replies = await execute_packed(client, [("XADD", "s", "5-1", "a", "1"), ("XADD", "s", "5-1", "a", "1"),
                                                ("XADD", "s", "4-0", "a", "1"), ("XLEN", "s")])  # fmt: skip
        assert replies[0] == b"5-1"
        assert is_duplicate_id_error(replies[1]) and is_duplicate_id_error(replies[2])
        assert replies[3] == 1
        assert await ensure_group(client, "s", "g") is True
        assert await ensure_group(client, "s", "g") is False
    finally:
        await client.aclose()


async def test_questdb_helpers_see_rows_only_when_applied(questdb_server: QuestDBServer) -> None:
    http = QuestDBHttp(questdb_server.url)
    try:
        await http.exec(
            "CREATE TABLE IF NOT EXISTS core_t (ts TIMESTAMP, k SYMBOL, v LONG) TIMESTAMP(ts) PARTITION BY HOUR WAL "
            "DEDUP UPSERT KEYS(ts, k)"
        )
        with Sender.from_conf(ilp_conf(questdb_server.url)) as sender:
            buf = sender.new_buffer()
            for i in range(1000):
                buf.row("core_t", symbols={"k": "a"}, columns={"v": i}, at=TimestampNanos(TS * 1000 + i * 1000))
            sender.flush(buf, clear=False, transactional=True)
            sender.flush(buf, transactional=True)  # a resend: DEDUP keeps one copy
        await http.wait_applied("core_t")
        assert await http.scalar("SELECT count() FROM core_t") == 1000
        assert await http.is_suspended("core_t") is False
        with pytest.raises(QuestDBError):
            await http.exec("SELECT * FROM no_such_table")
    finally:
        await http.close()


def test_settings_constructible_in_tests() -> None:
    s = Settings(symbols=("BTCUSDT",), ram_buffer_bytes=10)  # type: ignore[arg-type]
    assert s.symbols == ("BTCUSDT",) and s.ram_buffer_bytes == 10


_STOP_SCRIPT = """
import asyncio, sys
from tickbridge.core.lifecycle import Service, run_service, setup_logging
from tickbridge.core.wire import encode_tick

class Role(Service):
    name = "role"

    async def run(self) -> None:
        print("ready", flush=True)
        await self.stopping.wait()
        if sys.argv[1] == "hangs":  # its last flush retries a server that is gone
            while True:
                await asyncio.sleep(0.1)

setup_logging()
run_service(Role, stop_timeout=1.0)
"""


@pytest.mark.parametrize("behaviour", ["stops", "hangs"])
def test_a_stop_that_hangs_ends_with_one_error_line(behaviour: str) -> None:
    import signal
    import subprocess
    import sys
    import time

    proc = subprocess.Popen([sys.executable, "-c", _STOP_SCRIPT, behaviour], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)  # fmt: skip
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == b"ready"
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=20)[0].decode()
    if behaviour == "stops":  # exit 0: it returned by itself, before the deadline (which exits 1)
        assert proc.returncode == 0 and "did not stop" not in out, out
    else:
        assert proc.returncode == 1 and time.monotonic() - started >= 1.0, out
        assert "role did not stop within 1s" in out, out


def test_free_port_never_hands_out_a_port_twice() -> None:
    """A stack picks the simulator's port, then starts four servers before the simulator binds it; the
    kernel offers the same free port again often enough (measured here: ~30 repeats in 1,000 picks) to
    fail a stack with "address already in use"."""
    ports = [free_port() for _ in range(1000)]
    assert len(set(ports)) == len(ports)


@pytest.mark.parametrize("worker", [0, 1])
def test_two_xdist_workers_never_share_a_free_port(worker: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """`make test` runs two pytest-xdist workers: each one (and each process it starts, which inherits the
    variables) takes only its half of the ports, so both cannot pick the same port before a server binds it."""
    monkeypatch.setenv("PYTEST_XDIST_WORKER", f"gw{worker}")
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "2")
    ports = [free_port() for _ in range(200)]
    assert {(p >> 1) % 2 for p in ports} == {worker}
    assert len(set(ports)) == len(ports)
