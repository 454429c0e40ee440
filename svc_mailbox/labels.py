"""Gmail-style labels: the system set created with each account, user labels that nest with
"/", and label status (counts, UIDVALIDITY, UIDNEXT, HIGHESTMODSEQ) for lists and IMAP."""

from __future__ import annotations

import unicodedata

from mailmesh.v1 import types_pb2

from mailmesh_common.errors import AlreadyExists, InvalidInput, LimitExceeded, NotFound, PermissionDenied
from mailmesh_common.kv import decode_counter, encode_counter
from svc_mailbox import keys
from svc_mailbox.index import read_u64
from svc_mailbox.txn import MailTx

SYSTEM_LABELS = ("INBOX", "SENT", "DRAFTS", "SPAM", "TRASH", "STARRED", "IMPORTANT")
ALL_MAIL_NAME = "All Mail"
MAX_LABEL_NAME = 225
MAX_USER_LABELS = 10_000
LABEL_TYPE = types_pb2.LabelType


def uid_validity(now_us: int, salt: int = 0) -> int:
    return ((now_us // 1_000_000) + salt) & 0xFFFFFFFF or 1


def create_system_labels(mtx: MailTx) -> None:
    for i, name in enumerate((*SYSTEM_LABELS, keys.ALL)):
        label = types_pb2.Label(id=name, name=ALL_MAIL_NAME if name == keys.ALL else name,
                                type=LABEL_TYPE.LABEL_TYPE_SYSTEM, uid_validity=uid_validity(mtx.now, i))
        mtx.tr.set(keys.u(mtx.user, "lbl", name), label.SerializeToString())
        mtx.tr.set(keys.u(mtx.user, "lname", name.casefold()), name.encode())
        mtx.tr.set(keys.u(mtx.user, "lctr", name, "uidnext"), encode_counter(1))


def validate_name(name: str) -> str:
    name = unicodedata.normalize("NFC", name.strip())
    if not name:
        raise InvalidInput("label name must not be empty")
    if len(name) > MAX_LABEL_NAME:
        raise InvalidInput(f"label name is longer than {MAX_LABEL_NAME} characters")
    if any(unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") for c in name):
        raise InvalidInput("label name must not contain control characters")
    if name.startswith("/") or name.endswith("/") or "//" in name:
        raise InvalidInput("label name must not start or end with '/' or contain an empty level")
    if any(part != part.strip() for part in name.split("/")):
        raise InvalidInput("label levels must not start or end with spaces")
    upper = name.upper()
    if upper in (*SYSTEM_LABELS, keys.ALL, "UNREAD", ALL_MAIL_NAME.upper()):
        raise InvalidInput(f"{name!r} is a reserved label name")
    return name


def load(mtx: MailTx, label_id: str) -> types_pb2.Label:
    raw = mtx.tr.get(keys.u(mtx.user, "lbl", label_id))
    if raw is None:
        raise NotFound(f"label {label_id!r} not found")
    return with_status(mtx, types_pb2.Label.FromString(raw))


def exists(mtx: MailTx, label_id: str) -> bool:
    return mtx.tr.get(keys.u(mtx.user, "lbl", label_id)) is not None


def with_status(mtx: MailTx, label: types_pb2.Label) -> types_pb2.Label:
    lc = lambda n: keys.u(mtx.user, "lctr", label.id, n)  # noqa: E731
    tr = mtx.tr
    label.messages_total = decode_counter(tr.get(lc("total")))
    label.messages_unread = decode_counter(tr.get(lc("unread")))
    label.threads_total = decode_counter(tr.get(lc("threads")))
    label.uid_next = max(decode_counter(tr.get(lc("uidnext"))), 1)
    label.highest_modseq = read_u64(tr.get(lc("hms")))
    return label


def list_all(mtx: MailTx) -> list[types_pb2.Label]:
    begin, end = keys.u_range(mtx.user, "lbl")
    labels = [with_status(mtx, types_pb2.Label.FromString(v)) for _, v in mtx.tr.get_range(begin, end)]
    order = {name: i for i, name in enumerate((*SYSTEM_LABELS, keys.ALL))}
    labels.sort(key=lambda lb: (lb.type != LABEL_TYPE.LABEL_TYPE_SYSTEM, order.get(lb.id, 99),
                                lb.name.casefold()))
    return labels


def create(mtx: MailTx, name: str) -> types_pb2.Label:
    name = validate_name(name)
    tr = mtx.tr
    if tr.get(keys.u(mtx.user, "lname", name.casefold())) is not None:
        raise AlreadyExists(f"a label named {name!r} already exists")
    if mtx.counter("ctr", "userlabels") >= MAX_USER_LABELS:
        raise LimitExceeded(f"at most {MAX_USER_LABELS} labels per user")
    seq = mtx.counter("ctr", "labelseq") + 1
    tr.set(keys.u(mtx.user, "ctr", "labelseq"), encode_counter(seq))
    mtx.add(1, "ctr", "userlabels")
    label = types_pb2.Label(id=f"Label_{seq}", name=name, type=LABEL_TYPE.LABEL_TYPE_USER,
                            uid_validity=uid_validity(mtx.now, seq))
    tr.set(keys.u(mtx.user, "lbl", label.id), label.SerializeToString())
    tr.set(keys.u(mtx.user, "lname", name.casefold()), label.id.encode())
    tr.set(keys.u(mtx.user, "lctr", label.id, "uidnext"), encode_counter(1))
    mtx.change(types_pb2.CHANGE_TYPE_LABEL_CREATED, label_id=label.id)
    return with_status(mtx, label)


def rename(mtx: MailTx, label_id: str, new_name: str) -> types_pb2.Label:
    """Renames a user label and every label nested under it ("Work" → "Job" moves "Work/x")."""
    label = load(mtx, label_id)
    if label.type != LABEL_TYPE.LABEL_TYPE_USER:
        raise PermissionDenied(f"system label {label_id} cannot be renamed")
    new_name = validate_name(new_name)
    old_name = label.name
    if new_name == old_name:
        return label
    tr = mtx.tr
    holder = tr.get(keys.u(mtx.user, "lname", new_name.casefold()))
    if holder is not None and holder.decode() != label_id:
        raise AlreadyExists(f"a label named {new_name!r} already exists")
    moves: list[tuple[types_pb2.Label, str]] = [(label, new_name)]
    begin, end = keys.u_range(mtx.user, "lbl")
    for _, raw in tr.get_range(begin, end):  # records only: no counters needed here
        other = types_pb2.Label.FromString(raw)
        if other.type == LABEL_TYPE.LABEL_TYPE_USER and other.name.startswith(old_name + "/"):
            moves.append((other, new_name + other.name[len(old_name):]))
    for lb, _ in moves:
        tr.clear(keys.u(mtx.user, "lname", lb.name.casefold()))
    for lb, target in moves:
        clash = tr.get(keys.u(mtx.user, "lname", target.casefold()))
        if clash is not None:
            raise AlreadyExists(f"renaming would clash with the existing label {target!r}")
        lb.name = target
        stored = types_pb2.Label(id=lb.id, name=lb.name, type=lb.type, uid_validity=lb.uid_validity)
        tr.set(keys.u(mtx.user, "lbl", lb.id), stored.SerializeToString())
        tr.set(keys.u(mtx.user, "lname", target.casefold()), lb.id.encode())
        mtx.change(types_pb2.CHANGE_TYPE_LABEL_UPDATED, label_id=lb.id)
    return load(mtx, label_id)


def resolve_ids(mtx: MailTx, label_ids: list[str] | tuple[str, ...], *, field: str) -> list[str]:
    """Validates label ids a client names (system names are accepted case-insensitively)."""
    out: list[str] = []
    for lid in label_ids:
        canon = lid.upper() if lid.upper() in SYSTEM_LABELS else lid
        if canon == keys.ALL or canon.upper() == "UNREAD":
            raise InvalidInput(f"{field}: {lid!r} cannot be set directly")
        if not exists(mtx, canon):
            raise NotFound(f"{field}: label {lid!r} not found")
        if canon not in out:
            out.append(canon)
    return out
