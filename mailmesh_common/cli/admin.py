"""`mailmesh domain add|list` and `mailmesh user add|list|passwd`: administration through the
mailbox service's gRPC API (system calls carrying the mesh token from the data dir)."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
from google.protobuf import json_format
from mailmesh.v1 import mailbox_service_pb2 as pb
from mailmesh.v1 import mailbox_service_pb2_grpc as pb_grpc

from mailmesh_common import auth
from mailmesh_common.cli.status import read_endpoints
from mailmesh_common.config import Settings, load_settings

T = TypeVar("T")
TIMEOUT_S = 15.0


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(getattr(args, "config", None), data_dir=getattr(args, "data_dir", None))


def _call(args: argparse.Namespace, fn: Callable[[pb_grpc.MailboxServiceStub, Any], Awaitable[T]]) -> T:
    settings = _settings(args)
    md = ((auth.TOKEN_KEY, settings.token()),)
    # `mailmesh up` records where it put each service; fall back to the settings
    target = (read_endpoints(settings.data_dir) or {}).get("svc_mailbox") or settings.addr("mailbox")

    async def go() -> T:
        async with grpc.aio.insecure_channel(target) as ch:
            return await fn(pb_grpc.MailboxServiceStub(ch), md)

    return asyncio.run(go())


def _fail(exc: grpc.aio.AioRpcError, what: str) -> int:
    code = exc.code()
    if code == grpc.StatusCode.UNAVAILABLE:
        print(f"mailmesh: {what}: the mailbox service is not reachable (is `mailmesh up` running?)",
              file=sys.stderr)
    else:
        print(f"mailmesh: {what}: {exc.details()} ({code.name})", file=sys.stderr)
    return 1


def _read_password(args: argparse.Namespace) -> str:
    if args.password is not None:
        return str(args.password)
    if args.password_stdin:
        return sys.stdin.readline().rstrip("\n")
    if not sys.stdin.isatty():
        raise SystemExit("mailmesh: no terminal to prompt for a password: use --password-stdin")
    first = getpass.getpass("Password: ")
    if first != getpass.getpass("Repeat password: "):
        raise SystemExit("mailmesh: passwords do not match")
    return first


def domain_add(args: argparse.Namespace) -> int:
    try:
        r = _call(args, lambda s, md: s.CreateDomain(pb.CreateDomainRequest(name=args.domain), metadata=md,
                                                     timeout=TIMEOUT_S))
    except grpc.aio.AioRpcError as exc:
        return _fail(exc, "domain add")
    print(f"domain {r.domain.name} added")
    return 0


def domain_list(args: argparse.Namespace) -> int:
    async def all_pages(stub: pb_grpc.MailboxServiceStub, md: Any) -> list[Any]:
        out, token = [], ""
        while True:
            r = await stub.ListDomains(pb.ListDomainsRequest(page_size=1000, page_token=token), metadata=md,
                                       timeout=TIMEOUT_S)
            out.extend(r.domains)
            token = r.next_page_token
            if not token:
                return out

    try:
        domains = _call(args, all_pages)
    except grpc.aio.AioRpcError as exc:
        return _fail(exc, "domain list")
    if args.json:
        print(json.dumps([json_format.MessageToDict(d) for d in domains], indent=2))
    else:
        for d in domains:
            print(f"{d.name}\t{d.accounts_total} accounts")
    return 0


def user_add(args: argparse.Namespace) -> int:
    password = _read_password(args)
    req = pb.CreateAccountRequest(email=args.email, password=password, display_name=args.name or "",
                                  quota_bytes=args.quota or 0, aliases=args.alias or [])
    try:
        r = _call(args, lambda s, md: s.CreateAccount(req, metadata=md, timeout=TIMEOUT_S))
    except grpc.aio.AioRpcError as exc:
        return _fail(exc, "user add")
    print(f"user {r.account.email} added (id {r.account.user_id})")
    return 0


def user_list(args: argparse.Namespace) -> int:
    async def all_pages(stub: pb_grpc.MailboxServiceStub, md: Any) -> list[Any]:
        out, token = [], ""
        while True:
            r = await stub.ListAccounts(pb.ListAccountsRequest(domain=args.domain or "", page_size=1000,
                                                               page_token=token), metadata=md, timeout=TIMEOUT_S)
            out.extend(r.accounts)
            token = r.next_page_token
            if not token:
                return out

    try:
        accounts = _call(args, all_pages)
    except grpc.aio.AioRpcError as exc:
        return _fail(exc, "user list")
    if args.json:
        print(json.dumps([json_format.MessageToDict(a) for a in accounts], indent=2))
    else:
        for a in accounts:
            print(f"{a.email}\t{a.user_id}\t{a.messages_total} messages\t{a.used_bytes} bytes")
    return 0


def user_passwd(args: argparse.Namespace) -> int:
    password = _read_password(args)

    async def go(stub: pb_grpc.MailboxServiceStub, md: Any) -> None:
        acct = await stub.GetAccount(pb.GetAccountRequest(email=args.email), metadata=md, timeout=TIMEOUT_S)
        await stub.SetPassword(pb.SetPasswordRequest(name=f"users/{acct.account.user_id}", password=password),
                               metadata=md, timeout=TIMEOUT_S)

    try:
        _call(args, go)
    except grpc.aio.AioRpcError as exc:
        return _fail(exc, "user passwd")
    print(f"password of {args.email} changed")
    return 0


async def _user_id(stub: pb_grpc.MailboxServiceStub, md: Any, email: str) -> str:
    acct = await stub.GetAccount(pb.GetAccountRequest(email=email), metadata=md, timeout=TIMEOUT_S)
    return str(acct.account.user_id)


def user_delete(args: argparse.Namespace) -> int:
    if not args.yes:
        if not sys.stdin.isatty():
            print("mailmesh: user delete removes the account and all its mail: add --yes", file=sys.stderr)
            return 2
        if input(f"Delete {args.email} and all of its mail? Type the address to confirm: ").strip() != args.email:
            print("mailmesh: not confirmed; nothing deleted", file=sys.stderr)
            return 1

    async def go(stub: pb_grpc.MailboxServiceStub, md: Any) -> int:
        user = await _user_id(stub, md, args.email)
        r = await stub.DeleteAccount(pb.DeleteAccountRequest(name=f"users/{user}"), metadata=md, timeout=3600)
        return int(r.deleted_messages)

    try:
        n = _call(args, go)
    except grpc.aio.AioRpcError as exc:
        return _fail(exc, "user delete")
    print(f"user {args.email} deleted ({n} messages)")
    return 0


def user_recount(args: argparse.Namespace) -> int:
    async def go(stub: pb_grpc.MailboxServiceStub, md: Any) -> pb.RecountMailboxResponse:
        user = await _user_id(stub, md, args.email)
        return await stub.RecountMailbox(pb.RecountMailboxRequest(name=f"users/{user}"), metadata=md, timeout=3600)

    try:
        r = _call(args, go)
    except grpc.aio.AioRpcError as exc:
        return _fail(exc, "user recount")
    print(f"{args.email}: {r.account.messages_total} messages, {r.account.used_bytes} bytes")
    for label in r.labels:
        print(f"  {label.name}\t{label.messages_total} messages\t{label.messages_unread} unread"
              f"\t{label.threads_total} threads")
    return 0


def _mbox_entry(mail_from: str, when: float, raw: bytes, labels: list[str]) -> bytes:
    """One mboxrd entry: a From_ line, an X-Mailmesh-Labels header, body lines matching
    /^>*From / quoted with one more '>'."""
    stamp = time.strftime("%a %b %d %H:%M:%S %Y", time.gmtime(when))
    head = f"From {mail_from or 'MAILER-DAEMON'} {stamp}\n".encode()
    lines = raw.replace(b"\r\n", b"\n").split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    out = [head, f"X-Mailmesh-Labels: {','.join(labels)}\n".encode()]
    for line in lines:
        if line.lstrip(b">").startswith(b"From "):
            line = b">" + line
        out.append(line + b"\n")
    out.append(b"\n")
    return b"".join(out)


def _save_token(path: str, token: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(token)
    os.replace(tmp, path)


def user_export(args: argparse.Namespace) -> int:
    out = open(args.output, "ab" if args.resume else "wb") if args.output else sys.stdout.buffer  # noqa: SIM115
    token_file = f"{args.output}.resume" if args.output else ""
    token = ""
    if args.resume and token_file and os.path.exists(token_file):
        with open(token_file) as f:
            token = f.read().strip()

    async def go(stub: pb_grpc.MailboxServiceStub, md: Any) -> int:
        user = await _user_id(stub, md, args.email)
        n = 0
        call = stub.ExportMessages(pb.ExportMessagesRequest(parent=f"users/{user}", label_id=args.label or "",
                                                            page_token=token), metadata=md, timeout=86400)
        async for item in call:
            m = item.message
            senders = getattr(m, "from")
            sender = senders[0].email if len(senders) else ""
            out.write(_mbox_entry(sender, m.internal_date.seconds, item.raw, list(m.label_ids)))
            n += 1
            if token_file:
                out.flush()
                _save_token(token_file, item.next_page_token)
        return n

    try:
        n = _call(args, go)
    except grpc.aio.AioRpcError as exc:
        return _fail(exc, "user export")
    finally:
        if out is not sys.stdout.buffer:
            out.close()
    if token_file and os.path.exists(token_file):
        os.unlink(token_file)
    print(f"exported {n} messages of {args.email}", file=sys.stderr)
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", help="data dir of the running mesh (for its internal token)")
    p.add_argument("--config", help="TOML settings file")


def _password_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument("--password", help="the password (prompted when omitted; visible in `ps`, prefer the prompt)")
    p.add_argument("--password-stdin", action="store_true", help="read the password from standard input")


def add_admin_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Registers the admin subcommands; each sets `func(args) -> int` on its parser."""
    dom = sub.add_parser("domain", help="local mail domains")
    dsub = dom.add_subparsers(dest="domain_command", metavar="COMMAND")
    p = dsub.add_parser("add", help="add a domain this installation receives mail for")
    p.add_argument("domain")
    _common(p)
    p.set_defaults(func=domain_add)
    p = dsub.add_parser("list", help="list local domains")
    p.add_argument("--json", action="store_true")
    _common(p)
    p.set_defaults(func=domain_list)
    dom.set_defaults(func=lambda _a: (dom.print_help(sys.stderr), 2)[1])

    usr = sub.add_parser("user", help="mail accounts")
    usub = usr.add_subparsers(dest="user_command", metavar="COMMAND")
    p = usub.add_parser("add", help="create an account")
    p.add_argument("email")
    p.add_argument("--name", help="display name")
    p.add_argument("--quota", type=int, help="quota in bytes (default from settings)")
    p.add_argument("--alias", action="append", help="extra address (repeatable)")
    _password_opts(p)
    _common(p)
    p.set_defaults(func=user_add)
    p = usub.add_parser("list", help="list accounts")
    p.add_argument("--domain")
    p.add_argument("--json", action="store_true")
    _common(p)
    p.set_defaults(func=user_list)
    p = usub.add_parser("passwd", help="change an account's password")
    p.add_argument("email")
    _password_opts(p)
    _common(p)
    p.set_defaults(func=user_passwd)
    p = usub.add_parser("delete", help="delete an account and all of its mail")
    p.add_argument("email")
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    _common(p)
    p.set_defaults(func=user_delete)
    p = usub.add_parser("recount", help="rebuild a mailbox's counters from its indexes")
    p.add_argument("email")
    _common(p)
    p.set_defaults(func=user_recount)
    p = usub.add_parser("export", help="export a mailbox as an mboxrd file (labels in X-Mailmesh-Labels)")
    p.add_argument("email")
    p.add_argument("--label", help="only messages with this label id")
    p.add_argument("--output", "-o", help="file to write (default: standard output)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted export into --output")
    _common(p)
    p.set_defaults(func=user_export)
    usr.set_defaults(func=lambda _a: (usr.print_help(sys.stderr), 2)[1])
