"""`mailmesh dkim keygen|import|list` and `mailmesh queue list|show|retry|cancel`.

The dkim commands work on svc_send's key store (its KV: send.db in the data dir, or
FoundationDB), where every svc_send replica finds a key for its next message (within seconds);
keygen and import print the DNS TXT record to publish. The queue commands are system calls to
the running svc_send's SendService (the mesh token from the data dir).
"""

from __future__ import annotations

import argparse
import contextlib
import json
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

from google.protobuf import json_format
from google.protobuf.timestamp_pb2 import Timestamp
from mailmesh.v1 import send_service_pb2 as spb
from mailmesh.v1 import types_pb2

from mailmesh_common.cli.command import (
    Mesh,
    add_command,
    add_group,
    call,
    command,
    every_page,
    fail,
    settings_of,
)

TIMEOUT_S = 15.0
_STATE = {v: k.removeprefix("QUEUE_ENTRY_STATE_").lower() for k, v in spb.QueueEntryState.items()}
ALGORITHMS = ("rsa", "ed25519")  # svc_send.dkim_keys (imported only when a key is made)
DEFAULT_SELECTOR = "mail"
_RCPT_STATE = {v: k.removeprefix("RECIPIENT_STATE_").lower() for k, v in types_pb2.RecipientState.items()}


