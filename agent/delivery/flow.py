"""Back-pressure: a circuit breaker and a token-bucket rate limit, shared by the workers.

Both are small state machines over a monotonic time passed in by the caller, so their rules
are unit-tested without sleeping; the lock makes them safe to share between worker threads.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from enum import Enum


class BreakerState(Enum):
    CLOSED = "closed"
    """Calls flow."""
    OPEN = "open"
    """Too many failures in a row: no calls until the cooldown has passed."""
    HALF_OPEN = "half_open"
    """Cooldown over: one probe call is allowed; its result closes or reopens the breaker."""


@dataclass
class CircuitBreaker:
    """Opens after `threshold` consecutive retryable failures, so a dead Seyaha is probed,
    not hammered. Each reopening doubles the cooldown, up to `max_cooldown_s`."""

    threshold: int = 5
    cooldown_s: float = 30.0
    max_cooldown_s: float = 300.0

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self.state = BreakerState.CLOSED
        self.failures = 0
        self.opened_at = 0.0
        self.current_cooldown_s = self.cooldown_s
        self._probing = False

    def allow(self, now: float) -> bool:
        """May a call go out now? In HALF_OPEN only one caller gets True until it reports."""
        with self._lock:
            if self.state is BreakerState.CLOSED:
                return True
            if self.state is BreakerState.OPEN and now - self.opened_at >= self.current_cooldown_s:
                self.state = BreakerState.HALF_OPEN
                self._probing = False
            if self.state is BreakerState.HALF_OPEN and not self._probing:
                self._probing = True
                return True
            return False

    def wait_s(self, now: float) -> float:
        """Seconds until a call may be allowed again (0 when closed)."""
        with self._lock:
            if self.state is BreakerState.OPEN:
                return max(0.0, self.opened_at + self.current_cooldown_s - now)
            return 0.0

    def success(self) -> bool:
        """Record a success; True if this closed an open breaker."""
        with self._lock:
            was_open = self.state is not BreakerState.CLOSED
            self.state = BreakerState.CLOSED
            self.failures = 0
            self.current_cooldown_s = self.cooldown_s
            self._probing = False
            return was_open

    def failure(self, now: float) -> bool:
        """Record a retryable failure; True if this opened (or reopened) the breaker."""
        with self._lock:
            if self.state is BreakerState.HALF_OPEN:
                self.state = BreakerState.OPEN
                self.opened_at = now
                self.current_cooldown_s = min(self.max_cooldown_s, self.current_cooldown_s * 2)
                self._probing = False
                return True
            self.failures += 1
            if self.state is BreakerState.CLOSED and self.failures >= self.threshold:
                self.state = BreakerState.OPEN
                self.opened_at = now
                return True
            return False

    def neutral(self) -> None:
        """A call ended without telling anything about Seyaha's health (e.g. a 4xx)."""
        with self._lock:
            if self.state is BreakerState.HALF_OPEN:
                self.state = BreakerState.CLOSED
                self.failures = 0
                self.current_cooldown_s = self.cooldown_s
            self._probing = False


@dataclass
class RateLimit:
    """A token bucket: `rate_per_s` calls per second on average, bursts of up to `burst`.
    A rate of 0 means no limit."""

    rate_per_s: float
    burst: int = 1

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._tokens = float(self.burst)
        self._at: float | None = None

    def reserve(self, now: float) -> float:
        """Take a token; returns how many seconds the caller must wait before its call."""
        if self.rate_per_s <= 0:
            return 0.0
        with self._lock:
            if self._at is not None:
                self._tokens = min(
                    float(self.burst), self._tokens + (now - self._at) * self.rate_per_s
                )
            self._at = now
            self._tokens -= 1.0
            if self._tokens >= 0:
                return 0.0
            return -self._tokens / self.rate_per_s
