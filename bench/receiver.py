"""Loopback receivers for the benchmarks, each in its own process, and the handle that runs one.

`python -m bench.receiver --kind fast` is a minimal Seyaha stand-in on asyncio: HTTP/1.1 with
keep-alive, the x-webhook-secret and integration checks, the notify body parsed as JSON, and
Seyaha's success envelope as the answer. It does the least a correct receiver can do, so that
it is not what a throughput figure measures. `--kind sandbox` serves the agent's own sandbox
(agent/sandbox.py, a ThreadingHTTPServer) instead, to show what that one can take.

With --arrivals the fast receiver writes one line per notify to stdout as it arrives:
`A <availabilityId> <vacancies> <status> <monotonic seconds>`. CLOCK_MONOTONIC is one clock for
every process of a Linux machine, so the benchmark compares it with its own commit times.
GET /_bench/stats answers the counts received so far.

With --secrets-dir DIR the fast receiver is a platform's Seyaha: it accepts every integration
that has a file in DIR (named by its id, holding its secret), each with its own secret, and
its arrival lines name the integration of the path: `A <availabilityId> <vacancies> <status>
<monotonic seconds> <integration id>`, and `T <integration id> <monotonic seconds>` for each
sync/trigger.

`--kind answers` (AnswersReceiver) answers slowly or with hostile answers (ANSWER_KINDS),
switched at run time by POST /_bench/answer, prints the same arrival lines, and records
every call with its end, and the most calls for one slot it ever had in flight at once
(GET /_bench/calls).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import signal
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

from bench.agentconf import INTEGRATION_ID, SECRET
from bench.stats import process_cpu_s

_PATH = re.compile(
    rb"^/api/v1/partner-integrations/(?P<id>[^/]+)/(?P<endpoint>sync/trigger|availability/notify)/?$"
)
_NOTIFY_ANSWER = b'{"success":1,"data":{"updated":true}}'
_TRIGGER_ANSWER = b'{"success":1,"data":{"synced":0,"skipped":true}}'
_UNAUTHORIZED = b'{"success":0,"error":"Unauthorized","message":"Invalid webhook secret"}'
_NOT_FOUND = b'{"success":0,"error":"Not Found","message":"no such route or integration"}'
_BAD_REQUEST = b'{"success":0,"error":"Bad Request","message":"body is not a notify"}'

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
ANSWER_SETUP_TIMEOUT_S = 120.0
"""Longest wait for POST /_bench/answer: the two-layer gzip bomb is made when first asked
for (gigabytes of zeros compressed)."""


# -- the server (runs in the receiver process) ----------------------------------------------


@dataclass
class _Counts:
    notify: int = 0
    trigger: int = 0
    refused: int = 0
    unauthorized: int = 0
    """Of the refused: a wrong or missing x-webhook-secret (401)."""


def _response(status: int, body: bytes) -> bytes:
    reason = {200: b"OK", 400: b"Bad Request", 401: b"Unauthorized", 404: b"Not Found"}[status]
    return b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (
        status,
        reason,
        len(body),
        body,
    )


class FastReceiver:
    def __init__(
        self,
        secret: str,
        integration_id: str,
        arrivals: bool,
        secrets: dict[str, str] | None = None,
    ) -> None:
        self.secret = secret.encode("ascii")
        self.integration_id = integration_id.encode("ascii")
        self.arrivals = arrivals
        self.counts = _Counts()
        self.secrets = (
            None
            if secrets is None
            else {i.encode("ascii"): v.encode("ascii") for i, v in secrets.items()}
        )
        """A platform's integrations and their secrets (--secrets-dir); None: the one above."""

    def answer(
        self, method: bytes, target: bytes, headers: dict[bytes, bytes], body: bytes
    ) -> bytes:
        arrived = time.monotonic()
        if target.startswith(b"/_bench/stats"):
            c = self.counts
            stats = {
                "notify": c.notify,
                "trigger": c.trigger,
                "refused": c.refused,
                "unauthorized": c.unauthorized,
            }
            return _response(200, json.dumps(stats).encode("ascii"))
        match = _PATH.match(target)
        if self.secrets is not None and match is not None:
            secret = self.secrets.get(match["id"])
            known = secret is not None
        else:
            secret, known = self.secret, match is not None and match["id"] == self.integration_id
        if method != b"POST" or match is None or not known:
            self.counts.refused += 1
            return _response(404, _NOT_FOUND)
        if headers.get(b"x-webhook-secret") != secret:
            self.counts.refused += 1
            self.counts.unauthorized += 1
            return _response(401, _UNAUTHORIZED)
        # A platform's arrival lines name the integration of the path.
        routed = "" if self.secrets is None else " " + match["id"].decode("ascii")
        if match["endpoint"] == b"sync/trigger":
            self.counts.trigger += 1
            if self.arrivals and routed:
                sys.stdout.write(f"T{routed} {arrived:.6f}\n")
                sys.stdout.flush()
            return _response(200, _TRIGGER_ANSWER)
        try:
            notify = json.loads(body)
            slot = notify["availabilityId"]
        except (ValueError, KeyError, TypeError):
            self.counts.refused += 1
            return _response(400, _BAD_REQUEST)
        self.counts.notify += 1
        if self.arrivals:
            sys.stdout.write(
                f"A {slot} {notify.get('vacancies')} {notify.get('status')} {arrived:.6f}{routed}\n"
            )
            sys.stdout.flush()
        return _response(200, _NOTIFY_ANSWER)

    async def connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                request = await _read_request(reader)
                if request is None:
                    return
                method, target, headers, body = request
                writer.write(self.answer(method, target, headers, body))
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            writer.close()


