"""Container health check: ``python /opt/chat/healthcheck.py [<service> [path]]``.

Exit 0 when the service inside this container answers, 1 otherwise. Used by the images'
HEALTHCHECK (without arguments: the service named by ``CHAT_SERVICE``, which the image sets)
and by docker-compose.yml. Standard library only for the HTTP services (the
images carry no curl); the AI service is asked over the standard gRPC health protocol
(``grpc.health.v1.Health/Check``) with grpcio, which the image already has.

The port is read from the environment the same way the services read it (first non-empty of
the service's key and its aliases, else the default), so changing a port in ``.env`` does not
break the check. The check always dials 127.0.0.1: the services bind 0.0.0.0 in containers.
"""
from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request

# service -> (port keys in order of precedence, default port)
PORTS: dict[str, tuple[tuple[str, ...], int]] = {
    "gateway": (("GATEWAY_PORT", "SERVER_PORT"), 8000),
    "sessions": (("SESSIONS_PORT",), 8001),
    "files": (("FILES_PORT",), 8002),
    "billing": (("BILLING_PORT",), 8003),
    "ai": (("AI_SERVER_PORT",), 50051),
}
TIMEOUT_SECONDS = float(os.environ.get("HEALTHCHECK_TIMEOUT_SECONDS") or 3)


def port_of(service: str) -> int:
    keys, default = PORTS[service]
    for key in keys:
        value = os.environ.get(key)
        if value:
            return int(value)
    return default


def check_http(port: int, path: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=TIMEOUT_SECONDS) as reply:
            return 200 <= reply.status < 300
    except (urllib.error.URLError, OSError, ValueError) as exc:
        print(f"unhealthy: {exc}", file=sys.stderr)
        return False


def check_grpc(port: int) -> bool:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=TIMEOUT_SECONDS
            )
        except grpc.RpcError as exc:
            print(f"unhealthy: {exc.code()}", file=sys.stderr)
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def main(argv: list[str]) -> int:
    if not argv and os.environ.get("CHAT_SERVICE"):
        argv = [os.environ["CHAT_SERVICE"]]
    if not argv or argv[0] not in PORTS:
        print(f"usage: healthcheck.py {{{'|'.join(PORTS)}}} [path]", file=sys.stderr)
        return 2
    service = argv[0]
    port = port_of(service)
    if service == "ai":
        return 0 if check_grpc(port) else 1
    path = argv[1] if len(argv) > 1 else "/health"
    return 0 if check_http(port, path) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
