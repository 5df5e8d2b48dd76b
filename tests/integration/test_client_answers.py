"""The HTTP client against a real server that answers badly: huge, compressed, trickling,
echoing the secret. Each answer costs bounded memory and time, and the secret is never kept.
A call ends at its deadline (connect_timeout + timeout) whatever the server sends, and at once
when it is interrupted."""

from __future__ import annotations

import gzip
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler

import pytest

from agent.config import Secret
from agent.delivery.client import MAX_ANSWER_BYTES, SeyahaClient
from agent.delivery.policy import Verdict, classify
from tests.conftest import INTEGRATION_ID, SECRET
from tests.integration.conftest import Answer
from tests.misbehaving import TRICKLE_BYTE_EVERY_S, MisbehavingSeyaha

TIMEOUT_S = 1.0
REQUEST_S = 2 * TIMEOUT_S
"""A call's deadline: connect_timeout + timeout."""

LATE_S = 8.0
"""How far past its deadline a call may end on a slow, loaded machine (seconds): a ceiling,
not an expectation; each trickle below would hold a call for 30 s or more."""


@pytest.fixture
def client_for() -> Iterator[Callable[[str], SeyahaClient]]:
    made: list[SeyahaClient] = []

    def make(base_url: str) -> SeyahaClient:
        client = SeyahaClient(
            base_url=base_url,
            integration_id=INTEGRATION_ID,
            secret=Secret(SECRET),
            connect_timeout_s=TIMEOUT_S,
            timeout_s=TIMEOUT_S,
        )
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


def send(handler: BaseHTTPRequestHandler, status: int, body: bytes, **headers: str) -> None:
    handler.send_response(status)
    handler.send_header("Content-Length", str(len(body)))
    for name, value in headers.items():
        handler.send_header(name.replace("_", "-"), value)
    handler.end_headers()
    handler.wfile.write(body)


