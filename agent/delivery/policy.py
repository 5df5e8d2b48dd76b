"""Pure delivery decisions: what an answer from Seyaha means, and when to try again.

Nothing here does I/O or reads the clock; time and randomness come in as arguments.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from email.utils import parsedate_to_datetime
from enum import Enum
from typing import Any, Literal

BODY_EXCERPT_CHARS = 300
"""How much of an unexpected response body is kept as the reason (characters)."""


class Verdict(Enum):
    DELIVERED = "delivered"
    NOT_UPDATED = "not_updated"
    """2xx with `updated: false`: Seyaha did not know the product/option and syncs by itself."""
    RETRY = "retry"
    PAUSE = "pause"
    """The integration cannot accept anything (wrong secret, unknown integration)."""
    REJECTED = "rejected"
    """Seyaha refused this message for good; it is dead-lettered with the answer."""


@dataclass(frozen=True)
class Outcome:
    verdict: Verdict
    reason: str
    status: int | None = None
    retry_after_s: float | None = None
    scope: Literal["delivery", "integration"] = "delivery"
    """What a PAUSE holds: all delivery (Seyaha's address is wrong), or the message's
    integration only (its secret or id is refused, or it has no secret file)."""


@dataclass(frozen=True)
class RetryPolicy:
    initial_s: float = 1.0
    max_s: float = 300.0
    max_attempts: int = 20
    retry_after_max_s: float = 3600.0
    max_age_s: float = 86400.0


RETRY_STATUSES = frozenset({408, 425, 429})


def parse_retry_after(value: str | None, now: datetime) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP-date), or None."""
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    if text.isascii() and text.isdigit():
        return float(text)
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, (when - now).total_seconds())


def _envelope(body: str) -> dict[str, Any] | None:
    try:
        parsed = json.loads(body)
    except (ValueError, TypeError):
        return None
    return parsed if isinstance(parsed, dict) else None


def _excerpt(body: str) -> str:
    text = " ".join(body.split())
    if len(text) > BODY_EXCERPT_CHARS:
        return text[:BODY_EXCERPT_CHARS] + "..."
    return text or "(empty body)"


def _envelope_error(envelope: dict[str, Any] | None, body: str) -> str:
    if envelope is not None:
        parts = [str(envelope[k]) for k in ("error", "message") if envelope.get(k)]
        if parts:
            return ": ".join(parts)
    return _excerpt(body)


def classify(
    *,
    status: int | None,
    body: str = "",
    retry_after: str | None = None,
    error: str | None = None,
    location: str | None = None,
    now: datetime,
    unsent: Literal["no_secret", "unroutable"] | None = None,
    routed: bool = False,
) -> Outcome:
    """What Seyaha's answer (or the lack of one) means for the message. `unsent`: the call
    was not made (see client.Response); `routed`: the message's integration was named by its
    row, and its secret is a file of [seyaha] webhook_secrets_dir."""
    if unsent == "no_secret":
        return Outcome(Verdict.PAUSE, error or "no usable secret", scope="integration")
    if unsent == "unroutable":
        return Outcome(Verdict.REJECTED, error or "no integration to send to")
    if status is None:
        return Outcome(Verdict.RETRY, f"cannot reach Seyaha: {error or 'no response'}")
    wait = parse_retry_after(retry_after, now)
    if 200 <= status < 300:
        envelope = _envelope(body)
        if envelope is None or "success" not in envelope:
            # A catch-all proxy or web server behind a wrong base_url answers 200 with a page
            # of its own: counting that as delivered would lose every change.
            return Outcome(
                Verdict.PAUSE,
                f"{status} from Seyaha's address, but not Seyaha's JSON answer "
                f"({_excerpt(body)}): something else answers at seyaha.base_url (check it)",
                status,
            )
        if envelope.get("success") in (0, False):
            return Outcome(
                Verdict.RETRY,
                f"Seyaha answered {status} without success: {_envelope_error(envelope, body)}",
                status,
                wait,
            )
        data = envelope.get("data") if envelope is not None else None
        if isinstance(data, dict) and data.get("updated") is False:
            return Outcome(
                Verdict.NOT_UPDATED,
                "Seyaha does not know this product/option yet and will sync the catalog itself",
                status,
            )
        return Outcome(Verdict.DELIVERED, "delivered", status)
    if status in (401, 403):
        where = (
            "its file in seyaha.webhook_secrets_dir"
            if routed
            else "seyaha.webhook_secret_file or SEYAHA_WEBHOOK_SECRET"
        )
        return Outcome(
            Verdict.PAUSE,
            f"{status} from Seyaha: the webhook secret is wrong (check {where})",
            status,
            scope="integration",
        )
    if 300 <= status < 400:
        return Outcome(
            Verdict.PAUSE,
            f"{status} from Seyaha: redirected to {location or 'another address'} "
            "(check seyaha.base_url: it should be the final https:// address)",
            status,
        )
    if status == 404:
        where = (
            "the integration_id of its rows and seyaha.base_url"
            if routed
            else "seyaha.integration_id and seyaha.base_url"
        )
        return Outcome(
            Verdict.PAUSE,
            f"404 from Seyaha: integration not found (check {where}): "
            f"{_envelope_error(_envelope(body), body)}",
            status,
            scope="integration",
        )
    if status in RETRY_STATUSES or status >= 500:
        return Outcome(
            Verdict.RETRY,
            f"{status} from Seyaha: {_envelope_error(_envelope(body), body)}",
            status,
            wait,
        )
    return Outcome(
        Verdict.REJECTED,
        f"{status} from Seyaha: {_envelope_error(_envelope(body), body)}",
        status,
    )


def backoff_s(failures: int, policy: RetryPolicy, rand: float) -> float:
    """Full-jitter exponential backoff: uniform in [0, min(max, initial * 2^(failures-1))].

    `rand` is a number in [0, 1) supplied by the caller, so the rule stays testable.
    """
    exponent = min(max(0, failures - 1), 1000)  # 2.0**1024 overflows; max_s caps long before
    ceiling = min(policy.max_s, policy.initial_s * 2.0**exponent)
    return rand * ceiling


def retry_delay_s(
    failures: int, outcome: Outcome, policy: RetryPolicy, rand: float, age_s: float = 0.0
) -> float | None:
    """Seconds until the next attempt, or None when the message should be dead-lettered.

    `failures` counts failed attempts so far, this one included; `age_s` is how long the
    message has waited since it was queued. Either budget spent means a dead letter.
    Retry-After is honoured up to `retry_after_max_s`; without it the backoff applies.
    """
    if failures >= policy.max_attempts or age_s >= policy.max_age_s:
        return None
    if outcome.retry_after_s is not None:
        return min(outcome.retry_after_s, policy.retry_after_max_s)
    return backoff_s(failures, policy, rand)
