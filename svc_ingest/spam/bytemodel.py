"""The byte model: online logistic regression over hashed, binary, overlapping byte 4-grams of
the start of the raw message, one more input of the learned combiner (combine.py).

The approach that won the TREC spam tracks (Goodman & Yih 2006; Sculley & Wachman 2007): no
parsing at all, so it sees what the tokenizer normalises away: transfer encodings, HTML and
its layout, charset tricks, obfuscated words, header formatting. A message's features are the
distinct 4-byte windows of its first PREFIX_BYTES bytes after the mbox ``From `` envelope line
(never a feature: its share differs by class in stored corpora), each hashed to one of BUCKETS
weights; its logit is the sum of those weights. Training is the online gradient step of the
logistic loss, w += RATE * (y - p) on each of its buckets; `spam train` runs EPOCHS passes.

Measured by nested 5-fold cross-validation inside the training part of the development corpus
(never the held-out part), over five fold assignments, the combiner refitted with and without
this input (the byte model scored out of fold at both levels; figures in combine.py): at 2 of
2497 training ham flagged, detection 79.5 % -> 86.2 %; false positives at 99 % detection 23.4
-> 16.0; with the combiner's fit weighing ham 10x (combine.HAM_WEIGHT), 93.2 % at 2 ham and
90.2 % at the cut with 2.2 ham over it, where the combiner had 84.0 % with 2.8. Chosen the
same way: 2^18 buckets (2^20: no better), the first 2000 bytes (3000 scored the same and cost
more CPU; the lead's standalone test found 10 kB no better alone either), rate 0.02, 5 epochs
(3, unweighted fit: 86.2 % at 2 ham either way; with the cut moved up one unit, 86.2 % with
2.6 ham over it against 87.0 % with 2.6; 16.8 false positives at 99 % against 16.0). Hashing
the 2000 bytes and summing the weights costs ~0.6-0.9 ms of CPU per message in pure Python.
The decoded visible text (a second model, or its 4-grams added to this one's) measured no
better at the 0.1 % cut (combine.py).

State in the KV store, in the filter's subspace (shared by every replica):

    ("x", "p", page)         the weights `spam train` fitted: PAGES pages of PAGE_BUCKETS
                             little-endian int32 (fixed point, SCALE per unit), replaced whole
                             by a fit together with the combiner that learned to weigh them
    ("x", "f", page)         what single-message training (feedback, `spam train --no-fit`)
                             added since: same layout, updated read-modify-write in one
                             transaction per LEARN_BATCH messages, so concurrent trainers
                             lose nothing
    ("x", "v")               counter: bumped on every change; replicas reload on a change
    ("u", user, "x", bucket) counter: a user's own adjustment of that bucket (fixed point)
    ("u", user, "x", "n")    counter: messages that user's adjustments learned

A replica scores with a snapshot (fit + feedback pages summed) it re-reads at most every
SNAPSHOT_TTL_S, and only when the version changed; its own training shows at once. A user's
logit adds their adjustments for the message's buckets (read only for users who trained).
"""

from __future__ import annotations

import asyncio
import math
import random
import struct
import sys
import time
from array import array
from collections.abc import Callable, Iterable, Sequence

from mailmesh_common.kv import Database, Subspace, Transaction, TransactionTimedOut, decode_counter
from mailmesh_common.kv.subspace import pack_tuple
from mailmesh_common.telemetry import tracer

__all__ = ["BUCKETS", "EPOCHS", "PREFIX_BYTES", "RATE", "ByteModel", "Snapshot", "grams", "logit_of",
           "train_weights"]

