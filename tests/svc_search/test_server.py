"""`python -m svc_search` serves gRPC health and exits cleanly on SIGTERM."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import child_env, free_port, grpc_health


def test_python_m_svc_search_serves_health_and_stops_cleanly(tmp_path: Path, nats_server: str) -> None:
    port = free_port()
    env = child_env({"MAILMESH_NATS_URL": nats_server, "MAILMESH_SEARCH_PORT": str(port),
                     "MAILMESH_MAILBOX_PORT": str(free_port()), "MAILMESH_DATA_DIR": str(tmp_path / "data"),
                     "MAILMESH_HOST": "127.0.0.1"})
    proc = subprocess.Popen([sys.executable, "-m", "svc_search"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while grpc_health(port, timeout=0.5) != "SERVING":
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "svc_search did not become SERVING"
            time.sleep(0.1)
        assert (tmp_path / "data" / "search").is_dir()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0, proc.communicate()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
