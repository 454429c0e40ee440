"""Who is calling: the mesh's internal token and the acting user carried in gRPC metadata.

Every internal call carries `x-mailmesh-token` (the mesh's shared secret). Calls made on behalf
of a user also carry `x-mailmesh-user`; mailbox-scoped requests are checked against it. Calls
without an acting user are system calls (ingest, the admin CLI).
"""

from __future__ import annotations

import contextvars

from mailmesh_common.errors import InvalidInput, PermissionDenied

TOKEN_KEY = "x-mailmesh-token"
USER_KEY = "x-mailmesh-user"

_acting_user: contextvars.ContextVar[str | None] = contextvars.ContextVar("acting_user", default=None)


def acting_user() -> str | None:
    """The user on whose behalf the current RPC runs, or None for a system call."""
    return _acting_user.get()


def set_acting_user(user: str | None) -> contextvars.Token[str | None]:
    return _acting_user.set(user)


def reset_acting_user(token: contextvars.Token[str | None]) -> None:
    _acting_user.reset(token)


def user_from_parent(parent: str, *, field: str = "parent") -> str:
    """Resolves "users/{id}" or "users/me" to a user id the caller may act on."""
    parts = parent.split("/")
    if len(parts) != 2 or parts[0] != "users" or not parts[1]:
        raise InvalidInput(f"{field} must look like users/{{user}}, got {parent!r}")
    return check_user(parts[1])


def check_user(user: str) -> str:
    me = acting_user()
    if user == "me":
        if me is None:
            raise InvalidInput("users/me needs an acting user")
        return me
    if me is not None and me != user:
        raise PermissionDenied("the caller may not act on another user's mailbox")
    return user


def split_name(name: str, collection: str, *, field: str = "name") -> tuple[str, str]:
    """Parses "users/{user}/{collection}/{id}" → (checked user id, id)."""
    parts = name.split("/")
    if len(parts) != 4 or parts[0] != "users" or parts[2] != collection or not parts[1] or not parts[3]:
        raise InvalidInput(f"{field} must look like users/{{user}}/{collection}/{{id}}, got {name!r}")
    return check_user(parts[1]), parts[3]
