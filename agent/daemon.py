"""The daemon process: one Agent at a time, inside what outlives it.

What outlives a reload: the metrics registry and the operations listener (/metrics,
/healthz, /readyz), logging, the signal handlers. A reload (SIGHUP, or a change of the
configuration file or the secret file) validates the new configuration first: an invalid one
is rejected with the reason and the running agent carries on untouched; a valid one replaces
the agent after a clean stop. The outbox lives in the state store, so nothing is lost.

A SQLite state file deleted, replaced or emptied under the agent stops the daemon with exit 1
and the reason (agent.store.identity): going on would write into a file that is gone. The
restart (systemd, Docker) then resends every slot if the store it finds holds no baseline
(Agent.open).
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from types import FrameType

import watchfiles
from prometheus_client import CollectorRegistry

from agent import collector, systemd
from agent.app import Agent
from agent.config import Config, listen_address, load_config, secret_warnings
from agent.endpoints import OperationsServer
from agent.errors import AgentError, ConfigError
from agent.logs import Redaction, event, setup_logging
from agent.metrics import Metrics
from agent.store.identity import StateFileLost

log = logging.getLogger("agent")

FILE_DEBOUNCE_MS = 300
"""Editors write a file in several steps; changes closer than this are one reload."""


class Daemon:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.stop = threading.Event()
        self.reload = threading.Event()
        self._changed = threading.Event()
        # Before anything is logged: a SIGTERM sent as soon as the first line shows (a
        # supervisor stopping a unit that just started) is a clean stop, not a kill.
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, self._signal)
        self.config = load_config(path)
        self.redaction = Redaction([self.config.secret.reveal()])
        log_settings = self.config.settings.log
        setup_logging(level=log_settings.level, fmt=log_settings.format, redaction=self.redaction)
        self._warn_about(self.config)
        self.metrics = Metrics(CollectorRegistry())
        self.agent: Agent | None = None
        self.listener: OperationsServer | None = None
        self.state_lost: StateFileLost | None = None
        """Why the daemon stops by itself: its state file was lost (said once, as state.lost)."""

    @staticmethod
    def _warn_about(config: Config) -> None:
        for doubt in secret_warnings(config.secret, config.settings.seyaha.webhook_secret_file):
            event(log, logging.WARNING, "config.secret_doubt", doubt)

    def _readiness(self) -> list[str]:
        agent = self.agent
        return ["reloading the configuration"] if agent is None else agent.readiness()

    def _signal(self, signum: int, _frame: FrameType | None) -> None:
        if signum == signal.SIGHUP:
            self.reload.set()
        else:
            self.stop.set()
        self._changed.set()

    def _watch_files(self) -> None:
        """Ask for a reload when the configuration file or the secret file changes."""
        watched = {str(self.path.resolve())}
        secret_file = self.config.settings.seyaha.webhook_secret_file
        if secret_file is not None:
            watched.add(str(secret_file.resolve()))
        folders = {Path(p).parent for p in watched}
        try:
            for _ in watchfiles.watch(
                *folders,
                watch_filter=lambda _change, p: p in watched,
                debounce=FILE_DEBOUNCE_MS,
                stop_event=self.stop,
                recursive=False,
                rust_timeout=1000,
            ):
                event(log, logging.INFO, "config.changed", "configuration file changed")
                self.reload.set()
                self._changed.set()
        except Exception:
            log.exception(
                "watching the configuration file stopped; SIGHUP still reloads",
                extra={"event": "config.watch_failed"},
            )

    def _start_listener(self) -> None:
        listen = self.config.settings.metrics.listen
        address = listen_address(listen) if listen else None
        if address is None:
            return
        self.listener = OperationsServer(*address, self.metrics.registry, self._readiness).start()
        host, port = self.listener.address
        event(
            log,
            logging.INFO,
            "metrics.listening",
            f"/metrics, /healthz and /readyz on http://{host}:{port}",
            host=host,
            port=port,
        )

    def _state_file_lost(self, lost: StateFileLost) -> None:
        self.state_lost = lost
        self.stop.set()
        self._changed.set()

    def _start_agent(self) -> tuple[Agent, threading.Event, threading.Thread]:
        agent = Agent(self.config, metrics=self.metrics, on_state_lost=self._state_file_lost)
        agent.open()
        collector.settle()  # once per process: a reload's agent finds it done
        stop = threading.Event()
        thread = threading.Thread(target=agent.run, args=(stop,), name="agent", daemon=True)
        thread.start()
        self.agent = agent
        return agent, stop, thread

    def _try_reload(self) -> Config | None:
        """The new configuration if it is valid and different, else None (and say why)."""
        try:
            config = load_config(self.path)
        except ConfigError as exc:
            event(
                log,
                logging.ERROR,
                "config.reload_rejected",
                f"new configuration rejected, the running one stays in force: {exc}",
            )
            return None
        if config.settings == self.config.settings and config.secret == self.config.secret:
            event(log, logging.INFO, "config.unchanged", "configuration unchanged")
            return None
        if config.settings.metrics != self.config.settings.metrics:
            event(
                log,
                logging.WARNING,
                "config.restart_needed",
                "[metrics] listen changed: the listener moves at the next restart",
            )
        return config

    def run(self) -> int:
        agent, agent_stop, thread = self._start_agent()  # first: it refuses a second agent
        try:
            self._start_listener()
            watcher = threading.Thread(target=self._watch_files, name="config-watch", daemon=True)
            watcher.start()
            while not self.stop.is_set():
                self._changed.wait()
                self._changed.clear()
                if self.stop.is_set() or not self.reload.is_set():
                    continue
                self.reload.clear()
                systemd.notify("RELOADING=1")
                config = self._try_reload()
                if config is not None:
                    agent_stop.set()
                    thread.join()
                    agent.close()
                    self.agent = None
                    self.config = config
                    self.redaction.add(config.secret.reveal())
                    self._warn_about(config)
                    agent, agent_stop, thread = self._start_agent()
                    event(log, logging.INFO, "config.reloaded", "configuration reloaded")
                systemd.notify("READY=1")
            if self.state_lost is not None:
                # The agent stops cleanly below (finally); the CLI then prints why, exit 1.
                raise self.state_lost
        except AgentError:
            agent_stop.set()
            raise
        finally:
            agent_stop.set()
            thread.join()
            agent.close()
            if self.listener is not None:
                self.listener.stop()
        return 0
