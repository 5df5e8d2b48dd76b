"""A platform: one database, many Seyaha integrations, each row routed by its integration_id.

Real databases (the platform's inventory on SQLite, PostgreSQL and MariaDB; the state store
on all three), the real sandbox over HTTP checking each integration's own secret, and the
secrets folder on disk, changed while the agent runs.
"""

from __future__ import annotations

import io
import logging
import time
from argparse import Namespace
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest

from agent.app import Agent
from agent.clock import to_epoch_ms
from agent.commands import outbox
from agent.config import load_config
from agent.delivery.flow import BreakerState
from agent.model import Message, Slot
from agent.plan import notify_message
from agent.sandbox import Call, Sandbox
from agent.store import StateStore
from tests.integration.inventory import BACKEND_PARAMS, at, first_day
from tests.integration.platform import (
    ALPHA,
    BRAVO,
    CHARLIE,
    SECRETS,
    Platform,
    write_platform_config,
    write_secrets,
)

WAIT_S = 60.0
"""A ceiling for delivery, never an expectation."""


@pytest.fixture
def make_platform(new_database: Callable[[str], str]) -> Iterator[Callable[[str], Platform]]:
    made: list[Platform] = []

    def make(backend: str) -> Platform:
        platform = Platform(new_database(backend))
        made.append(platform)
        return platform

    yield make
    for platform in made:
        platform.close()


@pytest.fixture
def seyaha() -> Iterator[tuple[Sandbox, dict[str, str]]]:
    """The sandbox knowing the three integrations, with the secrets it expects (a dict the
    test may change: Seyaha rotating or revoking a secret)."""
    known = dict(SECRETS)
    sandbox = Sandbox(secrets=known.get, port=0).start()
    yield sandbox, known
    sandbox.stop()


@pytest.fixture
def make_platform_agent(tmp_path: Path) -> Iterator[Callable[..., Agent]]:
    made: list[Agent] = []

    def make(
        *,
        base_url: str,
        source_url: str,
        state_url: str,
        secrets: dict[str, str],
        **delivery: object,
    ) -> Agent:
        folder = write_secrets(tmp_path / "secrets", secrets)
        path = write_platform_config(
            tmp_path,
            name=f"platform-{len(made)}",
            base_url=base_url,
            source_url=source_url,
            state_url=state_url,
            secrets_dir=folder,
            delivery={"auth_probe_interval": 0.2, "backoff_initial": 0.05, **delivery},
        )
        agent = Agent(load_config(path))
        made.append(agent)
        agent.open()
        return agent

    yield make
    for agent in made:
        agent.close()


def seed(platform: Platform) -> None:
    """Three suppliers with a product and two slots each; a fourth with no integration."""
    day = first_day()
    for number, integration in enumerate((ALPHA, BRAVO, CHARLIE), start=1):
        platform.supplier(number, integration)
        platform.product(f"p{number}", number, title=f"Tour {number}")
        platform.slot(f"s{number}1", f"p{number}", at(day, 9))
        platform.slot(f"s{number}2", f"p{number}", at(day, 11))
    platform.supplier(4, None)
    platform.product("p4", 4)
    platform.slot("s41", "p4", at(day, 9))


def sent(sandbox: Sandbox) -> list[tuple[str, str, str | None, int]]:
    """(integration, endpoint, availability id, status) of every call, in order."""
    with sandbox.lock:
        return [
            (c.integration, c.endpoint, (c.body or {}).get("availabilityId"), c.status)
            for c in sandbox.calls
        ]


def reply(handler: BaseHTTPRequestHandler, status: int) -> None:
    """Answer as Seyaha does: its envelope for a 200, an empty object otherwise."""
    body = b'{"success": 1, "data": {"updated": true}}' if status == 200 else b"{}"
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


