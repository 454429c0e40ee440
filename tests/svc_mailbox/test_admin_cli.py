"""The admin CLI (`mailmesh domain|user ...`) as an operator runs it, against a running
svc_mailbox over gRPC."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

from mailmesh.v1 import mailbox_service_pb2 as pb

from tests.svc_mailbox.conftest import Mesh

MAILMESH = [sys.executable, "-m", "mailmesh_common.cli.main"]


async def cli(mesh: Mesh, *args: str, stdin: str = "") -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILMESH_")}
    env["MAILMESH_MAILBOX_PORT"] = str(mesh.settings.mailbox_port)
    proc = await asyncio.create_subprocess_exec(
        *MAILMESH, *args, "--data-dir", str(mesh.settings.data_dir), env=env,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(stdin.encode()), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_domain_and_user_administration(mesh: Mesh) -> None:
    assert (await cli(mesh, "domain", "add", "Example.COM"))[0] == 0
    code, out, _ = await cli(mesh, "domain", "list")
    assert code == 0 and "example.com" in out

    code, out, err = await cli(mesh, "user", "add", "alice@example.com", "--name", "Alice", "--password-stdin",
                               stdin="first password\n")
    assert code == 0, err
    assert "alice@example.com" in out
    code, out, _ = await cli(mesh, "user", "list")
    assert code == 0 and "alice@example.com" in out

    ok = await mesh.stub.Authenticate(pb.AuthenticateRequest(email="alice@example.com", password="first password"),
                                      metadata=mesh.md())
    assert ok.account.display_name == "Alice"

    code, _, err = await cli(mesh, "user", "passwd", "alice@example.com", "--password-stdin",
                             stdin="second password\n")
    assert code == 0, err
    ok = await mesh.stub.Authenticate(pb.AuthenticateRequest(email="alice@example.com", password="second password"),
                                      metadata=mesh.md())
    assert ok.account.email == "alice@example.com"
    # the password is stored hashed, never in clear
    store = Path(mesh.settings.resolved_kv_path()).read_bytes()
    assert b"second password" not in store


async def test_admin_errors_are_one_clear_line(mesh: Mesh) -> None:
    code, _, err = await cli(mesh, "user", "add", "bob@nowhere.test", "--password-stdin", stdin="long enough pw\n")
    assert code == 1
    assert "nowhere.test is not a local domain" in err and "Traceback" not in err
    await cli(mesh, "domain", "add", "example.com")
    code, _, err = await cli(mesh, "user", "add", "bob@example.com", "--password-stdin", stdin="short\n")
    assert code == 1 and "at least 8 characters" in err
    code, _, err = await cli(mesh, "domain", "add", "example.com")
    assert code == 1 and "already exists" in err


async def test_admin_with_service_down_says_so(mesh: Mesh) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILMESH_")}
    env["MAILMESH_MAILBOX_PORT"] = "1"  # nothing listens there
    proc = await asyncio.create_subprocess_exec(
        *MAILMESH, "domain", "list", "--data-dir", str(mesh.settings.data_dir), env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 1
    assert b"not reachable" in err
