"""The Bayesian token model: counts in the KV store, Robinson's f(w) and Fisher's chi-squared
combining (as in SpamBayes).

Combining (Gary Robinson, "A Statistical Approach to the Spam Problem", 2003; SpamBayes's
chi2_spamprob): for each token w seen in s spam and h ham of S spam and H ham messages,

    p(w) = (s/S) / (s/S + h/H)                 the token's spamminess from the class ratios
    f(w) = (STRENGTH * X + n * p(w)) / (STRENGTH + n),  n = s + h   (s=0.1, x=0.5)

then the MAX_DISCRIMINATORS tokens with |f(w) - 0.5| >= MIN_PROB_STRENGTH are combined with
Fisher's method twice: S = 1 - chi2Q(-2 ln prod(1 - f), 2n) is the evidence for spam,
H = 1 - chi2Q(-2 ln prod(f), 2n) for ham, and the indicator is (1 + S - H) / 2: near 1 spam,
near 0 ham, near 0.5 unsure (both or neither).

Besides the indicator over all tokens, the same combining runs over each token group
(tokenizer.token_group: header, content, structure), reported as that group's S and H in
BayesResult.parts; the learned combiner (combine.py) weighs them.

Parameters chosen by 5-fold cross-validation inside the training part of the development
corpus (never the held-out part): Robinson's s = 0.1 (unknown-word strength; with s = 1 rare
words stayed too close to 0.5: false positives at 99 % detection 23 -> 13 of 2497 ham),
x = 0.5, MIN_PROB_STRENGTH 0.1 and 150 clues (0.3/0.45 and 400 clues measured no better).

Per-user adjustment: a user's own training pools with the global counts, each user count
weighing USER_WEIGHT global ones: s' = s_g + W s_u, S' = S_g + W S_u (likewise ham), so a
user's corrections move exactly the tokens of the mail they judged and nothing else.

Key layout (tuple keys in the filter's subspace, default ("spam",)):

    ("g", "n", "s"|"h")                 counter: messages trained as spam / ham (global)
    ("g", "t", token, "s"|"h")          counter: messages of that class with the token
    ("g", "m", message_key)             chunked: class + tokens a message was trained with
    ("c",)                              the learned combiner (combine.py), JSON
    ("u", user_id, ...)                 the same three families for one user's adjustments
    ("x", ...), ("u", user_id, "x", ...)  the byte model's weights (bytemodel.py)

Counters use the atomic ADD so concurrent trainers on any replica never lose an update, and
the training record makes training idempotent per message: retraining as the same class is a
no-op, training as the other class first subtracts exactly what the record added. Bulk
training merges a batch's updates into one ADD per counter. Counters that fall to zero stay
as zero-valued keys (the KV API has no compare-and-clear); pruning rare tokens is left for
later.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
import zlib
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import cast

from mailmesh_common.kv import (
    Database,
    Subspace,
    Transaction,
    TransactionTimedOut,
    clear_chunked,
    decode_counter,
    get_chunked,
    set_chunked,
)
from mailmesh_common.kv.sqlite import SqliteDatabase
from svc_ingest.spam.bytemodel import ByteModel, Snapshot
from svc_ingest.spam.tokenizer import GROUPS, token_group

__all__ = [
    "MAX_DISCRIMINATORS",
    "MAX_UPDATES_PER_TRANSACTION",
    "MIN_PROB_STRENGTH",
    "BayesModel",
    "GROUPS",
    "BayesResult",
    "Counts",
    "TrainItem",
    "chi2_combine",
    "chi2_evidence",
    "clues_and_parts",
    "token_prob",
]

STRENGTH = 0.1  # Robinson's s: how much weight the prior X has (unknown-word strength)
UNKNOWN_PROB = 0.5  # Robinson's x: the probability of a token never seen
MIN_PROB_STRENGTH = 0.1  # tokens with |f - 0.5| below this are ignored
MAX_DISCRIMINATORS = 150  # strongest tokens combined per message
USER_WEIGHT = 5  # one user-trained message counts as this many global ones for that user
# Tokens looked up per read-only transaction (chunks run concurrently). Remote stores
# (FoundationDB: one round trip per lookup) gain from concurrent chunks; the embedded SQLite
# store reads locally, where each transaction only adds overhead: one transaction per message
# there (measured on the development corpus: 3.5 against 6.9 ms of CPU per message).
READ_CHUNK = 128
READ_CHUNK_LOCAL = 2000
# Bound on one training transaction: counter updates, counted before equal tokens of the
# batch are merged. Keeps it far below FoundationDB's 5 s and 10 MB per transaction (a
# transaction that still runs out of time is split and retried).
MAX_UPDATES_PER_TRANSACTION = 10_000
COMBINER_TTL_S = 30.0  # how long a replica uses its cached copy of the stored combiner
# Global token counts a replica read recently are reused this long (training elsewhere shows after
# at most this delay; training on this replica clears the cache at once), up to this many tokens.
TOKEN_CACHE_TTL_S = 60.0
TOKEN_CACHE_MAX = 200_000

_SPAM = "s"
_HAM = "h"
_LN2 = math.log(2)


@dataclass(frozen=True)
class Counts:
    """Trained-message counts of one model (global or one user)."""

    spam: int = 0
    ham: int = 0


@dataclass(frozen=True)
class BayesResult:
    """The model's judgement of one token set."""

    probability: float  # chi-squared indicator, 0 (ham) .. 1 (spam); 0.5 when not ready
    ready: bool  # enough training on both sides to be trusted
    clues: tuple[tuple[str, float], ...]  # the tokens used, strongest first, with f(w)
    counts: Counts  # the global model's size
    # (token group, spam evidence S, ham evidence H) of each group's tokens, GROUPS order
    parts: tuple[tuple[str, float, float], ...] = ()
    combiner: bytes | None = None  # the stored combiner (combine.Combiner.to_bytes), if fitted
    # the byte model (bytemodel.py): the replica's snapshot of the global weights, read with
    # the combiner; and the message's log-odds when the caller computed it (SpamFilter.score:
    # global weights plus the user's adjustments)
    byte_snapshot: Snapshot | None = None
    byte_logit: float | None = None


