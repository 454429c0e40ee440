"""Regenerates gen/ from protos/: Python messages, gRPC stubs and mypy stubs (`mailmesh dev gen`)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTOS = ROOT / "protos"
GEN = ROOT / "gen"

_INIT = '"""Generated protobuf contracts of mailmesh; see protos/. Do not edit."""\n'


def proto_files(protos: Path = PROTOS) -> list[Path]:
    return sorted(protos.rglob("*.proto"))


def generate(out: Path = GEN, protos: Path = PROTOS) -> list[Path]:
    """Generates every contract into `out`, replacing what was there. Returns the files written."""
    try:
        import grpc_tools
    except ImportError as exc:  # pragma: no cover - dev extra missing
        raise SystemExit("grpcio-tools is not installed: pip install -e '.[dev]'") from exc
    include = Path(grpc_tools.__file__).parent / "_proto"
    bindir = Path(sys.executable).parent
    target = out / "mailmesh"
    if target.exists():
        shutil.rmtree(target)
    out.mkdir(parents=True, exist_ok=True)
    files = [str(p.relative_to(protos)) for p in proto_files(protos)]
    cmd = [
        sys.executable, "-m", "grpc_tools.protoc",
        f"-I{protos}", f"-I{include}",
        f"--python_out={out}", f"--grpc_python_out={out}",
        f"--mypy_out={out}", f"--mypy_grpc_out={out}",
        f"--plugin=protoc-gen-mypy={bindir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bindir / 'protoc-gen-mypy_grpc'}",
        *files,
    ]
    subprocess.run(cmd, check=True, cwd=protos)
    for pkg in {p.parent for p in target.rglob("*.py")} | {target}:
        while True:
            (pkg / "__init__.py").write_text(_INIT)
            (pkg / "py.typed").write_text("")
            if pkg == target:
                break
            pkg = pkg.parent
    return sorted(p for p in target.rglob("*") if p.is_file())


if __name__ == "__main__":
    for path in generate():
        print(path.relative_to(ROOT))
