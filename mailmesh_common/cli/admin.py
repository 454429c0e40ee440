"""`mailmesh domain add|list` and `mailmesh user add|list|passwd|delete|recount|export`:
administration through the mailbox service's gRPC API (system calls carrying the mesh token from
the data dir; failures are one line on stderr and exit 1, see cli/command.py)."""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
import time
from typing import Any

from google.protobuf import json_format
from mailmesh.v1 import mailbox_service_pb2 as pb
from mailmesh.v1 import types_pb2

from mailmesh_common.cli.command import Mesh, add_command, add_group, call, command, every_page

TIMEOUT_S = 15.0
LONG_TIMEOUT_S = 3600.0
EXPORT_TIMEOUT_S = 86_400.0
PAGE_SIZE = 1000


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


def _print_list(items: list[Any], as_json: bool, line: Any) -> None:
    if as_json:
        print(json.dumps([json_format.MessageToDict(x) for x in items], indent=2))
    else:
        for x in items:
            print(line(x))


@command("domain add")
def domain_add(args: argparse.Namespace) -> int:
    r = call(args, lambda m: m.mailbox.CreateDomain(pb.CreateDomainRequest(name=args.domain), timeout=TIMEOUT_S))
    print(f"domain {r.domain.name} added")
    return 0


@command("domain list")
def domain_list(args: argparse.Namespace) -> int:
    async def go(m: Mesh) -> list[types_pb2.Domain]:
        return await every_page(lambda token: m.mailbox.ListDomains(
            pb.ListDomainsRequest(page_size=PAGE_SIZE, page_token=token), timeout=TIMEOUT_S), "domains")

    _print_list(call(args, go), args.json, lambda d: f"{d.name}\t{d.accounts_total} accounts")
    return 0


@command("user add")
def user_add(args: argparse.Namespace) -> int:
    password = _read_password(args)
    req = pb.CreateAccountRequest(email=args.email, password=password, display_name=args.name or "",
                                  quota_bytes=args.quota or 0, aliases=args.alias or [])
    r = call(args, lambda m: m.mailbox.CreateAccount(req, timeout=TIMEOUT_S))
    print(f"user {r.account.email} added (id {r.account.user_id})")
    return 0


@command("user list")
def user_list(args: argparse.Namespace) -> int:
    async def go(m: Mesh) -> list[types_pb2.Account]:
        return await every_page(lambda token: m.mailbox.ListAccounts(
            pb.ListAccountsRequest(domain=args.domain or "", page_size=PAGE_SIZE, page_token=token),
            timeout=TIMEOUT_S), "accounts")

    _print_list(call(args, go), args.json,
                lambda a: f"{a.email}\t{a.user_id}\t{a.messages_total} messages\t{a.used_bytes} bytes")
    return 0


@command("user passwd")
def user_passwd(args: argparse.Namespace) -> int:
    password = _read_password(args)

    async def go(m: Mesh) -> None:
        user = await m.user_id(args.email, TIMEOUT_S)
        await m.mailbox.SetPassword(pb.SetPasswordRequest(name=f"users/{user}", password=password),
                                    timeout=TIMEOUT_S)

    call(args, go)
    print(f"password of {args.email} changed")
    return 0


@command("user delete")
def user_delete(args: argparse.Namespace) -> int:
    if not args.yes:
        if not sys.stdin.isatty():
            print("mailmesh: user delete removes the account and all its mail: add --yes", file=sys.stderr)
            return 2
        if input(f"Delete {args.email} and all of its mail? Type the address to confirm: ").strip() != args.email:
            print("mailmesh: not confirmed; nothing deleted", file=sys.stderr)
            return 1

    async def go(m: Mesh) -> int:
        user = await m.user_id(args.email, TIMEOUT_S)
        r = await m.mailbox.DeleteAccount(pb.DeleteAccountRequest(name=f"users/{user}"), timeout=LONG_TIMEOUT_S)
        return int(r.deleted_messages)

    n = call(args, go)
    print(f"user {args.email} deleted ({n} messages)")
    return 0


@command("user recount")
def user_recount(args: argparse.Namespace) -> int:
    async def go(m: Mesh) -> pb.RecountMailboxResponse:
        user = await m.user_id(args.email, TIMEOUT_S)
        return await m.mailbox.RecountMailbox(pb.RecountMailboxRequest(name=f"users/{user}"),
                                              timeout=LONG_TIMEOUT_S)

    r = call(args, go)
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


@command("user export")
def user_export(args: argparse.Namespace) -> int:
    token_file = f"{args.output}.resume" if args.output else ""
    token = ""
    if args.resume and token_file and os.path.exists(token_file):
        with open(token_file) as f:
            token = f.read().strip()
    out = open(args.output, "ab" if args.resume else "wb") if args.output else sys.stdout.buffer  # noqa: SIM115

    async def go(m: Mesh) -> int:
        user = await m.user_id(args.email, TIMEOUT_S)
        n = 0
        stream = m.mailbox.ExportMessages(pb.ExportMessagesRequest(parent=f"users/{user}", label_id=args.label or "",
                                                                   page_token=token), timeout=EXPORT_TIMEOUT_S)
        async for item in stream:
            msg = item.message
            senders = getattr(msg, "from")
            sender = senders[0].email if len(senders) else ""
            out.write(_mbox_entry(sender, msg.internal_date.seconds, item.raw, list(msg.label_ids)))
            n += 1
            if token_file:
                out.flush()
                _save_token(token_file, item.next_page_token)
        return n

    try:
        n = call(args, go)
    finally:
        if out is not sys.stdout.buffer:
            out.close()
    if token_file and os.path.exists(token_file):
        os.unlink(token_file)
    print(f"exported {n} messages of {args.email}", file=sys.stderr)
    return 0


def _password_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument("--password", help="the password (prompted when omitted; visible in `ps`, prefer the prompt)")
    p.add_argument("--password-stdin", action="store_true", help="read the password from standard input")


def add_admin_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Registers the admin subcommands; each sets `func(args) -> int` on its parser."""
    dom = add_group(sub, "domain", "local mail domains")
    p = add_command(dom, "add", domain_add, "add a domain this installation receives mail for")
    p.add_argument("domain")
    p = add_command(dom, "list", domain_list, "list local domains")
    p.add_argument("--json", action="store_true")

    usr = add_group(sub, "user", "mail accounts")
    p = add_command(usr, "add", user_add, "create an account")
    p.add_argument("email")
    p.add_argument("--name", help="display name")
    p.add_argument("--quota", type=int, help="quota in bytes (default from settings)")
    p.add_argument("--alias", action="append", help="extra address (repeatable)")
    _password_opts(p)
    p = add_command(usr, "list", user_list, "list accounts")
    p.add_argument("--domain")
    p.add_argument("--json", action="store_true")
    p = add_command(usr, "passwd", user_passwd, "change an account's password")
    p.add_argument("email")
    _password_opts(p)
    p = add_command(usr, "delete", user_delete, "delete an account and all of its mail")
    p.add_argument("email")
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    p = add_command(usr, "recount", user_recount, "rebuild a mailbox's counters from its indexes")
    p.add_argument("email")
    p = add_command(usr, "export", user_export, "export a mailbox as an mboxrd file (labels in X-Mailmesh-Labels)")
    p.add_argument("email")
    p.add_argument("--label", help="only messages with this label id")
    p.add_argument("--output", "-o", help="file to write (default: standard output)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted export into --output")
