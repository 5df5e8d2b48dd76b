from __future__ import annotations

import io
import json
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from agent.clock import FakeClock
from agent.delivery.policy import Verdict, classify
from agent.model import CatalogKey
from agent.sandbox import Sandbox, validate_notify
from tests.conftest import INTEGRATION_ID, SECRET

PREFIX = f"/api/v1/partner-integrations/{INTEGRATION_ID}"
TRIGGER = f"{PREFIX}/sync/trigger"
NOTIFY = f"{PREFIX}/availability/notify"
JSON_HEADERS = {"x-webhook-secret": SECRET, "content-type": "application/json"}

Answer = tuple[int, dict[str, Any], dict[str, str]]


def notify_body(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "productId": "p1",
        "optionId": "o1",
        "availabilityId": "a1",
        "localDateTimeStart": "2026-07-01T10:00:00+03:00",
        "status": "AVAILABLE",
        "vacancies": 8,
        "capacity": 10,
    }
    body.update(overrides)
    return body


def join_background_syncs() -> None:
    for thread in threading.enumerate():
        if thread.name == "sandbox-sync":
            thread.join(5)


@pytest.fixture
def catalog() -> set[CatalogKey]:
    return {("p1", "o1"), ("p1", "o2")}


@pytest.fixture
def make_sandbox(catalog: set[CatalogKey]) -> Iterator[Callable[..., Sandbox]]:
    made: list[Sandbox] = []

    def _make(**kwargs: Any) -> Sandbox:
        kwargs.setdefault("secret", SECRET)
        kwargs.setdefault("integration_id", INTEGRATION_ID)
        kwargs.setdefault("catalog", lambda: set(catalog))
        made.append(Sandbox(port=0, **kwargs))
        return made[-1]

    yield _make
    join_background_syncs()
    for sandbox in made:
        sandbox.server.server_close()


@pytest.fixture
def sandbox(make_sandbox: Callable[..., Sandbox]) -> Sandbox:
    return make_sandbox()


def post_notify(sandbox: Sandbox, body: Any, headers: dict[str, str] = JSON_HEADERS) -> Answer:
    return sandbox.handle("POST", NOTIFY, headers, json.dumps(body).encode())


def post_trigger(sandbox: Sandbox, headers: dict[str, str] | None = None) -> Answer:
    return sandbox.handle("POST", TRIGGER, headers or {"x-webhook-secret": SECRET}, b"")


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (notify_body(), None),
        (notify_body(status="FREESALE", vacancies=None, capacity=None), None),
        (notify_body(localDateTimeStart="2026-07-01T10:00:00Z"), None),
        (notify_body(localDateTimeStart="2026-07-01T10:00:00.250-04:00"), None),
        (notify_body(status="CLOSED", vacancies=0), None),
        ([notify_body()], "body must be a JSON object"),
        (None, "body must be a JSON object"),
        (notify_body(productId=101), "productId is required and must be a non-empty string"),
        (notify_body(optionId=""), "optionId is required"),
        (
            {k: v for k, v in notify_body().items() if k != "availabilityId"},
            "availabilityId is required",
        ),
        (
            notify_body(localDateTimeStart="2026-07-01T10:00:00"),
            "localDateTimeStart must look like",
        ),
        (
            notify_body(localDateTimeStart="2026-07-01 10:00:00+03:00"),
            "localDateTimeStart must look",
        ),
        (notify_body(localDateTimeStart="2026-07-01T10:00+03:00"), "localDateTimeStart must look"),
        (notify_body(status="OPEN"), "status must be one of"),
        (notify_body(status="available"), "status must be one of"),
        (notify_body(vacancies=-1), "vacancies must be a non-negative integer or null"),
        (notify_body(vacancies="3"), "vacancies must be"),
        (notify_body(vacancies=True), "vacancies must be"),
        (notify_body(capacity=2.5), "capacity must be"),
    ],
)
def test_validate_notify(body: Any, problem: str | None) -> None:
    found = validate_notify(body)
    if problem is None:
        assert found is None
    else:
        assert found is not None
        assert found.startswith(problem)


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({"content-type": "application/json"}, id="missing"),
        pytest.param({**JSON_HEADERS, "x-webhook-secret": SECRET[:-1] + "0"}, id="wrong"),
        pytest.param({**JSON_HEADERS, "x-webhook-secret": ""}, id="empty"),
        pytest.param({**JSON_HEADERS, "x-webhook-secret": SECRET.upper()}, id="case"),
    ],
)
@pytest.mark.parametrize("path", [TRIGGER, NOTIFY])
def test_bad_secret_is_401(sandbox: Sandbox, headers: dict[str, str], path: str) -> None:
    status, answer, _ = sandbox.handle("POST", path, headers, json.dumps(notify_body()).encode())
    assert status == 401
    assert answer == {
        "success": 0,
        "error": "Unauthorized",
        "message": "Invalid or missing webhook secret",
    }
    assert sandbox.slots == {}
    assert [c.status for c in sandbox.calls] == [401]


