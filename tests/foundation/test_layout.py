"""The shape the design asks for: every service its own package of the same shape, and no
service importing another (they talk over HTTP and gRPC only)."""
from __future__ import annotations

import ast
import importlib
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


@pytest.mark.parametrize("service,has_database", SERVICES.items())
def test_litestar_services_share_one_shape(service: str, has_database: bool) -> None:
    package = ROOT / "services" / service / f"chat_{service}"
    for module in ("__main__.py", "app.py", "settings.py"):
        assert (package / module).is_file(), f"chat_{service}/{module} missing"
    app = importlib.import_module(f"chat_{service}.app")
    assert callable(app.create_app)
    assert callable(importlib.import_module(f"chat_{service}.__main__").main)
    migrations = sorted((package / "migrations").glob("*.sql")) if has_database else []
    assert bool(migrations) == has_database


@pytest.mark.parametrize("module", ["chat_gateway.app", "chat_ai.server"])
def test_services_without_a_database_load_no_database_driver(module: str) -> None:
    """Database errors are classified by chat_common.db, which only the services owning tables
    import: the gateway and the AI service start without asyncpg or SQLAlchemy."""
    code = f"import sys, {module}; print(sorted(m for m in ('asyncpg', 'sqlalchemy') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", f"{module} loads {done.stdout.strip()}"
