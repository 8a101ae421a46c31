"""Probes and health checks point at endpoints that exist.

- The HTTP paths used by Kubernetes probes, compose/Docker health checks and the Ingress are
  routes of the service's own Litestar app (``chat_<svc>.app.create_app``).
- deploy/docker/healthcheck.py (every image's HEALTHCHECK) works: against stub servers, and
  against the real gateway and AI service started as processes.
- Ports in probes are the ports the services listen on by default.
"""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
import time
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from .deploy_support import (
    ENV_SAMPLE,
    HEALTHCHECK_SCRIPT,
    HTTP_SERVICES,
    K8S_BASE,
    ROOT,
    SERVICES,
    Svc,
    bind_of,
    containers_of,
    environment,
    find,
    import_or_skip,
    parse_env_file,
    render_kustomization,
    scan_env_keys,
    settings_class,
    workloads,
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def sample_env() -> dict[str, str]:
    """.env.sample with values any test process can use (local hosts, a service token)."""
    env = parse_env_file(ENV_SAMPLE)[0]
    env.update({"SERVICE_TOKEN": "test-token", "JWT_SECRET": "test-secret", "SHUTDOWN_GRACE_SECONDS": "1"})
    return env


def route_paths(svc: Svc) -> set[str]:
    app_module = import_or_skip(f"{svc.module}.app", f"{svc.name} routes not checked")
    keys = set(scan_env_keys().keys)
    with environment(sample_env(), keys):
        app = app_module.create_app()
    return {route.path for route in app.routes}


def probe_paths() -> dict[str, set[str]]:
    """Every HTTP path something outside the code probes, per service."""
    paths: dict[str, set[str]] = {s.name: set() for s in HTTP_SERVICES}
    docs = render_kustomization(K8S_BASE)
    for workload in workloads(docs):
        name = workload["metadata"]["name"]
        for container in containers_of(workload):
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                http = (container.get(probe) or {}).get("httpGet")
                if http and name in paths:
                    paths[name].add(http["path"])
    # compose and the Dockerfiles run `healthcheck.py <svc>`, which GETs /health (the stub
    # server in test_healthcheck_script_http answers 200 on /health only).
    for name in paths:
        paths[name].add("/health")
    return paths


def matches(route: str, request_path: str, prefix: bool) -> bool:
    pattern = re.sub(r"\{[^}]+\}", "[^/]+", route)
    if prefix:
        return route == request_path or route.startswith(request_path.rstrip("/") + "/")
    return re.fullmatch(pattern, request_path) is not None


@pytest.mark.parametrize("svc", HTTP_SERVICES, ids=[s.name for s in HTTP_SERVICES])
def test_probe_paths_are_routes(svc: Svc) -> None:
    routes = route_paths(svc)
    wanted = probe_paths()[svc.name]
    assert {"/health", "/ready"} <= wanted, f"{svc.name}: probes should use /health and /ready, use {wanted}"
    missing = sorted(p for p in wanted if not any(matches(r, p, prefix=False) for r in routes))
    assert not missing, f"{svc.name}: probed paths that are not routes: {missing} (routes: {sorted(routes)})"


def test_ingress_paths_are_gateway_routes() -> None:
    routes = route_paths(SERVICES["gateway"])
    ingress = find(render_kustomization(K8S_BASE), "Ingress", "gateway")
    assert ingress is not None, "an Ingress for the gateway"
    missing = []
    for rule in ingress["spec"]["rules"]:
        for path in rule["http"]["paths"]:
            prefix = path["pathType"] == "Prefix"
            if not any(matches(r, path["path"], prefix) for r in routes):
                missing.append(f"{path['pathType']} {path['path']}")
    assert not missing, (
        f"the Ingress routes paths the gateway does not serve: {missing} (routes: {sorted(routes)})"
    )


@pytest.mark.parametrize("svc", SERVICES.values(), ids=list(SERVICES))
def test_default_ports_are_the_deployed_ports(svc: Svc) -> None:
    """With no configuration a service listens where the Dockerfile, probes and Services
    expect it (deploy_support.SERVICES); the settings code is the judge."""
    try:
        cls = settings_class(svc)
    except ImportError as exc:
        pytest.skip(f"{svc.name} settings not importable yet: {exc}")
    keys = set(scan_env_keys().keys)
    with environment({"SERVICE_TOKEN": "x"}, keys):
        _, port = bind_of(svc, cls.from_env())
    assert port == svc.port


# ------------------------------------------------------------------------ healthcheck.py


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802
        status = 200 if self.path == "/health" else 503
        self.send_response(status)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def run_healthcheck(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not re.match(r"^(GATEWAY|SERVER|SESSIONS|FILES|BILLING|AI_SERVER)_", k)}
    clean.update(env)
    return subprocess.run([sys.executable, str(HEALTHCHECK_SCRIPT), *args], env=clean,
                          capture_output=True, text=True, timeout=30)


def test_healthcheck_script_http() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    port = str(server.server_address[1])
    try:
        assert run_healthcheck(["sessions"], {"SESSIONS_PORT": port}).returncode == 0
        assert run_healthcheck(["gateway"], {"GATEWAY_PORT": port}).returncode == 0
        assert run_healthcheck(["gateway"], {"GATEWAY_PORT": "", "SERVER_PORT": port}).returncode == 0
        # a non-2xx answer and a closed port are unhealthy
        assert run_healthcheck(["billing", "/ready"], {"BILLING_PORT": port}).returncode == 1
        assert run_healthcheck(["files"], {"FILES_PORT": str(free_port())}).returncode == 1
        assert run_healthcheck(["nope"], {}).returncode == 2
    finally:
        server.shutdown()


def test_healthcheck_script_grpc() -> None:
    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        assert run_healthcheck(["ai"], {"AI_SERVER_PORT": str(port)}).returncode == 0
        servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        assert run_healthcheck(["ai"], {"AI_SERVER_PORT": str(port)}).returncode == 1
    finally:
        server.stop(None)
    assert run_healthcheck(["ai"], {"AI_SERVER_PORT": str(free_port())}).returncode == 1


def _start(svc: Svc, env: dict[str, str], log: Path) -> subprocess.Popen:
    if not (ROOT / "services" / svc.name / svc.module / "__main__.py").exists():
        pytest.skip(f"python -m {svc.module} does not exist yet")
    full = {k: v for k, v in os.environ.items() if k not in scan_env_keys().keys}
    full.update(env)
    with log.open("w") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen([sys.executable, "-m", svc.module], env=full, cwd=ROOT,
                                stdout=out, stderr=subprocess.STDOUT)


def _wait_healthy(process: subprocess.Popen, args: list[str], env: dict[str, str], log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the service exited ({process.returncode}):\n{log.read_text()[-3000:]}")
        if run_healthcheck(args, env).returncode == 0:
            return
        time.sleep(0.3)
    pytest.fail(f"healthcheck.py {' '.join(args)} never passed:\n{log.read_text()[-3000:]}")


def _stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def test_healthcheck_against_the_real_gateway(tmp_path: Path) -> None:
    """The gateway's /health answers without its dependencies (liveness must not depend on
    them), and the image's health check command sees it."""
    port = str(free_port())
    env = {**sample_env(), "GATEWAY_HOST": "127.0.0.1", "GATEWAY_PORT": port,
           "REDIS_HOST": "127.0.0.1", "REDIS_PORT": str(free_port()),
           "SESSIONS_URL": f"http://127.0.0.1:{free_port()}", "FILES_URL": f"http://127.0.0.1:{free_port()}",
           "BILLING_URL": f"http://127.0.0.1:{free_port()}", "AI_SERVER_HOST": "127.0.0.1",
           "AI_SERVER_PORT": str(free_port())}
    process = _start(SERVICES["gateway"], env, tmp_path / "gateway.log")
    try:
        _wait_healthy(process, ["gateway"], {"GATEWAY_PORT": port}, tmp_path / "gateway.log")
        # readiness reports the missing dependencies instead
        assert run_healthcheck(["gateway", "/ready"], {"GATEWAY_PORT": port}).returncode == 1
    finally:
        _stop(process)


def test_healthcheck_against_the_real_ai_service(tmp_path: Path) -> None:
    """The AI service serves grpc.health.v1 on its port: the Kubernetes gRPC probes and the
    image's health check can rely on it."""
    port = str(free_port())
    env = {**sample_env(), "AI_SERVER_BIND": "127.0.0.1", "AI_SERVER_PORT": port, "AI_PROVIDER": "offline"}
    process = _start(SERVICES["ai"], env, tmp_path / "ai.log")
    try:
        _wait_healthy(process, ["ai"], {"AI_SERVER_PORT": port}, tmp_path / "ai.log")
    finally:
        _stop(process)
