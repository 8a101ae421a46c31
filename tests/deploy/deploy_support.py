"""What the deployment tests share: where the artifacts are, reading them, scanning the service
code for the environment keys it reads, rendering kustomizations, and running settings code
under a given environment.

No Docker engine or cluster is needed: everything is parsed and checked offline.
"""
from __future__ import annotations

import ast
import copy
import functools
import importlib
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
SERVICES_DIR = ROOT / "services"
DOCKER_DIR = ROOT / "deploy" / "docker"
K8S_DIR = ROOT / "deploy" / "k8s"
K8S_BASE = K8S_DIR / "base"
K8S_OVERLAYS = sorted(p.parent for p in (K8S_DIR / "overlays").glob("*/kustomization.yaml"))
COMPOSE_FILE = ROOT / "docker-compose.yml"
ENV_SAMPLE = ROOT / ".env.sample"
DOCKERIGNORE = ROOT / ".dockerignore"
SECRET_TEMPLATE = K8S_BASE / "secret.example.yaml"
HEALTHCHECK_SCRIPT = DOCKER_DIR / "healthcheck.py"
K8S_VERSION = "1.30"

CONFIGMAP_NAME = "chat-backend-config"
SECRET_NAME = "chat-backend-secrets"


@dataclass(frozen=True)
class Svc:
    name: str
    module: str
    port: int          # the default in the service's settings code
    kind: str          # "http" (Litestar: /health, /ready, /metrics) or "grpc"


SERVICES: dict[str, Svc] = {
    "gateway": Svc("gateway", "chat_gateway", 8000, "http"),
    "sessions": Svc("sessions", "chat_sessions", 8001, "http"),
    "files": Svc("files", "chat_files", 8002, "http"),
    "billing": Svc("billing", "chat_billing", 8003, "http"),
    "ai": Svc("ai", "chat_ai", 50051, "grpc"),
}
HTTP_SERVICES = [s for s in SERVICES.values() if s.kind == "http"]
DB_SERVICES = ("billing", "sessions", "files")  # the services that own tables (migrations)

# the original's configuration keys (.env.sample): the original system's keys; they must keep working.
ORIGINAL_KEYS = (
    "SERVER_HOST", "SERVER_PORT", "DB_HOST", "DB_USER", "DB_PASSWORD", "DB_NAME", "DB_PORT",
    "REDIS_HOST", "REDIS_PORT", "REDIS_PASSWORD", "REDIS_DB", "AI_SERVER_HOST", "AI_SERVER_PORT",
    "MAX_FILE_SIZE", "MAX_CHAT_HISTORY_CONTEXT", "OPENAI_API_KEY", "OLLAMA_PORT",
)

# Keys whose values are secrets (or may embed one): Secret, never ConfigMap.
_SECRET_PATTERN = re.compile(r"(PASSWORD|SECRET|TOKEN|API_KEY|ACCESS_KEY|SECRET_KEY)$")
SECRET_EXTRA = {"DATABASE_URL", "REDIS_URL"}


def is_secret_key(key: str) -> bool:
    return bool(_SECRET_PATTERN.search(key)) or key in SECRET_EXTRA


def is_placeholder(value: str) -> bool:
    """A committed secret value must be empty or an obvious placeholder."""
    return value == "" or "change-me" in value


# --------------------------------------------------------------------------------- YAML files


def load_docs(path: Path) -> list[dict[str, Any]]:
    with path.open() as handle:
        return [doc for doc in yaml.safe_load_all(handle) if doc is not None]


def load_yaml(path: Path) -> Any:
    with path.open() as handle:
        return yaml.safe_load(handle)


def validate_k8s(doc: dict[str, Any], where: str) -> None:
    """Validate against the Kubernetes schemas offline (strict: unknown fields are errors);
    fail with the short reason rather than the whole schema."""
    import kubernetes_validate
    import pytest

    problem = ""
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        path = "/".join(str(p) for p in exc.absolute_path)
        problem = f"{exc.message} (at {path or '/'})"
    if problem:
        name = f"{doc.get('kind')}/{(doc.get('metadata') or {}).get('name')}"
        pytest.fail(f"{where}: {name} does not validate against Kubernetes {K8S_VERSION}: {problem}", pytrace=False)


