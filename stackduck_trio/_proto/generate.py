"""Regenerate the protobuf/gRPC modules of this package from ``proto/``.

Run ``python -m stackduck_trio._proto.generate`` after editing a ``.proto``
file. The generated modules are committed so that installing Stackduck needs
no code generator; ``tests/io/test_proto_current.py`` fails when they are out
of date with ``proto/``.

Two kinds of module are produced per proto file, all in this package:

* ``*_pb2.py`` / ``*_pb2.pyi``: messages (protobuf runtime);
* ``*_pb2_grpc.py``: grpcio stubs (for synchronous clients and tests).

The purerpc side is not generated: protoc-gen-purerpc 0.8 refuses proto3
``optional`` fields, and our server builds its method table from the
service descriptor in ``stackduck_pb2`` instead (``stackduck_trio._rpc``).

protoc writes absolute imports (``import stackduck_pb2``); they are rewritten
to relative imports so the modules live inside this package.
"""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys
import tempfile

PACKAGE_DIR = pathlib.Path(__file__).resolve().parent
PROTO_DIR = PACKAGE_DIR.parent.parent / "proto"
PROTOS = {
    # proto path relative to PROTO_DIR -> module stem in this package
    "stackduck.proto": "stackduck",
    "grpc/health/v1/health.proto": "health",
}
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def _fix_imports(text: str) -> str:
    for stem in ("stackduck", "health"):
        text = re.sub(rf"^import {stem}_pb2 as ", f"from . import {stem}_pb2 as ", text, flags=re.M)
        text = re.sub(rf"^import {stem}_pb2$", f"from . import {stem}_pb2", text, flags=re.M)
    text = re.sub(
        r"^from grpc\.health\.v1 import health_pb2 as ",
        "from . import health_pb2 as ",
        text,
        flags=re.M,
    )
    text = re.sub(
        r"^import grpc\.health\.v1\.health_pb2$", "from . import health_pb2", text, flags=re.M
    )
    text = text.replace("grpc.health.v1.health_pb2.", "health_pb2.")
    return text


def generate(out_dir: pathlib.Path) -> list[pathlib.Path]:
    """Generate every module into ``out_dir``; return the files written."""
    written: list[pathlib.Path] = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = pathlib.Path(tmp)
        for proto in PROTOS:
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "grpc_tools.protoc",
                    f"-I{PROTO_DIR}",
                    f"--python_out={tmp_path}",
                    f"--pyi_out={tmp_path}",
                    f"--grpc_python_out={tmp_path}",
                    str(PROTO_DIR / proto),
                ],
                check=True,
            )
        for proto, stem in PROTOS.items():
            src_dir = tmp_path / pathlib.Path(proto).parent
            base = pathlib.Path(proto).stem
            for suffix in GENERATED_SUFFIXES:
                src = src_dir / f"{base}{suffix}"
                dst = out_dir / f"{stem}{suffix}"
                dst.write_text(_fix_imports(src.read_text()))
                written.append(dst)
    return written


def main() -> None:
    for path in generate(PACKAGE_DIR):
        print(f"wrote {path.relative_to(PACKAGE_DIR.parent.parent)}")


if __name__ == "__main__":
    main()