def token_prob(spam: float, ham: float, nspam: float, nham: float) -> float:
    """Robinson's f(w) for a token seen in `spam` of `nspam` and `ham` of `nham` messages."""
    spamratio = spam / nspam if nspam > 0 else 0.0
    hamratio = ham / nham if nham > 0 else 0.0
    if spamratio + hamratio <= 0:
        return UNKNOWN_PROB
    p = spamratio / (spamratio + hamratio)
    n = spam + ham
    return (STRENGTH * UNKNOWN_PROB + n * p) / (STRENGTH + n)


def _chi2q(x2: float, v: int) -> float:
    """Probability that chi-squared with v (even) degrees of freedom is >= x2."""
    m = x2 / 2.0
    total = term = math.exp(-m)
    for i in range(1, v // 2):
        term *= m / i
        total += term
    return min(total, 1.0)


def chi2_combine(probs: Sequence[float]) -> float:
    """Fisher/Robinson chi-squared combining of token probabilities (SpamBayes chi2_spamprob)."""
    s, h = chi2_evidence(probs)
    return (s - h + 1.0) / 2.0


def chi2_evidence(probs: Sequence[float]) -> tuple[float, float]:
    """(S, H): Fisher's combined evidence for spam and for ham, each 0..1; (0.5, 0.5) without
    probabilities. chi2_combine's indicator is (1 + S - H) / 2, which loses the difference
    between "both strong" (conflicting evidence) and "neither"; the combiner sees both."""
    if not probs:
        return 0.5, 0.5
    s_prod = h_prod = 1.0
    s_exp = h_exp = 0
    for p in probs:
        p = min(max(p, 1e-9), 1.0 - 1e-9)
        s_prod *= 1.0 - p
        h_prod *= p
        if s_prod < 1e-200:  # keep the products in range: track the exponent separately
            s_prod, e = math.frexp(s_prod)
            s_exp += e
        if h_prod < 1e-200:
            h_prod, e = math.frexp(h_prod)
            h_exp += e
    s_log = math.log(s_prod) + s_exp * _LN2
    h_log = math.log(h_prod) + h_exp * _LN2
    n = len(probs)
    return 1.0 - _chi2q(-2.0 * s_log, 2 * n), 1.0 - _chi2q(-2.0 * h_log, 2 * n)


def _scored(counts: dict[str, tuple[float, float]], nspam: float, nham: float) -> list[tuple[float, str, float]]:
    """(-strength, token, f(w)) of every token strong enough to count, strongest first (ties by
    token, for determinism)."""
    scored = []
    for token, (s, h) in counts.items():
        if s <= 0 and h <= 0:
            continue
        f = token_prob(s, h, nspam, nham)
        strength = abs(f - 0.5)
        if strength >= MIN_PROB_STRENGTH:
            scored.append((-strength, token, f))
    scored.sort()
    return scored


def clues_of(counts: dict[str, tuple[float, float]], nspam: float, nham: float,
             *, max_clues: int = MAX_DISCRIMINATORS) -> list[tuple[str, float]]:
    """The strongest tokens (token, f(w)), strongest first; ties broken by token for
    determinism. `counts` maps token -> (spam, ham) messages containing it."""
    scored = _scored(counts, nspam, nham)
    return [(token, f) for _, token, f in scored[:max_clues]]


def clues_and_parts(counts: dict[str, tuple[float, float]], nspam: float, nham: float, *,
                    max_clues: int = MAX_DISCRIMINATORS,
                    ) -> tuple[float, list[tuple[str, float]], dict[str, tuple[float, float]]]:
    """(indicator over all tokens, its clues, {group: chi2_evidence (S, H) of that group's
    strongest max_clues tokens}) of a message whose known tokens have `counts`
    (token -> (spam, ham))."""
    scored = _scored(counts, nspam, nham)
    clues = [(token, f) for _, token, f in scored[:max_clues]]
    by_group: dict[str, list[float]] = {g: [] for g in GROUPS}
    for _, token, f in scored:
        group = by_group[token_group(token)]
        if len(group) < max_clues:
            group.append(f)
    parts = {g: chi2_evidence(probs) for g, probs in by_group.items()}
    return chi2_combine([f for _, f in clues]), clues, parts


def _encode_record(is_spam: bool, tokens: Sequence[str]) -> bytes:
    body = "\n".join(tokens).encode("utf-8", "replace")
    return (_SPAM if is_spam else _HAM).encode() + zlib.compress(body, 6)


def _decode_record(value: bytes) -> tuple[bool, list[str]]:
    is_spam = value[:1] == _SPAM.encode()
    body = zlib.decompress(value[1:]).decode("utf-8", "replace")
    return is_spam, body.split("\n") if body else []


def _tuple_str(s: str) -> bytes:
    """fdb.tuple encoding of one string element (type code 0x02, NUL escaped as 00 FF, then a
    terminating NUL): what Subspace.pack produces, without its per-call cost on hot paths."""
    return b"\x02" + s.encode("utf-8").replace(b"\x00", b"\x00\xff") + b"\x00"


_CLS = {True: _tuple_str(_SPAM), False: _tuple_str(_HAM)}


@dataclass(frozen=True)
class TrainItem:
    """One message to learn: its idempotency key, its tokens and its class."""

    key: str
    tokens: Sequence[str]
    is_spam: bool


class _Scope:
    """The keys of one model (global or one user) inside the filter's subspace."""

    __slots__ = ("space", "tokens", "n_spam", "n_ham")

    def __init__(self, space: Subspace) -> None:
        self.space = space
        self.tokens = space.pack(("t",))  # + _tuple_str(token) + _CLS[is_spam]
        self.n_spam = space.pack(("n", _SPAM))
        self.n_ham = space.pack(("n", _HAM))

    def token_key(self, token: str, is_spam: bool) -> bytes:
        return self.tokens + _tuple_str(token) + _CLS[is_spam]

    def token_prefix(self, token: str) -> bytes:
        return self.tokens + _tuple_str(token)

    def record_key(self, key: str) -> bytes:
        return self.space.pack(("m", key))

    def count_key(self, is_spam: bool) -> bytes:
        return self.n_spam if is_spam else self.n_ham


class _TokenCache:
    """Recently read global counts: token -> (read at, spam, ham), unseen tokens included;
    bounded (oldest reads go first) and expiring. `generation` changes on every clear, so a read
    that raced with a local training is not stored."""

    def __init__(self, ttl_s: float, max_entries: int) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self.entries: dict[str, tuple[float, int, int]] = {}
        self.totals: tuple[float, Counts] | None = None
        self.generation = 0

    def clear(self) -> None:
        self.entries.clear()
        self.totals = None
        self.generation += 1

    def lookup(self, tokens: Sequence[str], now: float) -> tuple[dict[str, tuple[int, int]], list[str]]:
        hits: dict[str, tuple[int, int]] = {}
        missing: list[str] = []
        cutoff = now - self.ttl_s
        entries = self.entries
        for token in tokens:
            e = entries.get(token)
            if e is None or e[0] < cutoff:
                missing.append(token)
            elif e[1] or e[2]:
                hits[token] = (e[1], e[2])
        return hits, missing

    def store(self, asked: Sequence[str], found: dict[str, tuple[int, int]], now: float,
              generation: int) -> None:
        if generation != self.generation:
            return
        entries = self.entries
        for token in asked:
            spam, ham = found.get(token, (0, 0))
            entries.pop(token, None)  # re-inserted at the end: insertion order is read order
            entries[token] = (now, spam, ham)
        excess = len(entries) - self.max_entries
        if excess > 0:
            for token in list(itertools.islice(entries, excess + self.max_entries // 10)):
                del entries[token]


_UNREAD = object()  # a value score() did not read (the cached one applies)


class _Reads:
    """What one score() transaction read: None (or _UNREAD for the combiner) = not read."""

    __slots__ = ("glob", "combiner", "snapshot", "tokens", "user_counts", "user_tokens", "user_byte")

    def __init__(self) -> None:
        self.glob: Counts | None = None
        self.combiner: object = _UNREAD
        self.snapshot: Snapshot | None = None
        self.tokens: dict[str, tuple[int, int]] | None = None
        self.user_counts: Counts | None = None
        self.user_tokens: dict[str, tuple[int, int]] | None = None
        self.user_byte = 0.0


class BayesModel:
    """Token counts in the KV store: a global model plus per-user adjustments."""

    def __init__(self, db: Database, space: Subspace, *, min_trained: int = 20) -> None:
        self.db = db
        self.read_chunk = READ_CHUNK_LOCAL if isinstance(db, SqliteDatabase) else READ_CHUNK
        self.space = space
        # Below this many spam or ham messages the model abstains (probability 0.5).
        self.min_trained = min_trained
        self._global = _Scope(space.subspace(("g",)))
        self._combiner_key = space.pack(("c",))
        self._combiner: tuple[float, bytes | None] | None = None  # (read at, value)
        self._cache = _TokenCache(TOKEN_CACHE_TTL_S, TOKEN_CACHE_MAX)
        self.bytes = ByteModel(db, space)  # the byte model's state in the same subspace

    def _scope(self, user_id: str) -> _Scope:
        return _Scope(self.space.subspace(("u", user_id))) if user_id else self._global

    # --- reading -----------------------------------------------------------------------------

    @staticmethod
    def _read_counts(tr: Transaction, scope: _Scope) -> Counts:
        return Counts(spam=max(0, decode_counter(tr.get(scope.n_spam))),
                      ham=max(0, decode_counter(tr.get(scope.n_ham))))

    async def counts(self, user_id: str = "") -> Counts:
        """Messages trained as spam and as ham (global, or the user's own adjustments)."""
        scope = self._scope(user_id)
        return await self.db.run(lambda tr: self._read_counts(tr, scope), readonly=True)

    @staticmethod
    def _read_tokens(tr: Transaction, scope: _Scope,
                     tokens: Sequence[str]) -> dict[str, tuple[int, int]]:
        spam_cls, ham_cls = _CLS[True], _CLS[False]
        out: dict[str, tuple[int, int]] = {}
        for token in tokens:
            prefix = scope.token_prefix(token)
            spam = ham = 0
            for key, value in tr.get_range(prefix + b"\x00", prefix + b"\xff", limit=4):
                cls = key[len(prefix):]
                if cls == spam_cls:
                    spam = max(0, decode_counter(value))
                elif cls == ham_cls:
                    ham = max(0, decode_counter(value))
            if spam or ham:
                out[token] = (spam, ham)
        return out

    async def token_counts(self, tokens: Sequence[str],
                           user_id: str = "") -> dict[str, tuple[int, int]]:
        """token -> (spam, ham) for the tokens the model has seen; read in concurrent chunks."""
        scope = self._scope(user_id)
        step = self.read_chunk
        chunks = [tokens[i:i + step] for i in range(0, len(tokens), step)]

        def reader(chunk: Sequence[str]) -> Callable[[Transaction], dict[str, tuple[int, int]]]:
            return lambda tr: self._read_tokens(tr, scope, chunk)

        parts = await asyncio.gather(*(self.db.run(reader(c), readonly=True) for c in chunks))
        out: dict[str, tuple[int, int]] = {}
        for part in parts:
            out.update(part)
        return out

    async def combiner(self) -> bytes | None:
        """The stored combiner (JSON), read at most every COMBINER_TTL_S per replica."""
        now = time.monotonic()
        cached = self._combiner
        if cached is not None and now - cached[0] < COMBINER_TTL_S:
            return cached[1]
        key = self._combiner_key
        value = await self.db.run(lambda tr: tr.get(key), readonly=True)
        self._combiner = (now, value)
        return value

    async def set_combiner(self, value: bytes | None) -> None:
        """Store (or with None, remove) the combiner; this replica sees it at once."""
        key = self._combiner_key

        def fn(tr: Transaction) -> None:
            if value is None:
                tr.clear(key)
            else:
                tr.set(key, value)

        await self.db.run(fn)
        self._combiner = (time.monotonic(), value)

    async def score(self, tokens: Sequence[str], user_id: str = "",
                    buckets: Callable[[], Sequence[int]] | None = None) -> BayesResult:
        """The chi-squared indicator of a token set, with the user's adjustments if any, its
        per-group indicators, and the stored combiner. With `buckets` (the message's byte model
        buckets, asked for only when a combiner is stored) the result also carries the byte
        model's log-odds: the global weights plus the user's adjustments.

        Everything not in the replica's caches (global totals and token counts, combiner, byte
        model snapshot) and the user's own state is read in ONE read-only transaction (none
        when the caches hold it all and there is no user); on a remote store, token lists
        longer than read_chunk are read in concurrent chunks as token_counts() does."""
        now = time.monotonic()
        cache = self._cache
        generation = cache.generation
        totals = cache.totals
        glob_cached = totals[1] if totals is not None and now - totals[0] < cache.ttl_s else None
        comb_cached = self._combiner
        comb_fresh = comb_cached is not None and now - comb_cached[0] < COMBINER_TTL_S
        bm = self.bytes
        snap_fresh = bm.fresh(now)
        byte_generation = bm.generation
        hits, missing = cache.lookup(tokens, now)
        inline_tokens = len(missing) <= self.read_chunk
        inline_user = len(tokens) <= self.read_chunk
        memo: list[Sequence[int]] = []

        def message_buckets() -> Sequence[int]:
            if not memo:
                memo.append(buckets() if buckets is not None else ())
            return memo[0]

        need_read = (glob_cached is None or not comb_fresh or bool(user_id)
                     or (missing and inline_tokens)
                     or (comb_cached is not None and comb_cached[1] is not None and snap_fresh is None))
        reads = _Reads()
        if need_read:
            reads = await self.db.run(
                lambda tr: self._read_for_score(
                    tr, reads=_Reads(), glob=glob_cached, combiner=comb_cached[1] if comb_fresh
                    and comb_cached is not None else _UNREAD, snapshot=snap_fresh,
                    missing=missing if inline_tokens else None, user_id=user_id,
                    user_tokens=tokens if inline_user else None,
                    buckets=message_buckets if buckets is not None else None),
                readonly=True)
        glob = reads.glob if reads.glob is not None else glob_cached
        assert glob is not None
        if reads.glob is not None:
            trained = glob.spam >= self.min_trained and glob.ham >= self.min_trained
            if trained and generation == cache.generation:
                cache.totals = (now, glob)
        if glob.spam < self.min_trained or glob.ham < self.min_trained:
            return BayesResult(0.5, False, (), glob)
        combiner: bytes | None
        if reads.combiner is not _UNREAD:
            combiner = cast("bytes | None", reads.combiner)
            self._combiner = (now, combiner)
        else:
            assert comb_cached is not None
            combiner = comb_cached[1]
        snapshot: Snapshot | None = None
        if combiner is not None:
            if reads.snapshot is not None:
                snapshot = reads.snapshot
                bm.keep(snapshot, byte_generation)
            else:
                assert snap_fresh is not None
                snapshot = snap_fresh
        if missing:
            if reads.tokens is not None:
                found = reads.tokens
            else:
                found = await self.token_counts(missing)
            cache.store(missing, found, now, generation)
            hits.update(found)
        counts: dict[str, tuple[float, float]] = dict(hits)
        nspam: float = glob.spam
        nham: float = glob.ham
        if user_id:
            mine = reads.user_counts
            if mine is not None and (mine.spam or mine.ham):
                nspam += USER_WEIGHT * mine.spam
                nham += USER_WEIGHT * mine.ham
                user_found = reads.user_tokens
                if user_found is None:
                    user_found = await self.token_counts(tokens, user_id)
                for token, (s, h) in user_found.items():
                    gs, gh = counts.get(token, (0, 0))
                    counts[token] = (gs + USER_WEIGHT * s, gh + USER_WEIGHT * h)
        probability, clues, parts = clues_and_parts(counts, nspam, nham)
        byte_logit: float | None = None
        if snapshot is not None and buckets is not None:
            byte_logit = snapshot.logit(message_buckets())
            if user_id:
                byte_logit += reads.user_byte
        return BayesResult(probability, True, tuple(clues), glob,
                           tuple((g, *parts[g]) for g in GROUPS), combiner, snapshot, byte_logit)

    def _read_for_score(self, tr: Transaction, *, reads: _Reads, glob: Counts | None,
                        combiner: object, snapshot: Snapshot | None, missing: Sequence[str] | None,
                        user_id: str, user_tokens: Sequence[str] | None,
                        buckets: Callable[[], Sequence[int]] | None) -> _Reads:
        """score()'s reads, in one transaction: only what the caller lacks (glob None, combiner
        _UNREAD, snapshot None mean "not cached")."""
        if glob is None:
            glob = reads.glob = self._read_counts(tr, self._global)
        if glob.spam < self.min_trained or glob.ham < self.min_trained:
            return reads
        if combiner is _UNREAD:
            combiner = reads.combiner = tr.get(self._combiner_key)
        if combiner is not None and snapshot is None:
            reads.snapshot = self.bytes.read_snapshot(tr)
        if missing:
            reads.tokens = self._read_tokens(tr, self._global, missing)
        if user_id:
            scope = self._scope(user_id)
            mine = reads.user_counts = self._read_counts(tr, scope)
            if (mine.spam or mine.ham) and user_tokens is not None:
                reads.user_tokens = self._read_tokens(tr, scope, user_tokens)
            if combiner is not None and buckets is not None:
                reads.user_byte = self.bytes.read_user_logit(tr, user_id, buckets)
        return reads

    # --- training ----------------------------------------------------------------------------

    @staticmethod
    def _apply(tr: Transaction, scope: _Scope, items: Sequence[TrainItem],
               forget: bool = False, changed_keys: set[str] | None = None) -> int:
        """Train (or, with forget, untrain) items in one scope: read each training record,
        merge every change into one delta per counter, write deltas and records. Returns
        how many messages changed (their keys added to changed_keys)."""
        deltas: dict[bytes, int] = defaultdict(int)
        changed = 0
        for item in items:
            record_key = scope.record_key(item.key)
            old = get_chunked(tr, record_key)
            if old is not None:
                was_spam, old_tokens = _decode_record(old)
                if was_spam == item.is_spam and not forget:
                    continue  # already trained this way: a no-op
                deltas[scope.count_key(was_spam)] -= 1
                for token in old_tokens:
                    deltas[scope.token_key(token, was_spam)] -= 1
            elif forget:
                continue
            changed += 1
            if changed_keys is not None:
                changed_keys.add(item.key)
            if forget:
                clear_chunked(tr, record_key)
                continue
            deltas[scope.count_key(item.is_spam)] += 1
            for token in item.tokens:
                deltas[scope.token_key(token, item.is_spam)] += 1
            set_chunked(tr, record_key, _encode_record(item.is_spam, item.tokens))
        for key, delta in deltas.items():
            if delta:
                tr.add(key, delta)
        return changed

    async def train_batch(self, items: Sequence[TrainItem], *,
                          user_ids: Iterable[str] = ("",), changed_keys: set[str] | None = None) -> int:
        """Count messages as spam or ham in each scope ("" = global). Idempotent per
        (scope, key): a message already trained as the same class is skipped, one trained as
        the other class is moved. Items sharing a key: the last one wins. Runs in as few
        transactions as MAX_UPDATES_PER_TRANSACTION allows (a message is never split); returns
        how many (scope, message) trainings changed something, and adds the keys of the
        messages that changed in some scope to changed_keys."""
        scopes = [self._scope(u) for u in dict.fromkeys(user_ids)]
        unique = list({item.key: TrainItem(item.key, list(dict.fromkeys(item.tokens)), item.is_spam)
                       for item in items}.values())
        changed = 0
        batch: list[TrainItem] = []
        size = 0
        for item in unique:
            cost = (len(item.tokens) + 1) * len(scopes)
            if batch and size + cost > MAX_UPDATES_PER_TRANSACTION:
                changed += await self._commit(scopes, batch, changed_keys=changed_keys)
                batch, size = [], 0
            batch.append(item)
            size += cost
        if batch:
            changed += await self._commit(scopes, batch, changed_keys=changed_keys)
        return changed

    async def _commit(self, scopes: Sequence[_Scope], batch: Sequence[TrainItem],
                      forget: bool = False, changed_keys: set[str] | None = None) -> int:
        # this replica sees its own training at once: reads racing the commit are not kept
        self._cache.clear()
        try:
            return await self._commit_uncached(scopes, batch, forget, changed_keys)
        finally:
            self._cache.clear()

    async def _commit_uncached(self, scopes: Sequence[_Scope], batch: Sequence[TrainItem],
                               forget: bool = False, changed_keys: set[str] | None = None) -> int:
        """Apply a batch in one transaction; one that runs into the 5 s limit (a loaded
        machine) is split in halves and retried, down to single messages."""
        def fn(tr: Transaction) -> tuple[int, set[str]]:
            keys: set[str] = set()  # per attempt: a retried transaction starts afresh
            return sum(self._apply(tr, scope, batch, forget, keys) for scope in scopes), keys

        try:
            n, keys = await self.db.run(fn)
            if changed_keys is not None:
                changed_keys.update(keys)
            return n
        except TransactionTimedOut:
            if len(batch) <= 1:
                raise
        half = len(batch) // 2
        return (await self._commit_uncached(scopes, batch[:half], forget, changed_keys)
                + await self._commit_uncached(scopes, batch[half:], forget, changed_keys))

    async def train(self, key: str, tokens: Sequence[str], *, is_spam: bool,
                    user_ids: Iterable[str] = ("",)) -> bool:
        """Count one message in each scope, in one transaction; True if anything changed."""
        return await self.train_batch([TrainItem(key, tokens, is_spam)], user_ids=user_ids) > 0

    async def forget(self, key: str, *, user_ids: Iterable[str] = ("",)) -> bool:
        """Remove a message's training from each scope; True if any scope had it."""
        scopes = [self._scope(u) for u in dict.fromkeys(user_ids)]
        return await self._commit(scopes, [TrainItem(key, (), False)], forget=True) > 0