def k8s_manifest_files() -> list[Path]:
    """Every Kubernetes manifest file (not the kustomization files themselves)."""
    return sorted(
        p for p in K8S_DIR.rglob("*.y*ml") if p.name not in ("kustomization.yaml", "kustomization.yml")
    )


# --------------------------------------------------------------------------------- .env files


def parse_env_file(path: Path) -> tuple[dict[str, str], list[str]]:
    """``KEY=value`` lines as a dict, and a list of problems (duplicates, bad lines, keys
    without a comment line right above)."""
    values: dict[str, str] = {}
    problems: list[str] = []
    previous = ""
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.rstrip()
        if not line or line.startswith("#"):
            previous = line
            continue
        match = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)=(.*)", line)
        if not match:
            problems.append(f"line {number}: not KEY=value: {line!r}")
            previous = line
            continue
        key, value = match.groups()
        if key in values:
            problems.append(f"line {number}: {key} given twice")
        if not previous.startswith("# ") or previous.startswith("# ---"):
            problems.append(f"line {number}: {key} has no comment line right above it")
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key] = value
        previous = line
    return values, problems


# --------------------------------------------------------------------------------- env key scan


@dataclass
class EnvScan:
    keys: dict[str, list[str]] = field(default_factory=dict)      # key -> where it is read
    aliases: dict[str, set[str]] = field(default_factory=dict)    # alias -> primary keys
    primaries: dict[str, set[str]] = field(default_factory=dict)  # primary -> its aliases
    unresolved: list[str] = field(default_factory=list)           # reads whose key is not a literal

    def add(self, key: str, where: str) -> None:
        self.keys.setdefault(key, []).append(where)

    @property
    def primary_keys(self) -> set[str]:
        return {k for k in self.keys if k not in self.aliases or k in self.primaries}


ENV_FUNCS = {"env_str", "env_int", "env_float", "env_bool", "env_list"}
# Functions of chat_common.settings whose env reads take the key from a parameter; their call
# sites are expanded instead (ServiceSettings.from_env(name) -> NAME_HOST/NAME_PORT,
# service_url(name) -> NAME_URL).
_DYNAMIC_OK = {("chat_common/settings.py", f) for f in (*ENV_FUNCS, "service_url", "from_env")}
_KEY = re.compile(r"^[A-Z][A-Z0-9_]*$")


