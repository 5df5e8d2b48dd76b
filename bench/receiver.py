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
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

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


# -- the server (runs in the receiver process) ----------------------------------------------


@dataclass
class _Counts:
    notify: int = 0
    trigger: int = 0
    refused: int = 0


def _response(status: int, body: bytes) -> bytes:
    reason = {200: b"OK", 400: b"Bad Request", 401: b"Unauthorized", 404: b"Not Found"}[status]
    return b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (
        status,
        reason,
        len(body),
        body,
    )


class FastReceiver:
    def __init__(self, secret: str, integration_id: str, arrivals: bool) -> None:
        self.secret = secret.encode("ascii")
        self.integration_id = integration_id.encode("ascii")
        self.arrivals = arrivals
        self.counts = _Counts()

    def answer(
        self, method: bytes, target: bytes, headers: dict[bytes, bytes], body: bytes
    ) -> bytes:
        arrived = time.monotonic()
        if target.startswith(b"/_bench/stats"):
            c = self.counts
            stats = {"notify": c.notify, "trigger": c.trigger, "refused": c.refused}
            return _response(200, json.dumps(stats).encode("ascii"))
        match = _PATH.match(target)
        if method != b"POST" or match is None or match["id"] != self.integration_id:
            self.counts.refused += 1
            return _response(404, _NOT_FOUND)
        if headers.get(b"x-webhook-secret") != self.secret:
            self.counts.refused += 1
            return _response(401, _UNAUTHORIZED)
        if match["endpoint"] == b"sync/trigger":
            self.counts.trigger += 1
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
                f"A {slot} {notify.get('vacancies')} {notify.get('status')} {arrived:.6f}\n"
            )
            sys.stdout.flush()
        return _response(200, _NOTIFY_ANSWER)

    async def connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                    return
                lines = head.split(b"\r\n")
                method, target, _version = lines[0].split(b" ", 2)
                headers: dict[bytes, bytes] = {}
                for line in lines[1:]:
                    name, _, value = line.partition(b":")
                    if name:
                        headers[name.strip().lower()] = value.strip()
                length = int(headers.get(b"content-length", b"0"))
                body = await reader.readexactly(length) if length else b""
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.receiver")
    parser.add_argument("--kind", choices=("fast", "sandbox"), default="fast")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--arrivals", action="store_true", help="print one line per notify")
    args = parser.parse_args(argv)
    if args.kind == "sandbox":
        _serve_sandbox(args.port)
    else:
        asyncio.run(_serve_fast(FastReceiver(SECRET, INTEGRATION_ID, args.arrivals), args.port))
    return 0


# -- the handle (runs in the benchmark process) ----------------------------------------------


@dataclass
class Arrival:
    slot: str
    vacancies: str
    status: str
    at: float
    """time.monotonic() in the receiver when the request was read."""


@dataclass
class _Seen:
    by_key: dict[tuple[str, str], float] = field(default_factory=dict)
    """(availabilityId, vacancies) -> first arrival time."""
    all: list[Arrival] = field(default_factory=list)


class Receiver:
    """A receiver process: its URL, its CPU time, and (with arrivals) what reached it when."""

    def __init__(self, kind: str = "fast", *, arrivals: bool = False, log: Path | None = None):
        self.kind = kind
        command = [sys.executable, "-m", "bench.receiver", "--kind", kind]
        if arrivals:
            command.append("--arrivals")
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

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            parts = line.split()
            if len(parts) != 5 or parts[0] != "A":
                continue
            arrival = Arrival(parts[1], parts[2], parts[3], float(parts[4]))
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
