"""``make run``: the whole system on this machine, reusing the data of the previous run.

PostgreSQL, Redis and the S3 store are taken from the environment when given (``DATABASE_URL``
or ``DB_HOST``; ``REDIS_URL`` or ``REDIS_HOST``; ``S3_ENDPOINT``), otherwise started from the
pip-installed servers with their data under ``DATA_DIR``. Ctrl-C stops every process started.
"""
from __future__ import annotations

import signal
import sys
import time
import urllib.error
from pathlib import Path

from chat_common.settings import database_url, env_int, env_str
from devstack.servers import port_is_free
from devstack.stack import Infrastructure, Ports, Stack, wait_ready

DEFAULT_DEMO_USER_ID = "6f0e0a52-3c5e-4a8e-9d43-7d6a1c0de001"


def _infrastructure() -> Infrastructure:
    infra = Infrastructure()
    if env_str("DATABASE_URL") or env_str("DB_HOST"):
        infra.database_url = database_url().replace("postgresql+asyncpg://", "postgresql://")
    if env_str("REDIS_URL") or env_str("REDIS_HOST"):
        from chat_gateway.settings import redis_url

        infra.redis_url = redis_url()
    if env_str("S3_ENDPOINT"):
        infra.s3_endpoint = env_str("S3_ENDPOINT")
        infra.s3_access_key = env_str("S3_ACCESS_KEY")
        infra.s3_secret_key = env_str("S3_SECRET_KEY")
    return infra


def ensure_demo_user(stack: Stack) -> str:
    user_id = env_str("DEMO_USER_ID", DEFAULT_DEMO_USER_ID)
    try:
        stack.admin("GET", f"/v1/users/{user_id}")
        return user_id
    except urllib.error.HTTPError as exc:
        if exc.code != 404:
            raise
    models = [int(m) for m in env_str("DEMO_USER_MODELS", "4,5,8").split(",") if m.strip()]
    return stack.create_user(
        env_str("DEMO_USER_NAME", "Demo User"), models, float(env_str("DEMO_USER_BALANCE", "1")), user_id
    )


def main() -> int:
    data_dir = Path(env_str("DATA_DIR", ".data")).resolve()
    ports = Ports(
        gateway=env_int("GATEWAY_PORT", 8000, "SERVER_PORT"),
        sessions=env_int("SESSIONS_PORT", 8001),
        files=env_int("FILES_PORT", 8002),
        billing=env_int("BILLING_PORT", 8003),
        ai=env_int("AI_SERVER_PORT", 50051),
    )
    busy = [f"{name}={port}" for name, port in vars(ports).items() if not port_is_free(port)]
    if busy:
        print(f"ports already in use: {', '.join(busy)} (set GATEWAY_PORT, SESSIONS_PORT, FILES_PORT, "
              "BILLING_PORT, AI_SERVER_PORT to others)", file=sys.stderr)
        return 1
    local_ports = {
        "postgres": env_int("LOCAL_POSTGRES_PORT", 5442),
        "redis": env_int("LOCAL_REDIS_PORT", 6390),
        "s3": env_int("LOCAL_S3_PORT", 8333),
        "master_port": env_int("LOCAL_S3_MASTER_PORT", 9334),
        "volume_port": env_int("LOCAL_S3_VOLUME_PORT", 8084),
        "filer_port": env_int("LOCAL_S3_FILER_PORT", 8889),
    }
    stack = Stack(data_dir, ports=ports, infra=_infrastructure(), local_ports=local_ports,
                  service_token=env_str("SERVICE_TOKEN"))

    stopping = {"now": False}

    def request_stop(signum: int, _frame: object) -> None:
        stopping["now"] = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    try:
        print(f"starting the system (data in {data_dir}) ...", flush=True)
        stack.start()
        wait_ready(stack.gateway_url, timeout=60)
        demo_user = ensure_demo_user(stack)
        print(
            "\nchat-backend is up\n"
            f"  gateway   {stack.gateway_url}  (WebSocket ws://127.0.0.1:{ports.gateway}/ws)\n"
            f"  demo user {demo_user}\n"
            f"  logs      {data_dir}/run/*.log\n"
            "Press Ctrl-C to stop.",
            flush=True,
        )
        while not stopping["now"]:
            for name, process in stack.services.items():
                if process.process is not None and process.process.poll() is not None:
                    print(f"{name} exited ({process.process.returncode}); log tail:\n{process.log_tail()}",
                          file=sys.stderr)
                    stopping["now"] = True
            time.sleep(0.5)
    except Exception as exc:  # noqa: BLE001 - report and stop whatever started
        print(f"failed to start: {exc}", file=sys.stderr)
        for name, process in stack.services.items():
            print(f"--- {name} log tail ---\n{process.log_tail()}", file=sys.stderr)
        stack.stop()
        return 1
    print("stopping ...", flush=True)
    stack.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