def _func_name(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return ""


def _const_str(node: ast.AST) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    return None


def _is_os_environ(node: ast.AST) -> bool:
    return isinstance(node, ast.Attribute) and node.attr == "environ" and isinstance(node.value, ast.Name) and node.value.id == "os"


class _Scanner(ast.NodeVisitor):
    def __init__(self, scan: EnvScan, rel: str) -> None:
        self.scan = scan
        self.rel = rel
        self.func_stack: list[str] = []

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        self.func_stack.append(node.name)
        self.generic_visit(node)
        self.func_stack.pop()

    visit_AsyncFunctionDef = visit_FunctionDef  # type: ignore[assignment]

    def _where(self, node: ast.AST) -> str:
        return f"{self.rel}:{getattr(node, 'lineno', '?')}"

    def _dynamic(self, node: ast.AST, what: str) -> None:
        inside = self.func_stack[-1] if self.func_stack else ""
        if (self.rel.split("services/", 1)[-1].split("/", 1)[-1], inside) in _DYNAMIC_OK:
            return
        self.scan.unresolved.append(f"{self._where(node)}: {what} (key is not a string literal)")

    def visit_Call(self, node: ast.Call) -> None:
        name = _func_name(node.func)
        if name in ENV_FUNCS and node.args:
            key = _const_str(node.args[0])
            if key is None:
                self._dynamic(node, name)
            else:
                self.scan.add(key, self._where(node))
                for extra in node.args[2:]:
                    alias = _const_str(extra)
                    if alias is None:
                        self._dynamic(node, f"{name} alias")
                        continue
                    self.scan.add(alias, self._where(node))
                    self.scan.aliases.setdefault(alias, set()).add(key)
                    self.scan.primaries.setdefault(key, set()).add(alias)
        elif name == "from_env" and isinstance(node.func, ast.Attribute) and _func_name(node.func.value) == "ServiceSettings":
            service = _const_str(node.args[0]) if node.args else None
            if service is None:
                self._dynamic(node, "ServiceSettings.from_env")
            else:
                for suffix in ("HOST", "PORT"):
                    self.scan.add(f"{service.upper()}_{suffix}", self._where(node))
        elif name == "service_url" and node.args:
            service = _const_str(node.args[0])
            if service is None:
                self._dynamic(node, "service_url")
            else:
                self.scan.add(f"{service.upper()}_URL", self._where(node))
        elif name in ("get", "setdefault", "pop") and isinstance(node.func, ast.Attribute) and _is_os_environ(node.func.value):
            key = _const_str(node.args[0]) if node.args else None
            if key is None:
                self._dynamic(node, f"os.environ.{name}")
            else:
                self.scan.add(key, self._where(node))
        elif name == "getenv" and isinstance(node.func, ast.Attribute) and _func_name(node.func.value) == "os":
            key = _const_str(node.args[0]) if node.args else None
            if key is None:
                self._dynamic(node, "os.getenv")
            else:
                self.scan.add(key, self._where(node))
        self.generic_visit(node)

    def visit_Subscript(self, node: ast.Subscript) -> None:
        if _is_os_environ(node.value):
            key = _const_str(node.slice)
            if key is None:
                self._dynamic(node, "os.environ[...]")
            else:
                self.scan.add(key, self._where(node))
        self.generic_visit(node)


@functools.lru_cache(maxsize=None)
def scan_env_keys(root: Path = SERVICES_DIR) -> EnvScan:
    """Every environment key the code under ``services/`` reads, found in its syntax tree
    (once per test run; do not modify the result)."""
    scan = EnvScan()
    for path in sorted(root.rglob("*.py")):
        if "aiproto" in path.parts:  # generated gRPC code
            continue
        rel = path.relative_to(ROOT).as_posix()
        try:
            tree = ast.parse(path.read_text(), filename=rel)
        except SyntaxError as exc:  # a file being written right now
            scan.unresolved.append(f"{rel}: cannot be parsed ({exc.msg}); its keys are unknown")
            continue
        _Scanner(scan, rel).visit(tree)
    for key in list(scan.keys):
        if not _KEY.match(key):
            scan.unresolved.append(f"{key!r} read at {scan.keys.pop(key)} is not an UPPER_CASE key")
    return scan


# --------------------------------------------------------------------------------- kustomize

CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume",
                  "StorageClass", "CustomResourceDefinition", "PriorityClass", "IngressClass"}
SUPPORTED_KUSTOMIZE_KEYS = {"apiVersion", "kind", "resources", "patches", "namespace", "images"}


class RenderError(Exception):
    pass


