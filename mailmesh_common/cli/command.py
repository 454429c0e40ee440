"""What every `mailmesh` subcommand that works on a mesh shares: its `--data-dir`/`--config`
options and the settings they give, the calls to the running services, and the one way a failure
reaches the operator: `mailmesh: WHAT: WHY` on stderr and exit 1, never a traceback.

    @command("domain add")
    def domain_add(args: argparse.Namespace) -> int:
        r = call(args, lambda mesh: mesh.mailbox.CreateDomain(req, timeout=TIMEOUT_S))
        print(f"domain {r.domain.name} added")
        return 0

A service is found where `mailmesh up` recorded it (endpoints.json in the data dir), else where
the settings say; every call carries the mesh token from the data dir (system calls).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
from mailmesh.v1 import mailbox_service_pb2 as mpb
from mailmesh.v1 import mailbox_service_pb2_grpc as mpb_grpc
from mailmesh.v1 import search_service_pb2_grpc as spb_grpc
from mailmesh.v1 import send_service_pb2_grpc as sendpb_grpc

from mailmesh_common import grpcclient
from mailmesh_common.cli.status import read_endpoints
from mailmesh_common.config import Settings, load_settings
from mailmesh_common.errors import ConfigError, MailmeshError

if TYPE_CHECKING:
    from mailmesh.v1.mailbox_service_pb2_grpc import MailboxServiceAsyncStub
    from mailmesh.v1.search_service_pb2_grpc import SearchServiceAsyncStub
    from mailmesh.v1.send_service_pb2_grpc import SendServiceAsyncStub

T = TypeVar("T")
Command = Callable[[argparse.Namespace], int]

EXIT_FAILED = 1
USER_LOOKUP_TIMEOUT_S = 15.0


def add_mesh_options(p: argparse.ArgumentParser) -> None:
    """`--data-dir` and `--config`: which mesh a command works on (a group of their own in its help)."""
    mesh = p.add_argument_group("which mesh")
    mesh.add_argument("--data-dir", help="data dir of the running mesh (for its internal token)")
    mesh.add_argument("--config", help="TOML settings file")


def settings_of(args: argparse.Namespace) -> Settings:
    """The settings named by a command's `--config` and `--data-dir` (and MAILMESH_*)."""
    return load_settings(getattr(args, "config", None), data_dir=getattr(args, "data_dir", None))


def add_group(sub: argparse._SubParsersAction, name: str, help: str) -> argparse._SubParsersAction:  # type: ignore[type-arg]
    """`mailmesh NAME`, a command that groups subcommands (`mailmesh user add|list...`): run
    without one, it prints its help and exits 2. Returns where its subcommands are added."""
    p = sub.add_parser(name, help=help)
    p.set_defaults(func=usage(p))
    return p.add_subparsers(dest=f"{name}_command", metavar="COMMAND")


def add_command(sub: argparse._SubParsersAction, name: str, func: Command,  # type: ignore[type-arg]
                help: str) -> argparse.ArgumentParser:
    """A subcommand that works on a mesh: its parser, with `--data-dir` and `--config`, running
    `func`; the caller adds its own arguments."""
    p: argparse.ArgumentParser = sub.add_parser(name, help=help)
    add_mesh_options(p)
    p.set_defaults(func=func)
    return p


def usage(parser: argparse.ArgumentParser) -> Command:
    """A command for a parser that only groups subcommands: prints its help, exits 2."""
    def run(_args: argparse.Namespace) -> int:
        parser.print_help(sys.stderr)
        return 2

    return run


class CallFailed(Exception):
    """A call to the mesh did not succeed; the text says why, for the operator."""


