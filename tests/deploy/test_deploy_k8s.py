"""deploy/k8s: every manifest validates against the Kubernetes 1.30 schemas offline (file by
file, and as rendered by each kustomization), and the rendered objects fit together: names
referenced exist, Services select pods and reach their ports, probes and security settings
are there, NetworkPolicies let in exactly what the design says, and the configuration names
Services that exist in each overlay."""
from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from .deploy_support import (
    CONFIGMAP_NAME,
    DB_SERVICES,
    K8S_BASE,
    K8S_DIR,
    K8S_OVERLAYS,
    ROOT,
    SECRET_NAME,
    SERVICES,
    bind_of,
    by_kind,
    config_env,
    containers_of,
    environment,
    find,
    k8s_manifest_files,
    kustomize_command,
    load_docs,
    load_yaml,
    merge_patch,
    pod_labels,
    pod_spec,
    render_kustomization,
    render_with_kustomize,
    resolve_port,
    scan_env_keys,
    secret_template_data,
    selector_matches,
    settings_class,
    validate_k8s,
    workloads,
)

KUSTOMIZATIONS = [K8S_BASE, *K8S_OVERLAYS]
OVERLAYS = K8S_OVERLAYS
COMPONENT = "app.kubernetes.io/component"
INFRA_PORTS = {"postgres": 5432, "redis": 6379, "minio": 9000}


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def test_overlays_exist() -> None:
    names = {p.name for p in OVERLAYS}
    assert "dev" in names, "overlays/dev is required"


# ------------------------------------------------------------------------ schema validation


def patch_users() -> dict[Path, Path]:
    """Patch file -> the kustomization directory that applies it."""
    users = {}
    for kfile in K8S_DIR.rglob("kustomization.yaml"):
        for patch in load_yaml(kfile).get("patches", []):
            if "path" in patch:
                users[(kfile.parent / patch["path"]).resolve()] = kfile.parent
    return users


@pytest.mark.parametrize("path", k8s_manifest_files(), ids=rel)
def test_manifest_file_validates(path: Path) -> None:
    docs = load_docs(path)
    assert docs, f"{path} holds no document"
    user = patch_users().get(path.resolve())
    for doc in docs:
        if user is None:
            validate_k8s(doc, rel(path))
            continue
        # A strategic-merge patch is a fragment: validate it merged into the object it
        # patches (it must find one).
        target = find(render_kustomization(user), doc["kind"], doc["metadata"]["name"])
        assert target is not None, f"{rel(path)}: patches {doc['kind']}/{doc['metadata']['name']}, which {rel(user)} does not have"
        validate_k8s(merge_patch(target, doc), f"{rel(path)} applied by {rel(user)}")


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=rel)
def test_rendered_kustomization_validates(directory: Path) -> None:
    docs = render_kustomization(directory)
    assert docs
    seen = set()
    for doc in docs:
        validate_k8s(doc, f"rendered {rel(directory)}")
        key = (doc["kind"], doc["metadata"].get("namespace"), doc["metadata"]["name"])
        assert key not in seen, f"{key} defined twice"
        seen.add(key)


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=rel)
def test_python_rendering_matches_kustomize(directory: Path) -> None:
    """The Python renderer the other tests use gives what kustomize gives."""
    if kustomize_command() is None:
        pytest.skip("neither kustomize nor kubectl is installed: rendered only by the Python renderer")
    ours = sorted(json.dumps(d, sort_keys=True) for d in render_kustomization(directory))
    theirs = sorted(json.dumps(d, sort_keys=True) for d in render_with_kustomize(directory))
    assert ours == theirs


def test_every_manifest_file_is_used() -> None:
    """A manifest no kustomization lists is never applied (the Secret template excepted)."""
    listed: set[Path] = set()
    for kfile in K8S_DIR.rglob("kustomization.yaml"):
        spec = load_yaml(kfile)
        for entry in spec.get("resources", []) + [p["path"] for p in spec.get("patches", [])]:
            listed.add((kfile.parent / entry).resolve())
    unused = [rel(p) for p in k8s_manifest_files() if p.resolve() not in listed and p.name != "secret.example.yaml"]
    assert not unused, f"manifests no kustomization uses: {unused}"