def _merge(base: Any, patch: Any) -> Any:
    """Strategic merge as far as these manifests need it: maps merge, lists of named maps
    merge by name, other lists are replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for key, value in patch.items():
            if isinstance(key, str) and key.startswith("$"):
                raise RenderError(f"patch directive {key} is not supported by the test renderer")
            out[key] = _merge(base[key], value) if key in base else copy.deepcopy(value)
        return out
    if (
        isinstance(base, list) and isinstance(patch, list)
        and all(isinstance(i, dict) and "name" in i for i in base + patch)
    ):
        merged = [copy.deepcopy(i) for i in base]
        index = {item["name"]: n for n, item in enumerate(merged)}
        for item in patch:
            if item["name"] in index:
                merged[index[item["name"]]] = _merge(merged[index[item["name"]]], item)
            else:
                merged.append(copy.deepcopy(item))
        return merged
    return copy.deepcopy(patch)


def merge_patch(base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    return _merge(base, patch)


def _pod_spec(doc: dict[str, Any]) -> dict[str, Any] | None:
    spec = doc.get("spec") or {}
    if doc.get("kind") == "CronJob":
        return spec.get("jobTemplate", {}).get("spec", {}).get("template", {}).get("spec")
    return spec.get("template", {}).get("spec") if "template" in spec else None


def containers_of(doc: dict[str, Any]) -> list[dict[str, Any]]:
    pod = _pod_spec(doc)
    if not pod:
        return []
    return list(pod.get("initContainers") or []) + list(pod.get("containers") or [])


def pod_spec(doc: dict[str, Any]) -> dict[str, Any] | None:
    return _pod_spec(doc)


def _split_image(image: str) -> tuple[str, str]:
    """``name[:tag][@digest]`` -> (name, rest including its separator)."""
    if "@" in image:
        name, digest = image.split("@", 1)
        rest = "@" + digest
    else:
        name, rest = image, ""
    last = name.rsplit("/", 1)[-1]
    if ":" in last:
        name, tag = name.rsplit(":", 1)
        rest = ":" + tag + rest
    return name, rest


def render_kustomization(directory: Path) -> list[dict[str, Any]]:
    """A Python rendering of ``kustomize build`` for the subset of features these
    kustomizations use (resources, strategic-merge patches by file, namespace, images).
    Anything else is refused, so this never silently differs from kustomize."""
    kfile = directory / "kustomization.yaml"
    spec = load_yaml(kfile)
    unknown = set(spec) - SUPPORTED_KUSTOMIZE_KEYS
    if unknown:
        raise RenderError(f"{kfile}: {sorted(unknown)} not supported by the test renderer; extend it")
    docs: list[dict[str, Any]] = []
    for resource in spec.get("resources", []):
        target = (directory / resource).resolve()
        if target.is_dir():
            docs.extend(render_kustomization(target))
        elif target.is_file():
            docs.extend(load_docs(target))
        else:
            raise RenderError(f"{kfile}: resource {resource} does not exist")
    for patch in spec.get("patches", []):
        if set(patch) != {"path"}:
            raise RenderError(f"{kfile}: only `patches: - path:` is supported by the test renderer")
        for patch_doc in load_docs(directory / patch["path"]):
            matches = [
                n for n, d in enumerate(docs)
                if d["kind"] == patch_doc["kind"] and d["metadata"]["name"] == patch_doc["metadata"]["name"]
            ]
            if len(matches) != 1:
                raise RenderError(f"{kfile}: patch for {patch_doc['kind']}/{patch_doc['metadata']['name']} matches {len(matches)} resources")
            docs[matches[0]] = _merge(docs[matches[0]], patch_doc)
    namespace = spec.get("namespace")
    if namespace:
        for doc in docs:
            if doc["kind"] not in CLUSTER_SCOPED:
                doc["metadata"]["namespace"] = namespace
    for image in spec.get("images", []):
        for doc in docs:
            for container in containers_of(doc):
                name, rest = _split_image(container["image"])
                if name != image["name"]:
                    continue
                new_name = image.get("newName", name)
                if "digest" in image:
                    rest = "@" + image["digest"]
                elif "newTag" in image:
                    rest = ":" + str(image["newTag"])
                container["image"] = new_name + rest
    return docs


def kustomize_command() -> list[str] | None:
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        probe = subprocess.run(["kubectl", "kustomize", "--help"], capture_output=True, timeout=30)
        if probe.returncode == 0:
            return ["kubectl", "kustomize"]
    return None


def render_with_kustomize(directory: Path) -> list[dict[str, Any]]:
    command = kustomize_command()
    assert command is not None
    result = subprocess.run([*command, str(directory)], capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise RenderError(f"{' '.join(command)} {directory} failed: {result.stderr}")
    return [d for d in yaml.safe_load_all(result.stdout) if d is not None]


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d.get("kind") == kind]


def find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any] | None:
    for doc in docs:
        if doc.get("kind") == kind and doc["metadata"]["name"] == name:
            return doc
    return None


def pod_labels(doc: dict[str, Any]) -> dict[str, str]:
    return (doc.get("spec", {}).get("template", {}).get("metadata", {}) or {}).get("labels", {}) or {}


def selector_matches(selector: dict[str, Any] | None, labels: dict[str, str]) -> bool:
    """A LabelSelector (matchLabels + matchExpressions) or a plain map (Service selector)."""
    if selector is None:
        return False
    match_labels: dict[str, Any]
    expressions: list[dict[str, Any]]
    if "matchLabels" not in selector and "matchExpressions" not in selector:
        match_labels, expressions = selector, []
    else:
        match_labels, expressions = selector.get("matchLabels") or {}, selector.get("matchExpressions") or []
    if any(labels.get(k) != v for k, v in match_labels.items()):
        return False
    for expr in expressions:
        value = labels.get(expr["key"])
        op = expr["operator"]
        if op == "In" and value not in expr["values"]:
            return False
        if op == "NotIn" and value in expr["values"]:
            return False
        if op == "Exists" and expr["key"] not in labels:
            return False
        if op == "DoesNotExist" and expr["key"] in labels:
            return False
    return True


def workloads(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d for d in docs if d.get("kind") in ("Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob")]


def resolve_port(container: dict[str, Any], port: int | str) -> int | None:
    if isinstance(port, int):
        return port
    if isinstance(port, str) and port.isdigit():
        return int(port)
    for item in container.get("ports") or []:
        if item.get("name") == port:
            return int(item["containerPort"])
    return None


def config_env(docs: list[dict[str, Any]]) -> dict[str, str]:
    """The environment a service pod of a rendering gets from envFrom: the ConfigMap, and the
    Secret template standing in for the real Secret."""
    configmap = find(docs, "ConfigMap", CONFIGMAP_NAME)
    assert configmap is not None, f"ConfigMap {CONFIGMAP_NAME} missing"
    env = {k: str(v) for k, v in (configmap.get("data") or {}).items()}
    env.update(secret_template_data())
    return env


def secret_template() -> dict[str, Any]:
    docs = load_docs(SECRET_TEMPLATE)
    assert len(docs) == 1 and docs[0]["kind"] == "Secret"
    return docs[0]


def secret_template_data() -> dict[str, str]:
    secret = secret_template()
    data = {k: str(v) for k, v in (secret.get("stringData") or {}).items()}
    assert not secret.get("data"), "use stringData (readable placeholders) in the Secret template"
    return data


# --------------------------------------------------------------------------------- compose


_VAR = re.compile(r"\$(?:\$|\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])((?:[^{}]|\{[^{}]*\}|\$\{[^{}]*\})*))?\}|([A-Za-z_][A-Za-z0-9_]*))")


def compose_variables(text: str) -> set[str]:
    """Names of the variables a compose file interpolates (``$$`` is a literal dollar)."""
    names: set[str] = set()
    for match in _VAR.finditer(text):
        if match.group(0) == "$$":
            continue
        names.add(match.group(1) or match.group(4))
        if match.group(3):
            names |= compose_variables(match.group(3))
    return names


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose interpolation: ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?err},
    ${VAR?err}, ${VAR:+alt}, nested defaults, $VAR, and $$ as a literal $."""

    def replace(match: re.Match[str]) -> str:
        whole = match.group(0)
        if whole == "$$":
            return "$"
        name = match.group(1) or match.group(4)
        op, arg = match.group(2), match.group(3) or ""
        current = env.get(name)
        if op is None:
            return current or ""
        if op == ":-":
            return current if current else interpolate(arg, env)
        if op == "-":
            return current if current is not None else interpolate(arg, env)
        if op in (":?", "?"):
            if (op == ":?" and not current) or current is None:
                raise ValueError(f"compose would stop: {name} is required ({arg})")
            return current
        if op == ":+":
            return interpolate(arg, env) if current else ""
        if op == "+":
            return interpolate(arg, env) if current is not None else ""
        raise ValueError(whole)

    return _VAR.sub(replace, value)


