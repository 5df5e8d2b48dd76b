"""A receiver that plays Seyaha badly, for tests that drive the real daemon against it.

One behaviour at a time, chosen by name, switched at run time: misbehave for the next N
calls, for T seconds or until told, then answer as Seyaha does.

- good: Seyaha's answers (`{"success":1,"data":{"updated":true}}`, a trigger's `synced`);
- slow: the same after 1.5-2.5 s;
- trickle: status and headers at once, then the body one byte a second;
- trickle_head: the status line and headers one byte a second (about 90 s), then the body;
- huge: a proxy's 502 page of 50 MB;
- gzip_bomb: 500 with Content-Encoding: gzip, 150 KB that unpack to 150 MB, whatever the
  request's Accept-Encoding said;
- echo_secret: 500 whose JSON body and headers (Location, Retry-After, X-Webhook-Secret)
  repeat the x-webhook-secret received;
- echo_secret_at_cap: 500, a page of blanks with the secret cut by every power-of-two read
  cap from 4 KiB to 1 MiB;
- html_2xx: 200 with a web server's HTML welcome page, as a catch-all proxy answers;
- reset: the connection closed without an answer, in turn: reset before the body is read,
  reset after it is read, closed cleanly after it is read;
- redirect: 302 to `redirect_to`;
- not_updated: 200 with `{"success":1,"data":{"updated":false}}`.

Every call is recorded (arrival, end, endpoint, JSON body, the secret header it carried, what
was answered), and the calls in flight for each slot (`availabilityId`) are counted, so a
test can check that two calls for one slot never overlapped.

A call is in flight from the moment its request has been read until its answer is complete or
the client hangs up, whichever comes first. Both ends are taken where no later call can have
been caused by them yet: the end is stamped just before the last bytes of the answer go out,
and a hang-up is also looked for (on the older call's socket) whenever a new call for the same
slot arrives, so a client that gave up and retried at once is not mistaken for two calls in
flight.

    receiver = MisbehavingSeyaha("huge").start()
    receiver.set_behaviour("reset", for_calls=10)   # then answers correctly
    ...
    receiver.calls(), receiver.slots(), receiver.max_in_flight_per_slot()
    receiver.stop()
"""

from __future__ import annotations

import contextlib
import json
import random
import re
import select
import socket
import struct
import threading
import time
import weakref
import zlib
from dataclasses import dataclass, field, replace
from functools import cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal, get_args

Behaviour = Literal[
    "good",
    "slow",
    "trickle",
    "trickle_head",
    "huge",
    "gzip_bomb",
    "echo_secret",
    "echo_secret_at_cap",
    "html_2xx",
    "reset",
    "redirect",
    "not_updated",
]
BEHAVIOURS: tuple[Behaviour, ...] = get_args(Behaviour)

SECRET_HEADER = "x-webhook-secret"

SLOW_ANSWER_S = (1.5, 2.5)
"""`slow` answers correctly after a delay drawn uniformly from this range (seconds)."""

TRICKLE_BYTE_EVERY_S = 1.0
"""`trickle` sends its body, `trickle_head` its status line and headers, one byte per this many
seconds: a 38-byte envelope takes 38 s, a head about 90 s, and every single read returns well
within any per-read timeout."""

HUGE_BODY_BYTES = 50 * 1024 * 1024
"""Size of the 502 page `huge` announces and sends (bytes)."""

BOMB_UNPACKED_BYTES = 150 * 1024 * 1024
"""What the `gzip_bomb` body unpacks to (bytes); packed it is about 150 KB."""

IDLE_CONNECTION_S = 60.0
"""A kept-alive connection that sends nothing for this long is closed (seconds)."""

_WAKE_S = 0.1
"""Longest a waiting answer goes without checking for a hang-up or a stop (seconds)."""

_CHUNK_BYTES = 64 * 1024
"""Size of each write of the `huge` page (bytes)."""

_PATH = re.compile(
    r"^/api/v1/partner-integrations/[^/]+/(?P<endpoint>sync/trigger|availability/notify)/?$"
)

_SEYAHA_ANSWERS: frozenset[Behaviour] = frozenset(
    {"good", "slow", "trickle", "trickle_head", "not_updated"}
)
"""Behaviours whose answer is Seyaha's own 2xx envelope: the call counts as delivered."""