def _when(t: Timestamp) -> str:
    if not t.seconds and not t.nanos:
        return "-"
    return datetime.fromtimestamp(t.seconds, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _age(t: Timestamp) -> str:
    secs = max(0, int(datetime.now(UTC).timestamp()) - t.seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if secs >= size:
            return f"{secs // size}{unit}"
    return f"{secs}s"


# --- dkim ---------------------------------------------------------------------------------------

@contextlib.contextmanager
def _key_store(args: argparse.Namespace) -> Iterator[Any]:
    """svc_send's DKIM key store on its KV (send.db in the data dir, or FoundationDB), closed after use."""
    from svc_send.dkim_keys import DkimKeyStore
    from svc_send.store import open_send_db

    keys = DkimKeyStore(open_send_db(settings_of(args)))
    try:
        yield keys
    finally:
        keys.db.close_sync()


def _print_stored(key: Any, where: str, advice: str) -> None:
    print(f"DKIM {key.algorithm} key for {key.domain} (selector {key.selector}) {where}")
    print(advice)
    _print_record(key)


def _print_record(key: Any, indent: str = "") -> None:
    print(f"{indent}{key.record_name}. IN TXT \"{key.txt_record()}\"")


@command("dkim keygen")
def dkim_keygen(args: argparse.Namespace) -> int:
    with _key_store(args) as keys:
        key = keys.put_sync(keys.new_key(args.domain, args.selector, args.algorithm), force=args.force)
    _print_stored(key, "stored in the send store",
                  "Publish this TXT record, then mail from the domain is signed with it:")
    return 0


@command("dkim import")
def dkim_import(args: argparse.Namespace) -> int:
    try:
        with open(args.file, "rb") as f:
            pem = f.read(1024 * 1024)
    except OSError as exc:
        return fail("dkim import", f"cannot read {args.file}: {exc.strerror}")
    with _key_store(args) as keys:
        key = keys.put_sync(keys.key_from_pem(args.domain, args.selector, pem), force=args.force)
    _print_stored(key, "imported into the send store", "Its TXT record (publish it if it is not published yet):")
    return 0


@command("dkim list")
def dkim_list(args: argparse.Namespace) -> int:
    with _key_store(args) as keys:
        found = keys.list_sync(args.domain or "")
    if not found:
        print("no DKIM keys")
        return 0
    for key in found:
        created = datetime.fromtimestamp(key.created, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        print(f"{key.domain}  selector {key.selector}  {key.algorithm}  created {created}")
        _print_record(key, "  ")
    return 0


# --- queue --------------------------------------------------------------------------------------

def _entry_lines(e: spb.QueueEntry) -> list[str]:
    lines = [f"id:            {e.id}",
             f"state:         {_STATE.get(e.state, '?')}",
             f"from:          <{e.mail_from}> (user {e.sender_user_id})",
             f"message:       {e.message}",
             f"subject:       {e.subject}",
             f"domain:        {e.domain}",
             f"size:          {e.size} bytes",
             f"queued:        {_when(e.create_time)} ({_age(e.create_time)} ago)",
             f"attempts:      {e.attempts}",
             f"last attempt:  {_when(e.last_attempt_time)}" + (f" at {e.remote_mta}" if e.remote_mta else ""),
             f"last reply:    {e.last_reply or '-'}",
             f"next attempt:  {_when(e.next_attempt_time)}",
             f"expires:       {_when(e.expire_time)}"]
    if e.finish_time.seconds:
        lines.append(f"finished:      {_when(e.finish_time)}")
    lines.append("recipients:")
    for r in e.recipients:
        lines.append(f"  {r.email:<40} {_RCPT_STATE.get(r.state, '?'):<10} attempts={r.attempts} "
                     f"{r.last_reply or ''}".rstrip())
    return lines


@command("queue list")
def queue_list(args: argparse.Namespace) -> int:
    async def go(m: Mesh) -> list[spb.QueueEntry]:
        return await every_page(lambda token: m.send.ListQueue(
            spb.ListQueueRequest(domain=args.domain or "", page_size=1000, page_token=token), timeout=TIMEOUT_S),
            "entries", args.limit)

    entries = call(args, go)
    if args.json:
        print(json.dumps([json_format.MessageToDict(e) for e in entries], indent=2))
        return 0
    if not entries:
        print("the outbound queue is empty")
        return 0
    print(f"{'ID':<36} {'STATE':<9} {'AGE':>5} {'TRIES':>5} {'NEXT ATTEMPT':<23} {'FROM':<28} TO / LAST REPLY")
    for e in entries:
        waiting = [r.email for r in e.recipients if r.state in (types_pb2.RECIPIENT_STATE_QUEUED,
                                                                 types_pb2.RECIPIENT_STATE_DEFERRED)]
        print(f"{e.id:<36} {_STATE.get(e.state, '?'):<9} {_age(e.create_time):>5} {e.attempts:>5} "
              f"{_when(e.next_attempt_time):<23} {e.mail_from[:28]:<28} {', '.join(waiting)}")
        if e.last_reply:
            print(f"{'':<36} last reply: {e.last_reply[:200]}")
    print(f"{len(entries)} waiting")
    return 0


def _entry_command(rpc: str, verb: str) -> Callable[[argparse.Namespace], int]:
    @command(f"queue {verb}")
    def run(args: argparse.Namespace) -> int:
        req = getattr(spb, f"{rpc}Request")(name=f"queueEntries/{args.id}")

        async def go(m: Mesh) -> spb.QueueEntry:
            r = await getattr(m.send, rpc)(req, timeout=TIMEOUT_S)
            return r.entry  # type: ignore[no-any-return]

        entry = call(args, go)
        if getattr(args, "json", False):
            print(json.dumps(json_format.MessageToDict(entry), indent=2))
            return 0
        if verb == "retry":
            print(f"queue entry {entry.id}: next attempt now")
        elif verb == "cancel":
            print(f"queue entry {entry.id}: cancelled; its pending recipients bounced")
        else:
            print("\n".join(_entry_lines(entry)))
        return 0

    return run


def add_send_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Adds `dkim` and `queue` to the `mailmesh` command."""
    dkim = add_group(sub, "dkim", "DKIM signing keys")
    p = add_command(dkim, "keygen", dkim_keygen, "create a DKIM key for a domain and print the TXT record to publish")
    p.add_argument("--domain", required=True, help="the sending domain, e.g. example.com")
    p.add_argument("--selector", default=DEFAULT_SELECTOR, help=f"DKIM selector (default {DEFAULT_SELECTOR})")
    p.add_argument("--algorithm", choices=ALGORITHMS, default="rsa",
                   help="rsa (2048-bit, rsa-sha256) or ed25519 (RFC 8463); default rsa")
    p.add_argument("--force", action="store_true", help="replace an existing key of that selector")
    p = add_command(dkim, "import", dkim_import, "store an existing private key (PEM, RSA or Ed25519) for a domain")
    p.add_argument("--domain", required=True, help="the sending domain, e.g. example.com")
    p.add_argument("--selector", required=True, help="the selector its public key is published under")
    p.add_argument("--file", required=True, help="the unencrypted PEM private key (PKCS#8 or PKCS#1)")
    p.add_argument("--force", action="store_true", help="replace an existing key of that selector")
    p = add_command(dkim, "list", dkim_list, "the stored keys and the TXT record of each")
    p.add_argument("--domain", help="only this domain's keys")

    queue = add_group(sub, "queue", "the outbound queue (mail waiting for remote servers)")
    p = add_command(queue, "list", queue_list, "what is waiting, for whom, since when, and why")
    p.add_argument("--domain", help="only deliveries to this domain")
    p.add_argument("--limit", type=int, default=1000, help="at most this many entries (default 1000)")
    p.add_argument("--json", action="store_true")
    for verb, rpc, text in (("show", "GetQueueEntry", "one entry with each recipient's state"),
                            ("retry", "RetryQueueEntry", "attempt a waiting entry now"),
                            ("cancel", "CancelQueueEntry", "give up an entry; its pending recipients bounce")):
        p = add_command(queue, verb, _entry_command(rpc, verb), text)
        p.add_argument("id", help="queue entry id (from `mailmesh queue list`)")
        p.add_argument("--json", action="store_true")


__all__ = ["add_send_commands"]