def compose_environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        out = {}
        for item in env:
            key, _, value = item.partition("=")
            out[key] = value
        return out
    return {k: "" if v is None else str(v) for k, v in env.items()}


def env_files_of(service: dict[str, Any]) -> list[str]:
    files = service.get("env_file")
    if files is None:
        return []
    if isinstance(files, (str, dict)):
        files = [files]
    return [f if isinstance(f, str) else f["path"] for f in files]


def container_env(service: dict[str, Any], env_sample: dict[str, str]) -> dict[str, str]:
    """What a compose container sees: its env_file .env (= .env.sample copied) overlaid with
    its environment: section interpolated with the same values."""
    env: dict[str, str] = {}
    if ".env" in env_files_of(service):
        env.update(env_sample)
    for key, value in compose_environment(service).items():
        env[key] = interpolate(value, env_sample)
    return env


# --------------------------------------------------------------------------------- settings code


@contextmanager
def environment(values: dict[str, str], clear: set[str]) -> Iterator[None]:
    """Run with exactly ``values`` for the keys in ``clear`` (others untouched)."""
    saved = dict(os.environ)
    try:
        for key in clear | set(values):
            os.environ.pop(key, None)
        os.environ.update(values)
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def settings_class(svc: Svc) -> type[Any]:
    """The service's own settings dataclass (``<Svc>Settings`` with ``from_env``)."""
    module = importlib.import_module(f"{svc.module}.settings")
    candidates = [
        obj for name, obj in vars(module).items()
        if isinstance(obj, type) and name.endswith("Settings") and obj.__module__ == module.__name__
        and hasattr(obj, "from_env")
    ]
    if len(candidates) != 1:
        raise LookupError(f"{module.__name__}: expected one *Settings class with from_env, found {candidates}")
    return candidates[0]


