"""Fixtures of the `mailmesh` command's tests."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailmesh_common.natsserver import spawn, stop_processes
from tests.conftest import child_env, grpc_health, wait_until


@pytest.fixture
def lone_search(tmp_path: Path, nats_server: str, mesh_settings: dict[str, str]) -> Iterator[dict[str, str]]:
    """svc_search alone, on the `nats_server` fixture; yields the settings it runs with."""
    env = {**mesh_settings, "MAILMESH_NATS_PORT": nats_server.rsplit(":", 1)[1]}
    proc = spawn([sys.executable, "-m", "svc_search"], log_file=tmp_path / "svc_search.log",
                 env=child_env(env), cwd=tmp_path)
    try:
        wait_until(lambda: proc.poll() is not None or grpc_health(int(env["MAILMESH_SEARCH_PORT"]), 0.5)
                   == "SERVING", 30, "svc_search to serve")
        assert proc.poll() is None, (tmp_path / "svc_search.log").read_text()
        yield env
    finally:
        stop_processes([proc], 10)
