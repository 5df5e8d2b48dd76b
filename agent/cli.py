"""Argument parsing only: each sub-command calls into agent.commands."""

from __future__ import annotations

import argparse
import os
import re
import sys
from enum import IntEnum
from pathlib import Path

from sqlalchemy.exc import SQLAlchemyError

from agent import __version__
from agent.errors import AgentError, ConfigError, first_line

DEFAULT_ONCE_TIMEOUT_S = 60.0
EXIT_BROKEN_PIPE = 128 + 13
"""What a shell reports for a process its pipe's reader closed on (SIGPIPE is 13)."""
DEFAULT_DEMO_SECONDS = 30.0


class StatusExit(IntEnum):
    """Exit codes of `outbox status`, for cron jobs and container health checks.

    The higher, the more severe: when several conditions hold, the command prints each and
    exits with the highest. 1 (the command failed) and 2 (invalid configuration) keep the
    meaning they have for every command.
    """

    OK = 0
    DEAD_LETTERS = 3
    BREAKER_OPEN = 4
    DAEMON_NOT_READY = 5
    PAUSED = 6


STATUS_EXIT_MEANINGS: tuple[tuple[int, str], ...] = (
    (StatusExit.OK, "delivery is healthy"),
    (1, "the command failed, e.g. the state store cannot be reached"),
    (2, "the configuration is invalid"),
    (StatusExit.DEAD_LETTERS, "dead letters wait for an operator (not counted with --ignore-dead)"),
    (StatusExit.BREAKER_OPEN, "the circuit breaker is open or half-open: Seyaha keeps failing"),
    (
        StatusExit.DAEMON_NOT_READY,
        "with --daemon: the daemon does not answer on [metrics] listen, or /readyz lists problems",
    ),
    (
        StatusExit.PAUSED,
        "delivery is paused: Seyaha refuses the secret or the integration id (on a platform: "
        "of at least one integration)",
    ),
)
"""Each exit code of `outbox status` and its meaning: the --help epilog, and the README table."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="seyaha-agent",
        description="Keeps Seyaha's view of your catalog and availability in step with your database.",
    )
    parser.add_argument("--version", action="version", version=f"seyaha-agent {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_config(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument(
            "--config",
            "-c",
            type=Path,
            required=True,
            metavar="FILE",
            help="the agent's TOML configuration file",
        )
        return sub

    with_config("run", "run the daemon: scan on poll_interval, deliver continuously")
    for name, text in (
        ("once", "scan once, deliver until the outbox is empty or the timeout passes"),
        ("resync", "notify Seyaha of every current slot (a deliberate backfill), then deliver"),
    ):
        sub = with_config(name, text)
        sub.add_argument(
            "--timeout",
            type=float,
            default=DEFAULT_ONCE_TIMEOUT_S,
            metavar="SECONDS",
            help=f"longest time to spend delivering (default {DEFAULT_ONCE_TIMEOUT_S:g})",
        )
    with_config("check", "validate the configuration, the databases and both queries")
    migrate = with_config(
        "migrate",
        "upgrade the state store's schema to this agent's version (every start does it too)",
    )
    migrate.add_argument(
        "--dry-run",
        action="store_true",
        help="show the store's version and the steps; change nothing",
    )
    triggers = with_config(
        "triggers",
        "PostgreSQL: install, remove or print the triggers that wake the agent on a change",
    )
    triggers.add_argument(
        "action",
        choices=("install", "uninstall", "show"),
        help="install or uninstall applies the SQL; show prints it and what is installed",
    )

    outbox = with_config("outbox", "look at and repair the outbox: status, list, retry, purge")
    actions = outbox.add_subparsers(dest="action", required=True, metavar="ACTION")
    status = actions.add_parser(
        "status",
        help="backlog, oldest message, last delivery, breaker, pause; an exit code for health",
        description="Backlog, oldest message, last delivery, circuit breaker and pause, read\n"
        "from the state store (never the source database); the exit code says what is wrong.",
        epilog="exit codes (several at once: the highest):\n"
        + "\n".join(f"  {code:d}  {meaning}" for code, meaning in STATUS_EXIT_MEANINGS),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    status.add_argument(
        "--daemon",
        action="store_true",
        help="also ask the running daemon's /readyz on [metrics] listen (a hung or stopped "
        "daemon, an unreachable source)",
    )
    status.add_argument(
        "--ignore-dead",
        action="store_true",
        help="dead letters are shown but leave the exit code alone (for a health check: they "
        "are an operator's to-do, not a broken daemon)",
    )
    _integration_option(status)
    listing = actions.add_parser("list", help="messages with their state, age and last error")
    _integration_option(listing)
    listing.add_argument(
        "--state", choices=("pending", "dead", "all"), default="all", help="which messages"
    )
    listing.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")
    retry = actions.add_parser("retry", help="put dead letters back in the queue")
    which = retry.add_mutually_exclusive_group(required=True)
    which.add_argument("--id", type=int, nargs="+", dest="ids", help="these message ids")
    which.add_argument("--all-dead", action="store_true", help="every dead letter")
    which.add_argument("--kind", choices=("trigger", "notify"), help="dead letters of one kind")
    _integration_option(retry)
    purge = actions.add_parser("purge", help="delete dead letters")
    _integration_option(purge)
    purge.add_argument("--dead", action="store_true", required=True, help="dead letters")
    purge.add_argument(
        "--older-than", metavar="AGE", help="only those dead for longer, e.g. 7d, 12h, 30m"
    )

    sandbox = commands.add_parser(
        "sandbox",
        help="run a local Seyaha-compatible receiver",
        description="A local receiver that behaves like Seyaha's webhooks and prints each call.",
    )
    sandbox.add_argument("--port", type=int, default=8377, help="port to listen on (default 8377)")
    sandbox.add_argument("--host", default="127.0.0.1", help="address to listen on")
    sandbox.add_argument(
        "--config",
        "-c",
        type=Path,
        metavar="FILE",
        help="take the secret, integration id and catalog (for updated:false) from this config",
    )
    sandbox.add_argument(
        "--secret-file",
        type=Path,
        metavar="FILE",
        help="file holding the secret to expect (else SEYAHA_WEBHOOK_SECRET or --config)",
    )
    sandbox.add_argument(
        "--secrets-dir",
        type=Path,
        metavar="DIR",
        help="several integrations: one file per integration id holding its secret, read at "
        "each call (else [seyaha] webhook_secrets_dir of --config)",
    )

    demo = commands.add_parser(
        "demo",
        help="watch the agent sync a demo inventory to the sandbox",
        description="A demo inventory, the sandbox and the daemon between them, with simulated bookings.",
    )
    demo.add_argument(
        "--seconds",
        type=float,
        default=DEFAULT_DEMO_SECONDS,
        help=f"how long to run (default {DEFAULT_DEMO_SECONDS:g})",
    )
    return parser


def _integration(value: str) -> str:
    text = value.strip().lower()
    if not re.fullmatch(r"[0-9a-f]{24}", text):
        raise argparse.ArgumentTypeError(
            f"{value!r} is not an integration id (24 hexadecimal characters)"
        )
    return text


def _integration_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--integration",
        type=_integration,
        metavar="ID",
        help="only the messages of this integration (a platform's rows name theirs)",
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code = _dispatch(args)
        sys.stdout.flush()  # inside the try: a reader that went away is seen here
        return code
    except AgentError as exc:
        print(f"seyaha-agent: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ConfigError) else 1
    except KeyboardInterrupt:
        return 130
    except SQLAlchemyError as exc:
        # A database failed where no narrower error applies (a read-only state store, a
        # server gone mid-command): one line, not a traceback.
        print(f"seyaha-agent: a database failed: {first_line(exc)}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # The reader went away (`outbox list | head`): stop quietly, as a process killed by
        # SIGPIPE would, instead of a traceback; stdout is pointed at /dev/null so that the
        # interpreter's final flush does not fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE


def _dispatch(args: argparse.Namespace) -> int:
    from agent import commands  # imported late so that --help stays fast

    if args.command == "run":
        return commands.run(args.config)
    if args.command == "once":
        return commands.once(args.config, timeout_s=args.timeout, resync=False)
    if args.command == "resync":
        return commands.once(args.config, timeout_s=args.timeout, resync=True)
    if args.command == "check":
        return commands.check(args.config)
    if args.command == "migrate":
        return commands.migrate(args.config, dry_run=args.dry_run)
    if args.command == "outbox":
        return commands.outbox(args.config, args)
    if args.command == "triggers":
        return commands.triggers(args.config, args.action)
    if args.command == "sandbox":
        return commands.sandbox(
            port=args.port,
            host=args.host,
            config_path=args.config,
            secret_file=args.secret_file,
            secrets_dir=args.secrets_dir,
        )
    if args.command == "demo":
        from agent.demo import run_demo

        return run_demo(seconds=args.seconds)
    raise AssertionError(f"unhandled command {args.command}")
