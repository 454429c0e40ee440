"""`mailmesh status`: one line per component, exit 0 only when everything is SERVING."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import SERVICE_PORT_VARS, MeshProcess, run_mailmesh


def lines_by_name(stdout: str) -> dict[str, list[str]]:
    return {line.split()[0]: line.split() for line in stdout.splitlines() if line.strip()}


def test_every_component_serving_exits_0(mailmesh_up: MeshProcess) -> None:
    res = run_mailmesh("status", "--data-dir", str(mailmesh_up.data_dir), env=mailmesh_up.env)
    assert res.returncode == 0, res.stdout + res.stderr
    rows = lines_by_name(res.stdout)
    for name, var in SERVICE_PORT_VARS.items():
        assert rows[name] == [name, f"127.0.0.1:{mailmesh_up.port(var)}", "SERVING"]
    assert rows["nats"] == ["nats", mailmesh_up.nats_url, "SERVING"]


def test_json_output(mailmesh_up: MeshProcess) -> None:
    res = run_mailmesh("status", "--data-dir", str(mailmesh_up.data_dir), "--json", env=mailmesh_up.env)
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["ok"] is True
    assert set(doc["components"]) == {*SERVICE_PORT_VARS, "nats"}
    assert {c["status"] for c in doc["components"].values()} == {"SERVING"}
    assert doc["components"]["svc_send"]["address"] == f"127.0.0.1:{mailmesh_up.port('MAILMESH_SEND_PORT')}"


def test_nothing_running_is_unreachable_and_exits_1(tmp_path: Path, mesh_settings: dict[str, str]) -> None:
    res = run_mailmesh("status", "--data-dir", str(tmp_path / "data"), env=mesh_settings)
    assert res.returncode == 1
    rows = lines_by_name(res.stdout)
    assert set(rows) == {*SERVICE_PORT_VARS, "nats"}
    assert {row[-1] for row in rows.values()} == {"UNREACHABLE"}
    assert rows["svc_mailbox"][1] == f"127.0.0.1:{mesh_settings['MAILMESH_MAILBOX_PORT']}"


def test_partial_mesh_names_what_is_down_and_exits_1(tmp_path: Path, lone_search: dict[str, str]) -> None:
    res = run_mailmesh("status", "--data-dir", str(tmp_path / "data"), env=lone_search)
    assert res.returncode == 1
    rows = lines_by_name(res.stdout)
    assert rows["svc_search"][-1] == "SERVING"
    assert rows["nats"][-1] == "SERVING"
    for name in ("svc_mailbox", "svc_send", "svc_ingest", "svc_gateway"):
        assert rows[name][-1] == "UNREACHABLE", name


def test_bad_setting_exits_2(tmp_path: Path) -> None:
    res = run_mailmesh("status", "--data-dir", str(tmp_path), env={"MAILMESH_SEARCH_PORT": "99999"})
    assert res.returncode == 2
    assert "MAILMESH_SEARCH_PORT" in res.stderr
    assert "Traceback" not in res.stderr


def test_help_lists_the_commands() -> None:
    res = subprocess.run([sys.executable, "-m", "mailmesh_common.cli.main", "--help"], capture_output=True,
                         text=True, timeout=30)
    assert res.returncode == 0
    for command in ("up", "status", "dev"):
        assert command in res.stdout