PREFIX_BYTES = 2000  # raw bytes looked at, after the mbox envelope line
BITS = 18
BUCKETS = 1 << BITS  # hashed weights
PAGE_BUCKETS = 4096  # weights per stored page (16 kB)
PAGES = BUCKETS // PAGE_BUCKETS
RATE = 0.02  # learning rate of the online gradient step
EPOCHS = 5  # passes over the messages when `spam train` fits
SCALE = 1 << 16  # stored weight = round(weight * SCALE), int32
MAX_LOGIT = 30.0
LEARN_BATCH = 16  # messages per learning transaction (bounds a per-user batch's counter updates)
SNAPSHOT_TTL_S = 30.0  # how long a replica scores with a snapshot before checking the version
_INT32 = (1 << 31) - 1
_HASH = 0x9E3779B1  # Fibonacci hashing: (4-gram * _HASH mod 2^32) >> (32 - BITS)
_SHIFT = 32 - BITS
_MASK32 = 0xFFFFFFFF


def grams(raw: bytes) -> list[int]:
    """The distinct buckets of the overlapping 4-byte windows of the first PREFIX_BYTES bytes
    after a leading mbox ``From `` line (in no particular order)."""
    if raw.startswith(b"From "):
        nl = raw.find(b"\n")
        raw = raw[nl + 1:] if nl >= 0 else b""
    head = raw[:PREFIX_BYTES]
    windows: set[int] = set()
    for offset in range(4):  # the windows starting at offset, offset + 4, ...: one C call each
        n = (len(head) - offset) // 4
        if n > 0:
            windows.update(struct.unpack_from(f">{n}I", head, offset))
    return list({(w * _HASH & _MASK32) >> _SHIFT for w in windows})


def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-max(-MAX_LOGIT, min(MAX_LOGIT, z))))


def logit_of(weights: Sequence[int], buckets: Iterable[int]) -> float:
    """The model's log-odds (spam) of a message with these buckets, from fixed-point weights."""
    return max(-MAX_LOGIT, min(MAX_LOGIT, sum(map(weights.__getitem__, buckets)) / SCALE))


def train_weights(items: Sequence[tuple[Sequence[int], bool]], *, epochs: int = EPOCHS,
                  seed: int = 0) -> list[float]:
    """Weights (floats, BUCKETS) learned from (buckets, is_spam) items by EPOCHS passes of online
    logistic regression from zero, each pass in a shuffled order (deterministic by seed)."""
    w = [0.0] * BUCKETS
    order = list(range(len(items)))
    rng = random.Random(seed)
    for _ in range(epochs):
        rng.shuffle(order)
        for i in order:
            buckets, is_spam = items[i]
            z = sum(map(w.__getitem__, buckets))
            step = RATE * ((1.0 if is_spam else 0.0) - _sigmoid(z))
            for b in buckets:
                w[b] += step
    return w


def _fixed(weight: float) -> int:
    return max(-_INT32, min(_INT32, round(weight * SCALE)))


def _encode(page: array[int]) -> bytes:
    if sys.byteorder == "big":  # stored little-endian whatever the replica's byte order
        page = array("i", page)
        page.byteswap()
    return page.tobytes()


def to_pages(weights: Sequence[float]) -> list[bytes]:
    """Float weights as the stored fixed-point pages."""
    fixed = array("i", (_fixed(w) for w in weights))
    return [_encode(fixed[p * PAGE_BUCKETS:(p + 1) * PAGE_BUCKETS]) for p in range(PAGES)]


def _page(value: bytes | None) -> array[int]:
    """A stored page (a missing or malformed one reads as zeros)."""
    page = array("i")
    if value is not None and len(value) == PAGE_BUCKETS * 4:
        page.frombytes(value)
        if sys.byteorder == "big":
            page.byteswap()
    else:
        page.frombytes(bytes(PAGE_BUCKETS * 4))
    return page


class Snapshot:
    """One replica's copy of the global weights (fit + feedback), fixed point."""

    __slots__ = ("version", "weights", "trained")

    def __init__(self, version: int, weights: array[int], trained: bool) -> None:
        self.version = version
        self.weights = weights
        self.trained = trained  # whether any weight is set (a fit or some training)

    def logit(self, buckets: Iterable[int]) -> float:
        return logit_of(self.weights, buckets)