# ------------------------------------------------------------------------ rendered objects


@pytest.fixture(scope="module", params=KUSTOMIZATIONS, ids=rel)
def rendered(request) -> tuple[Path, list[dict]]:
    return request.param, render_kustomization(request.param)


def deployment(docs: list[dict], name: str) -> dict:
    doc = find(docs, "Deployment", name)
    assert doc is not None, f"Deployment {name} missing"
    return doc


def test_a_deployment_and_service_per_service(rendered) -> None:
    _, docs = rendered
    for svc in SERVICES.values():
        dep = deployment(docs, svc.name)
        service = find(docs, "Service", svc.name)
        assert service is not None, f"Service {svc.name} missing"
        assert selector_matches(dep["spec"]["selector"], pod_labels(dep)), f"{svc.name}: selector does not match its pods"
        container = dep["spec"]["template"]["spec"]["containers"][0]
        image = container["image"]
        assert image.rsplit("/", 2)[-2:][0] == "chat-backend" and image.rsplit("/", 1)[-1].startswith(f"{svc.name}:"), image
        assert ":latest" not in image and ":" in image.rsplit("/", 1)[-1]


def test_services_select_pods_and_reach_their_ports(rendered) -> None:
    _, docs = rendered
    pods = [w for w in workloads(docs) if w["kind"] in ("Deployment", "StatefulSet")]
    for service in by_kind(docs, "Service"):
        if service["spec"].get("type") == "ExternalName":
            continue
        selected = [w for w in pods if selector_matches(service["spec"]["selector"], pod_labels(w))]
        assert len(selected) == 1, f"Service {service['metadata']['name']} selects {len(selected)} workloads"
        container = selected[0]["spec"]["template"]["spec"]["containers"][0]
        for port in service["spec"]["ports"]:
            target = resolve_port(container, port.get("targetPort", port["port"]))
            declared = [p["containerPort"] for p in container.get("ports", [])]
            assert target in declared, f"Service {service['metadata']['name']}: targetPort {port.get('targetPort')} not a container port"


def test_references_exist(rendered) -> None:
    """envFrom / valueFrom names and keys exist (the Secret: in the template)."""
    _, docs = rendered
    configmap = find(docs, "ConfigMap", CONFIGMAP_NAME)
    assert configmap is not None
    configmaps = {d["metadata"]["name"]: set(d.get("data") or {}) for d in by_kind(docs, "ConfigMap")}
    secrets = {SECRET_NAME: set(secret_template_data())}
    for workload in workloads(docs):
        for container in containers_of(workload):
            where = f"{workload['kind']}/{workload['metadata']['name']}/{container['name']}"
            for source in container.get("envFrom") or []:
                if "configMapRef" in source:
                    assert source["configMapRef"]["name"] in configmaps, where
                if "secretRef" in source:
                    assert source["secretRef"]["name"] in secrets, where
            for var in container.get("env") or []:
                ref = var.get("valueFrom") or {}
                if "configMapKeyRef" in ref:
                    r = ref["configMapKeyRef"]
                    assert r["key"] in configmaps.get(r["name"], set()), f"{where}: {r}"
                if "secretKeyRef" in ref:
                    r = ref["secretKeyRef"]
                    assert r["key"] in secrets.get(r["name"], set()), f"{where}: {r}"


