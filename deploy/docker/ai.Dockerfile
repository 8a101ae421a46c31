# syntax=docker/dockerfile:1
# Image of the reference AI service (gRPC, grpc.health.v1 on the same port).
# Build from the repository root (docker compose does this for every service):
#   docker build -f deploy/docker/ai.Dockerfile -t chat-backend/ai:0.1.0 .
# Runs exactly what a local run runs: `python -m chat_ai`.

# ---- builder: a virtualenv with the project and its pinned dependencies ----------------------
FROM python:3.11.13-slim-bookworm AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# Dependencies first, in a layer of their own: cached until pyproject.toml changes.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt
# Then the project itself (one distribution: every service package, the generated gRPC code,
# the SQL migrations). All images carry all packages; each runs its own entry point.
COPY services ./services
COPY tools ./tools
COPY proto ./proto
RUN pip install --no-deps . \
 && python -c "import chat_ai"

# ---- runtime: slim, no build tools, non-root ------------------------------------------------
FROM python:3.11.13-slim-bookworm AS runtime
LABEL org.opencontainers.image.title="chat-backend/ai" \
      org.opencontainers.image.description="the reference AI service (gRPC, grpc.health.v1 on the same port)"
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    AI_SERVER_BIND=0.0.0.0
RUN groupadd --system --gid 10001 chat \
 && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home \
            --shell /usr/sbin/nologin chat
COPY --from=builder /opt/venv /opt/venv
COPY deploy/docker/healthcheck.py /opt/chat/healthcheck.py
WORKDIR /opt/chat
USER 10001:10001
EXPOSE 50051
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "/opt/chat/healthcheck.py", "ai"]
CMD ["python", "-m", "chat_ai"]
