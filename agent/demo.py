"""`seyaha-agent demo`: a demo inventory, the sandbox and the daemon between them.

A SQLite inventory of a few Istanbul tours is created in a temporary folder; simulated
bookings, cancellations, closures, a deleted slot, a price change and a new product are
written to it while the daemon runs, and the sandbox prints each webhook call as it arrives.
At the end the sandbox's view of every slot that changed is compared with the inventory.
"""

from __future__ import annotations

import random
import secrets
import sqlite3
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import TextIO
from zoneinfo import ZoneInfo

from agent.app import Agent
from agent.config import load_config
from agent.db import create_engine
from agent.logs import Redaction, setup_logging
from agent.sandbox import Sandbox
from agent.source.reader import SourceReader

ZONE = "Europe/Istanbul"
DAYS = 10
START_HOURS = (9, 13, 18)
EVENT_EVERY_S = 1.2
"""Pause between two simulated changes: slow enough to follow each one on screen."""

CATALOG_QUERY = """
SELECT p.id AS product_id, o.id AS option_id, p.title, p.price_cents, o.name AS option_name
FROM products p JOIN options o ON o.product_id = p.id
"""
SLOTS_QUERY = """
SELECT o.product_id, s.option_id, s.id AS availability_id, s.starts_at AS local_date_time_start,
       CASE WHEN s.closed = 1 THEN 'CLOSED' END AS status,
       s.capacity - s.booked AS vacancies, s.capacity
FROM slots s JOIN options o ON o.id = s.option_id
"""

PRODUCTS = (
    ("bosphorus-cruise", "Bosphorus Sunset Cruise", 4500, (("sunset", 40), ("day", 60))),
    ("hagia-sophia", "Hagia Sophia Guided Tour", 3000, (("guided-en", 15),)),
    ("museum-pass", "Istanbul Museum Pass", 9900, (("pass", None),)),
)
NEW_PRODUCT = ("cappadocia-balloon", "Cappadocia Balloon Flight", 25000, (("sunrise", 20),))


def create_inventory(path: Path, now_local: datetime) -> None:
    with sqlite3.connect(path) as db:
        db.executescript(
            """
            CREATE TABLE products (id TEXT PRIMARY KEY, title TEXT NOT NULL,
                                   price_cents INTEGER NOT NULL);
            CREATE TABLE options (id TEXT PRIMARY KEY, product_id TEXT NOT NULL, name TEXT);
            CREATE TABLE slots (id INTEGER PRIMARY KEY, option_id TEXT NOT NULL,
                                starts_at TEXT NOT NULL, capacity INTEGER,
                                booked INTEGER NOT NULL DEFAULT 0,
                                closed INTEGER NOT NULL DEFAULT 0);
            """
        )
        for product in PRODUCTS:
            _add_product(db, product, now_local, DAYS)


def _add_product(
    db: sqlite3.Connection,
    product: tuple[str, str, int, tuple[tuple[str, int | None], ...]],
    now_local: datetime,
    days: int,
) -> None:
    product_id, title, price, options = product
    db.execute("INSERT INTO products VALUES (?, ?, ?)", (product_id, title, price))
    first_day = now_local.date() + timedelta(days=1)
    for option, capacity in options:
        option_id = f"{product_id}-{option}"
        db.execute("INSERT INTO options VALUES (?, ?, ?)", (option_id, product_id, option))
        for day in range(days):
            for hour in START_HOURS:
                start = datetime.combine(first_day + timedelta(days=day), datetime.min.time())
                db.execute(
                    "INSERT INTO slots (option_id, starts_at, capacity) VALUES (?, ?, ?)",
                    (option_id, start.replace(hour=hour).isoformat(timespec="seconds"), capacity),
                )