@pytest.mark.parametrize("endpoint", ["sync/trigger", "availability/notify"])
def test_wrong_integration_is_404(sandbox: Sandbox, endpoint: str) -> None:
    path = f"/api/v1/partner-integrations/{'f' * 24}/{endpoint}"
    status, answer, _ = sandbox.handle(
        "POST", path, JSON_HEADERS, json.dumps(notify_body()).encode()
    )
    assert status == 404
    assert answer["success"] == 0
    assert answer["message"] == "Integration not found"


def test_any_integration_is_accepted_without_an_id(make_sandbox: Callable[..., Sandbox]) -> None:
    sandbox = make_sandbox(integration_id=None)
    status, _, _ = sandbox.handle(
        "POST", f"/api/v1/partner-integrations/{'f' * 24}/sync/trigger", JSON_HEADERS, b""
    )
    assert status == 200


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", TRIGGER),
        ("POST", f"{PREFIX}/availability"),
        ("POST", "/api/v1/other"),
        ("GET", "/_sandbox/unknown"),
    ],
)
def test_unknown_route_is_404(sandbox: Sandbox, method: str, path: str) -> None:
    status, answer, _ = sandbox.handle(method, path, JSON_HEADERS, b"")
    assert status == 404
    assert answer["success"] == 0


def test_trigger_reports_synced_pairs_and_whether_anything_changed(
    sandbox: Sandbox, catalog: set[CatalogKey]
) -> None:
    assert post_trigger(sandbox) == (
        200,
        {"success": 1, "data": {"synced": 2, "skipped": True}},
        {},
    )

    catalog.add(("p2", "o1"))
    assert post_trigger(sandbox)[1] == {"success": 1, "data": {"synced": 3, "skipped": False}}
    assert post_trigger(sandbox)[1] == {"success": 1, "data": {"synced": 3, "skipped": True}}
    assert sandbox.known == {("p1", "o1"), ("p1", "o2"), ("p2", "o1")}


def test_trigger_without_a_catalog(make_sandbox: Callable[..., Sandbox]) -> None:
    sandbox = make_sandbox(catalog=None)
    assert post_trigger(sandbox)[:2] == (
        200,
        {"success": 1, "data": {"synced": 0, "skipped": True}},
    )


def test_notify_for_a_known_option_updates_the_slot(sandbox: Sandbox) -> None:
    body = notify_body(vacancies=3)
    status, answer, _ = post_notify(sandbox, body)
    assert (status, answer) == (200, {"success": 1, "data": {"updated": True}})
    assert sandbox.slots == {("p1", "o1", "a1"): body}
    assert sandbox.calls[-1].body == body


def test_notify_for_an_unknown_option_is_not_updated_and_syncs(
    sandbox: Sandbox, catalog: set[CatalogKey]
) -> None:
    catalog.add(("p9", "o1"))
    status, answer, _ = post_notify(sandbox, notify_body(productId="p9"))
    join_background_syncs()

    assert (status, answer) == (200, {"success": 1, "data": {"updated": False}})
    assert sandbox.slots == {}
    assert sandbox.known is not None
    assert ("p9", "o1") in sandbox.known
    assert post_notify(sandbox, notify_body(productId="p9"))[1]["data"] == {"updated": True}


def test_every_option_is_known_without_a_catalog(make_sandbox: Callable[..., Sandbox]) -> None:
    sandbox = make_sandbox(catalog=None)
    assert post_notify(sandbox, notify_body(productId="anything"))[1]["data"] == {"updated": True}


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"{not json", "body is not valid JSON"),
        (b"", "body must be a JSON object"),
        (json.dumps(notify_body(vacancies=-2)).encode(), "vacancies must be a non-negative"),
        (json.dumps(notify_body(localDateTimeStart="tomorrow")).encode(), "localDateTimeStart"),
    ],
)
def test_invalid_notify_is_400(sandbox: Sandbox, raw: bytes, message: str) -> None:
    status, answer, _ = sandbox.handle("POST", NOTIFY, JSON_HEADERS, raw)
    assert status == 400
    assert answer["success"] == 0
    assert answer["error"] == "Bad Request"
    assert answer["message"].startswith(message)
    assert sandbox.slots == {}


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded"])
def test_notify_needs_json_content_type(sandbox: Sandbox, content_type: str | None) -> None:
    headers = {"x-webhook-secret": SECRET}
    if content_type is not None:
        headers["content-type"] = content_type
    assert post_notify(sandbox, notify_body(), headers)[0] == 415


