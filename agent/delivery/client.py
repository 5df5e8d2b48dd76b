"""The HTTP client for Seyaha's two webhooks. It sends; it does not decide (see policy.py)."""

from __future__ import annotations

import logging
import re
import time
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import httpx

from agent import __version__
from agent.config import Secret
from agent.delivery.deadline import Deadlines, hold_to_deadlines
from agent.logs import event

if TYPE_CHECKING:
    from agent.integrations import SecretsFolder

log = logging.getLogger("agent.delivery")

SECRET_HEADER = "x-webhook-secret"

MAX_ANSWER_BYTES = 64 * 1024
"""Most of an answer's body that is kept (bytes): Seyaha's envelopes are tiny, and a proxy's
50 MB error page must not cost 50 MB per worker. Unpacked gzip is capped the same way."""

PARTIAL_SECRET_CHARS = 4
"""A body cut short that ends in at least this many first characters of the secret has them
masked (fewer can match by chance and reveal nothing)."""


@dataclass(frozen=True)
class Response:
    status: int | None
    body: str = ""
    retry_after: str | None = None
    error: str | None = None
    location: str | None = None
    interrupted: bool = False
    """The call was cut short because the agent is stopping (see SeyahaClient.interrupt):
    it says nothing about Seyaha."""
    unsent: Literal["no_secret", "unroutable"] | None = None
    """The call was not made: the integration has no usable secret file now, or the message
    names no integration this configuration can send to (`error` says which)."""


def user_agent() -> str:
    return f"seyaha-agent/{__version__}"


