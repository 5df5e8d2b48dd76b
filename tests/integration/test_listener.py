"""The HTTP listeners (the operations endpoints, the sandbox): a failed request is a line in
the agent's log, never a traceback on the daemon's stderr, and a client that goes away is
not worth even that."""

from __future__ import annotations

import logging
import socket
import struct
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler

import pytest
from prometheus_client import CollectorRegistry

from agent.endpoints import Listener, OperationsServer

WAIT_S = 10.0


def _reset(address: tuple[str, int], sent: bytes) -> None:
    """Connect, send `sent`, then close with a reset (SO_LINGER 0), as a client that gives up
    does."""
    client = socket.create_connection(address)
    client.sendall(sent)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.close()


@pytest.fixture
def operations() -> Iterator[OperationsServer]:
    server = OperationsServer("127.0.0.1", 0, CollectorRegistry(), lambda: []).start()
    yield server
    server.stop()


def test_a_client_that_resets_mid_request_leaves_no_traceback_and_no_log_line(
    operations: OperationsServer,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.DEBUG, logger="agent"):
        for sent in (b"", b"GET /metr"):
            _reset(operations.address, sent)
        # The listener still answers, once the resets were handled.
        deadline = time.monotonic() + WAIT_S
        while True:
            with socket.create_connection(operations.address) as client:
                client.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
                answer = client.recv(1024)
            if answer.startswith(b"HTTP/1.0 200") or time.monotonic() > deadline:
                break
    assert answer.startswith(b"HTTP/1.0 200")
    time.sleep(0.2)  # any traceback of the reset requests would be printed by now
    assert "Traceback" not in capfd.readouterr().err
    assert [r for r in caplog.records if getattr(r, "event", "") == "http.request_failed"] == []


def test_a_request_that_fails_otherwise_is_one_warning_line_not_a_traceback(
    capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    class Broken(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            raise ValueError("a bug in the handler")

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = Listener(("127.0.0.1", 0), Broken)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,))
    thread.start()
    try:
        with caplog.at_level(logging.WARNING, logger="agent"):
            with socket.create_connection(server.server_address[:2]) as client:
                client.sendall(b"GET / HTTP/1.0\r\n\r\n")
                client.recv(1024)  # the handler failed: the connection closes unanswered
            deadline = time.monotonic() + WAIT_S
            while time.monotonic() < deadline and not caplog.records:
                time.sleep(0.02)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(WAIT_S)
    failed = [r for r in caplog.records if getattr(r, "event", "") == "http.request_failed"]
    assert len(failed) == 1
    assert failed[0].getMessage() == (
        "a request from 127.0.0.1 failed: ValueError: a bug in the handler"
    )
    assert "Traceback" not in capfd.readouterr().err