def test_json_content_type_may_carry_a_charset(sandbox: Sandbox) -> None:
    headers = {**JSON_HEADERS, "content-type": "application/json; charset=utf-8"}
    assert post_notify(sandbox, notify_body(), headers)[0] == 200


@pytest.mark.parametrize(
    ("status", "phrase"), [(503, "Service Unavailable"), (429, "Too Many Requests")]
)
def test_fail_next_injects_statuses_with_retry_after(
    sandbox: Sandbox, status: int, phrase: str
) -> None:
    sandbox.fail_next(status, count=2, retry_after="7")

    first, second, third = (post_trigger(sandbox) for _ in range(3))

    injected = {"success": 0, "error": phrase, "message": "injected failure"}
    assert first == (status, injected, {"Retry-After": "7"})
    assert second == first
    assert third[0] == 200
    outcome = classify(
        status=status,
        body=json.dumps(first[1]),
        retry_after=first[2]["Retry-After"],
        now=FakeClock().now(),
    )
    assert outcome.verdict is Verdict.RETRY
    assert outcome.retry_after_s == 7.0


def test_fail_next_with_a_custom_body(sandbox: Sandbox) -> None:
    sandbox.fail_next(200, body=json.dumps({"success": 0, "error": "Busy", "message": "later"}))
    status, answer, extra = post_notify(sandbox, notify_body())
    assert (status, answer, extra) == (200, {"success": 0, "error": "Busy", "message": "later"}, {})
    assert sandbox.slots == {}


def test_fail_next_with_a_nonstandard_status(sandbox: Sandbox) -> None:
    sandbox.fail_next(599)
    status, answer, _ = post_trigger(sandbox)
    assert status == 599
    assert answer["success"] == 0
    assert post_trigger(sandbox)[0] == 200


def test_injected_failure_still_checks_the_secret(sandbox: Sandbox) -> None:
    sandbox.fail_next(503, count=1)
    assert post_trigger(sandbox, {"x-webhook-secret": "wrong"})[0] == 401
    assert post_trigger(sandbox)[0] == 503
    assert post_trigger(sandbox)[0] == 200


def test_control_routes(sandbox: Sandbox) -> None:
    fail = json.dumps({"status": 502, "count": 1, "retry_after": "3"}).encode()
    assert sandbox.handle("POST", "/_sandbox/fail", {}, fail)[0] == 200
    assert post_trigger(sandbox)[:1] == (502,)
    post_notify(sandbox, notify_body())

    status, listing, _ = sandbox.handle("GET", "/_sandbox/calls", {}, b"")
    assert status == 200
    assert [(c["endpoint"], c["status"]) for c in listing["calls"]] == [
        ("trigger", 502),
        ("notify", 200),
    ]
    assert sandbox.handle("GET", "/_sandbox/slots", {}, b"")[1] == {"slots": [notify_body()]}

    assert sandbox.handle("POST", "/_sandbox/reset", {}, b"")[1] == {"ok": True}
    assert sandbox.calls == []
    assert sandbox.slots == {}


@pytest.mark.parametrize("raw", [b"{}", b"{not json", b'{"status": "bad"}', b"[]"])
def test_bad_fail_spec_is_400(sandbox: Sandbox, raw: bytes) -> None:
    assert sandbox.handle("POST", "/_sandbox/fail", {}, raw)[0] == 400
    assert post_trigger(sandbox)[0] == 200


def test_calls_and_output_never_keep_the_secret(make_sandbox: Callable[..., Sandbox]) -> None:
    out = io.StringIO()
    sandbox = make_sandbox(out=out)
    headers = {**JSON_HEADERS, "user-agent": "seyaha-agent/test"}

    post_trigger(sandbox)
    post_notify(sandbox, notify_body(), headers)
    post_notify(sandbox, notify_body(), {"x-webhook-secret": "wrong-" + SECRET})

    assert sandbox.calls[1].headers == {
        "content-type": "application/json",
        "user-agent": "seyaha-agent/test",
    }
    listing = json.dumps(sandbox.handle("GET", "/_sandbox/calls", {}, b"")[1])
    assert SECRET not in listing
    printed = out.getvalue()
    assert SECRET not in printed
    assert "p1/o1 2026-07-01T10:00:00+03:00 AVAILABLE 8/10" in printed
    assert len(printed.splitlines()) == 3
