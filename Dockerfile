# telemed server image. Untested on the development machines (they have no Docker engine).
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    TELEMED_HOST=0.0.0.0 \
    TELEMED_PORT=8080 \
    TELEMED_DATA_DIR=/var/lib/telemed \
    TELEMED_LOG_FORMAT=json

# Only what the wheels need at run time; curl for the health check.
RUN apt-get update \
    && apt-get install -y --no-install-recommends curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --create-home --home-dir /home/telemed --uid 10001 telemed \
    && install -d -o telemed -g telemed /var/lib/telemed

WORKDIR /opt/telemed
COPY pyproject.toml README.md ./
COPY rooms ./rooms
COPY server ./server
COPY signaling ./signaling
COPY media ./media
COPY web ./web
# As .ci/smoke-run proves on every submission: a plain, non-editable install with no extras.
RUN pip install .

USER telemed
VOLUME ["/var/lib/telemed"]
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD curl -fsS http://127.0.0.1:8080/healthz || exit 1

# Migrations run at start-up too; `telemed db upgrade` applies them ahead of a rollout.
CMD ["telemed", "serve"]
