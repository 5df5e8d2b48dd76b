"""The operations listener: /metrics (Prometheus), /healthz (alive) and /readyz (ready).

It outlives configuration reloads: readiness is asked of whatever agent is current.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from agent.errors import ConfigError, first_line
from agent.logs import event

log = logging.getLogger("agent.endpoints")

STOP_WITHIN_S = 0.05
"""How often the listener's loop looks for a stop (serve_forever's poll_interval). The
default, 0.5 s, kept every stop and restart of the daemon waiting up to that long after the
agent itself had stopped. The 20 looks a second cost about 0.1% of a core at rest (an idle
listener alone, 20 s: 0.13% against 0.02%), where the daemon's whole at-rest figure is
0.6-1.7%."""


class Listener(ThreadingHTTPServer):
    """A threading HTTP server that reports a failed request in the agent's log, not as a
    traceback on stderr: a client that goes away mid-request (a scraper's timeout, a
    reset) is not worth a line; anything else is one WARNING line."""

    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if exc is None or isinstance(exc, ConnectionError | TimeoutError):
            return
        event(
            log,
            logging.WARNING,
            "http.request_failed",
            f"a request from {client_address[0]} failed: {type(exc).__name__}: {first_line(exc)}",
        )


Readiness = Callable[[], list[str]]
"""Returns the reasons the agent is not ready; an empty list means ready."""


class OperationsServer:
    def __init__(
        self, host: str, port: int, registry: CollectorRegistry, readiness: Readiness
    ) -> None:
        try:
            self.server = Listener((host, port), _handler(registry, readiness))
        except OSError as exc:
            raise ConfigError(
                [
                    f"[metrics] listen: cannot listen on {host}:{port} ({exc.strerror}); "
                    "another seyaha-agent or exporter may hold the port: pick another one"
                ]
            ) from None
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.server.server_address[:2]
        return str(host), int(port)

    def start(self) -> OperationsServer:
        self._thread = threading.Thread(
            target=self.server.serve_forever,
            args=(STOP_WITHIN_S,),
            name="operations",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        if self._thread is not None:
            self._thread.join(5)


def _handler(registry: CollectorRegistry, readiness: Readiness) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "seyaha-agent"

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._send(200, CONTENT_TYPE_LATEST, generate_latest(registry))
            elif path == "/healthz":
                self._json(200, {"status": "alive"})
            elif path == "/readyz":
                try:
                    problems = readiness()
                except Exception as exc:  # a broken check is a reason not to be ready
                    problems = [f"readiness check failed: {type(exc).__name__}"]
                self._json(
                    503 if problems else 200,
                    {"ready": not problems, "problems": problems},
                )
            else:
                self._json(
                    404, {"error": "not found", "paths": ["/metrics", "/healthz", "/readyz"]}
                )

        def _json(self, status: int, body: dict[str, Any]) -> None:
            self._send(status, "application/json", json.dumps(body).encode("utf-8"))

        def _send(self, status: int, content_type: str, payload: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # scrapes every few seconds would drown the agent's own log

    return Handler