async def _serve_fast(receiver: FastReceiver, port: int) -> None:
    server = await asyncio.start_server(receiver.connection, "127.0.0.1", port)
    stopped = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopped.set)
    bound = server.sockets[0].getsockname()[1]
    sys.stdout.write(f"READY {bound}\n")
    sys.stdout.flush()
    async with server:
        await stopped.wait()


def _serve_sandbox(port: int) -> None:
    from agent.sandbox import Sandbox  # the agent's own receiver, for comparison only

    sandbox = Sandbox(secret=SECRET, integration_id=INTEGRATION_ID, port=port)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=sandbox.stop).start())
    sys.stdout.write(f"READY {sandbox.port}\n")
    sys.stdout.flush()
    sandbox.serve_forever()


# -- the answers receiver: slow and hostile answers (runs in the receiver process) ------------

ANSWER_KINDS = ("delay", "huge", "gzip_bomb", "gzip_layers", "trickle")
"""How `--kind answers` answers a call; switched at run time (POST /_bench/answer), each call
keeping the answer chosen when it arrived:
- delay: Seyaha's 200 envelope after `delay_s` seconds;
- huge: a proxy's 502 page of HUGE_BODY_BYTES (Content-Length announced);
- gzip_bomb: a 500 with Content-Encoding: gzip, about 100 KB that unpack to BOMB_BYTES;
- gzip_layers: a 500 with Content-Encoding: gzip, gzip (two layers), a few KB that unpack to
  LAYERED_BOMB_BYTES;
- trickle: Seyaha's 200 envelope, status line and headers included, one byte per
  TRICKLE_BYTE_EVERY_S."""

HUGE_BODY_BYTES = 50 * 1024 * 1024
HUGE_CHUNK_BYTES = 64 * 1024
"""Size of each write of the `huge` page (bytes)."""

BOMB_BYTES = 100 * 1024 * 1024
"""What the one-layer gzip bomb unpacks to: deflate compresses at most about 1032:1, so about
100 KB on the wire is as far as one layer goes."""

LAYERED_BOMB_BYTES = 4 * 1024 * 1024 * 1024
"""What the two-layer bomb unpacks to (bytes): GBs need a second layer."""

BOMB_BLOCK_BYTES = 1024 * 1024
TRICKLE_BYTE_EVERY_S = 1.0

_TRICKLE_HEAD = (
    b"HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: Tue, 02 Dec 2025 15:00:00 GMT\r\n"
    b"Content-Type: application/json\r\nContent-Length: %d\r\nConnection: keep-alive\r\n\r\n"
)
"""The head of a proxied answer (147 bytes): trickled, it takes longer than the agent's
default lease (60 s), so a client that bounds each read but not the whole call holds the
message past its lease."""


@dataclass
class AnsweredCall:
    """One call as the answers receiver saw it (times: time.monotonic() of this machine)."""

    number: int
    endpoint: str
    slot: str | None
    vacancies: int | None
    answer: str
    arrived: float
    ended: float | None = None
    """When the answer's last bytes went out, or when the client was seen hanging up."""
    hung_up: bool = False
    status: int | None = None
    answered: bool = False
    """The whole answer was written (and drained to the socket)."""


