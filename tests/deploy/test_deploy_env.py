"""Every environment key the services read is configured everywhere they are deployed:
.env.sample, the Kubernetes ConfigMap or Secret template, and docker compose. The keys are
found by scanning the code under services/ in this test, so a key added tomorrow is caught."""
from __future__ import annotations

import pytest

from .deploy_support import (
    COMPOSE_FILE,
    CONFIGMAP_NAME,
    DB_SERVICES,
    ENV_SAMPLE,
    K8S_BASE,
    ORIGINAL_KEYS,
    SECRET_TEMPLATE,
    SERVICES,
    compose_environment,
    compose_variables,
    env_files_of,
    find,
    is_placeholder,
    is_secret_key,
    load_docs,
    load_yaml,
    parse_env_file,
    render_kustomization,
    scan_env_keys,
    secret_template_data,
)

# Values of the base ConfigMap that may differ from .env.sample: the public origin of the
# gateway is a compose-on-localhost value in one and the Ingress host in the other.
# METRICS_ALLOW_FROM: in a cluster Prometheus scrapes from the pod network, not from loopback.
K8S_MAY_DIFFER = {"GATEWAY_PUBLIC_URL", "ALLOWED_ORIGINS", "METRICS_ALLOW_FROM"}
# Keys compose may pin in a service's environment: to a value other than .env.sample's.
# GATEWAY_PORT: the container always listens on 8000; .env's GATEWAY_PORT/SERVER_PORT choose
# the published host port instead (checked in test_deploy_compose.py).
COMPOSE_PINNED = {"gateway": {"GATEWAY_PORT": "8000"}}


@pytest.fixture(scope="module")
def scan():
    return scan_env_keys()


@pytest.fixture(scope="module")
def env_sample():
    values, problems = parse_env_file(ENV_SAMPLE)
    return values, problems


@pytest.fixture(scope="module")
def configmap_data():
    docs = load_docs(K8S_BASE / "configmap.yaml")
    configmap = find(docs, "ConfigMap", CONFIGMAP_NAME)
    assert configmap is not None
    return {k: str(v) for k, v in configmap["data"].items()}


@pytest.fixture(scope="module")
def compose():
    return load_yaml(COMPOSE_FILE)


def test_scan_finds_the_known_keys(scan) -> None:
    # The scanner itself must work: keys read in settings code of every kind of call.
    for key in ("SERVICE_TOKEN", "DATABASE_URL", "DB_HOST", "GATEWAY_PORT", "SERVER_PORT",
                "SESSIONS_HOST", "SESSIONS_URL", "AI_SERVER_BIND", "MAX_FILE_SIZE"):
        assert key in scan.keys, f"scanner missed {key}"
    assert "SERVER_PORT" in scan.aliases


def test_every_env_read_has_a_literal_key(scan) -> None:
    assert not scan.unresolved, (
        "env reads whose key the deployment test cannot see (use a literal key, or teach "
        "tests/deploy/deploy_support.py the helper):\n" + "\n".join(scan.unresolved)
    )


def test_env_sample_lists_every_key_with_a_comment(scan, env_sample) -> None:
    values, problems = env_sample
    assert not problems, "\n".join(problems)
    missing = sorted(set(scan.keys) - set(values))
    assert not missing, "keys read by the services but missing from .env.sample:\n" + "\n".join(
        f"  {k}  (read at {', '.join(scan.keys[k])})" for k in missing
    )


def test_env_sample_has_the_original_keys(env_sample) -> None:
    values, _ = env_sample
    missing = [k for k in ORIGINAL_KEYS if k not in values]
    assert not missing, f"the original's configuration keys (.env.sample) keys missing from .env.sample: {missing}"


def test_original_keys_are_not_shadowed(scan, env_sample) -> None:
    """A new key that wins over an original alias (GATEWAY_PORT over SERVER_PORT) must be
    empty in .env.sample, or setting the original key there would silently do nothing."""
    values, _ = env_sample
    shadowing = {
        primary: alias for alias, primaries in scan.aliases.items() if alias in ORIGINAL_KEYS
        for primary in primaries if values.get(primary)
    }
    assert not shadowing, f".env.sample sets new keys that hide the original ones: {shadowing}"


