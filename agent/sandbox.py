"""A local Seyaha-compatible receiver for trying a setup before pointing it at Seyaha.

It implements the documented behaviour of the two webhooks: the x-webhook-secret check, the
`{"success": 1, "data": ...}` / `{"success": 0, "error": ..., "message": ...}` envelopes, a
trigger that re-reads the catalog (when it has one), and `updated: false` for a notify about
an unknown product/option, which starts a background catalog sync as Seyaha does. Every call
is printed as it arrives and kept in memory; the latest state of each slot is kept too, so a
run can be checked against the inventory.

Test helpers under /_sandbox/ (not part of Seyaha's API):
- GET  /_sandbox/calls           every call received, oldest first
- GET  /_sandbox/slots           the last state received for each slot
- POST /_sandbox/fail            {"status": 503, "count": 3, "retry_after": "2"}: answer the
                                 next `count` webhook calls with `status`
- POST /_sandbox/reset           forget calls, slots and pending failures
"""

from __future__ import annotations

import hmac
import json
import re
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from typing import Any, TextIO

from agent.endpoints import Listener
from agent.model import STATUSES, CatalogKey

_PATH = re.compile(
    r"^/api/v1/partner-integrations/(?P<id>[^/]+)/(?P<endpoint>sync/trigger|availability/notify)/?$"
)
_LOCAL_DATE_TIME = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$")


@dataclass
class Call:
    at: str
    endpoint: str
    status: int
    body: dict[str, Any] | None
    answer: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)
    integration: str = ""


@dataclass
class _Failures:
    status: int = 0
    remaining: int = 0
    retry_after: str | None = None
    body: str | None = None