@dataclass(frozen=True)
class Call:
    """One call as the receiver saw it. Times are `time.monotonic()` of this process."""

    number: int
    arrived_s: float
    ended_s: float | None
    """None while the call is still in flight."""
    endpoint: str
    """`trigger`, `notify`, or the path of anything else."""
    body: dict[str, Any] | None
    """The JSON body, or None when there was none or it was not read (`reset`)."""
    secret: str | None = field(repr=False)
    """The x-webhook-secret header it carried (kept out of the repr: failure messages show
    calls)."""
    behaviour: Behaviour
    status: int | None
    """The status line sent; None when nothing was (`reset`)."""
    answered: bool
    """The whole answer went out."""
    hung_up: bool
    """The client closed the connection before the answer was complete."""

    @property
    def slot(self) -> str | None:
        if self.endpoint != "notify" or self.body is None:
            return None
        slot = self.body.get("availabilityId")
        return None if slot is None else str(slot)

    @property
    def delivered(self) -> bool:
        """Answered completely with Seyaha's 2xx envelope: the daemon may count it done."""
        return self.answered and self.behaviour in _SEYAHA_ANSWERS and self.status == 200

    @property
    def duration_s(self) -> float | None:
        return None if self.ended_s is None else self.ended_s - self.arrived_s


@dataclass
class _Live:
    """A call being answered: its record and the socket a hang-up is looked for on."""

    call: Call
    connection: socket.socket | None


