"""``python -m devstack run`` starts everything; ``python -m devstack proto`` regenerates gRPC code."""
from __future__ import annotations

import sys


def main() -> int:
    command = sys.argv[1] if len(sys.argv) > 1 else "run"
    if command == "proto":
        from devstack.proto import main as proto_main

        return proto_main()
    if command == "run":
        from devstack.run import main as run_main

        return run_main()
    print("usage: python -m devstack [run|proto]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