class Sandbox:
    """The receiver. `catalog` returns the known (product_id, option_id) pairs, or None to
    accept every pair."""

    def __init__(
        self,
        *,
        secret: str = "",
        integration_id: str | None = None,
        secrets: Callable[[str], str | None] | None = None,
        catalog: Callable[[], set[CatalogKey]] | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        out: TextIO | None = None,
    ) -> None:
        self._secret = secret.encode("utf-8")
        self.secrets = secrets
        """Several integrations (a platform): the secret of an integration id, None for an
        integration this Seyaha does not know (404); else one integration and `secret`."""
        self.host = host
        self.integration_id = integration_id
        self._catalog_source = catalog
        self.out = out
        self.lock = threading.Lock()
        self.calls: list[Call] = []
        self.slots: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.known: set[CatalogKey] | None = None
        self._catalog_hash: int | None = None
        self._failures = _Failures()
        self.server = Listener((host, port), _handler_for(self))
        self._thread: threading.Thread | None = None
        self._pull_catalog()

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> Sandbox:
        self._thread = threading.Thread(
            target=self.server.serve_forever, name="sandbox", daemon=True
        )
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self.server.serve_forever()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        if self._thread is not None:
            self._thread.join(5)

    def fail_next(
        self, status: int, count: int = 1, retry_after: str | None = None, body: str | None = None
    ) -> None:
        with self.lock:
            self._failures = _Failures(status, count, retry_after, body)

    def reset(self) -> None:
        with self.lock:
            self.calls.clear()
            self.slots.clear()
            self._failures = _Failures()

    # -- behaviour ----------------------------------------------------------------------

    def _pull_catalog(self) -> tuple[int, bool]:
        """Re-read the catalog as Seyaha's sync does: (pairs synced, skipped as unchanged)."""
        if self._catalog_source is None:
            return 0, True
        pairs = self._catalog_source()
        digest = hash(frozenset(pairs))
        skipped = digest == self._catalog_hash
        self.known, self._catalog_hash = pairs, digest
        return len(pairs), skipped

    def _background_sync(self) -> None:
        threading.Thread(target=self._safe_pull, name="sandbox-sync", daemon=True).start()

    def _safe_pull(self) -> None:
        try:
            with self.lock:
                self._pull_catalog()
        except Exception as exc:  # the sandbox keeps answering even if the source is down
            self._print(f"background sync failed: {exc}")

    def handle(
        self, method: str, path: str, headers: dict[str, str], raw: bytes
    ) -> tuple[int, dict[str, Any], dict[str, str]]:
        """Answer one request: (status, JSON body, extra headers)."""
        if path.startswith("/_sandbox/"):
            return self._control(method, path, raw)
        match = _PATH.match(path)
        if method != "POST" or match is None:
            return 404, _error("Not Found", f"no route for {method} {path}"), {}
        endpoint = "trigger" if match["endpoint"] == "sync/trigger" else "notify"
        body: dict[str, Any] | None = None
        with self.lock:
            status, answer, extra = self._answer(match["id"], endpoint, headers, raw)
            if isinstance(answer.get("_body"), dict):
                body = answer.pop("_body")
            self.calls.append(
                Call(
                    at=datetime.now(UTC).isoformat(timespec="milliseconds"),
                    endpoint=endpoint,
                    status=status,
                    body=body,
                    answer=answer,
                    headers={
                        k: v for k, v in headers.items() if k in ("content-type", "user-agent")
                    },
                    integration=match["id"],
                )
            )
        self._show(endpoint, status, body, answer)
        return status, answer, extra

    def _answer(
        self, integration: str, endpoint: str, headers: dict[str, str], raw: bytes
    ) -> tuple[int, dict[str, Any], dict[str, str]]:
        given = headers.get("x-webhook-secret", "").encode("utf-8")
        expected = self._secret
        if self.secrets is not None:
            known = self.secrets(integration)
            if known is None:
                return 404, _error("Not Found", "Integration not found"), {}
            expected = known.encode("utf-8")
        if not hmac.compare_digest(given, expected):
            return 401, _error("Unauthorized", "Invalid or missing webhook secret"), {}
        if self.integration_id is not None and integration != self.integration_id:
            return 404, _error("Not Found", "Integration not found"), {}
        if self._failures.remaining > 0:
            failure = self._failures
            failure.remaining -= 1
            extra = {"Retry-After": failure.retry_after} if failure.retry_after else {}
            if failure.body is not None:
                try:
                    return failure.status, json.loads(failure.body), extra
                except ValueError:
                    pass
            try:
                phrase = HTTPStatus(failure.status).phrase
            except ValueError:
                phrase = f"HTTP {failure.status}"
            return failure.status, _error(phrase, "injected failure"), extra
        if endpoint == "trigger":
            synced, skipped = self._pull_catalog()
            return 200, {"success": 1, "data": {"synced": synced, "skipped": skipped}}, {}
        if headers.get("content-type", "").split(";")[0].strip() != "application/json":
            return (
                415,
                _error("Unsupported Media Type", "Content-Type must be application/json"),
                {},
            )
        try:
            body = json.loads(raw or b"null")
        except ValueError:
            return 400, _error("Bad Request", "body is not valid JSON"), {}
        problem = validate_notify(body)
        if problem is not None:
            return 400, {**_error("Bad Request", problem), "_body": body}, {}
        key = (body["productId"], body["optionId"], body["availabilityId"])
        if self.known is not None and (key[0], key[1]) not in self.known:
            self._background_sync()
            return 200, {"success": 1, "data": {"updated": False}, "_body": body}, {}
        self.slots[key] = body
        return 200, {"success": 1, "data": {"updated": True}, "_body": body}, {}

    def _control(
        self, method: str, path: str, raw: bytes
    ) -> tuple[int, dict[str, Any], dict[str, str]]:
        with self.lock:
            if method == "GET" and path == "/_sandbox/calls":
                return 200, {"calls": [asdict(c) for c in self.calls]}, {}
            if method == "GET" and path == "/_sandbox/slots":
                return 200, {"slots": list(self.slots.values())}, {}
            if method == "POST" and path == "/_sandbox/reset":
                self.calls.clear()
                self.slots.clear()
                self._failures = _Failures()
                return 200, {"ok": True}, {}
        if method == "POST" and path == "/_sandbox/fail":
            try:
                spec = json.loads(raw or b"{}")
                self.fail_next(
                    int(spec["status"]),
                    int(spec.get("count", 1)),
                    spec.get("retry_after"),
                    spec.get("body"),
                )
            except (ValueError, KeyError, TypeError) as exc:
                return 400, _error("Bad Request", f"expected {{status, count}}: {exc}"), {}
            return 200, {"ok": True}, {}
        return 404, _error("Not Found", f"no sandbox route {method} {path}"), {}

    # -- output -------------------------------------------------------------------------

    def _print(self, line: str) -> None:
        if self.out is not None:
            self.out.write(line + "\n")
            self.out.flush()

    def _show(
        self, endpoint: str, status: int, body: dict[str, Any] | None, answer: dict[str, Any]
    ) -> None:
        if self.out is None:
            return
        stamp = datetime.now().strftime("%H:%M:%S")
        if endpoint == "trigger":
            what = "catalog sync requested"
        elif body is not None:
            vacancies = body.get("vacancies")
            capacity = body.get("capacity")
            seats = "" if vacancies is None or capacity is None else f" {vacancies}/{capacity}"
            what = (
                f"{body.get('productId')}/{body.get('optionId')} "
                f"{body.get('localDateTimeStart')} {body.get('status')}{seats}"
            )
        else:
            what = ""
        data = answer.get("data") or {}
        verdict = (
            "updated:false (unknown product/option; background sync)"
            if data.get("updated") is False
            else ("ok" if status == 200 else f"{answer.get('error')}: {answer.get('message')}")
        )
        self._print(f"{stamp}  <- {endpoint:<7} {what}  -> {status} {verdict}")


def validate_notify(body: Any) -> str | None:
    """Why a notify body breaks the documented contract, or None if it is acceptable."""
    if not isinstance(body, dict):
        return "body must be a JSON object"
    for name in ("productId", "optionId", "availabilityId", "localDateTimeStart"):
        value = body.get(name)
        if not isinstance(value, str) or not value:
            return f"{name} is required and must be a non-empty string"
    if not _LOCAL_DATE_TIME.match(body["localDateTimeStart"]):
        return "localDateTimeStart must look like YYYY-MM-DDTHH:MM:SS+HH:MM"
    status = body.get("status")
    if status is not None and status not in STATUSES:
        return f"status must be one of {', '.join(STATUSES)}"
    for name in ("vacancies", "capacity"):
        value = body.get(name)
        if value is not None and (
            not isinstance(value, int) or isinstance(value, bool) or value < 0
        ):
            return f"{name} must be a non-negative integer or null"
    return None


def _error(error: str, message: str) -> dict[str, Any]:
    return {"success": 0, "error": error, "message": message}


def _handler_for(sandbox: Sandbox) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "seyaha-sandbox"
        protocol_version = "HTTP/1.1"

        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            headers = {k.lower(): v for k, v in self.headers.items()}
            status, answer, extra = sandbox.handle(self.command, self.path, headers, raw)
            payload = json.dumps(answer).encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            for name, value in extra.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(payload)

        do_POST = _serve
        do_GET = _serve

        def log_message(self, format: str, *args: Any) -> None:
            pass  # every call is shown by Sandbox._show, without headers

    return Handler