class SeyahaClient:
    def __init__(
        self,
        *,
        base_url: str,
        integration_id: str | None,
        secret: Secret,
        connect_timeout_s: float,
        timeout_s: float,
        transport: httpx.BaseTransport | None = None,
        secrets: SecretsFolder | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.integration_id = integration_id
        """The one integration of [seyaha] integration_id (messages naming none go there)."""
        self.secrets = secrets
        """A platform's secrets, one file per integration ([seyaha] webhook_secrets_dir)."""
        self._secret = secret
        self.request_s = connect_timeout_s + timeout_s
        """A call's deadline: connecting, sending and the whole answer end within this
        (seconds), however slowly the server sends."""
        self._deadlines = Deadlines()
        self._http = httpx.Client(
            base_url=self.base_url,
            headers={"User-Agent": user_agent()},
            timeout=httpx.Timeout(timeout_s, connect=connect_timeout_s),
            transport=transport,
            follow_redirects=False,
        )
        self.deadlines_held = hold_to_deadlines(self._http, self._deadlines)
        """Whether calls are held to their deadline in the network layer; if not (a test's
        mock transport, or an httpx whose internals moved), a body still arriving at the
        deadline ends the call, but a server trickling its headers can hold it longer."""
        if transport is None and not self.deadlines_held:
            event(
                log,
                logging.WARNING,
                "delivery.deadline_unheld",
                f"httpx {httpx.__version__} keeps its connection pools where this agent does "
                "not look: a call is limited per read, not in total, so a server trickling "
                "its headers can hold one past delivery.timeout; install the httpx version "
                "this agent was tested with",
            )

    def close(self) -> None:
        self._http.close()

    def interrupt(self) -> None:
        """End every call in flight now, and refuse new ones: the agent is stopping and the
        calls have had their grace. Each ends with a Response marked `interrupted`."""
        self._deadlines.interrupt()

    def set_secret(self, secret: Secret) -> None:
        self._secret = secret

    def trigger(self, integration_id: str = "") -> Response:
        """Ask Seyaha to sync the catalog of `integration_id` ("": the configured one)."""
        return self._post(integration_id, "sync/trigger", None)

    def notify(self, body: str, integration_id: str = "") -> Response:
        """Send a notify with `body`, the exact JSON the outbox kept (model.request_body)."""
        return self._post(integration_id, "availability/notify", body)

    def _route(self, integration_id: str) -> tuple[str, Secret] | Response:
        """The integration's path prefix and secret, or why no call can be made."""
        if not integration_id:
            if self.integration_id is None:
                return Response(
                    None,
                    error="queued for [seyaha] integration_id before webhook_secrets_dir was "
                    "set: it names no integration to send to",
                    unsent="unroutable",
                )
            return f"/api/v1/partner-integrations/{self.integration_id}", self._secret
        if self.secrets is None:
            return Response(
                None,
                error=f"queued for integration {integration_id} while webhook_secrets_dir was "
                "set; this configuration sends to [seyaha] integration_id only",
                unsent="unroutable",
            )
        secret = self.secrets.secret(integration_id)
        if secret is None:
            return Response(
                None,
                error=f"integration {integration_id} has no usable secret: "
                f"{self.secrets.problem(integration_id)}",
                unsent="no_secret",
            )
        return f"/api/v1/partner-integrations/{integration_id}", secret

    def _post(self, integration_id: str, endpoint: str, body: str | None) -> Response:
        route = self._route(integration_id)
        if isinstance(route, Response):
            return route
        prefix, secret = route
        path = f"{prefix}/{endpoint}"
        headers = {
            SECRET_HEADER: secret.reveal(),
            # Compressed answers are not invited: a small gzip body can unpack to gigabytes.
            "Accept-Encoding": "identity",
        }
        content: bytes | None = None
        if body is not None:
            headers["Content-Type"] = "application/json"
            content = body.encode("utf-8")
        started = time.monotonic()
        deadline = started + self.request_s
        try:
            with (
                self._deadlines.call(deadline),
                self._http.stream("POST", path, content=content, headers=headers) as answer,
            ):
                # A little past the cap, so that a copy of the secret across it is read whole
                # and masked before the body is cut (see _redacted).
                text = self._read(answer, deadline, MAX_ANSWER_BYTES + len(headers[SECRET_HEADER]))
                if text is None:
                    return self._failed(
                        f"timed out: the answer was still arriving after {self.request_s:g} s "
                        "(connect_timeout + timeout)",
                        secret,
                    )
                return self._redacted(
                    secret,
                    Response(
                        status=answer.status_code,
                        body=text,
                        retry_after=answer.headers.get("retry-after"),
                        location=answer.headers.get("location"),
                    ),
                )
        except httpx.TimeoutException as exc:
            if time.monotonic() >= deadline:
                return self._failed(
                    f"timed out: no answer within {self.request_s:g} s (connect_timeout + timeout)",
                    secret,
                )
            return self._failed(f"timed out ({type(exc).__name__})", secret)
        except httpx.HTTPError as exc:
            # httpx errors name the URL, never the headers; a URL never holds the secret.
            return self._failed(f"{type(exc).__name__}: {exc}", secret)

    def _failed(self, error: str, secret: Secret) -> Response:
        """No answer: `error` says why, unless the call was cut short by interrupt()."""
        if self._deadlines.interrupted:
            return Response(
                None,
                error="cut short: the agent was stopping and delivery.shutdown_grace was over",
                interrupted=True,
            )
        return self._redacted(secret, Response(None, error=error))

    @staticmethod
    def _read(answer: httpx.Response, deadline: float, limit: int) -> str | None:
        """At most `limit` bytes of the answer's body, as text; None past `deadline` (the
        network layer ends the read then, see deadline.py; the check after each chunk is for
        a transport it could not be put under)."""
        if answer.is_stream_consumed:  # a transport that hands over a body already read
            return answer.content[:limit].decode("utf-8", "replace")
        raw = bytearray()
        try:
            for chunk in answer.iter_raw():
                raw += chunk
                if len(raw) >= limit:
                    break
                if time.monotonic() > deadline:
                    return None
        except httpx.TimeoutException:
            if time.monotonic() >= deadline:
                return None
            raise
        encoding = answer.headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            data = _inflate(bytes(raw), encoding, limit)
            if data is None:
                return f"({encoding}-encoded answer of {len(raw)}+ bytes, not decoded)"
            raw = bytearray(data)
        return bytes(raw[:limit]).decode("utf-8", "replace")

    @staticmethod
    def _redacted(sent: Secret, response: Response) -> Response:
        """The answer with every echo of the secret sent masked: it is kept in the outbox as
        the last error, printed by the CLI and served by /readyz."""
        secret = sent.reveal()
        if not secret:
            return response
        pattern = re.compile(re.escape(secret), re.IGNORECASE)

        def mask(text: str | None) -> str | None:
            return None if text is None else pattern.sub("***", text)

        body = mask(response.body) or ""
        # A body cut short may end in the first characters of a copy of the secret.
        folded = body.lower()
        for length in range(min(len(secret) - 1, len(body)), PARTIAL_SECRET_CHARS - 1, -1):
            if folded.endswith(secret[:length].lower()):
                body = body[:-length] + "***"
                break
        return Response(
            status=response.status,
            body=body[:MAX_ANSWER_BYTES],
            retry_after=mask(response.retry_after),
            error=mask(response.error),
            location=mask(response.location),
        )


def _inflate(data: bytes, encoding: str, limit: int) -> bytes | None:
    """A gzip or deflate body unpacked to at most `limit` bytes; None for other codings or a
    body that does not unpack."""
    if encoding in ("gzip", "x-gzip"):
        wbits = 16 + zlib.MAX_WBITS
    elif encoding == "deflate":
        wbits = zlib.MAX_WBITS
    else:
        return None
    try:
        return zlib.decompressobj(wbits).decompress(data, limit)
    except zlib.error:
        return None
