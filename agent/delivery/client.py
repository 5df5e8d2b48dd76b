"""The HTTP client for Seyaha's two webhooks. It sends; it does not decide (see policy.py)."""

from __future__ import annotations

from dataclasses import dataclass

import httpx

from agent import __version__
from agent.config import Secret

SECRET_HEADER = "x-webhook-secret"


@dataclass(frozen=True)
class Response:
    status: int | None
    body: str = ""
    retry_after: str | None = None
    error: str | None = None
    location: str | None = None


def user_agent() -> str:
    return f"seyaha-agent/{__version__}"


class SeyahaClient:
    def __init__(
        self,
        *,
        base_url: str,
        integration_id: str,
        secret: Secret,
        connect_timeout_s: float,
        timeout_s: float,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.integration_id = integration_id
        prefix = f"/api/v1/partner-integrations/{integration_id}"
        self.trigger_path = f"{prefix}/sync/trigger"
        self.notify_path = f"{prefix}/availability/notify"
        self._secret = secret
        self._http = httpx.Client(
            base_url=self.base_url,
            headers={"User-Agent": user_agent()},
            timeout=httpx.Timeout(timeout_s, connect=connect_timeout_s),
            transport=transport,
            follow_redirects=False,
        )

    def close(self) -> None:
        self._http.close()

    def set_secret(self, secret: Secret) -> None:
        self._secret = secret

    def trigger(self) -> Response:
        return self._post(self.trigger_path, None)

    def notify(self, body: str) -> Response:
        """Send a notify with `body`, the exact JSON the outbox kept (model.request_body)."""
        return self._post(self.notify_path, body)

    def _post(self, path: str, body: str | None) -> Response:
        headers = {SECRET_HEADER: self._secret.reveal()}
        content: bytes | None = None
        if body is not None:
            headers["Content-Type"] = "application/json"
            content = body.encode("utf-8")
        try:
            answer = self._http.post(path, content=content, headers=headers)
        except httpx.TimeoutException as exc:
            return Response(None, error=f"timed out ({type(exc).__name__})")
        except httpx.HTTPError as exc:
            # httpx errors name the URL, never the headers, so the secret cannot leak here.
            return Response(None, error=f"{type(exc).__name__}: {exc}")
        return Response(
            status=answer.status_code,
            body=answer.text,
            retry_after=answer.headers.get("retry-after"),
            location=answer.headers.get("location"),
        )
