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

# `check` connects to the source and the state store and runs both queries on a few rows.
HEALTHCHECK --interval=60s --timeout=30s --start-period=20s --retries=3 \
  CMD ["seyaha-agent", "check", "--config", "/etc/seyaha-agent/seyaha-agent.toml"]

# tini as PID 1 forwards SIGTERM to the agent, which stops cleanly and exits 0.
ENTRYPOINT ["/usr/bin/tini", "--", "seyaha-agent"]
CMD ["run", "--config", "/etc/seyaha-agent/seyaha-agent.toml"]