def bind_of(svc: Svc, settings: Any) -> tuple[str, int]:
    """(bind host, port) of a service's settings."""
    if hasattr(settings, "service"):
        return settings.service.host, settings.service.port
    return settings.bind, settings.port


def import_or_skip(module: str, reason: str) -> Any:
    import pytest

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        pytest.skip(f"{reason}: `{module}` is not importable yet ({exc})")


def python() -> str:
    return sys.executable


def load_healthcheck() -> Any:
    """deploy/docker/healthcheck.py as a module (it is a script, not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("chat_deploy_healthcheck", HEALTHCHECK_SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------------- Dockerfiles


@dataclass
class Instruction:
    keyword: str
    args: str
    line: int


def parse_dockerfile(path: Path) -> list[Instruction]:
    """Instructions with continuation lines joined, comments and parser directives dropped."""
    instructions: list[Instruction] = []
    buffer = ""
    start = 0
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        stripped = raw.strip()
        if not buffer and (not stripped or stripped.startswith("#")):
            continue
        if buffer and stripped.startswith("#"):
            continue
        if not buffer:
            start = number
        if stripped.endswith("\\"):
            buffer += stripped[:-1] + " "
            continue
        buffer += stripped
        keyword, _, args = buffer.partition(" ")
        instructions.append(Instruction(keyword.upper(), args.strip(), start))
        buffer = ""
    assert not buffer, f"{path}: dangling line continuation"
    return instructions


def stages(instructions: list[Instruction]) -> list[list[Instruction]]:
    out: list[list[Instruction]] = []
    for instruction in instructions:
        if instruction.keyword == "FROM":
            out.append([])
        if out:
            out[-1].append(instruction)
    return out
