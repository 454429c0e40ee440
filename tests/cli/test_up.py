"""`mailmesh up` as a real subprocess: nats-server and five services on free ports, health,
streams, restart after a crash, clean stop on SIGTERM, no orphans, and every refusal to start."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import nats
import pytest
from nats.js import api as js_api

from mailmesh_common.natsserver import (
    NatsServerNotFound,
    check_config,
    find_nats_server,
    jetstream_ready,
    write_config,
)
from tests.conftest import (
    SERVICE_PORT_VARS,
    MeshProcess,
    grpc_health,
    leftovers,
    port_free,
    run_mailmesh,
    wait_until,
)


def test_up_prints_endpoints_and_every_service_is_serving(mailmesh_up: MeshProcess) -> None:
    out = "".join(mailmesh_up.stdout)
    for name, var in SERVICE_PORT_VARS.items():
        assert f"127.0.0.1:{mailmesh_up.port(var)}" in out, name
        assert grpc_health(mailmesh_up.port(var)) == "SERVING", name
    # served protocol listeners are advertised and answer; the others are not (their ports are
    # still reserved)
    for var in ("MAILMESH_SMTP_PORT", "MAILMESH_SUBMISSION_PORT"):
        assert f"127.0.0.1:{mailmesh_up.port(var)}" in out, var
        with socket.create_connection(("127.0.0.1", mailmesh_up.port(var)), timeout=10) as smtp:
            assert smtp.recv(512).startswith(b"220 "), var
    http = f"http://127.0.0.1:{mailmesh_up.port('MAILMESH_HTTP_PORT')}"
    assert http in out
    assert httpx.get(f"{http}/openapi.json", timeout=10).json()["openapi"].startswith("3.")
    assert f"127.0.0.1:{mailmesh_up.port('MAILMESH_IMAP_PORT')}" not in out
    assert mailmesh_up.nats_url in out
    assert str(mailmesh_up.data_dir) in out
    endpoints = json.loads((mailmesh_up.data_dir / "endpoints.json").read_text())
    assert endpoints["svc_mailbox"] == f"127.0.0.1:{mailmesh_up.port('MAILMESH_MAILBOX_PORT')}"
    assert endpoints["nats"] == mailmesh_up.nats_url
    assert int((mailmesh_up.data_dir / "mailmesh.pid").read_text()) == mailmesh_up.proc.pid
    pids = mailmesh_up.pids()
    assert pids["supervisor"] == mailmesh_up.proc.pid
    for name in (*SERVICE_PORT_VARS, "nats"):
        assert pids[name], name
        assert (mailmesh_up.data_dir / "logs" / f"{name}.log").exists(), name


async def test_streams_exist_with_file_storage(mailmesh_up: MeshProcess) -> None:
    nc = await nats.connect(mailmesh_up.nats_url, connect_timeout=5, allow_reconnect=False, max_reconnect_attempts=1)
    try:
        js = nc.jetstream()
        for name in ("INBOUND", "EVENTS", "OUTBOUND"):
            info = await js.stream_info(name)
            assert info.config.storage == js_api.StorageType.FILE, name
    finally:
        await nc.close()


def test_nats_config_syncs_every_write_and_is_valid(mailmesh_up: MeshProcess) -> None:
    conf = mailmesh_up.data_dir / "nats" / "nats-server.conf"
    text = conf.read_text()
    assert "sync_interval: always" in text
    assert f'listen: "127.0.0.1:{mailmesh_up.port("MAILMESH_NATS_PORT")}"' in text
    assert str(mailmesh_up.data_dir / "nats" / "js") in text
    assert not any(line.startswith("http") for line in text.splitlines())  # no monitor port by default
    res = subprocess.run([str(find_nats_server()), "-c", str(conf), "-t"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_status_lists_every_component_of_a_running_mesh(mailmesh_up: MeshProcess) -> None:
    res = run_mailmesh("status", "--data-dir", str(mailmesh_up.data_dir), env=mailmesh_up.env)
    assert res.returncode == 0, res.stdout + res.stderr
    names = [line.split()[0] for line in res.stdout.splitlines()]
    assert sorted(names) == sorted([*SERVICE_PORT_VARS, "nats"])


def test_ingest_runs_one_worker_per_core_by_default(mailmesh_up: MeshProcess) -> None:
    """MAILMESH_INGEST_WORKERS unset: one svc_ingest process per core (at most 8), all alive,
    sharing the SMTP port that takes mail."""
    expected = max(1, min(os.cpu_count() or 1, 8))
    pids = mailmesh_up.pids()
    ingest = sorted(name for name in pids if name.startswith("svc_ingest"))
    assert ingest == ["svc_ingest", *(f"svc_ingest-{k}" for k in range(2, expected + 1))]
    for name in ingest:
        pid = pids[name]
        assert pid is not None
        os.kill(pid, 0)  # alive
    with socket.create_connection(("127.0.0.1", mailmesh_up.port("MAILMESH_SMTP_PORT")), timeout=10) as s:
        assert s.recv(512).startswith(b"220 ")


def test_a_killed_service_is_restarted_and_serves_again(mailmesh_up: MeshProcess) -> None:
    old = mailmesh_up.pids()["svc_search"]
    assert old
    os.kill(old, signal.SIGKILL)
    wait_until(lambda: mailmesh_up.pids().get("svc_search") not in (None, old), 15, "svc_search to be restarted")
    wait_until(lambda: grpc_health(mailmesh_up.port("MAILMESH_SEARCH_PORT"), 1.0) == "SERVING", 20,
               "restarted svc_search to be SERVING")
    log = (mailmesh_up.data_dir / "logs" / "supervisor.log").read_text()
    assert f"svc_search (pid {old}) exited with signal SIGKILL" in log
    assert "svc_search restarted" in log
    assert "svc_search restarted" in "".join(mailmesh_up.stderr)


def test_a_killed_nats_server_is_restarted(mailmesh_up: MeshProcess) -> None:
    old = mailmesh_up.pids()["nats"]
    assert old
    os.kill(old, signal.SIGKILL)
    wait_until(lambda: mailmesh_up.pids().get("nats") not in (None, old), 15, "nats-server to be restarted")
    res = run_mailmesh("status", "--data-dir", str(mailmesh_up.data_dir), env=mailmesh_up.env)
    deadline = time.monotonic() + 15
    while res.returncode != 0 and time.monotonic() < deadline:
        time.sleep(0.3)
        res = run_mailmesh("status", "--data-dir", str(mailmesh_up.data_dir), env=mailmesh_up.env)
    assert res.returncode == 0, res.stdout


def test_a_second_up_on_the_same_data_dir_is_refused(mailmesh_up: MeshProcess) -> None:
    res = run_mailmesh("up", "--data-dir", str(mailmesh_up.data_dir), env=mailmesh_up.env)
    assert res.returncode == 1
    assert f"already running for {mailmesh_up.data_dir} (pid {mailmesh_up.proc.pid})" in res.stderr
    assert mailmesh_up.proc.poll() is None


def test_sigterm_stops_everything_and_leaves_nothing_behind(mailmesh_up: MeshProcess) -> None:
    ports = [int(v) for k, v in mailmesh_up.env.items() if k.endswith("_PORT")]
    started = time.monotonic()
    mailmesh_up.proc.send_signal(signal.SIGTERM)
    assert mailmesh_up.proc.wait(15) == 0
    assert time.monotonic() - started < 15
    wait_until(lambda: not leftovers(str(mailmesh_up.data_dir)), 5, "children to disappear")
    assert all(port_free(p) for p in ports)
    assert not (mailmesh_up.data_dir / "mailmesh.pid").exists()
    assert "stopped" in (mailmesh_up.data_dir / "logs" / "supervisor.log").read_text()


def test_a_nats_server_whose_jetstream_stops_answering_is_restarted(tmp_path: Path,
                                                                    mesh_settings: dict[str, str]) -> None:
    """nats-server keeps running with JetStream disabled after a storage error (a full disk); a
    stopped process is the same to its clients: the supervisor restarts it."""
    m = MeshProcess(tmp_path / "data", mesh_settings, "--jetstream-check", "0.5", "--jetstream-failures", "3")
    try:
        m.wait_up()
        old = m.pids()["nats"]
        assert old
        os.kill(old, signal.SIGSTOP)
        wait_until(lambda: m.pids().get("nats") not in (None, old), 30, "nats-server to be restarted")
        log = (m.data_dir / "logs" / "supervisor.log").read_text()
        assert f"nats (pid {old}) runs but its JetStream did not answer 3 checks in a row; restarting it" in log
        wait_until(lambda: run_mailmesh("status", "--data-dir", str(m.data_dir), env=m.env).returncode == 0, 30,
                   "every component, nats too, to be healthy again")
        assert m.pids().get("nats") not in (None, old)  # and not restarted again meanwhile
    finally:
        m.stop()


def test_jetstream_check_arguments_are_validated(tmp_path: Path, mesh_settings: dict[str, str]) -> None:
    res = run_mailmesh("up", "--data-dir", str(tmp_path / "data"), "--jetstream-failures", "0", env=mesh_settings)
    assert res.returncode == 2
    assert "--jetstream-failures" in res.stderr and not (tmp_path / "data").exists()


def test_children_die_with_a_killed_supervisor(tmp_path: Path, mesh_settings: dict[str, str]) -> None:
    data_dir = tmp_path / "data"
    m = MeshProcess(data_dir, mesh_settings)
    try:
        m.wait_up()
        children = [pid for name, pid in m.pids().items() if name != "supervisor" and pid]
        assert len(children) == 5 + max(1, min(os.cpu_count() or 1, 8))  # nats, 4 services, ingest workers
        m.proc.kill()
        m.proc.wait(5)
        wait_until(lambda: not leftovers(str(data_dir)), 15, "children of the killed supervisor to exit")
    finally:
        m.stop()


# --- refusing to start ----------------------------------------------------------------------------

def test_port_in_use_names_the_service_and_starts_nothing(tmp_path: Path, mesh_settings: dict[str, str]) -> None:
    port = int(mesh_settings["MAILMESH_MAILBOX_PORT"])
    data_dir = tmp_path / "data"
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", port))
        squatter.listen(1)
        res = run_mailmesh("up", "--data-dir", str(data_dir), env=mesh_settings)
    assert res.returncode != 0
    assert f"mailmesh up: svc_mailbox cannot listen on 127.0.0.1:{port}: port already in use" in res.stderr
    assert "Traceback" not in res.stderr
    assert not leftovers(str(data_dir))
    assert not (data_dir / "logs" / "nats.log").exists()


def test_missing_nats_server_is_a_clear_error(tmp_path: Path, mesh_settings: dict[str, str]) -> None:
    env = {**mesh_settings, "MAILMESH_NATS_SERVER_BIN": str(tmp_path / "no-such-nats-server"),
           "PATH": str(tmp_path / "empty-bin")}
    res = run_mailmesh("up", "--data-dir", str(tmp_path / "data"), env=env)
    assert res.returncode != 0
    assert "nats-server not found" in res.stderr
    assert "MAILMESH_NATS_SERVER_BIN" in res.stderr
    assert "Traceback" not in res.stderr
    assert not leftovers(str(tmp_path / "data"))


def test_bad_setting_exits_2_naming_the_variable(tmp_path: Path, mesh_settings: dict[str, str]) -> None:
    res = run_mailmesh("up", "--data-dir", str(tmp_path / "data"),
                       env={**mesh_settings, "MAILMESH_MAILBOX_PORT": "abc"})
    assert res.returncode == 2
    assert "MAILMESH_MAILBOX_PORT" in res.stderr
    assert "Traceback" not in res.stderr


def test_a_service_failing_at_start_stops_everything_and_names_it(tmp_path: Path,
                                                                  mesh_settings: dict[str, str]) -> None:
    # a stand-in svc_gateway (first on PYTHONPATH) failing the way a real one does when a
    # dependency is down: a message on stderr and exit code 4
    fake = tmp_path / "fake" / "svc_gateway"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "__main__.py").write_text(
        "import sys\nprint('svc_gateway: cannot start: NATS not reachable', file=sys.stderr)\nsys.exit(4)\n")
    data_dir = tmp_path / "data"
    env = {**mesh_settings, "PYTHONPATH": str(tmp_path / "fake")}
    res = run_mailmesh("up", "--data-dir", str(data_dir), env=env)
    assert res.returncode != 0
    assert "svc_gateway exited during start with code 4 (dependency unreachable)" in res.stderr
    assert "svc_gateway: cannot start: NATS not reachable" in res.stderr  # the log's last lines
    assert "mailmesh is up" not in res.stdout
    assert not leftovers(str(data_dir))
    assert all(port_free(int(v)) for k, v in mesh_settings.items() if k.endswith("_PORT"))


# --- the embedded nats-server helpers (behind the `nats_server` fixture too) ----------------------

async def test_nats_server_fixture_serves_jetstream(nats_server: str) -> None:
    assert await jetstream_ready(nats_server)


def test_config_with_monitor_port_is_accepted_by_nats_server(tmp_path: Path) -> None:
    conf = write_config(tmp_path / "nats", "127.0.0.1", 4999, monitor_port=8999)
    text = conf.read_text()
    assert 'http: "127.0.0.1:8999"' in text
    assert "sync_interval: always" in text
    check_config(find_nats_server(), conf)  # `nats-server -c conf -t`


def test_nats_server_bin_override_must_exist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAILMESH_NATS_SERVER_BIN", str(tmp_path / "missing"))
    with pytest.raises(NatsServerNotFound, match="MAILMESH_NATS_SERVER_BIN"):
        find_nats_server()
    monkeypatch.delenv("MAILMESH_NATS_SERVER_BIN")
    assert find_nats_server().name == "nats-server"