def deliver_until(agent: Agent, done: Callable[[], bool]) -> None:
    """Step the deliverer until `done()` (or fail after WAIT_S)."""
    deadline = time.monotonic() + WAIT_S
    while not done():
        assert time.monotonic() < deadline, "delivery did not get there in time"
        if agent.deliverer.step() == 0:
            time.sleep(0.05)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_each_row_goes_to_the_integration_it_names(
    backend: str,
    make_platform: Callable[[str], Platform],
    make_platform_agent: Callable[..., Agent],
    seyaha: tuple[Sandbox, dict[str, str]],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    sandbox, _ = seyaha
    platform = make_platform(backend)
    seed(platform)
    # CHARLIE has no secret file yet
    agent = make_platform_agent(
        base_url=sandbox.url,
        source_url=platform.url,
        state_url=f"sqlite:///{tmp_path / 'state.db'}",
        secrets={ALPHA: SECRETS[ALPHA], BRAVO: SECRETS[BRAVO]},
    )

    # The baseline: one trigger per integration that has rows and a secret.
    with caplog.at_level(logging.WARNING, logger="agent"):
        report = agent.scan()
    assert report.baseline
    assert (report.triggers, report.notifies) == (2, 0)
    skipped = sorted((r.query, r.key, r.reason.split(":")[0]) for r in report.skipped)
    assert skipped == [
        ("catalog_query", ("p3", "default"), f"integration {CHARLIE} has no usable secret"),
        ("catalog_query", ("p4", "default"), "integration_id is NULL"),
        ("slots_query", ("p3", "default", "s31"), f"integration {CHARLIE} has no usable secret"),
        ("slots_query", ("p3", "default", "s32"), f"integration {CHARLIE} has no usable secret"),
        ("slots_query", ("p4", "default", "s41"), "integration_id is NULL"),
    ]
    said = [r.getMessage() for r in caplog.records if getattr(r, "event", "") == "scan.no_secret"]
    assert len(said) == 1
    assert f"{CHARLIE} (3 rows)" in said[0]
    deliver_until(agent, lambda: len(sandbox.calls) == 2)
    assert sorted(sent(sandbox)) == [(ALPHA, "trigger", None, 200), (BRAVO, "trigger", None, 200)]

    # A booking goes to its own integration, with its own secret (the sandbox checks it).
    sandbox.reset()
    platform.book("s21", 3)
    platform.retitle("p1", "Tour 1, renamed")
    report = agent.scan()
    assert (report.triggers, report.notifies) == (1, 1)
    deliver_until(agent, lambda: len(sandbox.calls) == 2)
    assert sorted(sent(sandbox)) == [
        (ALPHA, "trigger", None, 200),
        (BRAVO, "notify", "s21", 200),
    ]

    # CHARLIE's secret file appears: its rows are read at the next reconciliation.
    sandbox.reset()
    write_secrets(tmp_path / "secrets", {CHARLIE: SECRETS[CHARLIE]})
    time.sleep(1.1)  # the answer "no secret" is kept for up to a second (RECHECK_S)
    report = agent.scan()
    assert (report.triggers, report.notifies) == (1, 2)
    deliver_until(agent, lambda: len(sandbox.calls) == 3)
    assert sent(sandbox)[0] == (CHARLIE, "trigger", None, 200)  # its catalog first
    assert sorted(sent(sandbox)[1:]) == [
        (CHARLIE, "notify", "s31", 200),
        (CHARLIE, "notify", "s32", 200),
    ]

    # A product that moves to another supplier changes both catalogs; a product removed
    # changes its own; slots of a removed product are not closed one by one.
    sandbox.reset()
    platform.move("p1", 2)
    platform.drop_product("p3")
    report = agent.scan()
    deliver_until(agent, lambda: agent.store.admin.stats().pending == 0)
    triggers = sorted(i for i, endpoint, _, _ in sent(sandbox) if endpoint == "trigger")
    assert triggers == [ALPHA, BRAVO, CHARLIE]
    moved = sorted((i, a) for i, endpoint, a, _ in sent(sandbox) if endpoint == "notify")
    assert moved == [(BRAVO, "s11"), (BRAVO, "s12")]


@pytest.mark.parametrize("store", BACKEND_PARAMS)
def test_a_refused_integration_pauses_alone(
    store: str,
    make_platform: Callable[[str], Platform],
    make_platform_agent: Callable[..., Agent],
    seyaha: tuple[Sandbox, dict[str, str]],
    new_database: Callable[[str], str],
    tmp_path: Path,
) -> None:
    sandbox, known = seyaha
    platform = make_platform("sqlite")
    seed(platform)
    known[BRAVO] = "f" * 64  # Seyaha holds another secret for BRAVO than its file
    state_url = f"sqlite:///{tmp_path / 'state.db'}" if store == "sqlite" else new_database(store)
    agent = make_platform_agent(
        base_url=sandbox.url, source_url=platform.url, state_url=state_url, secrets=SECRETS
    )
    agent.scan()  # triggers for the three, BRAVO's refused
    deliver_until(agent, lambda: BRAVO in agent.deliverer.paused)
    assert "401 from Seyaha" in agent.deliverer.paused[BRAVO].reason
    assert agent.deliverer.pause is None  # delivery as a whole goes on

    # While BRAVO is paused (its trigger waiting, older than everything below), the others'
    # bookings flow; BRAVO's own wait.
    platform.book("s11", 1)
    platform.book("s21", 2)
    platform.book("s31", 3)
    agent.scan()
    deliver_until(
        agent,
        lambda: (
            {(i, a) for i, e, a, s in sent(sandbox) if s == 200 and e == "notify"}
            == {(ALPHA, "s11"), (CHARLIE, "s31")}
        ),
    )
    waiting = agent.store.admin.entries(state="pending", integration=BRAVO)
    assert sorted((e.kind, (e.payload or {}).get("availabilityId")) for e in waiting) == [
        ("notify", "s21"),
        ("trigger", None),
    ]
    assert agent.store.admin.pending(besides=[BRAVO]) == 0
    refused = [c for c in sandbox.calls if c.integration == BRAVO]
    assert all(c.status == 401 for c in refused)
    assert (
        agent.store.coordination.status()
        .get(f"pause:{BRAVO}", "")
        .endswith(agent.deliverer.paused[BRAVO].reason)
    )
    assert agent.metrics.integrations_paused._value.get() == 1

    # The secret file is corrected: the next probe carries it, and BRAVO catches up, its
    # trigger before its notify.
    write_secrets(tmp_path / "secrets", {BRAVO: "f" * 64})
    deliver_until(agent, lambda: agent.store.admin.stats().pending == 0)
    assert BRAVO not in agent.deliverer.paused
    accepted = [(e, a) for i, e, a, s in sent(sandbox) if i == BRAVO and s == 200]
    assert accepted == [("trigger", None), ("notify", "s21")]
    assert f"pause:{BRAVO}" not in agent.store.coordination.status()


def test_a_message_without_a_secret_file_waits_and_is_kept(
    make_platform: Callable[[str], Platform],
    make_platform_agent: Callable[..., Agent],
    seyaha: tuple[Sandbox, dict[str, str]],
    tmp_path: Path,
) -> None:
    """A secret file removed after its rows were queued: nothing is sent for that
    integration, nothing is lost, and the file's return resumes it."""
    sandbox, _ = seyaha
    platform = make_platform("sqlite")
    seed(platform)
    agent = make_platform_agent(
        base_url=sandbox.url,
        source_url=platform.url,
        state_url=f"sqlite:///{tmp_path / 'state.db'}",
        secrets=SECRETS,
    )
    agent.scan()
    (tmp_path / "secrets" / ALPHA).unlink()
    deliver_until(agent, lambda: ALPHA in agent.deliverer.paused)
    assert "no usable secret" in agent.deliverer.paused[ALPHA].reason
    deliver_until(agent, lambda: agent.store.admin.pending(besides=[ALPHA]) == 0)
    assert [c.integration for c in sandbox.calls if c.integration == ALPHA] == []
    (kept,) = agent.store.admin.entries(state="pending", integration=ALPHA)
    assert kept.kind == "trigger"
    assert "no secret file" in (kept.last_error or "")
    listing = io.StringIO()
    outbox(
        agent.config.path,
        Namespace(action="list", state="all", limit=50, integration=ALPHA),
        listing,
    )
    (line,) = [x for x in listing.getvalue().splitlines() if "sync/trigger" in x]
    assert line.split()[1] == "paused"
    result = agent.drain(WAIT_S)
    assert result.paused_reason is not None
    assert ALPHA in result.paused_reason
    write_secrets(tmp_path / "secrets", {ALPHA: SECRETS[ALPHA]})
    deliver_until(agent, lambda: agent.store.admin.stats().pending == 0)
    assert [(c.endpoint, c.status) for c in sandbox.calls if c.integration == ALPHA] == [
        ("trigger", 200)
    ]


def test_an_echoed_secret_of_any_integration_is_masked(
    make_platform: Callable[[str], Platform],
    make_platform_agent: Callable[..., Agent],
    tmp_path: Path,
    serve: Callable[..., str],
) -> None:
    """A server that echoes the header it got: the error kept in the outbox never holds the
    secret of the integration the call was for."""

    def echo(handler: BaseHTTPRequestHandler) -> None:
        got = handler.headers.get("x-webhook-secret", "")
        body = f'{{"error": "bad gateway, you sent {got}"}}'.encode()
        handler.send_response(502)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    url = serve(echo)
    platform = make_platform("sqlite")
    seed(platform)
    agent = make_platform_agent(
        base_url=url,
        source_url=platform.url,
        state_url=f"sqlite:///{tmp_path / 'state.db'}",
        secrets=SECRETS,
    )
    agent.scan()
    deliver_until(
        agent,
        lambda: all(e.last_error for e in agent.store.admin.entries(state="pending")),
    )
    errors = [e.last_error or "" for e in agent.store.admin.entries(state="pending")]
    assert len(errors) == 3
    assert all("you sent ***" in e for e in errors)
    assert not any(secret in e for e in errors for secret in SECRETS.values())


def _calls_of(sandbox: Sandbox, integration: str) -> list[Call]:
    with sandbox.lock:
        return [c for c in sandbox.calls if c.integration == integration]


@pytest.mark.parametrize(
    ("store", "busy", "quiet"),
    [
        pytest.param("sqlite", ALPHA, BRAVO, id="sqlite-first-busy"),
        pytest.param("sqlite", CHARLIE, ALPHA, id="sqlite-last-busy"),
        pytest.param("postgresql", CHARLIE, ALPHA, marks=pytest.mark.postgres, id="postgresql"),
        pytest.param("mariadb", CHARLIE, BRAVO, marks=pytest.mark.mariadb, id="mariadb"),
    ],
)
def test_a_backlog_of_one_integration_does_not_hold_back_another(
    store: str,
    busy: str,
    quiet: str,
    make_platform: Callable[[str], Platform],
    make_platform_agent: Callable[..., Agent],
    seyaha: tuple[Sandbox, dict[str, str]],
    new_database: Callable[[str], str],
    tmp_path: Path,
) -> None:
    """One integration has 150 notifies waiting; another's one change, queued after all of
    them, goes out after one batch of the 150, not after all of them (integrations take
    turns), whichever of the two comes first in id order."""
    sandbox, _ = seyaha
    platform = make_platform("sqlite")
    state_url = f"sqlite:///{tmp_path / 'state.db'}" if store == "sqlite" else new_database(store)
    batch = 20
    agent = make_platform_agent(
        base_url=sandbox.url,
        source_url=platform.url,
        state_url=state_url,
        secrets=SECRETS,
        batch_size=batch,
    )
    start = datetime.combine(first_day(), datetime.min.time(), tzinfo=UTC) + timedelta(hours=9)

    def change(integration: str, number: int) -> Message:
        return notify_message(
            Slot(
                product_id=f"p-{integration[:2]}",
                option_id="default",
                availability_id=str(number),
                local_date_time_start=start.isoformat(),
                start_utc=start,
                status="AVAILABLE",
                vacancies=5,
                capacity=10,
                integration_id=integration,
            ),
            "changed",
        )

    now_ms = to_epoch_ms(agent.clock.now())
    with agent.store.connector.write() as conn:
        agent.store.queue.enqueue(conn, [change(busy, n) for n in range(150)], now_ms)
    first = agent.deliverer.step()  # the busy one's turn has begun
    assert first >= 1
    with agent.store.connector.write() as conn:
        agent.store.queue.enqueue(conn, [change(quiet, 0)], now_ms)
    deliver_until(agent, lambda: any(c.integration == quiet for c in sandbox.calls))
    before = [c.integration for c in sandbox.calls].index(quiet)
    # The claim under way, then the turns go round: at most one more claim of the backlog
    # (a platform's claim holds about TURN_S of sending, a single call at the defaults).
    assert before <= first + batch
    deliver_until(agent, lambda: agent.store.admin.stats().pending == 0)
    assert len(_calls_of(sandbox, busy)) == 150


def test_an_integration_that_keeps_failing_opens_its_own_breaker_only(
    make_platform: Callable[[str], Platform],
    make_platform_agent: Callable[..., Agent],
    serve: Callable[..., str],
    tmp_path: Path,
) -> None:
    """Seyaha answers 500 to everything for ALPHA and accepts the others: ALPHA's own
    breaker opens and holds its calls back, the shared one stays closed, the rest flow."""
    answered: list[tuple[str, int]] = []

    def answer(handler: BaseHTTPRequestHandler) -> None:
        integration = handler.path.split("/")[4]
        status = 500 if integration == ALPHA else 200
        answered.append((integration, status))
        reply(handler, status)

    platform = make_platform("sqlite")
    seed(platform)
    agent = make_platform_agent(
        base_url=serve(answer),
        source_url=platform.url,
        state_url=f"sqlite:///{tmp_path / 'state.db'}",
        secrets=SECRETS,
        breaker_failures=2,
        breaker_cooldown=600.0,
        backoff_max=0.05,
        integration_rate_limit=1.0,
    )
    agent.scan()
    for n in (1, 2, 3):
        platform.book(f"s{n}1", 0)
        platform.book(f"s{n}2", 1)
    agent.scan()  # each integration: its trigger (baseline) and two notifies
    deliver_until(agent, lambda: agent.store.admin.pending(besides=[ALPHA]) == 0)
    own = agent.deliverer._breakers[ALPHA]
    assert own.state is BreakerState.OPEN
    assert agent.deliverer.breaker.state is BreakerState.CLOSED
    assert agent.metrics.integrations_breaker_open._value.get() == 1
    tried = [s for i, s in answered if i == ALPHA]
    assert tried == [500, 500]  # two failures opened it; nothing more was sent
    for _ in range(20):
        agent.deliverer.step()
    assert [s for i, s in answered if i == ALPHA] == [500, 500]
    assert len(agent.store.admin.entries(state="pending", integration=ALPHA)) == 3

    # Each integration has its own rate (1 call per second here): one integration's bucket
    # says nothing about another's.
    one, other = "d4" * 12, "e5" * 12
    assert agent.deliverer._wait_for_rate(one) == 0
    assert agent.deliverer._wait_for_rate(one) > 0.5
    assert agent.deliverer._wait_for_rate(other) == 0


def test_a_probe_that_tells_nothing_does_not_leave_the_breaker_half_open(
    make_platform: Callable[[str], Platform],
    make_platform_agent: Callable[..., Agent],
    serve: Callable[..., str],
    tmp_path: Path,
) -> None:
    """ALPHA's calls fail twice (its own breaker opens); after the cooldown its probe is
    refused for good (422: a dead letter, nothing about ALPHA's health). Its other messages
    must still go out, not wait behind a breaker stuck half-open."""
    answers = iter([500, 500, 422])
    got: list[int] = []

    def answer(handler: BaseHTTPRequestHandler) -> None:
        integration = handler.path.split("/")[4]
        status = next(answers, 200) if integration == ALPHA else 200
        if integration == ALPHA:
            got.append(status)
        reply(handler, status)

    platform = make_platform("sqlite")
    seed(platform)
    agent = make_platform_agent(
        base_url=serve(answer),
        source_url=platform.url,
        state_url=f"sqlite:///{tmp_path / 'state.db'}",
        secrets=SECRETS,
        breaker_failures=2,
        breaker_cooldown=0.3,
        backoff_initial=0.01,
        backoff_max=0.01,
    )
    agent.scan()
    platform.book("s11", 0)
    platform.book("s12", 1)
    agent.scan()  # ALPHA: its trigger, then two notifies
    deliver_until(agent, lambda: agent.store.admin.pending(besides=[]) == 0)
    assert got[:3] == [500, 500, 422]
    assert got[3:] == [200, 200]  # the two others went out after the probe
    assert len(agent.store.admin.entries(state="dead", integration=ALPHA)) == 1


def test_a_waiting_notify_follows_its_slot_to_another_integration(
    make_store: Callable[[str], StateStore],
) -> None:
    store = make_store("sqlite")
    start = datetime.combine(first_day(), datetime.min.time(), tzinfo=UTC)

    def state(integration: str, vacancies: int) -> Message:
        return notify_message(
            Slot(
                "p1",
                "default",
                "s1",
                start.isoformat(),
                start,
                "AVAILABLE",
                vacancies,
                10,
                integration,
            ),
            "changed",
        )

    now_ms = to_epoch_ms(datetime.now(UTC))
    with store.connector.write() as conn:
        store.queue.enqueue(conn, [state(ALPHA, 5)], now_ms)
    with store.connector.write() as conn:
        store.queue.enqueue(conn, [state(BRAVO, 4)], now_ms)
    (waiting,) = store.admin.entries(state="pending")
    assert (waiting.integration_id, (waiting.payload or {})["vacancies"]) == (BRAVO, 4)


def test_a_pause_with_nothing_left_to_send_is_lifted(
    make_platform: Callable[[str], Platform],
    make_platform_agent: Callable[..., Agent],
    seyaha: tuple[Sandbox, dict[str, str]],
    tmp_path: Path,
) -> None:
    """ALPHA is paused (no secret file) and its only message goes away (here: delivered by
    hand, as another agent would): the pause ends, in this process and in the store's
    record, instead of `outbox status` reporting it for good."""
    sandbox, _ = seyaha
    platform = make_platform("sqlite")
    seed(platform)
    agent = make_platform_agent(
        base_url=sandbox.url,
        source_url=platform.url,
        state_url=f"sqlite:///{tmp_path / 'state.db'}",
        secrets=SECRETS,
    )
    agent.scan()
    (tmp_path / "secrets" / ALPHA).unlink()
    deliver_until(agent, lambda: ALPHA in agent.deliverer.paused)
    assert f"pause:{ALPHA}" in agent.store.coordination.status()
    agent.refresh_outbox_metrics()
    assert ALPHA in agent.deliverer.paused  # its trigger still waits
    (message,) = agent.store.queue.claim(
        agent.clock.now() + timedelta(hours=1), limit=1, lease_s=60, after=""
    )
    assert message.integration_id == ALPHA
    assert agent.store.queue.complete(message)
    agent.refresh_outbox_metrics()
    assert ALPHA not in agent.deliverer.paused
    assert f"pause:{ALPHA}" not in agent.store.coordination.status()
    assert agent.metrics.integrations_paused._value.get() == 0
