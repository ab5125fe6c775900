"""Capped exponential backoff with full jitter, reset on success."""

from __future__ import annotations

import random


class Backoff:
    """`next()` returns the next delay: uniform in [base*2^n / 2, min(cap, base*2^n)]."""

    def __init__(self, base: float = 0.1, cap: float = 10.0, rng: random.Random | None = None) -> None:
        if base <= 0 or cap < base:
            raise ValueError("need 0 < base <= cap")
        self.base = base
        self.cap = cap
        self.attempts = 0
        self._rng = rng or random.Random()

    def next(self) -> float:
        ceiling = min(self.cap, self.base * (2 ** min(self.attempts, 30)))
        self.attempts += 1
        return self._rng.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self.attempts = 0
