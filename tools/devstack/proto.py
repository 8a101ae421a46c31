"""Generate the Python gRPC code from proto/ into chat_common.aiproto (``make proto``).

The proto is compiled under the virtual path ``chat_common/aiproto/`` so the generated modules
import each other by their package path; the wire names (package ``ai_service``) are untouched.
"""
from __future__ import annotations

import shutil
import sys
import tempfile
from importlib import resources
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTO_DIR = ROOT / "proto"
TARGET = ROOT / "services" / "common"
PACKAGE_PATH = "chat_common/aiproto"
GENERATED = ("ai_service_pb2.py", "ai_service_pb2.pyi", "ai_service_pb2_grpc.py")


def generate(out_root: Path) -> list[Path]:
    from grpc_tools import protoc

    well_known = str(resources.files("grpc_tools") / "_proto")
    out_root.mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"-I{PACKAGE_PATH}={PROTO_DIR}",
        f"-I{well_known}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        f"{PACKAGE_PATH}/ai_service.proto",
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed")
    return [out_root / PACKAGE_PATH / name for name in GENERATED]


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        produced = generate(Path(tmp))
        target_dir = TARGET / PACKAGE_PATH
        target_dir.mkdir(parents=True, exist_ok=True)
        (target_dir / "__init__.py").write_text('"""Generated from proto/ by `make proto`; do not edit."""\n')
        for path in produced:
            shutil.copyfile(path, target_dir / path.name)
            print(f"wrote {target_dir / path.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