class Simulator:
    """Writes the kinds of change a supplier's booking system makes, one at a time."""

    def __init__(self, path: Path, out: TextIO, rng: random.Random) -> None:
        self.path = path
        self.out = out
        self.rng = rng
        self.changed: set[str] = set()
        self.events = 0
        self.new_product_added = False

    def say(self, text: str) -> None:
        stamp = datetime.now().strftime("%H:%M:%S")
        self.out.write(f"{stamp}  db {text}\n")
        self.out.flush()

    def step(self, now_local: datetime) -> None:
        with sqlite3.connect(self.path) as db:
            actions: list[tuple[int, Callable[[sqlite3.Connection], None]]] = [
                (6, self.book),
                (2, self.cancel),
                (1, self.sell_out),
                (1, self.close),
                (1, self.delete),
                (1, self.reprice),
            ]
            if not self.new_product_added and self.events >= 4:
                self.new_product_added = True
                _add_product(db, NEW_PRODUCT, now_local, 2)
                self.say(f"new product {NEW_PRODUCT[0]} with 6 slots")
                self.events += 1
                return
            weights, choices = zip(*actions, strict=True)
            self.rng.choices(choices, weights=weights)[0](db)
            self.events += 1

    def _pick(self, db: sqlite3.Connection, where: str) -> tuple[int, str, str, int, int] | None:
        # `where` is one of this class's fixed conditions, never outside input.
        row = db.execute(
            "SELECT id, option_id, starts_at, capacity, booked FROM slots "  # noqa: S608
            f"WHERE closed = 0 AND capacity IS NOT NULL AND {where} ORDER BY random() LIMIT 1"
        ).fetchone()
        if row is None:
            return None
        self.changed.add(str(row[0]))
        return (int(row[0]), str(row[1]), str(row[2]), int(row[3]), int(row[4]))

    def book(self, db: sqlite3.Connection) -> None:
        row = self._pick(db, "booked < capacity")
        if row:
            seats = min(self.rng.randint(1, 4), row[3] - row[4])
            db.execute("UPDATE slots SET booked = booked + ? WHERE id = ?", (seats, row[0]))
            self.say(
                f"booking: {seats} seat(s) on {row[1]} {row[2]} ({row[3] - row[4] - seats} left)"
            )

    def cancel(self, db: sqlite3.Connection) -> None:
        row = self._pick(db, "booked > 0")
        if row:
            db.execute("UPDATE slots SET booked = booked - 1 WHERE id = ?", (row[0],))
            self.say(f"cancellation: 1 seat back on {row[1]} {row[2]}")

    def sell_out(self, db: sqlite3.Connection) -> None:
        row = self._pick(db, "booked < capacity")
        if row:
            db.execute("UPDATE slots SET booked = capacity WHERE id = ?", (row[0],))
            self.say(f"group booking sells out {row[1]} {row[2]}")

    def close(self, db: sqlite3.Connection) -> None:
        row = self._pick(db, "1 = 1")
        if row:
            db.execute("UPDATE slots SET closed = 1 WHERE id = ?", (row[0],))
            self.say(f"closure: {row[1]} {row[2]} closed (weather)")

    def delete(self, db: sqlite3.Connection) -> None:
        row = self._pick(db, "1 = 1")
        if row:
            db.execute("DELETE FROM slots WHERE id = ?", (row[0],))
            self.say(f"slot deleted: {row[1]} {row[2]}")

    def reprice(self, db: sqlite3.Connection) -> None:
        product_id, title, price, _ = self.rng.choice(PRODUCTS)
        new_price = price + self.rng.choice((-500, 500, 1000))
        db.execute("UPDATE products SET price_cents = ? WHERE id = ?", (new_price, product_id))
        self.say(f"price change: {title} now {new_price / 100:.2f}")


def _write_config(folder: Path, base_url: str, secret: str) -> Path:
    secret_file = folder / "webhook_secret"
    secret_file.write_text(secret + "\n", encoding="utf-8")
    secret_file.chmod(0o600)
    config = folder / "seyaha-agent.toml"
    config.write_text(
        f"""
[seyaha]
base_url = "{base_url}"
integration_id = "64a1b2c3d4e5f6a7b8c9d0e1"
webhook_secret_file = "webhook_secret"

[source]
url = "sqlite:///inventory.db"
poll_interval = 0.5
timezone = "{ZONE}"
catalog_query = \"\"\"{CATALOG_QUERY}\"\"\"
slots_query = \"\"\"{SLOTS_QUERY}\"\"\"

[state]
url = "sqlite:///state.db"

[log]
level = "WARNING"
format = "text"
""",
        encoding="utf-8",
    )
    return config


