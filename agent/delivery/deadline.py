"""Deadlines for whole HTTP calls, enforced in the network layer under httpx.

httpx's timeouts bound each read and each write, not a call (encode/httpx#1450): a server that
trickles its status line, its headers or its body one byte a second passes every per-read
timeout and holds a call open for as long as it likes. Here every network operation of a call
(connecting, the TLS handshake, each read and write) is given at most the time left until the
call's deadline, so the call ends then as a timeout, whatever the server sends. Name resolution
is the one wait this cannot bound (the system resolver's own limits apply).

`interrupt()` ends every call in flight at once: the connections are shut down, which wakes a
read blocked in another thread (closing a socket would not). It is for shutdown, once the
calls have had their grace.

httpx has no public hook for its network layer, so `hold_to_deadlines` puts a wrapper around
the network backend of each of the client's connection pools (httpcore's NetworkBackend
interface is public; where the pools keep it is not). If a later httpx keeps them elsewhere it
says so (False), and calls are bounded per read only, as before.
"""

from __future__ import annotations

import socket
import threading
import time
import weakref
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from ssl import SSLContext
from typing import Any

import httpcore
import httpx


class Deadlines:
    """The deadline of the call each thread is making (a thread makes one call at a time),
    and the interruption that ends them all."""

    def __init__(self) -> None:
        self._local = threading.local()
        self._interrupted = threading.Event()
        self._lock = threading.Lock()
        self._streams: weakref.WeakSet[_Stream] = weakref.WeakSet()

    @contextmanager
    def call(self, deadline: float) -> Iterator[None]:
        """Every network operation of this thread in the block ends by `deadline`
        (time.monotonic())."""
        self._local.deadline = deadline
        try:
            yield
        finally:
            self._local.deadline = None

    def left_s(self) -> float | None:
        """Seconds left to this thread's call (0 once interrupted); None outside a call."""
        if self._interrupted.is_set():
            return 0.0
        deadline: float | None = getattr(self._local, "deadline", None)
        return None if deadline is None else deadline - time.monotonic()

    @property
    def interrupted(self) -> bool:
        return self._interrupted.is_set()

    def interrupt(self) -> None:
        """End every call in flight now and every later one at its first operation."""
        self._interrupted.set()
        with self._lock:
            streams = list(self._streams)
        for stream in streams:
            stream.shut()

    def _opened(self, stream: _Stream) -> None:
        with self._lock:
            self._streams.add(stream)
        if self._interrupted.is_set():  # opened while interrupt() went through the others
            stream.shut()

    def _closed(self, stream: _Stream) -> None:
        with self._lock:
            self._streams.discard(stream)

    def bounded(self, timeout: float | None, late: type[httpcore.TimeoutException]) -> float | None:
        """`timeout` for one operation, cut to what is left of the call; `late` raised when
        nothing is left (a zero timeout would make the socket non-blocking instead)."""
        left = self.left_s()
        if left is None:
            return timeout
        if left <= 0:
            raise late("the call's deadline has passed")
        return left if timeout is None else min(timeout, left)


def hold_to_deadlines(client: httpx.Client, deadlines: Deadlines) -> bool:
    """Put every connection pool of `client` (its own and those of proxies from the
    environment) on `deadlines`. False if one of them could not be (see the module's doc)."""
    transports: list[Any] = [getattr(client, "_transport", None)]
    transports += list(getattr(client, "_mounts", {}).values())
    held = True
    for transport in transports:
        if transport is None:  # a NO_PROXY entry: requests there use the client's transport
            continue
        pool: Any = getattr(transport, "_pool", None)
        backend = getattr(pool, "_network_backend", None)
        if not isinstance(backend, httpcore.NetworkBackend):
            held = False
            continue
        if not isinstance(backend, _Backend):
            pool._network_backend = _Backend(backend, deadlines)
    return held


class _Backend(httpcore.NetworkBackend):
    def __init__(self, inner: httpcore.NetworkBackend, deadlines: Deadlines) -> None:
        self._inner = inner
        self._deadlines = deadlines

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        timeout = self._deadlines.bounded(timeout, httpcore.ConnectTimeout)
        stream = self._inner.connect_tcp(host, port, timeout, local_address, socket_options)
        return _Stream(stream, self._deadlines)

    def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        timeout = self._deadlines.bounded(timeout, httpcore.ConnectTimeout)
        stream = self._inner.connect_unix_socket(path, timeout, socket_options)
        return _Stream(stream, self._deadlines)

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


class _Stream(httpcore.NetworkStream):
    def __init__(self, inner: httpcore.NetworkStream, deadlines: Deadlines) -> None:
        self._inner = inner
        self._deadlines = deadlines
        deadlines._opened(self)

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max_bytes, self._deadlines.bounded(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, self._deadlines.bounded(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._deadlines._closed(self)
        self._inner.close()

    def start_tls(
        self,
        ssl_context: SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.NetworkStream:
        # One bound for the whole handshake: Python's TLS layer keeps a socket timeout as a
        # deadline across the handshake's reads and writes.
        timeout = self._deadlines.bounded(timeout, httpcore.ConnectTimeout)
        secured = self._inner.start_tls(ssl_context, server_hostname, timeout)
        self._deadlines._closed(self)  # the TLS stream owns the connection from here
        return _Stream(secured, self._deadlines)

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)

    def shut(self) -> None:
        """Shut the connection down both ways: a read blocked on it returns at once."""
        sock = self._inner.get_extra_info("socket")
        if isinstance(sock, socket.socket):
            # The plain socket's shutdown, also under TLS: SSLSocket.shutdown would drop
            # its TLS state under a read still running in another thread.
            with suppress(OSError):
                socket.socket.shutdown(sock, socket.SHUT_RDWR)
