# syntax=docker/dockerfile:1
# Stage 1: build the wheel.
FROM python:3.12-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY agent ./agent
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

# Stage 2: a slim runtime with the wheel and its dependencies, running as a non-root user.
FROM python:3.12-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends tini \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /var/lib/seyaha-agent --create-home seyaha
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels

ENV SEYAHA_AGENT_SEYAHA__WEBHOOK_SECRET_FILE=/run/secrets/webhook_secret \
    SEYAHA_AGENT_STATE__URL=sqlite:////var/lib/seyaha-agent/state.db \
    SEYAHA_AGENT_METRICS__LISTEN=0.0.0.0:9464 \
    PYTHONUNBUFFERED=1
USER seyaha
WORKDIR /var/lib/seyaha-agent
VOLUME ["/var/lib/seyaha-agent"]
# /metrics, /healthz, /readyz
EXPOSE 9464

# Health is the daemon's own, and never costs the supplier's database a query: `outbox status`
# reads the agent's state store, and --daemon asks the running daemon's /readyz on the listen
# address above (through loopback). Unhealthy while delivery is paused (exit 6), the daemon
# does not answer or is not ready (5: hung, stopped scanning, source or state store
# unreachable), or the circuit breaker is open (4). --ignore-dead: dead letters are an
# operator's to-do (alert SeyahaAgentDeadLetters), not a broken daemon, and a restart would
# not clear them.
HEALTHCHECK --interval=30s --timeout=20s --start-period=30s --retries=3 \
  CMD ["seyaha-agent", "outbox", "--config", "/etc/seyaha-agent/seyaha-agent.toml", "status", "--daemon", "--ignore-dead"]

# tini as PID 1 forwards SIGTERM to the agent, which stops cleanly and exits 0.
ENTRYPOINT ["/usr/bin/tini", "--", "seyaha-agent"]
CMD ["run", "--config", "/etc/seyaha-agent/seyaha-agent.toml"]