def test_service_pods_are_hardened_and_sized(rendered) -> None:
    _, docs = rendered
    for workload in workloads(docs):
        spec = pod_spec(workload)
        name = f"{workload['kind']}/{workload['metadata']['name']}"
        assert spec is not None, f"{name}: a pod template"
        assert spec.get("securityContext", {}).get("runAsNonRoot") is True, f"{name}: runAsNonRoot"
        # Services named sessions, redis... would inject SESSIONS_PORT=tcp://... and friends,
        # which the services read as integers.
        assert spec.get("enableServiceLinks") is False, f"{name}: enableServiceLinks must be false"
        assert spec.get("automountServiceAccountToken") is False, f"{name}: no API token needed"
        for container in containers_of(workload):
            where = f"{name}/{container['name']}"
            resources = container.get("resources") or {}
            for part in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(resources.get(part) or {}), f"{where}: resources.{part}"
            security = container.get("securityContext") or {}
            assert security.get("allowPrivilegeEscalation") is False, where
            assert "ALL" in (security.get("capabilities") or {}).get("drop", []), where
            if container["image"].split("/")[-2:][0] == "chat-backend":
                assert security.get("readOnlyRootFilesystem") is True, f"{where}: read-only root filesystem"
                mounts = {m["mountPath"] for m in container.get("volumeMounts") or []}
                assert "/tmp" in mounts, f"{where}: a writable /tmp with a read-only root"


def test_probes(rendered) -> None:
    _, docs = rendered
    for svc in SERVICES.values():
        container = deployment(docs, svc.name)["spec"]["template"]["spec"]["containers"][0]
        ports = [p["containerPort"] for p in container["ports"]]
        assert ports == [svc.port], f"{svc.name}: container ports {ports}, the service listens on {svc.port}"
        for probe_name in ("readinessProbe", "livenessProbe"):
            probe = container.get(probe_name)
            assert probe, f"{svc.name}: no {probe_name}"
            if svc.kind == "grpc":
                assert "grpc" in probe, f"{svc.name}: {probe_name} must use the gRPC health protocol"
                assert probe["grpc"]["port"] == svc.port
                assert probe["grpc"].get("service", "") == ""
            else:
                expected = "/ready" if probe_name == "readinessProbe" else "/health"
                assert probe.get("httpGet", {}).get("path") == expected, f"{svc.name}: {probe_name} on {expected}"
                assert resolve_port(container, probe["httpGet"]["port"]) == svc.port


def test_configuration_binds_and_reaches(rendered) -> None:
    """Each service's own settings code, run with the ConfigMap (+ Secret template) as its
    environment, listens on 0.0.0.0 at its Deployment's container port."""
    _, docs = rendered
    env = config_env(docs)
    keys = set(scan_env_keys().keys)
    skipped = []
    for svc in SERVICES.values():
        try:
            cls = settings_class(svc)
        except ImportError as exc:
            skipped.append(f"{svc.name} ({exc})")
            continue
        with environment(env, keys):
            host, port = bind_of(svc, cls.from_env())
        container = deployment(docs, svc.name)["spec"]["template"]["spec"]["containers"][0]
        assert host == "0.0.0.0", f"{svc.name} would bind {host!r}"
        assert port == container["ports"][0]["containerPort"], f"{svc.name}: listens on {port}"
    assert env["MIGRATE_ON_START"] == "false", "the chat-migrate Job applies migrations"
    if skipped:
        pytest.skip(f"settings not importable yet, not checked: {skipped}")