class Mesh:
    """Stubs of the running services, each on a channel opened at its first use. A command asks
    them one call after another: the service asked last is the one a failure is told about."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._endpoints = read_endpoints(settings.data_dir) or {}
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._stubs: dict[str, Any] = {}
        self.last = ""

    def address(self, service: str) -> str:
        """Where `service` (mailbox, search, send) listens."""
        return self._endpoints.get(f"svc_{service}") or self.settings.addr(service)

    def _stub(self, service: str, make: Callable[[grpc.aio.Channel], Any]) -> Any:
        self.last = service
        if service not in self._stubs:
            self._channels[service] = grpcclient.channel(self.address(service), self.settings)
            self._stubs[service] = make(self._channels[service])
        return self._stubs[service]

    @property
    def mailbox(self) -> MailboxServiceAsyncStub:
        return self._stub("mailbox", mpb_grpc.MailboxServiceStub)  # type: ignore[no-any-return]

    @property
    def search(self) -> SearchServiceAsyncStub:
        return self._stub("search", spb_grpc.SearchServiceStub)  # type: ignore[no-any-return]

    @property
    def send(self) -> SendServiceAsyncStub:
        return self._stub("send", sendpb_grpc.SendServiceStub)  # type: ignore[no-any-return]

    async def user_id(self, email: str, timeout_s: float = USER_LOOKUP_TIMEOUT_S) -> str:
        """The id of the account with this address (NOT_FOUND when there is none)."""
        r = await self.mailbox.GetAccount(mpb.GetAccountRequest(email=email), timeout=timeout_s)
        return str(r.account.user_id)

    def reason(self, exc: grpc.aio.AioRpcError) -> str:
        """Why a call failed, in the operator's words: a service that cannot be reached, did not
        answer in time or is up but unavailable is named with its address; a service's own answer
        (its details and status code) is passed on."""
        code = exc.code()
        channel = self._channels.get(self.last)
        where = f"the {self.last} service at {self.address(self.last)}" if self.last else "a service"
        connected = channel is not None and channel.get_state() == grpc.ChannelConnectivity.READY
        if code == grpc.StatusCode.UNAVAILABLE and not connected:
            return f"{where} is not reachable (is `mailmesh up` running?)"
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return f"{where} did not answer in time (DEADLINE_EXCEEDED)"
        details = exc.details() or "no details"
        if code == grpc.StatusCode.UNAVAILABLE:  # it is up, but cannot serve now (e.g. its own dependency is down)
            return f"{where} is unavailable: {details} (UNAVAILABLE)"
        return f"{details} ({code.name})"

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()


def call(args: argparse.Namespace, fn: Callable[[Mesh], Awaitable[T]]) -> T:
    """Runs `fn` on the mesh named by `args`; a failed gRPC call raises CallFailed (which
    `command` turns into one line on stderr and exit 1)."""
    settings = settings_of(args)

    async def go() -> T:
        mesh = Mesh(settings)
        try:
            return await fn(mesh)
        except grpc.aio.AioRpcError as exc:
            raise CallFailed(mesh.reason(exc)) from None
        finally:
            await mesh.close()

    return asyncio.run(go())


async def every_page(page: Callable[[str], Awaitable[Any]], field: str, limit: int | None = None) -> list[Any]:
    """The items (the repeated `field`) of every page that `page(page_token)` answers, first page
    first, until a page has no `next_page_token` or `limit` items are there."""
    out: list[Any] = []
    token = ""
    while True:
        r = await page(token)
        out.extend(getattr(r, field))
        token = r.next_page_token
        if not token or (limit is not None and len(out) >= limit):
            return out if limit is None else out[:limit]


def fail(what: str, why: str) -> int:
    """`mailmesh: WHAT: WHY` on stderr; the exit code of a failed command."""
    print(f"mailmesh: {what}: {why}", file=sys.stderr)
    return EXIT_FAILED


def command(what: str) -> Callable[[Command], Command]:
    """Wraps a subcommand named `what` (e.g. "user add"): a failed call to the mesh, an error of
    ours (but a bad setting, which `mailmesh` answers with exit 2) or of the file system becomes
    one line on stderr and exit 1."""
    def wrap(fn: Command) -> Command:
        @functools.wraps(fn)
        def run(args: argparse.Namespace) -> int:
            try:
                return fn(args)
            except CallFailed as exc:
                return fail(what, str(exc))
            except ConfigError:
                raise
            except MailmeshError as exc:
                return fail(what, exc.message)
            except OSError as exc:
                return fail(what, f"{exc.filename}: {exc.strerror}" if exc.filename else str(exc))

        return run

    return wrap


__all__ = ["CallFailed", "Command", "Mesh", "add_command", "add_group", "add_mesh_options", "call", "command",
           "every_page", "fail", "settings_of", "usage"]
