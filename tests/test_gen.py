"""gen/ is what `make gen` produces from protos/ today, and the contracts pass `buf lint`."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and "__pycache__" not in p.parts}


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
