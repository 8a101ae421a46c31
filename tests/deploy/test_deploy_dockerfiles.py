"""deploy/docker/<service>.Dockerfile: one per service, multi-stage, pinned bases, a non-root
user, a HEALTHCHECK through deploy/docker/healthcheck.py, and the same entry point as a local
run (`python -m chat_<service>`). Also the .dockerignore keeps secrets and local state out of
the build context without hiding what the Dockerfiles copy."""
from __future__ import annotations

import json
import re
import shlex

import pytest

from deploy_support import DOCKER_DIR, DOCKERIGNORE, ROOT, SERVICES, Svc, parse_dockerfile, stages

PINNED_BASE = re.compile(r"^(?:[a-z0-9.-]+(?::\d+)?/)?[a-z0-9._/-]+:(?P<tag>[A-Za-z0-9_.-]+)(?:@sha256:[0-9a-f]{64})?$")


def dockerfile(svc: Svc):
    path = DOCKER_DIR / f"{svc.name}.Dockerfile"
    assert path.is_file(), f"{path} missing (one Dockerfile per service)"
    return parse_dockerfile(path)


def exec_form(args: str) -> list[str]:
    """The JSON (exec) form of CMD/ENTRYPOINT/HEALTHCHECK CMD; shell form is refused, since
    a shell as PID 1 does not pass SIGTERM on to the service (graceful shutdown)."""
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


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
    assert argv[:2] == ["python", "/opt/chat/healthcheck.py"] and argv[2] == svc.name, argv
    copies = [i.args for i in runtime if i.keyword == "COPY"]
    assert any("deploy/docker/healthcheck.py" in c and c.split()[-1] == "/opt/chat/healthcheck.py" for c in copies)


@pytest.mark.parametrize("svc", SERVICES.values(), ids=list(SERVICES))
def test_entry_point_is_the_local_one(svc: Svc) -> None:
    runtime = stages(dockerfile(svc))[-1]
    entrypoints = [exec_form(i.args) for i in runtime if i.keyword == "ENTRYPOINT"]
    cmds = [exec_form(i.args) for i in runtime if i.keyword == "CMD"]
    argv = (entrypoints[-1] if entrypoints else []) + (cmds[-1] if cmds else [])
    assert argv == ["python", "-m", svc.module], f"runs {argv}, a local run runs python -m {svc.module}"
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
