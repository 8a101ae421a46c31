"""deploy/docker/Dockerfile: one recipe for every service (build arguments SERVICE and PORT, as
docker-compose.yml passes them), multi-stage, pinned bases, a non-root user, a HEALTHCHECK
through deploy/docker/healthcheck.py, and the same entry point as a local run (the service's
console script, `python -m chat_<service>`). Also the .dockerignore keeps secrets and local
state out of the build context without hiding what the Dockerfile copies."""
from __future__ import annotations

import json
import re
import shlex
import tomllib

import pytest

from .deploy_support import (
    COMPOSE_FILE,
    DOCKER_DIR,
    DOCKERIGNORE,
    ROOT,
    SERVICES,
    Instruction,
    Svc,
    load_healthcheck,
    load_yaml,
    parse_dockerfile,
    stages,
)

PINNED_BASE = re.compile(r"^(?:[a-z0-9.-]+(?::\d+)?/)?[a-z0-9._/-]+:(?P<tag>[A-Za-z0-9_.-]+)(?:@sha256:[0-9a-f]{64})?$")
DOCKERFILE = DOCKER_DIR / "Dockerfile"
_VARIABLE = re.compile(r"\$(?:\{(\w+)\}|(\w+))")


def build_args(svc: Svc) -> dict[str, str]:
    """The build arguments docker-compose.yml builds the service's image with."""
    build = load_yaml(COMPOSE_FILE)["services"][svc.name]["build"]
    return {key: str(value) for key, value in (build.get("args") or {}).items()}


def dockerfile(svc: Svc) -> list[Instruction]:
    """The recipe as built for ``svc``: its ARG and ENV values substituted where Docker does."""
    assert DOCKERFILE.is_file(), f"{DOCKERFILE} missing"
    values = dict(build_args(svc))

    def substitute(text: str) -> str:
        return _VARIABLE.sub(lambda m: values.get(m[1] or m[2], m[0]), text)

    resolved = []
    for instruction in parse_dockerfile(DOCKERFILE):
        if instruction.keyword == "ARG":
            name, _, default = instruction.args.partition("=")
            values.setdefault(name, default)
        args = instruction.args
        if instruction.keyword in ("FROM", "LABEL", "ENV", "EXPOSE", "COPY", "USER", "WORKDIR"):
            args = substitute(args)
        if instruction.keyword == "ENV":
            for name, value in re.findall(r"(\w+)=(\S+)", args):
                values[name] = value
        resolved.append(Instruction(instruction.keyword, args, instruction.line))
    return resolved


def exec_form(args: str) -> list[str]:
    """The JSON (exec) form of CMD/ENTRYPOINT/HEALTHCHECK CMD; shell form is refused, since
    a shell as PID 1 does not pass SIGTERM on to the service (graceful shutdown)."""
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def test_one_recipe_for_every_service() -> None:
    assert sorted(p.name for p in DOCKER_DIR.iterdir() if "Dockerfile" in p.name) == ["Dockerfile"]
    for svc in SERVICES.values():
        assert build_args(svc) == {"SERVICE": svc.name, "PORT": str(svc.port)}, svc.name


@pytest.mark.parametrize("svc", SERVICES.values(), ids=list(SERVICES))
def test_multi_stage_with_pinned_bases(svc: Svc) -> None:
    instructions = dockerfile(svc)
    all_stages = stages(instructions)
    assert len(all_stages) >= 2, "multi-stage: a builder stage and a runtime stage"
    names = set()
    for stage in all_stages:
        words = stage[0].args.split()
        image = words[0]
        if "AS" in (w.upper() for w in words):
            names.add(words[-1].lower())
        if image.lower() in names:
            continue  # FROM an earlier stage
        assert "$" not in image, f"base image {image} must be written out, not taken from an ARG"
        match = PINNED_BASE.match(image)
        assert match, f"base image {image} has no tag"
        assert match["tag"] != "latest" and re.search(r"\d", match["tag"]), f"base image {image} is not pinned to a version"
    runtime = all_stages[-1]
    assert any(i.keyword == "COPY" and "--from=" in i.args for i in runtime), "the runtime stage copies the builder's result"
    assert not any(i.keyword == "RUN" and re.search(r"\bpip install\b", i.args) for i in runtime), (
        "the runtime stage installs nothing: it copies the builder's virtualenv"
    )
    builder = all_stages[0]
    assert any(i.keyword == "RUN" and re.search(r"pip install[^&]*\s\.(\s|$)", i.args) for i in builder), (
        "the builder installs the project (pip install .)"
    )


@pytest.mark.parametrize("svc", SERVICES.values(), ids=list(SERVICES))
def test_runs_as_non_root(svc: Svc) -> None:
    runtime = stages(dockerfile(svc))[-1]
    users = [i.args for i in runtime if i.keyword == "USER"]
    assert users, "the runtime stage sets a USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), f"runs as {users[-1]}"
    # Numeric, so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
    assert user.isdigit(), "USER should be numeric (uid[:gid])"
    assert any(i.keyword == "RUN" and f"--uid {user}" in i.args for i in runtime), f"uid {user} is created"


