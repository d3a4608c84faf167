# syntax=docker/dockerfile:1
# referral-service image: gRPC on 50051, HTTP/JSON (and /metrics, /healthz) on 8080.
#
# The base image is pinned by digest (python:3.11.16-slim-bookworm, the multi-platform index of
# 2026-08-25): a rebuild gets the same bytes until someone bumps the line on purpose.
ARG PYTHON_IMAGE=python:3.11.16-slim-bookworm@sha256:0bee7276f83efd4a1ee05bbbf4281d95ed28e079220a9457f25a93e3f1e3c31b

# --- build: the project and its dependencies in a virtualenv ---------------------------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml README.md alembic.ini ./
COPY referral_service ./referral_service
COPY generated ./generated
# the stubs' own distribution (built from generated/), which the server depends on
COPY clients/python ./clients/python
COPY migrations ./migrations
# uvloop (the event loop `serve` uses when it is installed) and OpenTelemetry (off unless
# REFERRAL_TRACING_ENABLED=true; nothing of it is imported otherwise).
RUN /opt/venv/bin/pip install '.[uvloop,tracing]' && /opt/venv/bin/referral-service --version

# --- runtime: the virtualenv, an unprivileged user, nothing else -----------------------------
FROM ${PYTHON_IMAGE} AS runtime
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PATH=/opt/venv/bin:$PATH
COPY --from=build /opt/venv /opt/venv
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin referral \
    && install -d -m 700 -o referral /data
USER 10001
# Listen on every interface of the container; JSON log lines. Workers: one per CPU of the
# container's CPU quota (cgroup) unless REFERRAL_WORKERS says otherwise.
ENV REFERRAL_GRPC_HOST=0.0.0.0 REFERRAL_HTTP_HOST=0.0.0.0 REFERRAL_DATA_DIR=/data REFERRAL_LOG_FORMAT=json
EXPOSE 50051 8080
# `referral-service health` asks /healthz (the metrics port's when REFERRAL_METRICS_PORT is set):
# exit 0 only while SERVING, so a replica that cannot reach its database turns unhealthy.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 CMD ["referral-service", "health"]
STOPSIGNAL SIGTERM
# Migrations run under a PostgreSQL advisory lock: replicas starting together take turns.
CMD ["referral-service", "serve", "--migrate"]
