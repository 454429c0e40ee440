"""Rebuilding the search documents of a user from the mailbox store (the recovery path when an
index is lost or its schema changed): `mailmesh search reindex [--user EMAIL]`.

For one user: note the mailbox's highest MODSEQ, stream every message with its raw bytes
(ExportMessages), parse each raw message as the mailbox does for FULL reads, and write the
documents in chunks, tagged with this rebuild's generation. Then documents of older
generations that reflect no change after the noted MODSEQ are stale (their messages are gone)
and are removed. The EVENTS indexer keeps running meanwhile; DocStore's MODSEQ guard and
tombstones keep the two from undoing each other's work.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

from mailmesh_common.errors import NotFound
from mailmesh_common.mailboxclient import MailboxClient
from mailmesh_common.mime import parse_message
from svc_search.documents import SearchDocument, fill_full, from_message
from svc_search.store import EVERYTHING, DocStore

log = logging.getLogger(__name__)

CHUNK = 200


@dataclass
class Progress:
    user_id: str = ""
    documents: int = 0
    removed: int = 0
    users_done: int = 0
    done: bool = False


class Reindexer:
    def __init__(self, store: DocStore, mailbox: MailboxClient) -> None:
        self.store = store
        self.mailbox = mailbox
        self._last_generation = 0

    def _generation(self) -> int:
        g = max(int(time.time() * 1000), self._last_generation + 1)
        self._last_generation = g
        return g

    async def run(self, users: list[str] | None) -> AsyncIterator[Progress]:
        """Rebuilds `users` (every user of the mailbox when None), yielding progress."""
        todo = users if users is not None else await self.mailbox.user_ids()
        p = Progress()
        for user in todo:
            p.user_id = user
            async for _ in self.user(user, p):
                yield p
            p.users_done += 1
            yield p
        p.done = True
        yield p

    async def user(self, user: str, p: Progress) -> AsyncIterator[None]:
        generation = self._generation()
        try:
            account = await self.mailbox.get_account(user)
        except NotFound:
            # the account is gone (its account_deleted event removes them too): its documents
            # are all stale
            async with self.store.lock:
                p.removed += await self.store.backend.delete_stale(user, EVERYTHING, EVERYTHING)
            log.info("user %s no longer exists: %d documents removed", user, p.removed)
            return
        start_modseq = account.highest_modseq
        self.store.begin_reindex(user)
        try:
            chunk: list[SearchDocument] = []
            async for message, raw in self.mailbox.export(user):
                parsed = await asyncio.to_thread(parse_message, raw)
                doc = from_message(user, fill_full(message, parsed))
                chunk.append(replace(doc, generation=generation))
                if len(chunk) >= CHUNK:
                    await self.store.put_snapshot(chunk)
                    p.documents += len(chunk)
                    chunk = []
                    yield None
            if chunk:
                await self.store.put_snapshot(chunk)
                p.documents += len(chunk)
            async with self.store.lock:
                p.removed += await self.store.backend.delete_stale(user, generation, start_modseq)
            log.info("reindexed user %s: %d documents so far, %d stale removed", user, p.documents, p.removed)
        finally:
            self.store.end_reindex(user)
