"""DKIM keys live in svc_send's KV store (so every replica signs with them): `mailmesh dkim
keygen|import|list` work on that store, a running svc_send signs its next message with a key
made there, and key files under {data_dir}/dkim are imported at start (the `sm` fixture's
example.com keys come that way)."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest

from mailmesh_common.cli.main import run as _cli
from mailmesh_common.dns import Resolver
from svc_ingest.checks.dkim import verify_dkim
from svc_send.dkim_keys import new_private_pem
from tests.svc_send.conftest import REMOTE, SendMesh, wait_for

_RECORD = re.compile(r'^\s*(\S+)\. IN TXT "(v=DKIM1; [^"]+)"$', re.MULTILINE)


def test_dkim_keygen_import_and_list_work_on_the_send_store(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    opts = ["--data-dir", str(data)]
    assert _cli(["dkim", "keygen", "--domain", "Example.ORG", *opts]) == 0
    out = capsys.readouterr().out
    assert "stored in the send store" in out
    assert 'mail._domainkey.example.org. IN TXT "v=DKIM1; k=rsa; p=MII' in out
    assert (data / "send.db").exists() and not (data / "dkim").exists(), "the store, not a file, holds it"
    assert _cli(["dkim", "keygen", "--domain", "example.org", *opts]) == 1
    assert "exists already" in capsys.readouterr().err
    assert _cli(["dkim", "keygen", "--domain", "example.org", "--selector", "ed", "--algorithm", "ed25519",
                 *opts]) == 0
    assert 'ed._domainkey.example.org. IN TXT "v=DKIM1; k=ed25519; p=' in capsys.readouterr().out
    assert _cli(["dkim", "keygen", "--domain", "bad domain", *opts]) == 1
    capsys.readouterr()

    pem = tmp_path / "old.pem"
    pem.write_bytes(new_private_pem("rsa"))
    assert _cli(["dkim", "import", "--domain", "example.net", "--selector", "2019", "--file", str(pem), *opts]) == 0
    assert '2019._domainkey.example.net. IN TXT "v=DKIM1; k=rsa; p=MII' in capsys.readouterr().out
    junk = tmp_path / "junk.pem"
    junk.write_bytes(b"-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n")
    assert _cli(["dkim", "import", "--domain", "example.net", "--selector", "x", "--file", str(junk), *opts]) == 1
    assert "not a PEM private key" in capsys.readouterr().err
    assert _cli(["dkim", "import", "--domain", "example.net", "--selector", "x", "--file",
                 str(tmp_path / "missing.pem"), *opts]) == 1
    assert "cannot read" in capsys.readouterr().err

    assert _cli(["dkim", "list", *opts]) == 0
    listed = capsys.readouterr().out
    assert [name for name, _ in _RECORD.findall(listed)] == [
        "2019._domainkey.example.net", "ed._domainkey.example.org", "mail._domainkey.example.org"]
    assert _cli(["dkim", "list", "--domain", "example.net", *opts]) == 0
    assert [n for n, _ in _RECORD.findall(capsys.readouterr().out)] == ["2019._domainkey.example.net"]


async def _delivered_from(sm: SendMesh, sender: str) -> bytes | None:
    found = [m.data for m in sm.sink.messages if m.mail_from == sender]
    return found[0] if found else None


async def test_a_key_made_with_the_cli_signs_the_next_message_of_the_running_service(
        sm: SendMesh, capsys: pytest.CaptureFixture[str]) -> None:
    assert sm.settings is not None
    zoe = (await sm.mesh.admin_setup("example.org", ("zoe",)))["zoe"]
    capsys.readouterr()
    code = await asyncio.to_thread(_cli, ["dkim", "keygen", "--domain", "example.org", "--selector", "s2024",
                                          "--algorithm", "ed25519", "--data-dir", str(sm.settings.data_dir)])
    assert code == 0
    [(name, value)] = _RECORD.findall(capsys.readouterr().out)
    sm.dns.add(name, "TXT", value)
    assert not (sm.settings.data_dir / "dkim" / "example.org").exists()

    await sm.send_mail(zoe, to=(f"dave@{REMOTE}",), subject="signed by the store's key")
    data = await wait_for(lambda: _delivered_from(sm, "zoe@example.org"), "zoe's message at the remote")
    results = await verify_dkim(Resolver([sm.dns.address]), data)
    assert [(x.domain, x.algorithm, x.result) for x in results] == [("example.org", "ed25519-sha256", "pass")]
