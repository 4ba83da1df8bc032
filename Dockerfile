# syntax=docker/dockerfile:1
#
# chatnode image: one node (HTTP API on 8080, WebSocket gateway on 8765, path /ws).
#   docker build -t chatnode .
#   docker run --rm -e CHATNODE_JWT_SECRET=... -e CHATNODE_REDIS_URL=... \
#       -e CHATNODE_DATABASE_URL=... -p 8080:8080 -p 8765:8765 chatnode
# `chatnode migrate` applies the schema (see compose.yaml). CHATNODE_JWT_SECRET must be
# 32+ random bytes (openssl rand -hex 32). CHATNODE_METRICS_PORT moves /metrics off the
# HTTP port to one you do not publish (compose uses 9100).

# ---- build: install the package and its dependencies into a venv -------------------
FROM python:3.11-slim AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /src
COPY pyproject.toml schema.sql ./
COPY chatnode/ chatnode/
# chatnode/schema.sql is a symlink to ../schema.sql; make it a real file so it is
# shipped as package data whatever the build backend does with symlinks.
RUN cp --remove-destination schema.sql chatnode/schema.sql \
 && python -m venv /opt/venv \
 && /opt/venv/bin/pip install . \
 && /opt/venv/bin/python -c "import importlib.resources as r; assert r.files('chatnode').joinpath('schema.sql').read_text()"

# ---- runtime --------------------------------------------------------------------------
FROM python:3.11-slim

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN useradd --system --user-group --uid 10001 --create-home --home-dir /home/chatnode \
        --shell /usr/sbin/nologin chatnode

COPY --from=build /opt/venv /opt/venv

USER chatnode:chatnode
WORKDIR /home/chatnode

EXPOSE 8080 8765

# Liveness: /healthz answers 200 while the process runs. Honors CHATNODE_HTTP_PORT when
# the port is moved by environment; urlopen raises (exit 1) on refusal or non-2xx.
HEALTHCHECK --interval=10s --timeout=3s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('CHATNODE_HTTP_PORT', '8080'), timeout=2)"]

# Exec form: chatnode is PID 1 and gets SIGTERM directly (it drains, closes sockets
# with 1012 and exits 0).
STOPSIGNAL SIGTERM
CMD ["chatnode", "serve", "--host", "0.0.0.0"]
