"""Domains and accounts: creation with the system labels, addresses, passwords (scrypt), and
recipient resolution for inbound SMTP."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os

from mailmesh.v1 import mailbox_service_pb2 as pb
from mailmesh.v1 import types_pb2

from mailmesh_common import address
from mailmesh_common.errors import AlreadyExists, InvalidInput, NotFound
from mailmesh_common.kv import Transaction, decode_counter
from svc_mailbox import keys, labels
from svc_mailbox.txn import MailTx, now_us, ts_from_us

SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1
MIN_PASSWORD = 8
MAX_PASSWORD = 1024
MAX_ALIASES = 100


def hash_password(password: str) -> str:
    check_password_rules(password)
    salt = os.urandom(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, dklen=32)
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


_DUMMY = "scrypt$16384$8$1$AAAAAAAAAAAAAAAAAAAAAA==$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="


def verify_password(password: str, stored: str | None) -> bool:
    """Constant work whether or not the account exists."""
    try:
        _, n, r, p, salt, digest = (stored or _DUMMY).split("$")
        got = hashlib.scrypt(password.encode()[:MAX_PASSWORD], salt=base64.b64decode(salt), n=int(n),
                             r=int(r), p=int(p), dklen=32)
        return stored is not None and hmac.compare_digest(got, base64.b64decode(digest))
    except (ValueError, TypeError):
        return False


def check_password_rules(password: str) -> None:
    if len(password) < MIN_PASSWORD:
        raise InvalidInput(f"password must be at least {MIN_PASSWORD} characters")
    if len(password) > MAX_PASSWORD:
        raise InvalidInput(f"password must be at most {MAX_PASSWORD} characters")


def create_domain(tr: Transaction, name: str) -> types_pb2.Domain:
    domain = address.validate_domain(name)
    if tr.get(keys.g("dom", domain)) is not None:
        raise AlreadyExists(f"domain {domain} already exists")
    d = types_pb2.Domain(name=domain, create_time=ts_from_us(now_us()))
    tr.set(keys.g("dom", domain), d.SerializeToString())
    return d


def list_domains(tr: Transaction, after: str, limit: int) -> list[types_pb2.Domain]:
    begin, end = keys.g_range("dom")
    if after:
        begin = keys.g("dom", after) + b"\x00"
    out = []
    for _, v in tr.get_range(begin, end, limit=limit):
        d = types_pb2.Domain.FromString(v)
        d.accounts_total = decode_counter(tr.get(keys.g("domctr", d.name)))
        out.append(d)
    return out


def is_local_domain(tr: Transaction, domain: str) -> bool:
    return tr.get(keys.g("dom", domain)) is not None


def create_account(tr: Transaction, req: pb.CreateAccountRequest, user_id: str, pw_hash: str,
                   default_quota: int) -> types_pb2.Account:
    primary = address.canonical(req.email)
    local, domain = address.split(primary)
    if req.quota_bytes < 0:
        raise InvalidInput("quota_bytes must not be negative (0 uses the default)")
    if len(req.display_name) > 200:
        raise InvalidInput("display_name is longer than 200 characters")
    if not is_local_domain(tr, domain):
        raise NotFound(f"domain {domain} is not a local domain; add it first")
    if len(req.aliases) > MAX_ALIASES:
        raise InvalidInput(f"at most {MAX_ALIASES} aliases")
    addrs = [primary]
    for alias in req.aliases:
        a = address.canonical(alias)
        if not is_local_domain(tr, address.split(a)[1]):
            raise NotFound(f"alias {a}: domain is not a local domain")
        if a not in addrs:
            addrs.append(a)
    for a in addrs:
        if tr.get(keys.g("addr", a)) is not None:
            raise AlreadyExists(f"address {a} already belongs to an account")
    acct = types_pb2.Account(user_id=user_id, email=primary, display_name=req.display_name,
                             addresses=addrs, quota_bytes=req.quota_bytes or default_quota,
                             create_time=ts_from_us(now_us()))
    for a in addrs:
        tr.set(keys.g("addr", a), user_id.encode())
    tr.set(keys.g("acct", primary), user_id.encode())
    tr.set(keys.g("acctdom", domain, primary), user_id.encode())
    tr.add(keys.g("domctr", domain), 1)
    tr.set(keys.u(user_id, "acct"), acct.SerializeToString())
    tr.set(keys.u(user_id, "pw"), pw_hash.encode())
    labels.create_system_labels(MailTx(tr, user_id))
    return acct


def _stored_account(tr: Transaction, user_id: str) -> types_pb2.Account:
    """The account record as stored (no counters); NotFound once deleted or being deleted."""
    raw = tr.get(keys.u(user_id, "acct"))
    if raw is None or tr.get(keys.u(user_id, "deleting")) is not None:
        raise NotFound("no such user")
    return types_pb2.Account.FromString(raw)


def _used_bytes(tr: Transaction, user_id: str) -> int:
    return decode_counter(tr.get(keys.u(user_id, "ctr", "used")))


def load_account(tr: Transaction, user_id: str) -> types_pb2.Account:
    acct = _stored_account(tr, user_id)
    acct.used_bytes = _used_bytes(tr, user_id)
    acct.messages_total = decode_counter(tr.get(keys.u(user_id, "ctr", "total")))
    acct.highest_modseq = decode_counter(tr.get(keys.u(user_id, "ctr", "modseq")))
    return acct


def user_for_address(tr: Transaction, email: str) -> str | None:
    try:
        canon = address.canonical(email)
    except InvalidInput:
        return None
    raw = tr.get(keys.g("addr", canon))
    if raw is None:
        # subaddressing: local+tag@domain delivers to local@domain
        local, domain = address.split(canon)
        if "+" in local:
            raw = tr.get(keys.g("addr", f"{local.split('+', 1)[0]}@{domain}"))
    return raw.decode() if raw is not None else None


def list_accounts(tr: Transaction, domain: str, after: str, limit: int) -> list[types_pb2.Account]:
    if domain:
        d = address.validate_domain(domain)
        begin, end = keys.g_range("acctdom", d)
        start = keys.g("acctdom", d, after) + b"\x00" if after else begin
    else:
        begin, end = keys.g_range("acct")
        start = keys.g("acct", after) + b"\x00" if after else begin
    return [load_account(tr, v.decode()) for _, v in tr.get_range(start, end, limit=limit)]


def resolve_recipient(tr: Transaction, addr: str, size: int, postmaster: str = "") -> pb.ResolveRecipientResponse:
    """Where mail to addr goes. `postmaster` (a canonical address, the `postmaster` setting)
    takes a local domain's postmaster@ and abuse@ mail when no account or alias has them."""
    try:
        canon = address.canonical(addr)
    except InvalidInput:
        raise InvalidInput(f"not a valid address: {addr[:100]!r}") from None
    local, domain = address.split(canon)
    if not is_local_domain(tr, domain):
        return pb.ResolveRecipientResponse(
            resolution=pb.RECIPIENT_RESOLUTION_FOREIGN_DOMAIN, canonical_address=canon)
    user = user_for_address(tr, canon)
    if user is None and postmaster and local in address.ROLE_LOCAL_PARTS:
        user = user_for_address(tr, postmaster)
    if user is None:
        return pb.ResolveRecipientResponse(
            resolution=pb.RECIPIENT_RESOLUTION_UNKNOWN_USER, canonical_address=canon)
    # only the quota and its usage: not every counter load_account reads
    quota = _stored_account(tr, user).quota_bytes
    # an unknown size (0) still needs a byte: a mailbox filled to its quota takes nothing more
    if quota and _used_bytes(tr, user) + max(size, 1) > quota:
        return pb.ResolveRecipientResponse(resolution=pb.RECIPIENT_RESOLUTION_OVER_QUOTA,
                                           user_id=user, canonical_address=canon)
    return pb.ResolveRecipientResponse(resolution=pb.RECIPIENT_RESOLUTION_LOCAL_USER,
                                       user_id=user, canonical_address=canon)