@pytest.mark.parametrize("svc", SERVICES.values(), ids=list(SERVICES))
def test_healthcheck(svc: Svc) -> None:
    runtime = stages(dockerfile(svc))[-1]
    checks = [i.args for i in runtime if i.keyword == "HEALTHCHECK"]
    assert len(checks) == 1 and checks[0].upper() != "NONE", "one HEALTHCHECK in the runtime stage"
    _, _, command = checks[0].partition("CMD ")
    argv = exec_form(command.strip())
    assert argv[:2] == ["python", "/opt/chat/healthcheck.py"], argv
    if len(argv) == 2:  # the service named by the image's CHAT_SERVICE
        env = dict(re.findall(r"(\w+)=(\S+)", " ".join(i.args for i in runtime if i.keyword == "ENV")))
        assert env.get("CHAT_SERVICE") == svc.name, env
    else:
        assert argv[2] == svc.name, argv
    copies = [i.args for i in runtime if i.keyword == "COPY"]
    assert any("deploy/docker/healthcheck.py" in c and c.split()[-1] == "/opt/chat/healthcheck.py" for c in copies)


@pytest.mark.parametrize("svc", SERVICES.values(), ids=list(SERVICES))
def test_entry_point_is_the_local_one(svc: Svc) -> None:
    runtime = stages(dockerfile(svc))[-1]
    entrypoints = [exec_form(i.args) for i in runtime if i.keyword == "ENTRYPOINT"]
    cmds = [exec_form(i.args) for i in runtime if i.keyword == "CMD"]
    argv = (entrypoints[-1] if entrypoints else []) + (cmds[-1] if cmds else [])
    # chat-service: the builder links it to the service's own console script, which runs the
    # module's main() as `python -m chat_<service>` does
    assert argv == ["chat-service"], argv
    builder = stages(dockerfile(svc))[0]
    link = [i.args for i in builder if i.keyword == "RUN" and "/opt/venv/bin/chat-service" in i.args]
    assert link and 'ln -s "/opt/venv/bin/chat-${SERVICE}" /opt/venv/bin/chat-service' in link[0], link
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts[f"chat-{svc.name}"] == f"{svc.module}.__main__:main", scripts
    exposed = [p.split("/")[0] for i in runtime if i.keyword == "EXPOSE" for p in i.args.split()]
    assert exposed == [str(svc.port)], f"EXPOSE {exposed}, the service listens on {svc.port}"


@pytest.mark.parametrize("svc", SERVICES.values(), ids=list(SERVICES))
def test_entry_point_module_exists(svc: Svc) -> None:
    main = ROOT / "services" / svc.name / svc.module / "__main__.py"
    if not main.exists():
        pytest.skip(f"{main.relative_to(ROOT)} not written yet: the image's CMD cannot run until it is")
    assert main.is_file()


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern (relative to the context root) as a regex that matches the
    path itself or anything below it (excluding a directory excludes its contents)."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(f"^{out}(?:/.*)?$")


def ignored(path: str) -> bool:
    """Docker's rule: the last matching pattern wins; ``!`` re-includes."""
    result = False
    for line in DOCKERIGNORE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        if _pattern_regex(pattern).match(path):
            result = not negate
    return result


def test_dockerignore_keeps_secrets_and_state_out() -> None:
    for path in (".env", ".git/config", ".venv/bin/python", ".data/postgres", "services/x/__pycache__/a.pyc"):
        assert ignored(path), f".dockerignore must exclude {path}"


@pytest.mark.parametrize("svc", SERVICES.values(), ids=list(SERVICES))
def test_dockerignore_keeps_what_is_copied(svc: Svc) -> None:
    for instruction in dockerfile(svc):
        if instruction.keyword != "COPY" or "--from=" in instruction.args:
            continue
        sources = [w for w in shlex.split(instruction.args) if not w.startswith("--")][:-1]
        for source in sources:
            source = source.rstrip("/")
            assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
            assert not ignored(source), f"COPY {source}: excluded by .dockerignore"


def test_healthcheck_names_its_service_from_the_image(monkeypatch: pytest.MonkeyPatch) -> None:
    healthcheck = load_healthcheck()
    monkeypatch.delenv("CHAT_SERVICE", raising=False)
    assert healthcheck.main([]) == 2  # no service named anywhere: usage
    monkeypatch.setenv("CHAT_SERVICE", "nonsense")
    assert healthcheck.main([]) == 2
    asked: list[tuple[int, str]] = []

    def check_http(port: int, path: str) -> bool:
        asked.append((port, path))
        return True

    monkeypatch.setattr(healthcheck, "check_http", check_http)
    monkeypatch.setenv("CHAT_SERVICE", "billing")
    monkeypatch.delenv("BILLING_PORT", raising=False)
    assert healthcheck.main([]) == 0 and asked == [(8003, "/health")]