def test_hpa_and_pdb_for_the_gateway(rendered) -> None:
    _, docs = rendered
    gateway = deployment(docs, "gateway")
    hpas = by_kind(docs, "HorizontalPodAutoscaler")
    assert [h["spec"]["scaleTargetRef"] for h in hpas] == [{"apiVersion": "apps/v1", "kind": "Deployment", "name": "gateway"}]
    assert 1 <= hpas[0]["spec"]["minReplicas"] <= hpas[0]["spec"]["maxReplicas"]
    assert "replicas" not in gateway["spec"], "the autoscaler owns the gateway's replica count"
    pdbs = by_kind(docs, "PodDisruptionBudget")
    assert len(pdbs) == 1 and selector_matches(pdbs[0]["spec"]["selector"], pod_labels(gateway))
    grace = gateway["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > int(config_env(docs).get("SHUTDOWN_GRACE_SECONDS") or 10), "sockets need time to drain"


def test_migration_job(rendered) -> None:
    _, docs = rendered
    jobs = [j for j in by_kind(docs, "Job") if j["metadata"]["name"] == "chat-migrate"]
    assert len(jobs) == 1
    container = jobs[0]["spec"]["template"]["spec"]["containers"][0]
    script = " ".join(container.get("command", []) + container.get("args", []))
    for svc in DB_SERVICES:
        assert f"python -m chat_{svc} migrate" in script
    assert "chat-backend/" in container["image"]
    assert jobs[0]["spec"]["template"]["spec"]["restartPolicy"] in ("OnFailure", "Never")


def test_ingress_for_the_gateway(rendered) -> None:
    _, docs = rendered
    ingresses = by_kind(docs, "Ingress")
    assert len(ingresses) == 1
    ingress = ingresses[0]
    notes = ingress["metadata"].get("annotations") or {}
    assert int(notes["nginx.ingress.kubernetes.io/proxy-read-timeout"]) >= 3600
    assert int(notes["nginx.ingress.kubernetes.io/proxy-send-timeout"]) >= 3600
    body = notes["nginx.ingress.kubernetes.io/proxy-body-size"]
    assert body.endswith("m"), body
    max_mb = int(config_env(docs)["MAX_FILE_SIZE"])
    # At least the upload limit (plus room for the multipart framing, so the gateway's own
    # limit answers), and not much more.
    assert max_mb <= int(body[:-1]) <= max_mb + 1, f"proxy-body-size {body} vs MAX_FILE_SIZE {max_mb}"
    assert notes.get("nginx.ingress.kubernetes.io/proxy-request-buffering") == "off", "uploads stream"
    for rule in ingress["spec"]["rules"]:
        for path in rule["http"]["paths"]:
            backend = path["backend"]["service"]
            assert backend == {"name": "gateway", "port": {"number": 8000}}, backend


def test_network_policies(rendered) -> None:
    """Default deny; gateway from the ingress controller only; sessions, billing and ai from
    the gateway only; files from the gateway and the agents' namespaces."""
    _, docs = rendered
    policies = by_kind(docs, "NetworkPolicy")
    deny = [p for p in policies if p["spec"]["podSelector"] == {} and p["spec"]["policyTypes"] == ["Ingress"]
            and not p["spec"].get("ingress")]
    assert deny, "a default-deny ingress policy"
    pods = {w["metadata"]["name"]: pod_labels(w) for w in workloads(docs)}

    def allowed_sources(component: str, port: int) -> list[dict]:
        labels = pods[component]
        sources: list[dict] = []
        for policy in policies:
            if "Ingress" not in policy["spec"].get("policyTypes", ["Ingress"]):
                continue
            if not selector_matches(policy["spec"]["podSelector"], labels) and policy["spec"]["podSelector"] != {}:
                continue
            for rule in policy["spec"].get("ingress") or []:
                ports = [p.get("port") for p in rule.get("ports") or []]
                assert ports, f"{policy['metadata']['name']}: a rule without ports opens every port"
                if port not in ports:
                    continue
                assert rule.get("from"), f"{policy['metadata']['name']}: a rule without `from` admits everyone"
                sources.extend(rule["from"])
        return sources

    def is_gateway(source: dict) -> bool:
        """A source that admits the gateway's pods and no other pod of the rendering."""
        if set(source) != {"podSelector"}:
            return False
        admitted = {name for name, labels in pods.items() if selector_matches(source["podSelector"], labels)}
        return admitted == {"gateway"}

    gateway_sources = allowed_sources("gateway", SERVICES["gateway"].port)
    assert gateway_sources and all(
        set(s) == {"namespaceSelector"} and s["namespaceSelector"].get("matchLabels", {}).get("kubernetes.io/metadata.name") == "ingress-nginx"
        for s in gateway_sources
    ), gateway_sources
    for name in ("sessions", "billing", "ai"):
        sources = allowed_sources(name, SERVICES[name].port)
        assert sources and all(is_gateway(s) for s in sources), f"{name}: {sources}"
    files_sources = allowed_sources("files", SERVICES["files"].port)
    assert any(is_gateway(s) for s in files_sources)
    others = [s for s in files_sources if not is_gateway(s)]
    assert all(set(s) == {"namespaceSelector"} and s["namespaceSelector"].get("matchLabels") for s in others), others
    # Nobody but the gateway may reach sessions/billing/ai on any port.
    for name in ("sessions", "billing", "ai"):
        for policy in policies:
            if selector_matches(policy["spec"]["podSelector"], pods[name]):
                for rule in policy["spec"].get("ingress") or []:
                    assert all(is_gateway(s) for s in rule.get("from") or [{}]), policy["metadata"]["name"]


# ------------------------------------------------------------------------ overlays


@pytest.mark.parametrize("directory", OVERLAYS, ids=rel)
def test_overlay_provides_every_address_in_the_config(directory: Path) -> None:
    """DB_HOST, REDIS_HOST, S3_ENDPOINT, AI_SERVER_HOST and the *_URL keys name Services of
    the overlay, on ports those Services serve."""
    docs = render_kustomization(directory)
    env = config_env(docs)
    namespace = {d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"}
    assert len(namespace) == 1 and None not in namespace, f"one namespace for everything: {namespace}"
    addresses = {
        "DB_HOST": (env["DB_HOST"], int(env["DB_PORT"])),
        "REDIS_HOST": (env["REDIS_HOST"], int(env["REDIS_PORT"])),
        "S3_ENDPOINT": (urlsplit(env["S3_ENDPOINT"]).hostname, urlsplit(env["S3_ENDPOINT"]).port),
        "AI_SERVER_HOST": (env["AI_SERVER_HOST"], int(env["AI_SERVER_PORT"])),
    }
    for key in ("SESSIONS_URL", "FILES_URL", "BILLING_URL"):
        parts = urlsplit(env[key])
        addresses[key] = (parts.hostname, parts.port)
    for key, (host, port) in addresses.items():
        assert host is not None, f"{key}: no host"
        service = find(docs, "Service", host)
        assert service is not None, f"{key}: no Service {host} in {rel(directory)}"
        if service["spec"].get("type") == "ExternalName":
            continue
        assert port in [p["port"] for p in service["spec"]["ports"]], f"{key}: Service {host} does not serve {port}"


def test_dev_overlay_runs_the_engines_with_storage() -> None:
    dev = K8S_DIR / "overlays" / "dev"
    docs = render_kustomization(dev)
    for name, port in INFRA_PORTS.items():
        workload = find(docs, "StatefulSet", name)
        assert workload is not None, f"overlays/dev: StatefulSet {name}"
        assert workload["spec"]["replicas"] == 1
        assert workload["spec"].get("volumeClaimTemplates"), f"{name}: a PVC for its data"
        image = workload["spec"]["template"]["spec"]["containers"][0]["image"]
        assert ":" in image and not image.endswith(":latest"), image
        service = find(docs, "Service", name)
        assert service and port in [p["port"] for p in service["spec"]["ports"]]
    assert any(j["metadata"]["name"] == "minio-init" for j in by_kind(docs, "Job")), "a Job creates the bucket"
    policies = by_kind(docs, "NetworkPolicy")
    for name in INFRA_PORTS:
        workload = find(docs, "StatefulSet", name)
        assert workload is not None, f"overlays/dev: StatefulSet {name}"
        labels = pod_labels(workload)
        assert any(selector_matches(p["spec"]["podSelector"], labels) for p in policies if p["spec"]["podSelector"]), (
            f"overlays/dev: nothing may reach {name} past the default deny"
        )


def test_images_match_compose() -> None:
    """Kubernetes base and docker compose name the same images (what compose builds is what
    a dev cluster runs)."""
    compose = load_yaml(ROOT / "docker-compose.yml")
    docs = render_kustomization(K8S_BASE)
    for svc in SERVICES:
        k8s_image = deployment(docs, svc)["spec"]["template"]["spec"]["containers"][0]["image"]
        assert k8s_image == compose["services"][svc]["image"], svc
