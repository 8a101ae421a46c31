"""The shape the design asks for: every service its own package of the same shape, and no
service importing another (they talk over HTTP and gRPC only)."""
from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SERVICES = {"gateway": False, "sessions": True, "files": True, "billing": True}
ALL = [*SERVICES, "ai"]


def imported_modules(package_dir: Path) -> set[str]:
    found: set[str] = set()
    for path in package_dir.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("service", ALL)
def test_no_service_imports_another(service: str) -> None:
    imports = imported_modules(ROOT / "services" / service / f"chat_{service}")
    others = {f"chat_{other}" for other in ALL if other != service}
    assert not imports & others, f"chat_{service} imports {imports & others}"


def _calls(tree: ast.AST, name: str) -> bool:
    return any(
        isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == name
        for node in ast.walk(tree)
    )


@pytest.mark.parametrize("service", ALL)
def test_every_service_has_the_shared_anatomy(service: str) -> None:
    """docs/internal-api.md, "Package shape": an entry point through chat_common.entry, frozen
    settings read once by from_env, and (the Litestar services) create_app(settings) with the
    shared ServicePlugin and dependencies handed out by Litestar; the services owning tables
    have migrations and say whether to apply them on start."""
    package = ROOT / "services" / service / f"chat_{service}"
    main_tree = ast.parse((package / "__main__.py").read_text())
    assert _calls(main_tree, "run_service"), f"chat_{service}/__main__.py does not start through chat_common.entry"
    entry = importlib.import_module(f"chat_{service}.__main__")
    assert list(inspect.signature(entry.main).parameters) == ["argv"], "main(argv=None)"

    settings_module = importlib.import_module(f"chat_{service}.settings")
    classes = [c for c in vars(settings_module).values()
               if inspect.isclass(c) and c.__module__ == settings_module.__name__ and c.__name__.endswith("Settings")]
    assert len(classes) == 1, f"chat_{service}.settings: one <Service>Settings, found {classes}"
    settings_class = classes[0]
    assert dataclasses.is_dataclass(settings_class) and settings_class.__dataclass_params__.frozen  # type: ignore[attr-defined]
    assert isinstance(inspect.getattr_static(settings_class, "from_env"), classmethod)

    if service in SERVICES:
        app_tree = ast.parse((package / "app.py").read_text())
        assert _calls(app_tree, "ServicePlugin"), f"chat_{service}/app.py does not use chat_common.app.ServicePlugin"
        app = importlib.import_module(f"chat_{service}.app")
        assert list(inspect.signature(app.create_app).parameters) == ["settings"]
        has_database = SERVICES[service]
        migrations = sorted((package / "migrations").glob("*.sql"))
        assert bool(migrations) == has_database
        fields = {f.name for f in dataclasses.fields(settings_class)}
        if has_database:
            assert {"database_url", "db_schema", "migrate_on_start"} <= fields, fields
            assert hasattr(entry, "migrate"), f"chat_{service}: python -m chat_{service} migrate"


@pytest.mark.parametrize("service", ALL)
def test_every_entry_point_refuses_an_unknown_argument_alike(service: str) -> None:
    done = subprocess.run([sys.executable, "-m", f"chat_{service}", "--bogus"], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "SERVICE_TOKEN": "x" * 32})
    assert done.returncode == 2, (done.returncode, done.stdout[-500:], done.stderr[-500:])
    assert done.stderr.startswith(f"usage: python -m chat_{service}"), done.stderr
    assert ("[migrate]" in done.stderr) == SERVICES.get(service, False)


@pytest.mark.parametrize("module", ["chat_gateway.app", "chat_ai.server"])
def test_services_without_a_database_load_no_database_driver(module: str) -> None:
    """Database errors are classified by chat_common.db, which only the services owning tables
    import: the gateway and the AI service start without asyncpg or SQLAlchemy."""
    code = f"import sys, {module}; print(sorted(m for m in ('asyncpg', 'sqlalchemy') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", f"{module} loads {done.stdout.strip()}"
