"""The mailbox's page tokens are the mesh's (mailmesh_common.pagetoken): signed, bound to the
user and the listing; a tampered, foreign or mismatched token is INVALID_ARGUMENT."""

from __future__ import annotations

from mailmesh_common.pagetoken import Cursor, PageTokens

__all__ = ["Cursor", "PageTokens"]