class MisbehavingSeyaha:
    """A real HTTP server on 127.0.0.1 that answers Seyaha's two webhooks in one of
    `BEHAVIOURS`. `redirect` sends clients to `redirect_to` (a URL without a path)."""

    def __init__(
        self,
        behaviour: Behaviour = "good",
        *,
        redirect_to: str | None = None,
        seed: int = 0,
    ) -> None:
        self._check(behaviour)
        self._behaviour: Behaviour = behaviour
        self._then: Behaviour = "good"
        self._bad_calls_left: int | None = None
        self._bad_until_s: float | None = None
        self.redirect_to = redirect_to
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        self._calls: list[_Live] = []
        self._in_flight: dict[str, list[_Live]] = {}
        self._peaks: dict[str, int] = {}
        self._resets = 0
        self._stopping = threading.Event()
        self._connections: set[socket.socket] = set()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- life cycle -------------------------------------------------------------------------

    def start(self) -> MisbehavingSeyaha:
        self._server = _Server(self)
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="misbehaving-seyaha", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop accepting, cut every open connection and wait for the handlers to end."""
        if self._server is None:
            return
        self._stopping.set()
        self._server.shutdown()
        with self._lock:
            open_connections = list(self._connections)
        for connection in open_connections:
            with contextlib.suppress(OSError):  # already closed by its handler
                connection.shutdown(socket.SHUT_RDWR)
        self._server.server_close()  # joins the handler threads
        if self._thread is not None:
            self._thread.join(10)
        self._server = None

    def __enter__(self) -> MisbehavingSeyaha:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self._server is not None, "start() first"
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    # -- behaviour --------------------------------------------------------------------------

    def set_behaviour(
        self,
        behaviour: Behaviour,
        *,
        for_calls: int | None = None,
        for_s: float | None = None,
        then: Behaviour = "good",
    ) -> None:
        """Answer every following call with `behaviour`; with `for_calls` or `for_s`, only the
        next N calls or for T seconds, after which `then` takes over."""
        self._check(behaviour)
        self._check(then)
        with self._lock:
            self._behaviour = behaviour
            self._then = then
            self._bad_calls_left = for_calls
            self._bad_until_s = None if for_s is None else time.monotonic() + for_s

    @property
    def behaviour(self) -> Behaviour:
        with self._lock:
            return self._behaviour

    def _next_behaviour(self) -> Behaviour:
        with self._lock:
            if self._bad_until_s is not None and time.monotonic() >= self._bad_until_s:
                self._behaviour, self._bad_until_s = self._then, None
            if self._bad_calls_left is not None:
                if self._bad_calls_left <= 0:
                    self._behaviour, self._bad_calls_left = self._then, None
                else:
                    self._bad_calls_left -= 1
            return self._behaviour

    @staticmethod
    def _check(behaviour: str) -> None:
        if behaviour not in BEHAVIOURS:
            raise ValueError(f"unknown behaviour {behaviour!r} (one of {', '.join(BEHAVIOURS)})")

    # -- what happened ----------------------------------------------------------------------

    def calls(self) -> list[Call]:
        """Every call so far, in order of arrival."""
        with self._lock:
            return [live.call for live in self._calls]

    def slots(self) -> dict[str, dict[str, Any]]:
        """The last state delivered for each slot (calls answered with Seyaha's envelope)."""
        found: dict[str, dict[str, Any]] = {}
        for call in self.calls():
            if call.delivered and call.slot is not None and call.body is not None:
                found[call.slot] = call.body
        return found

    def max_in_flight_per_slot(self) -> int:
        """The most calls for one slot that were ever in flight at once (0: no notify yet)."""
        with self._lock:
            return max(self._peaks.values(), default=0)

    def in_flight_peaks(self) -> dict[str, int]:
        """For each slot, the most calls for it that were in flight at once."""
        with self._lock:
            return dict(self._peaks)

    # -- recording ----------------------------------------------------------------------------

    def _arrive(
        self,
        handler: BaseHTTPRequestHandler,
        behaviour: Behaviour,
        body: dict[str, Any] | None,
    ) -> _Live:
        now = time.monotonic()
        with self._lock:
            call = Call(
                number=len(self._calls) + 1,
                arrived_s=now,
                ended_s=None,
                endpoint=_endpoint(handler.path),
                body=body,
                secret=handler.headers.get(SECRET_HEADER),
                behaviour=behaviour,
                status=None,
                answered=False,
                hung_up=False,
            )
            live = _Live(call, handler.connection)
            self._calls.append(live)
            slot = call.slot
            if slot is not None:
                # A call whose client hung up before this one arrived was not in flight any
                # more, even if its handler has not noticed yet.
                others = []
                for other in self._in_flight.get(slot, []):
                    if other.connection is not None and _client_gone(other.connection):
                        self._end_locked(other, now, hung_up=True)
                    if other.call.ended_s is None:
                        others.append(other)
                others.append(live)
                self._in_flight[slot] = others
                self._peaks[slot] = max(self._peaks.get(slot, 0), len(others))
            return live

    def _end_locked(self, live: _Live, now: float, *, hung_up: bool = False) -> None:
        if live.call.ended_s is None:
            live.call = replace(live.call, ended_s=now)
        if hung_up:
            live.call = replace(live.call, hung_up=True)
        live.connection = None  # from here on its handler may close the socket
        slot = live.call.slot
        if slot is not None and slot in self._in_flight:
            self._in_flight[slot] = [o for o in self._in_flight[slot] if o is not live]

    def _end(self, live: _Live, *, hung_up: bool = False) -> None:
        with self._lock:
            self._end_locked(live, time.monotonic(), hung_up=hung_up)

    def _note(self, live: _Live, **fields: Any) -> None:
        with self._lock:
            live.call = replace(live.call, **fields)

    # -- answering ----------------------------------------------------------------------------

    def _handle(self, handler: _Handler) -> None:
        behaviour = self._next_behaviour()
        variant = -1
        if behaviour == "reset":
            with self._lock:
                self._resets += 1
                variant = self._resets % 3
            if variant == 0:  # as soon as the headers are in, the body left unread
                live = self._arrive(handler, behaviour, None)
                self._end(live)
                handler.abort()
                return
        length = int(handler.headers.get("content-length") or 0)
        raw = handler.rfile.read(length) if length else b""
        live = self._arrive(handler, behaviour, _json_or_none(raw))
        try:
            if behaviour == "reset":
                self._end(live)
                if variant == 1:
                    handler.abort()  # RST after reading the request
                else:
                    handler.close_connection = True  # FIN after reading, no answer
                return
            self._answer(handler, live, behaviour)
        except (ConnectionError, TimeoutError):
            self._end(live, hung_up=True)
            handler.close_connection = True
        finally:
            self._end(live)

    def _answer(self, handler: _Handler, live: _Live, behaviour: Behaviour) -> None:
        endpoint = live.call.endpoint
        if endpoint not in ("trigger", "notify"):
            self._send(handler, live, 404, _envelope_error("Not Found", "no such endpoint"))
        elif behaviour in ("good", "slow", "not_updated"):
            if behaviour == "slow":
                with self._lock:
                    delay = self._random.uniform(*SLOW_ANSWER_S)
                if not self._wait(handler, live, delay):
                    return
            updated = behaviour != "not_updated"
            self._send(handler, live, 200, _seyaha_answer(endpoint, updated=updated))
        elif behaviour == "trickle":
            self._trickle(handler, live, _seyaha_answer(endpoint, updated=True))
        elif behaviour == "trickle_head":
            self._trickle_head(handler, live, _seyaha_answer(endpoint, updated=True))
        elif behaviour == "huge":
            self._huge(handler, live)
        elif behaviour == "gzip_bomb":
            self._send(
                handler,
                live,
                500,
                gzip_bomb(),
                {"Content-Type": "text/plain", "Content-Encoding": "gzip"},
            )
        elif behaviour == "echo_secret":
            secret = live.call.secret or ""
            body = {
                "success": 0,
                "error": f"Internal Server Error for x-webhook-secret: {secret}",
                "message": f"upstream rejected {secret.upper()} (received headers: "
                f"x-webhook-secret={secret})",
            }
            headers = {
                "X-Webhook-Secret": secret,
                "Location": f"https://seyaha.invalid/debug?secret={secret}",
                "Retry-After": secret,
            }
            self._send(handler, live, 500, json.dumps(body).encode(), headers)
        elif behaviour == "echo_secret_at_cap":
            page = _padded_echo(live.call.secret or "")
            self._send(handler, live, 500, page, {"Content-Type": "text/html"})
        elif behaviour == "html_2xx":
            self._send(handler, live, 200, _HTML_PAGE, {"Content-Type": "text/html"})
        elif behaviour == "redirect":
            target = self.redirect_to or f"{self.url}/moved"
            page = b"<html><body>Moved</body></html>"
            headers = {"Location": f"{target}{handler.path}", "Content-Type": "text/html"}
            self._send(handler, live, 302, page, headers)
        else:
            raise AssertionError(f"unhandled behaviour {behaviour}")

    def _send(
        self,
        handler: _Handler,
        live: _Live,
        status: int,
        body: bytes,
        headers: dict[str, str] | None = None,
    ) -> None:
        """The whole answer in one write, its end stamped just before."""
        head = _head(status, {"Content-Type": "application/json", **(headers or {})}, len(body))
        self._note(live, status=status)
        self._end(live)
        handler.wfile.write(head + body)
        self._note(live, answered=True)

    def _trickle(self, handler: _Handler, live: _Live, body: bytes) -> None:
        self._note(live, status=200)
        handler.wfile.write(_head(200, {"Content-Type": "application/json"}, len(body)))
        for index in range(len(body)):
            if not self._wait(handler, live, TRICKLE_BYTE_EVERY_S):
                return
            if index == len(body) - 1:
                self._end(live)
            handler.wfile.write(body[index : index + 1])
        self._note(live, answered=True)

    def _trickle_head(self, handler: _Handler, live: _Live, body: bytes) -> None:
        head = _head(200, {"Content-Type": "application/json"}, len(body))
        self._note(live, status=200)
        for index in range(len(head)):
            if not self._wait(handler, live, TRICKLE_BYTE_EVERY_S):
                return
            handler.wfile.write(head[index : index + 1])
        self._end(live)
        handler.wfile.write(body)
        self._note(live, answered=True)

    def _huge(self, handler: _Handler, live: _Live) -> None:
        chunk = _huge_chunk()
        head = _head(502, {"Content-Type": "text/html"}, HUGE_BODY_BYTES)
        self._note(live, status=502)
        handler.close_connection = True
        handler.wfile.write(head)
        sent = 0
        while sent < HUGE_BODY_BYTES:
            if self._stopping.is_set():
                return
            piece = chunk[: HUGE_BODY_BYTES - sent]
            if sent + len(piece) >= HUGE_BODY_BYTES:
                self._end(live)
            handler.wfile.write(piece)
            sent += len(piece)
        self._note(live, answered=True)

    def _wait(self, handler: _Handler, live: _Live, seconds: float) -> bool:
        """Wait `seconds` unless the client hangs up (False) or the receiver stops (False)."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            if self._stopping.is_set():
                handler.close_connection = True
                return False
            readable, _, _ = select.select([handler.connection], [], [], min(left, _WAKE_S))
            if readable and _client_gone(handler.connection):
                self._end(live, hung_up=True)
                handler.close_connection = True
                return False
        return True

    def _opened(self, connection: socket.socket) -> None:
        with self._lock:
            self._connections.add(connection)

    def _closed(self, connection: socket.socket) -> None:
        with self._lock:
            self._connections.discard(connection)


class _Server(ThreadingHTTPServer):
    daemon_threads = False  # server_close() joins the handlers (stop() cuts their sockets)

    def __init__(self, receiver: MisbehavingSeyaha) -> None:
        self.receiver = receiver
        self.aborted: weakref.WeakSet[socket.socket] = weakref.WeakSet()
        super().__init__(("127.0.0.1", 0), _Handler)

    def shutdown_request(self, request: Any) -> None:
        # An aborted connection is closed without the FIN that shutdown() would send first:
        # with SO_LINGER 0 the close is a bare RST, as from a crashed proxy.
        if request in self.aborted:
            self.close_request(request)
        else:
            super().shutdown_request(request)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = IDLE_CONNECTION_S
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.server.receiver._opened(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.receiver._closed(self.connection)

    def handle(self) -> None:
        # A client that gives up resets or drops its connection, also between two calls on a
        # kept-alive one: that is what these tests provoke, not an error of the receiver.
        with contextlib.suppress(ConnectionError, TimeoutError):
            super().handle()

    def do_POST(self) -> None:
        self.server.receiver._handle(self)

    def do_GET(self) -> None:
        body = _envelope_error("Not Found", "the webhooks are POST only")
        self.wfile.write(_head(404, {"Content-Type": "application/json"}, len(body)) + body)

    def abort(self) -> None:
        """Close this connection with a reset, without answering."""
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.server.aborted.add(self.connection)
        self.close_connection = True

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the calls are recorded; thousands of lines would only hide a failure


# -- answers -----------------------------------------------------------------------------------


def _seyaha_answer(endpoint: str, *, updated: bool) -> bytes:
    data: dict[str, Any] = (
        {"synced": 42, "skipped": False} if endpoint == "trigger" else {"updated": updated}
    )
    return json.dumps({"success": 1, "data": data}, separators=(",", ":")).encode()


def _envelope_error(error: str, message: str) -> bytes:
    return json.dumps({"success": 0, "error": error, "message": message}).encode()


_HTML_PAGE = (
    b"<!DOCTYPE html>\n<html><head><title>Welcome to nginx!</title></head>\n<body>"
    b"<h1>Welcome to nginx!</h1><p>If you see this page, the web server is successfully "
    b"installed and working.</p></body></html>\n"
)
"""What a catch-all proxy or a default virtual host answers, with 200, to any path."""

_REASONS = {200: "OK", 302: "Found", 404: "Not Found", 500: "Internal Server Error"}


CUT_SECRET_AT = tuple(2**power for power in range(12, 21))
"""`echo_secret_at_cap` puts a copy of the secret across each of these offsets (4 KiB to
1 MiB): wherever a client caps its read of the answer, one copy is cut in two."""

CUT_BEFORE_CHARS = 40
"""How many characters of the cut copy come before the cap."""


def _padded_echo(secret: str) -> bytes:
    """A page of blank lines (templated error pages have many) with the secret across each
    of CUT_SECRET_AT: the part before a cap is not the whole secret, so masking the whole
    secret does not catch it, and folding the blanks brings it to the front."""
    page = bytearray(b" " * (CUT_SECRET_AT[-1] + len(secret)))
    for offset in CUT_SECRET_AT:
        start = offset - CUT_BEFORE_CHARS
        page[start : start + len(secret)] = secret.encode()
    return bytes(page)


def _head(status: int, headers: dict[str, str], length: int) -> bytes:
    reason = _REASONS.get(status, "Bad Gateway" if status == 502 else "Status")
    lines = [f"HTTP/1.1 {status} {reason}", "Server: misbehaving-seyaha"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    lines.append(f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


@cache
def _huge_chunk() -> bytes:
    """64 KB of a proxy's 502 page, repeated to make the 50 MB body."""
    page = (
        b"<html><head><title>502 Bad Gateway</title></head><body><center>"
        b"<h1>502 Bad Gateway</h1></center><hr><center>nginx</center></body></html>\n"
    )
    return (page * (_CHUNK_BYTES // len(page) + 1))[:_CHUNK_BYTES]


@cache
def gzip_bomb() -> bytes:
    """A gzip body of about 150 KB that unpacks to BOMB_UNPACKED_BYTES of text."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    block = b"0" * (1024 * 1024)
    parts = [packer.compress(block) for _ in range(BOMB_UNPACKED_BYTES // len(block))]
    parts.append(packer.flush())
    return b"".join(parts)


def _endpoint(path: str) -> str:
    match = _PATH.match(path.split("?", 1)[0])
    if match is None:
        return path
    return "notify" if match["endpoint"] == "availability/notify" else "trigger"


def _json_or_none(raw: bytes) -> dict[str, Any] | None:
    try:
        parsed = json.loads(raw) if raw else None
    except ValueError:
        return None
    return parsed if isinstance(parsed, dict) else None


def _client_gone(connection: socket.socket) -> bool:
    """Has the client closed (or reset) this connection? Never blocks."""
    try:
        readable, _, _ = select.select([connection], [], [], 0)
        if not readable:
            return False
        return connection.recv(1, socket.MSG_PEEK) == b""
    except (OSError, ValueError):
        return True
