"""Rebuilding a lost index at start, in the background.

When the backend finds at start that its documents are gone or unusable (backend.rebuild_reason:
the index was missing although EVENTS had already been indexed, unreadable, of another schema,
or an earlier rebuild was interrupted), the service still starts, and this task rebuilds every
user's documents from the mailbox store with the Reindexer while the EVENTS indexer keeps
running (DocStore keeps the two from undoing each other's work).

Until a user's documents are rebuilt, a search of that user answers UNAVAILABLE ("the search
index is being rebuilt") instead of a partial answer. GetIndexStatus reports the progress. The
backend keeps a durable marker while the rebuild runs, so a rebuild cut short by a stop starts
again at the next start. A temporary failure (the mailbox unreachable) is retried with a growing
delay; a user that keeps failing is skipped after MAX_USER_ATTEMPTS (logged) so the rest of the
index comes back.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from mailmesh_common import telemetry
from mailmesh_common.errors import MailmeshError, Unavailable
from mailmesh_common.mailboxclient import MailboxClient
from svc_search.backends.base import Backend
from svc_search.reindex import Progress, Reindexer

log = logging.getLogger(__name__)
T = TypeVar("T")

MAX_USER_ATTEMPTS = 8
RETRY_MIN_S = 0.5
RETRY_MAX_S = 30.0
MAX_TRACKED_USERS = 1_000_000  # users answered individually before the whole rebuild is done


@dataclass
class RebuildStatus:
    rebuilding: bool = False
    reason: str = ""
    users_done: int = 0
    users_total: int = 0
    documents: int = 0


class Rebuilder:
    def __init__(self, backend: Backend, reindexer: Reindexer, mailbox: MailboxClient) -> None:
        self.backend = backend
        self.reindexer = reindexer
        self.mailbox = mailbox
        self.status = RebuildStatus()
        self._done_users: set[str] = set()
        self.failed: set[str] = set()  # users whose rebuild gave up: UNAVAILABLE until reindexed
        self.finished = asyncio.Event()

    def reindexed(self, user: str) -> None:
        """A reindex of `user` succeeded (their documents are complete again)."""
        self.failed.discard(user)

    def check(self, user: str) -> None:
        """Raises Unavailable while `user`'s documents are not rebuilt yet."""
        if user in self.failed:
            raise Unavailable("the search documents of this user could not be rebuilt yet; an operator has "
                              "to run `mailmesh search reindex` for the user")
        s = self.status
        if s.rebuilding and user not in self._done_users and self.backend.needs_rebuild(user):
            total = f" of {s.users_total}" if s.users_total else ""
            raise Unavailable(f"the search index is being rebuilt ({s.users_done}{total} users done); "
                              "try again shortly")

    def mark_rebuilding(self, reason: str) -> None:
        """Searches answer UNAVAILABLE from now on until `run` has finished."""
        self.status = RebuildStatus(rebuilding=True, reason=reason)
        self._done_users.clear()
        self.finished.clear()

    async def run(self, reason: str, stop: asyncio.Event) -> None:
        """Rebuilds every user's documents; returns when done (or stopped). An unexpected
        failure starts the rebuild over after a delay (searches stay UNAVAILABLE meanwhile)."""
        delay = RETRY_MIN_S
        while not stop.is_set():
            try:
                await self._rebuild(reason, stop)
                return
            except Exception:
                log.exception("rebuilding the search index failed; starting over in %.1fs", delay)
            if await self._sleep(stop, delay):
                return
            delay = min(delay * 2, RETRY_MAX_S)

    async def _rebuild(self, reason: str, stop: asyncio.Event) -> None:
        self.mark_rebuilding(reason)
        log.warning("search index: %s; rebuilding every user's documents from the mailbox", reason)
        with telemetry.tracer().start_as_current_span("search.rebuild", attributes={"mailmesh.reason": reason}) as span:
            ok, _ = await self._retrying(stop, lambda: self.backend.begin_rebuild(reason), "record the rebuild")
            ok, users = await self._retrying(stop, self.mailbox.user_ids, "list the mailbox's users")
            if not ok or users is None:
                return
            users = [u for u in users if self.backend.needs_rebuild(u)]
            self.status.users_total = len(users)
            for user in users:
                if stop.is_set():
                    return
                if not await self._user(user, stop):
                    if stop.is_set():
                        return
                    self.failed.add(user)
                self.status.users_done += 1
                if len(self._done_users) < MAX_TRACKED_USERS:
                    self._done_users.add(user)
            if self.failed:  # the marker stays: the next start tries again
                log.error("search index rebuild left %d users without their documents; they get UNAVAILABLE "
                          "until `mailmesh search reindex --user` succeeds for them", len(self.failed))
            else:
                ok, _ = await self._retrying(stop, self.backend.end_rebuild, "record the end of the rebuild")
                if not ok:
                    return
            span.set_attribute("mailmesh.users", self.status.users_done)
            span.set_attribute("mailmesh.documents", self.status.documents)
        self.status.rebuilding = False
        self._done_users.clear()
        self.finished.set()
        log.warning("search index rebuilt: %d users, %d documents", self.status.users_done, self.status.documents)

    async def _user(self, user: str, stop: asyncio.Event) -> bool:
        """Rebuilds one user's documents; False if it failed MAX_USER_ATTEMPTS times or stopped."""
        delay = RETRY_MIN_S
        for attempt in range(1, MAX_USER_ATTEMPTS + 1):
            p = Progress(user_id=user)
            base = self.status.documents
            try:
                async for _ in self.reindexer.user(user, p):
                    self.status.documents = base + p.documents
                self.status.documents = base + p.documents
                return True
            except MailmeshError as exc:
                self.status.documents = base + p.documents
                if attempt == MAX_USER_ATTEMPTS:
                    log.error("rebuilding the documents of user %s failed %d times (%s); skipped: run "
                              "`mailmesh search reindex --user` for it", user, attempt, exc.message)
                    return False
                log.warning("rebuilding the documents of user %s failed (%s); retrying in %.1fs",
                            user, exc.message, delay)
            if await self._sleep(stop, delay):
                return False
            delay = min(delay * 2, RETRY_MAX_S)
        return False

    async def _retrying(self, stop: asyncio.Event, fn: Callable[[], Awaitable[T]], what: str
                        ) -> tuple[bool, T | None]:
        """(True, fn()) once it succeeds (temporary failures retried); (False, None) if stopped first."""
        delay = RETRY_MIN_S
        while not stop.is_set():
            try:
                return True, await fn()
            except Unavailable as exc:
                log.warning("search index rebuild: cannot %s (%s); retrying in %.1fs", what, exc.message, delay)
            if await self._sleep(stop, delay):
                break
            delay = min(delay * 2, RETRY_MAX_S)
        return False, None

    @staticmethod
    async def _sleep(stop: asyncio.Event, delay: float) -> bool:
        """Waits `delay` seconds; True if stopped meanwhile."""
        try:
            await asyncio.wait_for(stop.wait(), delay)
            return True
        except TimeoutError:
            return False
