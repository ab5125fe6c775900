"""Snapshot requests from the Brain to the collector (issue 17).

The Brain's ingest call puts a symbol whose book broke (or has none) into the Brain set `tickbridge:book:wanted`;
the collector, which cannot reach the Brain, polls the VPS set `tickbridge:book:requests`. The forwarder talks
to both, so it moves the requests across on its maintenance tick (every 0.2 s while the Brain is up). A request
is removed from the Brain only after it is in the VPS set: a failure in between repeats it, which is harmless
(a set holds a symbol once, and the Brain ignores a whole book older than its own valid one).
"""

from __future__ import annotations

import logging
from typing import Any

from redis.exceptions import ResponseError

from tickbridge.core import keys
from tickbridge.core.redis_io import TRANSIENT_ERRORS

log = logging.getLogger("tickbridge.forwarder")

#: A link error, or a refusal (an ACL without the book keys) that must not stop the forwarding.
_ERRORS: tuple[type[BaseException], ...] = (*TRANSIENT_ERRORS, ResponseError)
#: Symbols moved per round at most (SYMBOLS holds 50; the set only grows through the ingest function).
MAX_RELAY = 1024


async def relay_book_requests(brain: Any, vps: Any) -> int:
    """Move the Brain's wanted symbols to the VPS request set; returns how many (0 on a link error)."""
    try:
        wanted = await brain.srandmember(keys.BOOK_WANTED, MAX_RELAY)
        if not wanted:
            return 0
        await vps.sadd(keys.BOOK_REQUESTS, *wanted)
        await brain.srem(keys.BOOK_WANTED, *wanted)
    except _ERRORS as exc:
        log.debug("book requests not relayed: %s", exc)
        return 0
    return len(wanted)
