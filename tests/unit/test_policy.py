from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from agent.delivery.policy import (
    BODY_EXCERPT_CHARS,
    Outcome,
    RetryPolicy,
    Verdict,
    backoff_s,
    classify,
    parse_retry_after,
    retry_delay_s,
)

NOW = datetime(2026, 7, 1, 9, 0, tzinfo=UTC)
POLICY = RetryPolicy(initial_s=1.0, max_s=300.0, max_attempts=5, retry_after_max_s=600.0)


def envelope(**fields: object) -> str:
    return json.dumps(fields)


@pytest.mark.parametrize(
    ("status", "body", "verdict", "reason"),
    [
        (200, "", Verdict.PAUSE, "200 from Seyaha's address, but not Seyaha's JSON answer"),
        (204, "", Verdict.PAUSE, "not Seyaha's JSON answer ((empty body))"),
        (200, "OK", Verdict.PAUSE, "not Seyaha's JSON answer (OK): something else answers"),
        (200, "[1, 2]", Verdict.PAUSE, "not Seyaha's JSON answer ([1, 2])"),
        (200, "<html><body>Welcome to nginx</body></html>", Verdict.PAUSE, "check it"),
        (200, envelope(data={"updated": True}), Verdict.PAUSE, "not Seyaha's JSON answer"),
        (200, envelope(success=1, data={"updated": True}), Verdict.DELIVERED, "delivered"),
        (
            200,
            envelope(success=1, data={"synced": 3, "skipped": False}),
            Verdict.DELIVERED,
            "delivered",
        ),
        (
            200,
            envelope(success=0, error="Internal", message="queue full"),
            Verdict.RETRY,
            "200 without success: Internal: queue full",
        ),
        (
            200,
            envelope(success=False, message="try later"),
            Verdict.RETRY,
            "without success: try later",
        ),
        (202, envelope(success=0), Verdict.RETRY, 'without success: {"success": 0}'),
        (
            200,
            envelope(success=1, data={"updated": False}),
            Verdict.NOT_UPDATED,
            "does not know this product/option",
        ),
        (401, envelope(success=0, error="Unauthorized"), Verdict.PAUSE, "webhook secret is wrong"),
        (403, "", Verdict.PAUSE, "webhook secret is wrong"),
        (
            404,
            envelope(success=0, error="Not Found", message="Integration not found"),
            Verdict.PAUSE,
            "integration not found",
        ),
        (408, "", Verdict.RETRY, "408 from Seyaha: (empty body)"),
        (425, "", Verdict.RETRY, "425 from Seyaha"),
        (
            429,
            envelope(error="Too Many Requests"),
            Verdict.RETRY,
            "429 from Seyaha: Too Many Requests",
        ),
        (500, "<html>oops</html>", Verdict.RETRY, "500 from Seyaha: <html>oops</html>"),
        (502, "", Verdict.RETRY, "502 from Seyaha"),
        (
            503,
            envelope(success=0, message="maintenance"),
            Verdict.RETRY,
            "503 from Seyaha: maintenance",
        ),
        (
            400,
            envelope(success=0, error="Bad Request", message="localDateTimeStart is invalid"),
            Verdict.REJECTED,
            "400 from Seyaha: Bad Request: localDateTimeStart is invalid",
        ),
        (
            409,
            "conflict:\n  slot   locked",
            Verdict.REJECTED,
            "409 from Seyaha: conflict: slot locked",
        ),
        (413, "", Verdict.REJECTED, "413 from Seyaha: (empty body)"),
        (422, envelope(detail="nope"), Verdict.REJECTED, '422 from Seyaha: {"detail": "nope"}'),
    ],
)
def test_classify(status: int, body: str, verdict: Verdict, reason: str) -> None:
    outcome = classify(status=status, body=body, now=NOW)
    assert outcome.verdict is verdict
    assert reason in outcome.reason
    assert outcome.status == status


def test_no_response_is_retried_with_the_error() -> None:
    outcome = classify(status=None, error="ConnectError: connection refused", now=NOW)
    assert outcome.verdict is Verdict.RETRY
    assert outcome.reason == "cannot reach Seyaha: ConnectError: connection refused"
    assert outcome.status is None


