"""The gateway as a process: `mailmesh up` serves the REST API on http_port next to the gRPC
health endpoint, and `python -m svc_gateway` stops cleanly (exit 0) on SIGTERM."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import httpx
from mailmesh.v1 import mailbox_service_pb2 as mpb
from mailmesh.v1 import mailbox_service_pb2_grpc as mpb_grpc

from mailmesh_common import auth
from tests.conftest import MeshProcess, child_env, grpc_health, mesh_env, nats_server, wait_until  # noqa: F401


def _get(url: str) -> int:
    try:
        return httpx.get(url, timeout=5).status_code
    except httpx.HTTPError:
        return 0


def test_mailmesh_up_serves_the_rest_api(mailmesh_up: MeshProcess) -> None:
    base = f"http://127.0.0.1:{mailmesh_up.port('MAILMESH_HTTP_PORT')}"
    wait_until(lambda: _get(f"{base}/openapi.json") == 200, 30, "the REST API")
    assert grpc_health(mailmesh_up.port("MAILMESH_GATEWAY_PORT")) == "SERVING"
    token = (mailmesh_up.data_dir / "internal.token").read_text().strip()
    md = ((auth.TOKEN_KEY, token),)
    with grpc.insecure_channel(f"127.0.0.1:{mailmesh_up.port('MAILMESH_MAILBOX_PORT')}") as ch:
        stub = mpb_grpc.MailboxServiceStub(ch)
        stub.CreateDomain(mpb.CreateDomainRequest(name="up.test"), metadata=md, timeout=30)
        stub.CreateAccount(mpb.CreateAccountRequest(email="dana@up.test", password="correct horse battery"),
                           metadata=md, timeout=30)
    with httpx.Client(base_url=base, timeout=30) as http:
        assert http.get("/v1/profile").status_code == 401
        r = http.post("/v1/auth/token", json={"email": "dana@up.test", "password": "correct horse battery"})
        assert r.status_code == 200, r.text
        r = http.get("/v1/profile", headers={"Authorization": f"Bearer {r.json()['accessToken']}"})
        assert r.status_code == 200 and r.json()["emailAddress"] == "dana@up.test"


def test_python_m_svc_gateway_stops_cleanly_on_sigterm(tmp_path: Path, nats_server: str) -> None:  # noqa: F811
    env = mesh_env(tmp_path / "data")
    env["MAILMESH_NATS_URL"] = nats_server
    proc = subprocess.Popen([sys.executable, "-m", "svc_gateway"], env=child_env(env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        base = f"http://127.0.0.1:{env['MAILMESH_HTTP_PORT']}"
        wait_until(lambda: proc.poll() is not None or _get(f"{base}/openapi.json") == 200, 30, "the REST API")
        assert proc.poll() is None, proc.communicate()
        assert grpc_health(int(env["MAILMESH_GATEWAY_PORT"])) == "SERVING"
        # the mailbox is not running: an authenticated call would need it, a login answers 503
        r = httpx.post(f"{base}/v1/auth/token", json={"email": "a@b.test", "password": "x"}, timeout=60)
        assert r.status_code == 503 and r.json()["error"]["code"] == "SERVICE_UNAVAILABLE"
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert time.monotonic() - started < 30
        assert "Traceback" not in err
        assert _get(f"{base}/openapi.json") == 0  # no longer listening
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
