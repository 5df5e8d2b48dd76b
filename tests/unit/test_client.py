from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from importlib.metadata import version

import httpx
import pytest

from agent import __version__
from agent.config import Secret
from agent.delivery.client import Response, SeyahaClient, user_agent
from agent.model import request_body
from tests.conftest import INTEGRATION_ID, SECRET

BASE_URL = "https://api.seyaha.test"
PREFIX = f"/api/v1/partner-integrations/{INTEGRATION_ID}"
PAYLOAD = {
    "productId": "101",
    "optionId": "standard",
    "availabilityId": "9001",
    "localDateTimeStart": "2026-07-01T10:00:00+03:00",
    "status": "LIMITED",
    "vacancies": 2,
    "capacity": 10,
}
BODY = request_body(PAYLOAD)

Handler = Callable[[httpx.Request], httpx.Response]
MakeClient = Callable[[Handler], SeyahaClient]


@pytest.fixture
def seen() -> list[httpx.Request]:
    return []


@pytest.fixture
def make_client(seen: list[httpx.Request]) -> Iterator[MakeClient]:
    clients: list[SeyahaClient] = []

    def _make(handler: Handler, base_url: str = BASE_URL) -> SeyahaClient:
        def recording(request: httpx.Request) -> httpx.Response:
            seen.append(request)
            return handler(request)

        client = SeyahaClient(
            base_url=base_url,
            integration_id=INTEGRATION_ID,
            secret=Secret(SECRET),
            connect_timeout_s=1.0,
            timeout_s=2.0,
            transport=httpx.MockTransport(recording),
        )
        clients.append(client)
        return client

    yield _make
    for client in clients:
        client.close()


def ok(request: httpx.Request) -> httpx.Response:
    return httpx.Response(200, json={"success": 1, "data": {"updated": True}})


def test_user_agent_names_the_installed_version() -> None:
    assert user_agent() == f"seyaha-agent/{__version__}"
    assert __version__ == version("seyaha-agent")


def test_trigger_request(make_client: MakeClient, seen: list[httpx.Request]) -> None:
    answer = make_client(ok).trigger()

    (request,) = seen
    assert request.method == "POST"
    assert str(request.url) == f"{BASE_URL}{PREFIX}/sync/trigger"
    assert request.headers["x-webhook-secret"] == SECRET
    assert request.headers["user-agent"] == f"seyaha-agent/{__version__}"
    assert request.content == b""
    assert answer.status == 200


def test_notify_request(make_client: MakeClient, seen: list[httpx.Request]) -> None:
    make_client(ok).notify(BODY)

    (request,) = seen
    assert request.method == "POST"
    assert request.url.path == f"{PREFIX}/availability/notify"
    assert request.headers["content-type"] == "application/json"
    assert request.headers["x-webhook-secret"] == SECRET
    assert request.headers["user-agent"] == f"seyaha-agent/{__version__}"
    assert json.loads(request.content) == PAYLOAD
    assert request.content == BODY.encode("utf-8")  # the kept body, not a re-serialisation


@pytest.mark.parametrize("base_url", ["https://api.seyaha.test/", "https://api.seyaha.test//"])
def test_trailing_slash_in_base_url(
    make_client: MakeClient, seen: list[httpx.Request], base_url: str
) -> None:
    make_client(ok, base_url).trigger()
    assert str(seen[0].url) == f"{BASE_URL}{PREFIX}/sync/trigger"


def test_set_secret_changes_the_header(make_client: MakeClient, seen: list[httpx.Request]) -> None:
    client = make_client(ok)
    client.set_secret(Secret("rotated"))
    client.trigger()
    assert seen[0].headers["x-webhook-secret"] == "rotated"


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        (httpx.Response(200, text='{"success":1}'), Response(200, '{"success":1}')),
        (
            httpx.Response(503, text="busy", headers={"Retry-After": "30"}),
            Response(503, "busy", retry_after="30"),
        ),
        (httpx.Response(401, text=""), Response(401, "")),
        (
            httpx.Response(302, headers={"Location": "https://elsewhere.test/"}),
            Response(302, "", location="https://elsewhere.test/"),
        ),
    ],
)
def test_answer_is_passed_on(
    make_client: MakeClient, answer: httpx.Response, expected: Response
) -> None:
    assert make_client(lambda request: answer).notify(BODY) == expected


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (httpx.ConnectError, "ConnectError: "),
        (httpx.RemoteProtocolError, "RemoteProtocolError: "),
        (httpx.ReadError, "ReadError: "),
        (httpx.ConnectTimeout, "timed out (ConnectTimeout)"),
        (httpx.ReadTimeout, "timed out (ReadTimeout)"),
    ],
)
@pytest.mark.parametrize("send", ["trigger", "notify"])
def test_network_error_is_a_response_without_status(
    make_client: MakeClient, error: type[httpx.TransportError], reason: str, send: str
) -> None:
    def fail(request: httpx.Request) -> httpx.Response:
        raise error(f"failed talking to {request.url}", request=request)

    client = make_client(fail)
    answer = client.trigger() if send == "trigger" else client.notify(BODY)

    assert answer.status is None
    assert answer.error is not None
    assert answer.error.startswith(reason)
    assert SECRET not in repr(answer)
