"""gen/ is what `make gen` produces from protos/ today, and the contracts pass `buf lint`.

The generators stamp their own version into the files (grpcio-tools' GRPC_GENERATED_VERSION,
protoc's runtime-version check): a fresh install may bring a newer patch release of the tools
than the one that wrote gen/, so those stamps are compared apart from the contract code. What
the stamps demand of the runtime must be what pyproject.toml installs at the least."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

# The generator-version stamps: grpcio-tools' in *_pb2_grpc.py, protoc's in *_pb2.py.
_GRPC_STAMP = re.compile(rb"^GRPC_GENERATED_VERSION = '([0-9.]+)'$", re.M)
_PROTOBUF_STAMP = re.compile(rb"^# Protobuf Python Version: ([0-9.]+)$", re.M)
_PROTOBUF_CHECK = re.compile(rb"(_runtime_version\.Domain\.PUBLIC,\n)\s*\d+,\n\s*\d+,\n\s*\d+,\n")


def _unstamped(content: bytes) -> bytes:
    content = _GRPC_STAMP.sub(b"GRPC_GENERATED_VERSION = '*'", content)
    content = _PROTOBUF_STAMP.sub(b"# Protobuf Python Version: *", content)
    return _PROTOBUF_CHECK.sub(rb"\1*\n", content)


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): _unstamped(p.read_bytes()) for p in sorted(root.rglob("*"))
            if p.is_file() and "__pycache__" not in p.parts}


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split("."))


def _minimum(requirement: str) -> tuple[int, ...]:
    """The `>=` bound pyproject.toml's dependencies give a package."""
    text = (REPO / "pyproject.toml").read_text()
    found = re.search(rf'"{re.escape(requirement)}>=([0-9.]+)"', text)
    assert found, f"pyproject.toml has no {requirement}>= requirement"
    return _version(found.group(1))


def _buf() -> Path | None:
    beside = Path(sys.executable).parent / "buf"
    if beside.exists():
        return beside
    found = shutil.which("buf")
    return Path(found) if found else None


needs_grpc_tools = pytest.mark.skipif(
    importlib.util.find_spec("grpc_tools") is None or importlib.util.find_spec("mypy_protobuf") is None,
    reason="grpcio-tools / mypy-protobuf not installed (pip install -e '.[dev]')")


@needs_grpc_tools
def test_gen_is_up_to_date(tmp_path: Path) -> None:
    from mailmesh_common.devtools.gen import generate

    written = generate(out=tmp_path)
    assert written, "generate() wrote nothing"
    fresh = _tree(tmp_path / "mailmesh")
    committed = _tree(REPO / "gen" / "mailmesh")
    missing = sorted(set(fresh) - set(committed))
    extra = sorted(set(committed) - set(fresh))
    changed = sorted(name for name in set(fresh) & set(committed) if fresh[name] != committed[name])
    assert not (missing or extra or changed), (
        f"gen/ is stale: run make gen (missing: {missing}, not generated any more: {extra}, "
        f"different: {changed})")


def test_installed_runtimes_satisfy_the_generated_code() -> None:
    """The generated modules refuse to import under an older grpcio/protobuf than the tools that
    wrote them: pyproject.toml must never allow one."""
    gen = REPO / "gen" / "mailmesh" / "v1"
    grpc_stamps = {m.group(1).decode() for p in gen.glob("*_pb2_grpc.py")
                   if (m := _GRPC_STAMP.search(p.read_bytes()))}
    protobuf_stamps = {m.group(1).decode() for p in gen.glob("*_pb2.py")
                       if (m := _PROTOBUF_STAMP.search(p.read_bytes()))}
    assert grpc_stamps and protobuf_stamps, "no version stamps found in gen/"
    assert _minimum("grpcio") >= max(map(_version, grpc_stamps)), (
        f"gen/ needs grpcio>={max(grpc_stamps, key=_version)}: raise the bound in pyproject.toml")
    assert _minimum("protobuf") >= max(map(_version, protobuf_stamps)), (
        f"gen/ needs protobuf>={max(protobuf_stamps, key=_version)}: raise the bound in pyproject.toml")


@needs_grpc_tools
def test_mailmesh_dev_gen_writes_and_lists_the_files(tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, "-m", "mailmesh_common.cli.main", "dev", "gen", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    listed = set(res.stdout.split())
    assert str(tmp_path / "mailmesh" / "v1" / "mailbox_service_pb2_grpc.py") in listed
    assert (tmp_path / "mailmesh" / "v1" / "py.typed").exists()


@pytest.mark.skipif(_buf() is None, reason="buf not installed (pip install -e '.[dev]' installs buf-bin)")
def test_buf_lint_passes() -> None:
    buf = _buf()
    assert buf is not None
    res = subprocess.run([str(buf), "lint"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, f"buf lint failed:\n{res.stdout}{res.stderr}"