def test_env_sample_secrets_are_placeholders(env_sample) -> None:
    values, _ = env_sample
    real = {k: v for k, v in values.items() if is_secret_key(k) and not is_placeholder(v)}
    assert not real, f".env.sample must hold placeholders (change-me) or nothing for secrets: {real}"


def test_every_key_is_in_the_configmap_or_secret_template(scan, configmap_data) -> None:
    secret = secret_template_data()
    configured = set(configmap_data) | set(secret)
    # Older aliases of a key (MINIO_ROOT_USER for S3_ACCESS_KEY) need not be set in Kubernetes:
    # the primary key is.
    required = {k for k in scan.keys if k not in scan.aliases or k in ORIGINAL_KEYS}
    missing = sorted(required - configured)
    assert not missing, (
        f"keys read by the services but in neither deploy/k8s/base/configmap.yaml nor "
        f"{SECRET_TEMPLATE.name}:\n" + "\n".join(f"  {k}  (read at {', '.join(scan.keys[k])})" for k in missing)
    )


def test_secret_keys_live_in_the_secret_only(configmap_data) -> None:
    secret = secret_template_data()
    both = sorted(set(configmap_data) & set(secret))
    assert not both, f"keys in both the ConfigMap and the Secret (which wins is unclear): {both}"
    leaked = sorted(k for k in configmap_data if is_secret_key(k))
    assert not leaked, f"secret keys in the ConfigMap: {leaked}"
    not_placeholders = {k: v for k, v in secret.items() if not is_placeholder(v)}
    assert not not_placeholders, f"the Secret template must hold placeholders only: {not_placeholders}"


def test_secret_template_is_not_applied_by_kustomize() -> None:
    for directory in [K8S_BASE, *sorted((K8S_BASE.parent / "overlays").iterdir())]:
        if not (directory / "kustomization.yaml").exists():
            continue
        docs = render_kustomization(directory)
        secrets = [d["metadata"]["name"] for d in docs if d["kind"] == "Secret"]
        assert not secrets, f"{directory}: a Secret is rendered ({secrets}); secrets must not be committed"


def test_configmap_agrees_with_env_sample(env_sample, configmap_data) -> None:
    values, _ = env_sample
    differ = {
        k: (values[k], v) for k, v in configmap_data.items()
        if k in values and values[k] != v and k not in K8S_MAY_DIFFER
    }
    assert not differ, f"ConfigMap and .env.sample disagree (.env.sample, ConfigMap): {differ}"
    unknown = sorted(set(configmap_data) - set(values))
    assert not unknown, f"ConfigMap keys that .env.sample does not document: {unknown}"


def test_compose_services_read_env_file(compose) -> None:
    for name in [*SERVICES, "migrate"]:
        service = compose["services"][name]
        assert ".env" in env_files_of(service), f"compose service {name} must use env_file: .env"


def test_compose_does_not_override_env_sample(compose, env_sample, scan) -> None:
    """A service's environment: may not silently replace what .env says, except the pinned
    container-wiring keys; every override must also be a key the services read."""
    values, _ = env_sample
    for name in [*SERVICES, "migrate"]:
        pinned = COMPOSE_PINNED.get(name, {})
        for key, value in compose_environment(compose["services"][name]).items():
            assert key in scan.keys, f"compose sets {key} for {name}, which no service reads"
            if key in pinned:
                assert value == pinned[key], f"compose pins {key}={value!r} for {name}, expected {pinned[key]!r}"
                continue
            if "${" in value:
                continue  # comes from .env itself
            assert value == values.get(key), (
                f"compose hardcodes {key}={value!r} for {name} but .env.sample says {values.get(key)!r}"
            )


def test_compose_migrate_on_start_is_off_where_migrate_runs(compose, env_sample) -> None:
    for name in DB_SERVICES:
        env = compose_environment(compose["services"][name])
        assert env.get("MIGRATE_ON_START") == "false", f"{name}: MIGRATE_ON_START must be false (the migrate service runs them)"


def test_compose_variables_are_documented(env_sample) -> None:
    values, _ = env_sample
    used = compose_variables(COMPOSE_FILE.read_text())
    missing = sorted(used - set(values))
    assert not missing, f"docker-compose.yml interpolates variables .env.sample does not define: {missing}"