def peak_bytes(work: Callable[[], object]) -> int:
    tracemalloc.start()
    try:
        work()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_huge_answer_is_read_only_up_to_the_cap(
    serve: Callable[[Answer], str], client_for: Callable[[str], SeyahaClient]
) -> None:
    size = 50 * 1024 * 1024
    chunk = b"<p>catch-all proxy</p>" * 4096

    def huge(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(502)
        handler.send_header("Content-Length", str(size))
        handler.end_headers()
        for _ in range(size // len(chunk)):
            handler.wfile.write(chunk)

    client = client_for(serve(huge))
    answers = []
    peak = peak_bytes(lambda: answers.append(client.trigger()))

    (answer,) = answers
    assert answer.status == 502
    assert len(answer.body) == MAX_ANSWER_BYTES
    assert peak < 8 * MAX_ANSWER_BYTES  # was 330 MB for this answer


def test_a_gzip_bomb_is_unpacked_only_up_to_the_cap(
    serve: Callable[[Answer], str], client_for: Callable[[str], SeyahaClient]
) -> None:
    bomb = gzip.compress(b"0" * (200 * 1024 * 1024), compresslevel=9)
    assert len(bomb) < 300 * 1024

    def packed(handler: BaseHTTPRequestHandler) -> None:
        send(handler, 500, bomb, Content_Encoding="gzip", Content_Type="text/plain")

    client = client_for(serve(packed))
    answers = []
    peak = peak_bytes(lambda: answers.append(client.trigger()))

    (answer,) = answers
    assert answer.status == 500
    assert answer.body == "0" * MAX_ANSWER_BYTES
    assert peak < 16 * MAX_ANSWER_BYTES  # was 590 MB for a 100 KB bomb


def test_the_client_does_not_invite_compression(
    serve: Callable[[Answer], str], client_for: Callable[[str], SeyahaClient]
) -> None:
    asked: list[str | None] = []

    def record(handler: BaseHTTPRequestHandler) -> None:
        asked.append(handler.headers.get("accept-encoding"))
        send(handler, 200, b'{"success":1,"data":{"synced":1,"skipped":false}}')

    client_for(serve(record)).trigger()
    assert asked == ["identity"]


def test_an_answer_trickling_byte_by_byte_ends_at_the_timeout(
    serve: Callable[[Answer], str], client_for: Callable[[str], SeyahaClient]
) -> None:
    body = b'{"success":1,"data":{"updated":true}}' * 10

    def trickle(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        for byte in body:
            handler.wfile.write(bytes([byte]))
            handler.wfile.flush()
            time.sleep(0.1)  # each read returns long before the per-read timeout

    client = client_for(serve(trickle))
    started = time.monotonic()
    answer = client.notify('{"productId":"1"}')
    elapsed = time.monotonic() - started

    assert answer.status is None
    assert answer.error == (
        "timed out: the answer was still arriving after 2 s (connect_timeout + timeout)"
    )
    assert elapsed < REQUEST_S + LATE_S  # the body alone takes 37 s to arrive


@pytest.fixture
def receiver() -> Iterator[MisbehavingSeyaha]:
    with MisbehavingSeyaha("trickle_head") as started:
        yield started


def test_a_status_line_and_headers_trickling_byte_by_byte_end_at_the_deadline(
    receiver: MisbehavingSeyaha,
) -> None:
    """Each byte of the head comes well within the per-read timeout: httpx alone waited for
    the whole head, about 99 s, whatever delivery.timeout said."""
    timeout_s = 2 * TRICKLE_BYTE_EVERY_S  # per read: never reached between two bytes
    client = SeyahaClient(
        base_url=receiver.url,
        integration_id=INTEGRATION_ID,
        secret=Secret(SECRET),
        connect_timeout_s=TIMEOUT_S,
        timeout_s=timeout_s,
    )
    try:
        assert client.deadlines_held
        started = time.monotonic()
        answer = client.notify('{"productId":"1"}')
        elapsed = time.monotonic() - started
    finally:
        client.close()

    assert (answer.status, answer.interrupted) == (None, False)
    assert answer.error == (
        f"timed out: no answer within {TIMEOUT_S + timeout_s:g} s (connect_timeout + timeout)"
    )
    assert elapsed < TIMEOUT_S + timeout_s + LATE_S
    (call,) = receiver.calls()
    assert not call.answered  # its head alone takes 99 bytes * TRICKLE_BYTE_EVERY_S
    # the connection was closed, not left to trickle on
    _wait_for(lambda: bool(receiver.calls()[0].hung_up), "the receiver to see the hang-up")


def test_an_interrupted_call_ends_at_once_and_says_so(
    receiver: MisbehavingSeyaha,
) -> None:
    """Shutdown's grace is over: a call far from its own deadline is cut short."""
    client = SeyahaClient(
        base_url=receiver.url,
        integration_id=INTEGRATION_ID,
        secret=Secret(SECRET),
        connect_timeout_s=TIMEOUT_S,
        timeout_s=600.0,
    )
    try:
        _wait_for_calls_then(receiver, client.interrupt)
        started = time.monotonic()
        answer = client.notify('{"productId":"1"}')
        elapsed = time.monotonic() - started
        after = client.trigger()  # a call started once interrupted does not go out
    finally:
        client.close()

    assert answer.interrupted
    assert answer.status is None
    assert answer.error is not None
    assert answer.error.startswith("cut short: the agent was stopping")
    assert elapsed < LATE_S
    assert after.interrupted
    assert len(receiver.calls()) == 1
    _wait_for(lambda: bool(receiver.calls()[0].hung_up), "the receiver to see the hang-up")


def _wait_for_calls_then(receiver: MisbehavingSeyaha, act: Callable[[], None]) -> None:
    """Call `act` from another thread once the receiver has a call in flight."""

    def watch() -> None:
        deadline = time.monotonic() + LATE_S
        while not receiver.calls() and time.monotonic() < deadline:
            time.sleep(0.02)
        act()

    threading.Thread(target=watch, daemon=True).start()


def _wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + LATE_S
    while not condition():
        assert time.monotonic() < deadline, f"waited {LATE_S:g} s for {what}"
        time.sleep(0.05)


@pytest.mark.parametrize("echo", [SECRET, SECRET.upper(), f"bad secret '{SECRET}' for {SECRET}"])
def test_a_server_echoing_the_secret_never_gets_it_kept(
    serve: Callable[[Answer], str], client_for: Callable[[str], SeyahaClient], echo: str
) -> None:
    def echoing(handler: BaseHTTPRequestHandler) -> None:
        body = f'{{"success":0,"error":"Bad Request","message":"{echo}"}}'.encode()
        send(handler, 500, body, Location=f"https://x.test/?s={echo}", Retry_After=echo)

    answer = client_for(serve(echoing)).notify('{"productId":"1"}')
    outcome = classify(
        status=answer.status,
        body=answer.body,
        retry_after=answer.retry_after,
        location=answer.location,
        now=datetime.now(UTC),
    )

    assert answer.status == 500
    assert outcome.verdict is Verdict.RETRY
    for kept in (answer.body, answer.location, answer.retry_after, outcome.reason):
        assert kept is not None
        assert SECRET.lower() not in kept.lower()
        assert "***" in kept


@pytest.mark.parametrize("cut", [1, 4, 20, 40, 63])
@pytest.mark.parametrize("padding", [" ", "x"])
def test_a_secret_echoed_across_the_read_cap_is_not_kept_in_part(
    serve: Callable[[Answer], str],
    client_for: Callable[[str], SeyahaClient],
    cut: int,
    padding: str,
) -> None:
    """A copy of the secret straddling the cap was cut, and its first part kept (whitespace
    folding in the stored reason then brought it to the front)."""
    body = (padding * (MAX_ANSWER_BYTES - cut) + SECRET + padding * 100).encode()

    def echoing(handler: BaseHTTPRequestHandler) -> None:
        send(handler, 500, body)

    answer = client_for(serve(echoing)).notify('{"productId":"1"}')
    reason = classify(status=answer.status, body=answer.body, now=datetime.now(UTC)).reason

    pieces = {SECRET[i : i + 8].lower() for i in range(len(SECRET) - 7)}
    for kept in (answer.body, reason):
        assert not any(piece in kept.lower() for piece in pieces)
    assert len(answer.body) <= MAX_ANSWER_BYTES
