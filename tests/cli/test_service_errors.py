"""How every `mailmesh` command that calls a service fails (cli/command.py): a service that
is not there, that does not answer, or that answers an error is one line on stderr naming the
command and the reason, exit 1, nothing on stdout and never a traceback."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailmesh_common.cli.main import run
from tests.conftest import MeshProcess, run_mailmesh

REACH = "is not reachable (is `mailmesh up` running?)"


def one_error_line(res: subprocess.CompletedProcess[str]) -> str:
    """The single stderr line of a failed command (asserting exit 1, no output, no traceback)."""
    assert res.returncode == 1, res.stdout + res.stderr
    assert "Traceback" not in res.stderr, res.stderr
    assert res.stdout == ""
    lines = res.stderr.splitlines()
    assert len(lines) == 1, res.stderr
    return lines[0]


# (command line, the command's name in the message, the service it asks first)
DOWN_CASES = [
    (["domain", "list"], "domain list", "mailbox"),
    (["user", "add", "ann@example.com", "--password", "long enough pw"], "user add", "mailbox"),
    (["user", "export", "ann@example.com"], "user export", "mailbox"),
    (["search", "status"], "search status", "search"),
    (["search", "reindex", "--quiet"], "search reindex", "search"),  # a streaming call
    (["search", "query", "--user", "ann@example.com", "hello"], "search query", "mailbox"),
    (["queue", "list"], "queue list", "send"),
    (["queue", "retry", "some-id"], "queue retry", "send"),
]


@pytest.mark.parametrize(("argv", "what", "service"), DOWN_CASES, ids=[c[1] for c in DOWN_CASES])
def test_a_service_where_nothing_listens_is_named_with_its_address(
        tmp_path: Path, mesh_settings: dict[str, str], argv: list[str], what: str, service: str) -> None:
    res = run_mailmesh(*argv, "--data-dir", str(tmp_path / "data"), env=mesh_settings)
    port = mesh_settings[f"MAILMESH_{service.upper()}_PORT"]
    assert one_error_line(res) == f"mailmesh: {what}: the {service} service at 127.0.0.1:{port} {REACH}"


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts TCP connections and never says a word (a hung server)."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(16)
        yield int(server.getsockname()[1])


def test_a_service_that_never_answers_is_a_clear_timeout_not_a_hang(
        tmp_path: Path, mesh_settings: dict[str, str], silent_port: int) -> None:
    env = {**mesh_settings, "MAILMESH_MAILBOX_PORT": str(silent_port)}
    res = run_mailmesh("domain", "list", "--data-dir", str(tmp_path / "data"), env=env, timeout=120)
    assert one_error_line(res) == (f"mailmesh: domain list: the mailbox service at 127.0.0.1:{silent_port} "
                                   "did not answer in time (DEADLINE_EXCEEDED)")


# --- a running mesh answering errors ---------------------------------------------------------------

def mailmesh(mesh: MeshProcess, *argv: str) -> subprocess.CompletedProcess[str]:
    return run_mailmesh(*argv, "--data-dir", str(mesh.data_dir), env=mesh.env)


@pytest.fixture(scope="module")
def ann(mailmesh_up: MeshProcess) -> str:
    """ann@example.com, an account of the running mesh (made with the CLI)."""
    for argv in (("domain", "add", "example.com"), ("user", "add", "ann@example.com", "--password", "long enough pw")):
        res = mailmesh(mailmesh_up, *argv)
        assert res.returncode == 0, res.stderr
    return "ann@example.com"


# (command line, the command's name in the message, what the service's own answer says, its code)
ANSWER_CASES = [
    (["user", "passwd", "nobody@example.com", "--password", "long enough pw"], "user passwd",
     "no account has that address", "NOT_FOUND"),
    (["user", "add", "bob@example.com", "--password", "short"], "user add", "at least 8 characters",
     "INVALID_ARGUMENT"),
    (["user", "add", "bob@nowhere.test", "--password", "long enough pw"], "user add",
     "nowhere.test is not a local domain", "NOT_FOUND"),
    (["search", "status", "--user", "nobody@example.com"], "search status",
     "no account has that address", "NOT_FOUND"),
    (["search", "query", "--user", "ann@example.com", "from:"], "search query",
     "invalid query at character 6: expected a value after from:", "INVALID_ARGUMENT"),
    (["queue", "show", "nosuch"], "queue show", "queue entry nosuch not found", "NOT_FOUND"),
]


@pytest.mark.parametrize(("argv", "what", "says", "code"), ANSWER_CASES,
                         ids=[f"{c[1]}-{c[3]}" for c in ANSWER_CASES])
def test_a_service_answering_an_error_is_passed_on_as_one_line(
        mailmesh_up: MeshProcess, ann: str, argv: list[str], what: str, says: str, code: str) -> None:
    line = one_error_line(mailmesh(mailmesh_up, *argv))
    assert line.startswith(f"mailmesh: {what}: ") and line.endswith(f" ({code})"), line
    assert says in line, line


def test_an_output_file_that_cannot_be_written_is_one_line(mailmesh_up: MeshProcess, ann: str,
                                                           tmp_path: Path) -> None:
    target = tmp_path / "no such dir" / "ann.mbox"
    line = one_error_line(mailmesh(mailmesh_up, "user", "export", ann, "-o", str(target)))
    assert line == f"mailmesh: user export: {target}: No such file or directory"


def test_a_service_that_is_up_but_cannot_serve_says_so_instead_of_unreachable(
        tmp_path: Path, lone_search: dict[str, str]) -> None:
    """svc_search alone: it answers, but a full reindex needs the mailbox, which is down."""
    res = run_mailmesh("search", "reindex", "--quiet", "--data-dir", str(tmp_path / "data"), env=lone_search,
                       timeout=120)
    line = one_error_line(res)
    port = lone_search["MAILMESH_SEARCH_PORT"]
    assert line.startswith(f"mailmesh: search reindex: the search service at 127.0.0.1:{port} is unavailable: ")
    assert line.endswith(" (UNAVAILABLE)") and REACH not in line, line


@pytest.mark.parametrize("group", ["domain", "user", "search", "dkim", "queue", "dev"])
def test_a_group_without_its_subcommand_prints_its_help_and_exits_2(
        group: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert run([group]) == 2
    out = capsys.readouterr()
    assert out.out == "" and out.err.startswith(f"usage: mailmesh {group} [-h] COMMAND ...")
