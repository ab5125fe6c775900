"""Issue 18: each venue adapter's book against an independent reference rebuild at >= 200 checkpoints of a
simulated run with the simulator's venue faults (`tickbridge_dev.bench.venuebooks`; the simulated hour is
`python -m tickbridge_dev.bench.venuebooks`, docs/results/venue-books-2026-12-05.md). In-process, no sockets:
a few seconds."""

from __future__ import annotations

from decimal import Decimal

import pytest

from tickbridge_dev.bench import venuebooks
from tickbridge_dev.bench.venuebooks import kraken_crc32


@pytest.mark.parametrize("venue", ["coinbase", "kraken"])
def test_adapter_book_equals_reference_at_200_checkpoints_through_faults(venue: str) -> None:
    res = venuebooks.run(venue, minutes=3, checkpoints=200, rate=20.0, tick_s=0.1, seed=11, faults_per_minute=3.0)
    assert res.checkpoints >= 200
    assert res.books_compared == res.checkpoints * len(venuebooks.SYMBOLS)
    assert not res.mismatches, res.mismatches[:5]
    assert res.faults.get("drop_connections", 0) >= 1 and res.reconnects == res.faults["drop_connections"]
    if venue == "coinbase":
        assert res.faults.get("skip_sequence", 0) >= 1
        assert res.sequence_gaps == res.reference_gaps >= 1  # each seen by both, every book resynced
        assert res.resyncs >= res.sequence_gaps
    else:
        assert res.faults.get("corrupt_checksum", 0) >= 1 and res.faults.get("drop_book_update", 0) >= 1
        # The reference's CRC32 on every book message; the adapter's verdict the same on each.
        assert res.checksum_agreed > 1000 and res.verdicts_differ == 0
        assert res.checksum_disagreed == res.adapter_mismatches >= res.faults["corrupt_checksum"]
        assert res.explained
    assert res.ok


def test_reference_checksum_matches_krakens_documented_example() -> None:
    """Kraken's v1 guide example (https://docs.kraken.com/api/docs/guides/spot-ws-book-v1): asks 0.05005..0.05050,
    bids 0.05000..0.04950 without 0.04985, each 0.00000500: 974947235."""
    asks = [(f"0.0{5005 + 5 * i}", "0.00000500") for i in range(10)]
    bids = [(f"0.0{p}", "0.00000500") for p in range(5000, 4945, -5) if p != 4985]
    got = kraken_crc32({Decimal(p): (p, q) for p, q in bids}, {Decimal(p): (p, q) for p, q in asks})
    assert got == 974947235