def run_demo(seconds: float, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    rng = random.Random(7)
    secret = secrets.token_hex(32)
    with tempfile.TemporaryDirectory(prefix="seyaha-demo-") as tmp:
        folder = Path(tmp)
        now_local = datetime.now(ZoneInfo(ZONE)).replace(tzinfo=None)
        create_inventory(folder / "inventory.db", now_local)
        catalog_reader = SourceReader(
            create_engine(f"sqlite:///{folder / 'inventory.db'}", role="source"),
            catalog_query=CATALOG_QUERY,
            slots_query=SLOTS_QUERY,
            timezone=ZoneInfo(ZONE),
        )
        sandbox = Sandbox(
            secret=secret,
            integration_id="64a1b2c3d4e5f6a7b8c9d0e1",
            catalog=catalog_reader.catalog_keys,
            out=out,
        ).start()
        config = load_config(_write_config(folder, sandbox.url, secret))
        setup_logging(level="WARNING", fmt="text", redaction=Redaction([secret]))
        agent = Agent(config)
        agent.open()
        out.write(
            f"Demo inventory: {folder / 'inventory.db'}\n"
            f"Sandbox (Seyaha stand-in): {sandbox.url}\n"
            f"The agent scans every 0.5 s; running for {seconds:g} s (Ctrl-C stops).\n\n"
        )
        out.flush()
        stop = threading.Event()
        daemon = threading.Thread(target=agent.run, args=(stop,), name="agent", daemon=True)
        daemon.start()
        simulator = Simulator(folder / "inventory.db", out, rng)
        deadline = time.monotonic() + seconds
        interrupted = False
        try:
            time.sleep(min(2.0, seconds / 4))  # let the baseline go out first
            while time.monotonic() < deadline - 2.0:
                simulator.step(datetime.now(ZoneInfo(ZONE)).replace(tzinfo=None))
                time.sleep(EVENT_EVERY_S)
            time.sleep(max(0.0, min(2.0, deadline - time.monotonic())))
        except KeyboardInterrupt:
            interrupted = True
        stop.set()
        daemon.join(30)
        sandbox.stop()
        matched, total = _compare(agent, sandbox, simulator.changed)
        agent.close()
        catalog_reader.engine.dispose()
        triggers = sum(1 for c in sandbox.calls if c.endpoint == "trigger")
        notifies = sum(1 for c in sandbox.calls if c.endpoint == "notify")
        out.write(
            "\nSummary\n"
            f"  database changes simulated: {simulator.events}\n"
            f"  calls received by the sandbox: {triggers} sync/trigger, {notifies} availability/notify\n"
            f"  slots changed in the database whose last state reached the sandbox "
            f"correctly: {matched}/{total}\n"
        )
        if interrupted:
            out.write("  (stopped early by Ctrl-C)\n")
        out.write(
            "\nNext: copy config.example.toml, point [source] at your database, run "
            "`seyaha-agent check --config FILE`, then `seyaha-agent sandbox --config FILE` and "
            "`seyaha-agent run --config FILE` side by side.\n"
        )
        out.flush()
        return 0 if matched == total else 1


def _compare(agent: Agent, sandbox: Sandbox, changed: set[str]) -> tuple[int, int]:
    """How many changed slots the sandbox last saw in their current state (or CLOSED)."""
    current = {s.availability_id: s.payload() for s in agent.reader.read().slots}
    received = {key[2]: body for key, body in sandbox.slots.items()}
    matched = 0
    for slot_id in changed:
        seen = received.get(slot_id)
        expected = current.get(slot_id)
        if expected is None:
            matched += seen is not None and seen.get("status") == "CLOSED"
        else:
            matched += seen == expected
    return matched, len(changed)