class ByteModel:
    """The byte model's state in the KV store (see the module docstring for the keys)."""

    def __init__(self, db: Database, space: Subspace) -> None:
        self.db = db
        self.space = space
        self._version_key = space.pack(("x", "v"))
        self.ttl_s = SNAPSHOT_TTL_S
        self._snapshot: tuple[float, Snapshot] | None = None  # (checked at, snapshot)
        self._generation = 0  # bumped by this replica's own writes: a read racing one is not kept
        self._lock = asyncio.Lock()

    def _page_key(self, kind: str, page: int) -> bytes:
        return self.space.pack(("x", kind, page))

    def _user_key(self, user_id: str, bucket: int) -> bytes:
        return self.space.pack(("u", user_id, "x", bucket))

    def _user_count_key(self, user_id: str) -> bytes:
        return self.space.pack(("u", user_id, "x", "n"))

    # --- reading -----------------------------------------------------------------------------

    def _read_all(self, tr: Transaction) -> Snapshot:
        version = decode_counter(tr.get(self._version_key))
        weights = array("i")
        trained = False
        for p in range(PAGES):
            fit_value = tr.get(self._page_key("p", p))
            fb_value = tr.get(self._page_key("f", p))
            trained = trained or fit_value is not None or fb_value is not None
            page = _page(fit_value)
            if fb_value is not None:
                for i, d in enumerate(_page(fb_value)):
                    if d:
                        page[i] = max(-_INT32, min(_INT32, page[i] + d))
            weights.extend(page)
        return Snapshot(version, weights, trained)

    async def snapshot(self) -> Snapshot:
        """The global weights this replica scores with: re-read when ttl_s (SNAPSHOT_TTL_S)
        passed and the stored version changed."""
        fresh = self.fresh(time.monotonic())
        if fresh is not None:
            return fresh
        async with self._lock:
            fresh = self.fresh(time.monotonic())
            if fresh is not None:
                return fresh
            generation = self.generation
            snap = await self.db.run(self.read_snapshot, readonly=True)
            self.keep(snap, generation)
            return snap

    def fresh(self, now: float) -> Snapshot | None:
        """The cached snapshot while it was checked less than ttl_s ago, else None."""
        cached = self._snapshot
        return cached[1] if cached is not None and now - cached[0] < self.ttl_s else None

    @property
    def generation(self) -> int:
        """Bumped by this replica's own writes: a snapshot read before one is not kept."""
        return self._generation

    def read_snapshot(self, tr: Transaction) -> Snapshot:
        """The stored weights inside the caller's transaction: the cached snapshot while the
        stored version is still its version, else every page read again."""
        version = decode_counter(tr.get(self._version_key))
        cached = self._snapshot
        if cached is not None and cached[1].version == version:
            return cached[1]
        with tracer(__name__).start_as_current_span("spam.byte_model.reload") as span:
            snap = self._read_all(tr)
            span.set_attribute("mailmesh.spam.byte_model.version", snap.version)
        return snap

    def keep(self, snap: Snapshot, generation: int) -> None:
        """Caches a snapshot read at `generation` (unless this replica wrote since)."""
        if generation == self._generation:
            self._snapshot = (time.monotonic(), snap)

    async def user_logit(self, user_id: str, buckets: Sequence[int]) -> float:
        """The sum of a user's adjustments over these buckets (0.0 when they have none)."""
        return await self.db.run(lambda tr: self.read_user_logit(tr, user_id, lambda: buckets),
                                 readonly=True)

    def read_user_logit(self, tr: Transaction, user_id: str,
                        buckets: Callable[[], Sequence[int]]) -> float:
        """user_logit() inside the caller's transaction; buckets is called only when the user
        has adjustments."""
        if decode_counter(tr.get(self._user_count_key(user_id))) <= 0:
            return 0.0
        prefix = self.space.pack(("u", user_id, "x"))
        get = tr.get
        return sum(decode_counter(get(prefix + pack_tuple((b,)))) for b in buckets()) / SCALE

    # --- writing -----------------------------------------------------------------------------

    def _forget_snapshot(self) -> None:
        self._snapshot = None
        self._generation += 1

    async def store_fit(self, weights: Sequence[float]) -> None:
        """Replace the fitted weights (a `spam train` fit); feedback pages stay."""
        pages = to_pages(weights)

        def fn(tr: Transaction) -> None:
            for p, value in enumerate(pages):
                tr.set(self._page_key("p", p), value)
            tr.add(self._version_key, 1)

        with tracer(__name__).start_as_current_span("spam.byte_model.store_fit"):
            try:
                await self.db.run(fn)
            finally:
                self._forget_snapshot()

    async def learn(self, items: Sequence[tuple[Sequence[int], bool]], *,
                    user_ids: Iterable[str] = ("",)) -> None:
        """One online step per (buckets, is_spam) message, in order: on the global feedback
        pages ("" in user_ids) and on each named user's adjustments; LEARN_BATCH messages per
        transaction (pages read and written once per transaction)."""
        scopes = list(dict.fromkeys(user_ids))
        users = [u for u in scopes if u]
        glob = "" in scopes
        if not items:
            return
        with tracer(__name__).start_as_current_span("spam.byte_model.learn") as span:
            span.set_attribute("mailmesh.spam.messages", len(items))
            span.set_attribute("mailmesh.spam.users", len(users))
            try:
                for i in range(0, len(items), LEARN_BATCH):
                    await self._learn_chunk(items[i:i + LEARN_BATCH], glob, users)
            finally:
                self._forget_snapshot()

    async def _learn_chunk(self, chunk: Sequence[tuple[Sequence[int], bool]], glob: bool,
                           users: Sequence[str]) -> None:
        """One transaction; one that runs into the time limit (a loaded machine, a remote
        store) is split in halves and retried, down to single messages."""
        def fn(tr: Transaction) -> None:
            self._learn(tr, chunk, glob, users)

        try:
            await self.db.run(fn)
            return
        except TransactionTimedOut:
            if len(chunk) <= 1:
                raise
        half = len(chunk) // 2
        await self._learn_chunk(chunk[:half], glob, users)
        await self._learn_chunk(chunk[half:], glob, users)

    def _learn(self, tr: Transaction, items: Sequence[tuple[Sequence[int], bool]], glob: bool,
               users: Sequence[str]) -> None:
        pages = sorted({b // PAGE_BUCKETS for buckets, _ in items for b in buckets})
        fit = {p: _page(tr.get(self._page_key("p", p))) for p in pages}
        fb = {p: _page(tr.get(self._page_key("f", p))) for p in pages}
        mine: dict[str, dict[int, int]] = {u: {} for u in users}  # bucket -> stored + added
        added: dict[str, dict[int, int]] = {u: {} for u in users}
        touched = False
        for buckets, is_spam in items:
            target = 1.0 if is_spam else 0.0
            z = sum(fit[b // PAGE_BUCKETS][b % PAGE_BUCKETS] + fb[b // PAGE_BUCKETS][b % PAGE_BUCKETS]
                    for b in buckets) / SCALE
            for user in users:
                have = mine[user]
                for b in buckets:
                    if b not in have:
                        have[b] = decode_counter(tr.get(self._user_key(user, b)))
                step = _fixed(RATE * (target - _sigmoid(z + sum(have[b] for b in buckets) / SCALE)))
                if step:
                    delta = added[user]
                    for b in buckets:
                        have[b] += step
                        delta[b] = delta.get(b, 0) + step
            if glob:
                step = _fixed(RATE * (target - _sigmoid(z)))
                if step:
                    touched = True
                    for b in buckets:
                        page = fb[b // PAGE_BUCKETS]
                        i = b % PAGE_BUCKETS
                        page[i] = max(-_INT32, min(_INT32, page[i] + step))
        if touched:
            for p in pages:
                tr.set(self._page_key("f", p), _encode(fb[p]))
        for user in users:
            for b, d in added[user].items():
                if d:
                    tr.add(self._user_key(user, b), d)
            tr.add(self._user_count_key(user), len(items))
        tr.add(self._version_key, 1)
