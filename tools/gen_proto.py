"""Regenerate netforge/proto/netforge_pb2.py from protos/netforge.proto.

Needs grpcio-tools (the ``dev`` extra), whose bundled protoc fixes the generated code's
version: keep it pinned in pyproject.toml so that the committed module stays reproducible.

    python tools/gen_proto.py            # rewrite the module
    python tools/gen_proto.py --check    # exit 1 if the committed module is stale
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO = ROOT / "protos" / "netforge.proto"
MODULE = ROOT / "netforge" / "proto" / "netforge_pb2.py"


def generate(out_dir: Path) -> Path:
    """Run protoc on the schema, writing netforge_pb2.py into ``out_dir``."""
    from grpc_tools import protoc

    args = ["protoc", f"-I{PROTO.parent}", f"--python_out={out_dir}", str(PROTO)]
    if protoc.main(args) != 0:
        raise SystemExit(f"protoc failed on {PROTO}")
    return out_dir / MODULE.name


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp)).read_bytes()
    if args.check:
        if MODULE.read_bytes() != fresh:
            print(f"{MODULE} is stale: run python tools/gen_proto.py", file=sys.stderr)
            return 1
        return 0
    MODULE.write_bytes(fresh)
    return 0


if __name__ == "__main__":
    sys.exit(main())