def test_rejection_keeps_only_an_excerpt_of_a_long_body() -> None:
    outcome = classify(status=400, body="x" * 5000, now=NOW)
    assert outcome.verdict is Verdict.REJECTED
    assert outcome.reason == "400 from Seyaha: " + "x" * BODY_EXCERPT_CHARS + "..."


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        (None, None),
        ("", None),
        ("   ", None),
        ("0", 0.0),
        ("120", 120.0),
        (" 7 ", 7.0),
        ("Wed, 01 Jul 2026 09:01:30 GMT", 90.0),
        ("Wed, 01 Jul 2026 08:00:00 GMT", 0.0),
        ("1.5", None),
        ("-5", None),
        ("soon", None),
        ("²", None),
        ("Wed, 01 Jul 2026 09:01:30", None),
    ],
)
def test_parse_retry_after(header: str | None, seconds: float | None) -> None:
    assert parse_retry_after(header, NOW) == seconds


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (429, ""),
        (503, ""),
        (200, envelope(success=0, error="Busy")),
    ],
)
def test_retry_carries_retry_after(status: int, body: str) -> None:
    outcome = classify(status=status, body=body, retry_after="42", now=NOW)
    assert outcome.verdict is Verdict.RETRY
    assert outcome.retry_after_s == 42.0


@pytest.mark.parametrize(
    ("failures", "rand", "expected"),
    [
        (1, 0.0, 0.0),
        (1, 0.5, 0.5),
        (2, 0.5, 1.0),
        (3, 0.5, 2.0),
        (3, 0.75, 3.0),
        (9, 0.5, 128.0),
        (10, 0.5, 150.0),
        (10, 0.999, 299.7),
        (0, 0.5, 0.5),
        (5000, 0.5, 150.0),
    ],
)
def test_backoff_full_jitter(failures: int, rand: float, expected: float) -> None:
    assert backoff_s(failures, POLICY, rand) == pytest.approx(expected)


@pytest.mark.parametrize("failures", range(1, 15))
@pytest.mark.parametrize("rand", [0.0, 0.3, 0.999999])
def test_backoff_stays_within_its_ceiling(failures: int, rand: float) -> None:
    ceiling = min(POLICY.max_s, POLICY.initial_s * 2 ** (failures - 1))
    assert 0.0 <= backoff_s(failures, POLICY, rand) <= ceiling


@pytest.mark.parametrize(
    ("failures", "retry_after_s", "expected"),
    [
        (1, None, 0.5),
        (4, None, 4.0),
        (4, 30.0, 30.0),
        (4, 0.0, 0.0),
        (4, 86_400.0, 600.0),
        (5, None, None),
        (5, 30.0, None),
        (9, None, None),
    ],
)
def test_retry_delay(failures: int, retry_after_s: float | None, expected: float | None) -> None:
    outcome = Outcome(Verdict.RETRY, "503 from Seyaha", 503, retry_after_s)
    assert retry_delay_s(failures, outcome, POLICY, rand=0.5) == expected


def test_retry_after_from_a_response_is_capped() -> None:
    outcome = classify(status=503, retry_after="Thu, 02 Jul 2026 09:00:00 GMT", now=NOW)
    assert outcome.retry_after_s == 86_400.0
    assert retry_delay_s(1, outcome, POLICY, rand=0.5) == POLICY.retry_after_max_s


@pytest.mark.parametrize("status", [301, 302, 307, 308])
def test_a_redirect_pauses_delivery_and_points_at_base_url(status: int) -> None:
    outcome = classify(
        status=status,
        location="https://api.seyaha.net/api/v1/x",
        now=datetime(2026, 1, 1, tzinfo=UTC),
    )
    assert outcome.verdict is Verdict.PAUSE
    assert "redirected to https://api.seyaha.net/api/v1/x" in outcome.reason
    assert "seyaha.base_url" in outcome.reason


@pytest.mark.parametrize(
    ("age_s", "expected"),
    [(0.0, 2.0), (86399.0, 2.0), (86400.0, None), (90000.0, None)],
)
def test_a_message_older_than_its_age_budget_is_dead_lettered(
    age_s: float, expected: float | None
) -> None:
    outcome = Outcome(Verdict.RETRY, "503", 503, retry_after_s=2.0)
    assert retry_delay_s(1, outcome, RetryPolicy(max_age_s=86400.0), 0.5, age_s) == expected