@cache
def _gzip_of_zeros(unpacked: int) -> bytes:
    packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    block = bytes(BOMB_BLOCK_BYTES)
    parts = [packer.compress(block) for _ in range(unpacked // BOMB_BLOCK_BYTES)]
    parts.append(packer.flush())
    return b"".join(parts)


@cache
def layered_bomb() -> bytes:
    """LAYERED_BOMB_BYTES of zeros, gzipped twice (the second layer shrinks the first's
    repetitive output another thousandfold)."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    return packer.compress(_gzip_of_zeros(LAYERED_BOMB_BYTES)) + packer.flush()


def _head(status: int, headers: dict[str, str], length: int) -> bytes:
    reasons = {200: "OK", 500: "Internal Server Error", 502: "Bad Gateway"}
    lines = [f"HTTP/1.1 {status} {reasons.get(status, 'Status')}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    lines.append(f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


class AnswersReceiver:
    """Seyaha's checks (path, integration, secret), answers that are slow or hostile, and a
    record of every call: when it arrived, when it ended, and how many calls for one slot
    were in flight at once (a call is in flight from its request read to its answer's last
    bytes, or to the client hanging up)."""

    def __init__(self, secret: str, integration_id: str) -> None:
        self.secret = secret.encode("ascii")
        self.integration_id = integration_id.encode("ascii")
        self.kind = "delay"
        self.delay_s = 0.0
        self.calls: list[AnsweredCall] = []
        self.refused = 0
        self.peaks: dict[str, int] = {}
        self._in_flight: dict[str, list[tuple[AnsweredCall, asyncio.StreamReader]]] = {}

    # -- recording ------------------------------------------------------------------------

    def _arrive(self, call: AnsweredCall, reader: asyncio.StreamReader) -> None:
        self.calls.append(call)
        if call.slot is None:
            return
        # A client that hung up on an older call before this one arrived is not waiting for
        # it any more, even if its handler has not been scheduled to notice yet.
        live = []
        for other, other_reader in self._in_flight.get(call.slot, []):
            if other_reader.at_eof():
                self._end(other, hung_up=True)
            if other.ended is None:
                live.append((other, other_reader))
        live.append((call, reader))
        self._in_flight[call.slot] = live
        self.peaks[call.slot] = max(self.peaks.get(call.slot, 0), len(live))

    def _end(self, call: AnsweredCall, *, hung_up: bool = False) -> None:
        if call.ended is None:
            call.ended = time.monotonic()
            call.hung_up = hung_up
        if call.slot is not None:
            live = self._in_flight.get(call.slot, [])
            self._in_flight[call.slot] = [pair for pair in live if pair[0] is not call]

    # -- serving --------------------------------------------------------------------------

    async def connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                request = await _read_request(reader)
                if request is None:
                    return
                method, target, headers, body = request
                if not await self._respond(method, target, headers, body, reader, writer):
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            writer.close()

    async def _respond(
        self,
        method: bytes,
        target: bytes,
        headers: dict[bytes, bytes],
        body: bytes,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> bool:
        """Answer one request; False when the connection is done with."""
        if target.startswith(b"/_bench/"):
            try:
                writer.write(_response(200, self._control(target, body)))
            except (ValueError, KeyError, TypeError) as exc:
                writer.write(_response(400, json.dumps({"error": str(exc)}).encode()))
            await writer.drain()
            return True
        match = _PATH.match(target)
        if method != b"POST" or match is None or match["id"] != self.integration_id:
            self.refused += 1
            writer.write(_response(404, _NOT_FOUND))
            await writer.drain()
            return True
        if headers.get(b"x-webhook-secret") != self.secret:
            self.refused += 1
            writer.write(_response(401, _UNAUTHORIZED))
            await writer.drain()
            return True
        trigger = match["endpoint"] == b"sync/trigger"
        try:
            notify = {} if trigger else json.loads(body)
        except ValueError:
            notify = {}
        slot = notify.get("availabilityId") if isinstance(notify, dict) else None
        vacancies = notify.get("vacancies") if isinstance(notify, dict) else None
        call = AnsweredCall(
            number=len(self.calls) + 1,
            endpoint="trigger" if trigger else "notify",
            slot=None if slot is None else str(slot),
            vacancies=vacancies,
            answer=self.kind if self.kind != "delay" else f"delay {self.delay_s:g} s",
            arrived=time.monotonic(),
        )
        self._arrive(call, reader)
        if call.slot is not None:
            sys.stdout.write(
                f"A {call.slot} {vacancies} {notify.get('status')} {call.arrived:.6f}\n"
            )
            sys.stdout.flush()
        envelope = _TRIGGER_ANSWER if trigger else _NOTIFY_ANSWER
        try:
            if self.kind == "delay":
                if not await _hold(reader, self.delay_s):
                    self._end(call, hung_up=True)
                    return False
                return await self._send(writer, call, _response(200, envelope), 200)
            if self.kind == "huge":
                return await self._huge(reader, writer, call)
            if self.kind in ("gzip_bomb", "gzip_layers"):
                layered = self.kind == "gzip_layers"
                bomb = layered_bomb() if layered else _gzip_of_zeros(BOMB_BYTES)
                coding = {"Content-Encoding": "gzip, gzip" if layered else "gzip"}
                answer = _head(500, {"Content-Type": "text/plain", **coding}, len(bomb)) + bomb
                return await self._send(writer, call, answer, 500)
            return await self._trickle(reader, writer, call, envelope)
        except ConnectionError:
            self._end(call, hung_up=True)
            return False

    async def _send(
        self, writer: asyncio.StreamWriter, call: AnsweredCall, answer: bytes, status: int
    ) -> bool:
        call.status = status
        self._end(call)  # before the bytes go out: nothing they cause can come earlier
        writer.write(answer)
        await writer.drain()
        call.answered = True
        return True

    async def _huge(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, call: AnsweredCall
    ) -> bool:
        call.status = 502
        page = (
            b"<html><head><title>502 Bad Gateway</title></head><body><center>"
            b"<h1>502 Bad Gateway</h1></center><hr><center>nginx</center></body></html>\n"
        )
        chunk = (page * (HUGE_CHUNK_BYTES // len(page) + 1))[:HUGE_CHUNK_BYTES]
        writer.write(_head(502, {"Content-Type": "text/html"}, HUGE_BODY_BYTES))
        sent = 0
        while sent < HUGE_BODY_BYTES:
            if reader.at_eof():
                self._end(call, hung_up=True)
                return False
            piece = chunk[: HUGE_BODY_BYTES - sent]
            if sent + len(piece) >= HUGE_BODY_BYTES:
                self._end(call)
            writer.write(piece)
            sent += len(piece)
            await writer.drain()
        call.answered = True
        return True

    async def _trickle(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        call: AnsweredCall,
        envelope: bytes,
    ) -> bool:
        call.status = 200
        answer = _TRICKLE_HEAD % len(envelope) + envelope
        for index in range(len(answer)):
            if not await _hold(reader, TRICKLE_BYTE_EVERY_S):
                self._end(call, hung_up=True)
                return False
            if index == len(answer) - 1:
                self._end(call)
            writer.write(answer[index : index + 1])
            await writer.drain()
        call.answered = True
        return True

    def _control(self, target: bytes, body: bytes) -> bytes:
        if target.startswith(b"/_bench/answer"):
            wanted = json.loads(body)
            if wanted["kind"] not in ANSWER_KINDS:
                raise ValueError(f"unknown answer kind {wanted['kind']!r}")
            info: dict[str, int] = {}
            if wanted["kind"] == "gzip_bomb":  # made now, not while a call waits for it
                info = {"packed": len(_gzip_of_zeros(BOMB_BYTES)), "unpacked": BOMB_BYTES}
            elif wanted["kind"] == "gzip_layers":
                info = {"packed": len(layered_bomb()), "unpacked": LAYERED_BOMB_BYTES}
            elif wanted["kind"] == "huge":
                info = {"packed": HUGE_BODY_BYTES, "unpacked": HUGE_BODY_BYTES}
            elif wanted["kind"] == "trickle":
                whole = len(_TRICKLE_HEAD % len(_NOTIFY_ANSWER) + _NOTIFY_ANSWER)
                info = {"packed": whole, "unpacked": whole}
            self.kind = wanted["kind"]
            self.delay_s = float(wanted.get("delay_s", 0.0))
            return json.dumps({"kind": self.kind, "delay_s": self.delay_s, **info}).encode()
        if target.startswith(b"/_bench/calls"):
            calls = [asdict(c) for c in self.calls]
            return json.dumps({"calls": calls, "peaks": self.peaks}).encode()
        counts = {
            "notify": sum(c.endpoint == "notify" for c in self.calls),
            "trigger": sum(c.endpoint == "trigger" for c in self.calls),
            "refused": self.refused,
        }
        return json.dumps(counts).encode()


async def _hold(reader: asyncio.StreamReader, seconds: float) -> bool:
    """Wait `seconds`; False as soon as the client hangs up. A client waiting for its answer
    sends nothing (httpx does not pipeline), so anything read ends the exchange too."""
    if reader.at_eof():
        return False
    if seconds <= 0:
        return True
    try:
        await asyncio.wait_for(reader.read(1), seconds)
    except TimeoutError:
        return True
    except ConnectionError:
        return False
    return False


async def _serve_answers(port: int) -> None:
    receiver = AnswersReceiver(SECRET, INTEGRATION_ID)
    server = await asyncio.start_server(receiver.connection, "127.0.0.1", port)
    stopped = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopped.set)
    sys.stdout.write(f"READY {server.sockets[0].getsockname()[1]}\n")
    sys.stdout.flush()
    async with server:
        await stopped.wait()


async def _read_request(
    reader: asyncio.StreamReader,
) -> tuple[bytes, bytes, dict[bytes, bytes], bytes] | None:
    """One HTTP/1.1 request (method, target, lower-cased headers, body); None once the client
    has gone."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
        return None
    lines = head.split(b"\r\n")
    method, target, _version = lines[0].split(b" ", 2)
    headers: dict[bytes, bytes] = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name:
            headers[name.strip().lower()] = value.strip()
    length = int(headers.get(b"content-length", b"0"))
    body = await reader.readexactly(length) if length else b""
    return method, target, headers, body


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.receiver")
    parser.add_argument("--kind", choices=("fast", "sandbox", "answers"), default="fast")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--arrivals", action="store_true", help="print one line per notify")
    parser.add_argument(
        "--secrets-dir",
        type=Path,
        help="fast: a platform's integrations, one file per integration id holding its secret",
    )
    args = parser.parse_args(argv)
    if args.kind == "sandbox":
        _serve_sandbox(args.port)
    elif args.kind == "answers":
        asyncio.run(_serve_answers(args.port))
    else:
        secrets = None if args.secrets_dir is None else read_secrets(args.secrets_dir)
        receiver = FastReceiver(SECRET, INTEGRATION_ID, args.arrivals, secrets)
        asyncio.run(_serve_fast(receiver, args.port))
    return 0


def read_secrets(folder: Path) -> dict[str, str]:
    """{integration id: secret} of a platform's secrets folder (as webhook_secrets_dir)."""
    return {
        path.name.lower(): path.read_text(encoding="utf-8").strip()
        for path in folder.iterdir()
        if re.fullmatch(r"[0-9a-fA-F]{24}", path.name)
    }


# -- the handle (runs in the benchmark process) ----------------------------------------------


@dataclass
class Arrival:
    slot: str
    vacancies: str
    status: str
    at: float
    """time.monotonic() in the receiver when the request was read."""
    integration: str = ""
    """The integration id of the path (a receiver with --secrets-dir), else empty."""


@dataclass
class _Seen:
    by_key: dict[tuple[str, str], float] = field(default_factory=dict)
    """(availabilityId, vacancies) -> first arrival time."""
    all: list[Arrival] = field(default_factory=list)
    triggers: list[tuple[str, float]] = field(default_factory=list)
    """(integration id, arrival time) of each sync/trigger (a receiver with --secrets-dir)."""


class Receiver:
    """A receiver process: its URL, its CPU time, and (with arrivals) what reached it when."""

    def __init__(
        self,
        kind: str = "fast",
        *,
        arrivals: bool = False,
        log: Path | None = None,
        secrets_dir: Path | None = None,
    ):
        self.kind = kind
        command = [sys.executable, "-m", "bench.receiver", "--kind", kind]
        if arrivals:
            command.append("--arrivals")
        if secrets_dir is not None:
            command += ["--secrets-dir", str(secrets_dir)]
        self._log = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=self._log, text=True, bufsize=1
        )
        assert self.process.stdout is not None
        ready = _read_line(self.process, START_TIMEOUT_S)
        if not ready.startswith("READY "):
            self.stop()
            raise RuntimeError(f"the {kind} receiver did not start: {ready!r}")
        self.port = int(ready.split()[1])
        self._seen = _Seen()
        self._changed = threading.Condition()
        self._reader: threading.Thread | None = None
        if arrivals:
            self._reader = threading.Thread(target=self._read, name="arrivals", daemon=True)
            self._reader.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def cpu_s(self) -> float:
        return process_cpu_s(self.process.pid)

    def stats(self) -> dict[str, int]:
        answer = httpx.get(f"{self.url}/_bench/stats", timeout=5.0)
        answer.raise_for_status()
        return dict(answer.json())

    def answer_with(self, kind: str, delay_s: float = 0.0) -> dict[str, Any]:
        """How `--kind answers` answers the calls that arrive from now on (ANSWER_KINDS)."""
        answer = httpx.post(
            f"{self.url}/_bench/answer",
            json={"kind": kind, "delay_s": delay_s},
            timeout=ANSWER_SETUP_TIMEOUT_S,
        )
        answer.raise_for_status()
        return dict(answer.json())

    def calls(self) -> tuple[list[AnsweredCall], dict[str, int]]:
        """Every call `--kind answers` received so far, and its in-flight peak per slot."""
        answer = httpx.get(f"{self.url}/_bench/calls", timeout=30.0)
        answer.raise_for_status()
        found = answer.json()
        return [AnsweredCall(**c) for c in found["calls"]], dict(found["peaks"])

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            parts = line.split()
            if len(parts) == 3 and parts[0] == "T":
                with self._changed:
                    self._seen.triggers.append((parts[1], float(parts[2])))
                    self._changed.notify_all()
                continue
            if len(parts) not in (5, 6) or parts[0] != "A":
                continue
            arrival = Arrival(parts[1], parts[2], parts[3], float(parts[4]), *parts[5:])
            with self._changed:
                self._seen.all.append(arrival)
                self._seen.by_key.setdefault((arrival.slot, arrival.vacancies), arrival.at)
                self._changed.notify_all()

    def arrival(self, slot: str, vacancies: int) -> float | None:
        with self._changed:
            return self._seen.by_key.get((slot, str(vacancies)))

    def arrivals(self) -> list[Arrival]:
        with self._changed:
            return list(self._seen.all)

    def triggers(self) -> list[tuple[str, float]]:
        """(integration id, arrival time) of each sync/trigger (with secrets_dir)."""
        with self._changed:
            return list(self._seen.triggers)

    def wait_for(self, keys: Iterable[tuple[str, int]], timeout_s: float) -> dict[str, float]:
        """Wait until every (slot, vacancies) arrived or `timeout_s` passed; {slot: time}."""
        wanted = {(slot, str(v)) for slot, v in keys}
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while True:
                missing = wanted - self._seen.by_key.keys()
                remaining = deadline - time.monotonic()
                if not missing or remaining <= 0:
                    break
                self._changed.wait(min(remaining, 0.5))
            return {k[0]: self._seen.by_key[k] for k in wanted if k in self._seen.by_key}

    def slots_seen(self, slots: Iterable[str], since: float = 0.0) -> dict[str, list[str]]:
        """Statuses received for each of `slots` after `since` (monotonic seconds)."""
        wanted = set(slots)
        found: dict[str, list[str]] = {}
        for a in self.arrivals():
            if a.slot in wanted and a.at >= since:
                found.setdefault(a.slot, []).append(a.status)
        return found

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._reader is not None:
            self._reader.join(STOP_TIMEOUT_S)
        if self.process.stdout is not None:
            self.process.stdout.close()
        if self._log is not subprocess.DEVNULL:
            self._log.close()

    def __enter__(self) -> Receiver:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


def _read_line(process: subprocess.Popen[str], timeout_s: float) -> str:
    """The process's first stdout line, or "" if it exits or stays silent for `timeout_s`."""
    got: list[str] = []

    def read() -> None:
        assert process.stdout is not None
        got.append(process.stdout.readline())

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout_s)
    return got[0].strip() if got else ""


if __name__ == "__main__":
    raise SystemExit(main())
