"""The spam filter as the ingest pipeline, the gRPC servicer and `mailmesh spam eval` call it:
one score from the Bayesian token model and the rules, compared with a threshold.

With a fitted combiner (combine.py; `mailmesh spam train` fits it on the folders it learns and
stores it with the model):

    score = DEFAULT_THRESHOLD + POINTS_PER_LOGIT * (z - cut)  +  fixed rule points

where z is the regression's log-odds over the model's chi-squared evidence (over all tokens,
and spam and ham evidence per token group), the local rules it learned and the byte model's
log-odds (bytemodel.py: global weights plus the user's adjustments), and `cut` the
log-odds that cross-validation
inside the training folders chose for at most 0.1 % false positives. So the tuned cut sits at
the default threshold 5.0; a message in the unsure region between the ham and spam clusters
lands one point from 5.0 per unit of log-odds from the cut, and a configured threshold above
or below 5.0 makes the filter more lenient or stricter from there. Fixed points: the
SPF/DKIM/DMARC rules (never learnable from folder mail) and local rules that fired too rarely
in training to learn.

The byte model learns with the token counts: a `spam train` fit replaces its fitted weights
(trained on the same messages as the combiner); training one message at a time (feedback,
train(), `spam train --no-fit` or `--user`) takes one online step on the global weights and the
user's adjustments, once per message judgement, as the token counts are idempotent per message.

Without a combiner (a model trained one message at a time, e.g. only through feedback):

    score = BAYES_MIN + (BAYES_MAX - BAYES_MIN) * P  +  sum(rule weights)

where P is the chi-squared indicator over all tokens (0 ham .. 1 spam; see bayes.py): a
message the model is sure about (P = 1) scores 6.0 before rules, one it is sure is ham -3.0, an
unsure one 1.5. While the model has fewer than `min_trained` spam or ham messages it abstains
and only the rules count.

Mail at or above the threshold is delivered to SPAM with X-Spam-Score / X-Spam-Status headers
(accept-then-filter: nothing is rejected, so there is no backscatter).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import hashlib
import sys
from array import array
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass

from mailmesh_common.kv import Database, Subspace
from mailmesh_common.telemetry import tracer
from svc_ingest.spam import bytemodel, combine
from svc_ingest.spam.bayes import BayesModel, BayesResult, Counts, TrainItem
from svc_ingest.spam.rules import DEFAULT_WEIGHTS, LOCAL_RULES, AuthSummary, RuleHit, evaluate
from svc_ingest.spam.tokenizer import Analysis, analyze

__all__ = ["BAYES_MAX", "BAYES_MIN", "DEFAULT_THRESHOLD", "POINTS_PER_LOGIT", "AuthSummary",
           "SpamFilter", "Verdict", "learn_features", "message_key", "train_features"]

DEFAULT_THRESHOLD = 5.0
BAYES_MIN = -3.0
BAYES_MAX = 6.0
POINTS_PER_LOGIT = 1.0  # score points per unit of the combiner's log-odds
# Test names for the model's probability, as SpamAssassin names its BAYES_* bands.
_BANDS = ((0.01, "BAYES_00"), (0.05, "BAYES_05"), (0.20, "BAYES_20"), (0.40, "BAYES_40"),
          (0.60, "BAYES_50"), (0.80, "BAYES_60"), (0.95, "BAYES_80"), (0.99, "BAYES_95"),
          (0.999, "BAYES_99"), (2.0, "BAYES_999"))


@dataclass(frozen=True)
class Verdict:
    """The filter's judgement: the score, whether it is over the threshold, and the
    X-Spam-Status text ("Yes, score=7.3 required=5.0 tests=BAYES_99,SUBJ_ALL_CAPS")."""

    score: float
    is_spam: bool
    status: str


def bayes_test(probability: float) -> str:
    """The BAYES_* band of a probability."""
    for upper, name in _BANDS:
        if probability < upper:
            return name
    return "BAYES_999"


def message_key(analysis: Analysis) -> str:
    """What makes training idempotent per message: its Message-ID when it has one (the copy
    a mailbox stores carries extra trace headers, the Message-ID is the same), else its bytes."""
    mid = analysis.parsed.message_id.strip()
    if mid:
        return hashlib.sha256(b"mid:" + mid.encode("utf-8", "replace")).hexdigest()
    return hashlib.sha256(b"raw:" + analysis.raw).hexdigest()


Learned = tuple[str, list[str], list[str], "array[int]"]  # learn_features: key, tokens, hits, buckets


async def _aiter(items: Iterable[tuple[bytes, bool]]) -> AsyncIterator[tuple[bytes, bool]]:
    for item in items:
        yield item


def train_features(raw: bytes) -> tuple[str, list[str]]:
    """(message key, tokens) of a raw message: what training needs (picklable, so bulk
    training can compute it in worker processes)."""
    analysis = analyze(raw)
    return message_key(analysis), analysis.tokens


def learn_features(raw: bytes) -> Learned:
    """(message key, tokens, local rule hits, byte model buckets) of a raw message: what
    training and fitting the combiner need (picklable, for worker processes)."""
    analysis = analyze(raw)
    hits = [h.name for h in evaluate(analysis, None) if h.name in LOCAL_RULES]
    return message_key(analysis), analysis.tokens, hits, array("i", bytemodel.grams(raw))


class SpamFilter:
    """Scores and learns mail. Token counts live in the KV store (shared by every replica)."""

    def __init__(self, db: Database, *, threshold: float = DEFAULT_THRESHOLD,
                 subspace_name: str = "spam", weights: Mapping[str, float] | None = None,
                 min_trained: int = 20,
                 executor: concurrent.futures.Executor | None = None) -> None:
        self.db = db
        self.threshold = threshold
        self.weights = {**DEFAULT_WEIGHTS, **(weights or {})}
        self.model = BayesModel(db, Subspace((subspace_name,)), min_trained=min_trained)
        self.bytes = self.model.bytes  # the byte model (bytemodel.py), same subspace
        # Where parsing and tokenizing run (CPU work kept off the event loop): the default
        # thread pool, or e.g. a process pool for bulk training.
        self.executor = executor
        self.fitted: combine.Combiner | None = None  # what the last train_many(fit=True) stored
        self.fit_note = ""  # why it stored none
        self._parsed: tuple[bytes, combine.Combiner | None] | None = None

    async def analyze(self, raw: bytes) -> Analysis:
        """Parse and tokenize off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, analyze, raw)

    async def classify(self, raw: bytes, *, auth: AuthSummary | None = None,
                       user_id: str = "") -> Verdict:
        """Score one raw message; auth None means SPF/DKIM/DMARC were not checked."""
        analysis = await self.analyze(raw)
        bayes = await self.score(analysis, user_id)
        return self.judge(analysis, bayes, auth)

    async def score(self, analysis: Analysis, user_id: str = "") -> BayesResult:
        """The models' evidence on an analysed message: the token model's (bayes.py) and, when
        a combiner is stored, the byte model's log-odds (global weights plus the user's
        adjustments)."""
        with tracer(__name__).start_as_current_span("spam.score") as span:
            bayes = await self.model.score(analysis.tokens, user_id,
                                           lambda: bytemodel.grams(analysis.raw))
            if bayes.byte_logit is not None:
                span.set_attribute("mailmesh.spam.byte_logit", bayes.byte_logit)
        return bayes

    def judge(self, analysis: Analysis, bayes: BayesResult,
              auth: AuthSummary | None = None) -> Verdict:
        """Combine the model's result and the rules into a Verdict (pure)."""
        hits: list[RuleHit] = evaluate(analysis, auth, weights=self.weights)
        tests = [h.name for h in hits]
        comb = self._combiner(bayes.combiner) if bayes.ready else None
        if comb is not None:
            byte_logit = bayes.byte_logit
            if byte_logit is None:  # scored by model.score alone: the global byte weights
                snap = bayes.byte_snapshot
                byte_logit = snap.logit(bytemodel.grams(analysis.raw)) if snap is not None else 0.0
            x = combine.features(bayes.probability, {g: (sp, hm) for g, sp, hm in bayes.parts}, tests,
                                 byte_logit)
            score = DEFAULT_THRESHOLD + POINTS_PER_LOGIT * (comb.log_odds(x) - comb.cut)
            score += sum(h.points for h in hits if not (h.name in LOCAL_RULES and comb.learned(h.name)))
            tests.insert(0, bayes_test(bayes.probability))
        else:
            score = sum(h.points for h in hits)
            if bayes.ready:
                score += BAYES_MIN + (BAYES_MAX - BAYES_MIN) * bayes.probability
                tests.insert(0, bayes_test(bayes.probability))
        score = round(score, 2) + 0.0  # no "-0.0"
        is_spam = round(score, 1) >= self.threshold
        status = (f"{'Yes' if is_spam else 'No'}, score={score:.1f} required={self.threshold:.1f} "
                  f"tests={','.join(sorted(tests)) or 'none'}")
        return Verdict(score=score, is_spam=is_spam, status=status)

    async def combiner(self) -> combine.Combiner | None:
        """The stored combiner this filter scores with, or None (the fixed mapping)."""
        return self._combiner(await self.model.combiner())

    def _combiner(self, value: bytes | None) -> combine.Combiner | None:
        """The stored combiner, parsed once per stored value."""
        if value is None:
            return None
        cached = self._parsed
        if cached is not None and cached[0] == value:
            return cached[1]
        parsed = combine.Combiner.from_bytes(value)
        self._parsed = (value, parsed)
        return parsed

    async def train(self, raw: bytes, *, is_spam: bool, user_id: str = "") -> tuple[int, int]:
        """Learn one message as spam or ham in the global model (and the user's adjustments
        when user_id is given). Idempotent per message; training it as the other class moves
        its counts. Returns the global model's (spam, ham) message counts."""
        analysis = await self.analyze(raw)
        await self.train_analysis(analysis, is_spam=is_spam, user_id=user_id)
        counts = await self.model.counts()
        return counts.spam, counts.ham

    async def train_analysis(self, analysis: Analysis, *, is_spam: bool, user_id: str = "") -> bool:
        """train() for an already analysed message; True if the model changed."""
        scopes = ("", user_id) if user_id else ("",)
        changed = await self.model.train(message_key(analysis), analysis.tokens, is_spam=is_spam,
                                         user_ids=scopes)
        if changed:  # the byte model learns each judgement once, as the token counts do
            await self.bytes.learn([(bytemodel.grams(analysis.raw), is_spam)], user_ids=scopes)
        return changed

    async def train_many(self, items: Iterable[tuple[bytes, bool]] | AsyncIterator[tuple[bytes, bool]],
                         *, user_id: str = "", batch: int = 256, fit: bool = False,
                         refit: bool = False) -> tuple[int, int]:
        """train() for many (raw, is_spam) messages: analysed `batch` at a time on the executor
        while the previous batch is written, each batch in as few bounded transactions as
        possible. Same tokens, keys and idempotency as train(). Returns the global counts.

        With fit (global training only), the combiner is then fitted on these messages
        (combine.fit, cross-validated inside them) and stored with the model (see
        fit_combiner) together with the byte model it trained on them; self.fitted holds it, or
        None with the reason in self.fit_note. Without a stored fit, the byte model takes one
        online step on each message whose training changed the model (as train() does)."""
        loop = asyncio.get_running_loop()
        scopes = ("", user_id) if user_id else ("",)
        writing: asyncio.Task[None] | None = None
        fit = fit and not user_id
        fit_items: list[combine.FitItem] = []
        changed: set[str] = set()
        self.fitted = None

        async def write(done: list[TrainItem], grams: dict[str, array[int]]) -> None:
            keys: set[str] = set()
            await self.model.train_batch(done, user_ids=scopes, changed_keys=keys)
            changed.update(keys)
            if not fit:  # with fit the byte model is fitted below (or learns afterwards)
                learned = {it.key: (grams[it.key], it.is_spam) for it in done if it.key in keys}
                await self.bytes.learn(list(learned.values()), user_ids=scopes)

        async def flush(pending: list[tuple[asyncio.Future[Learned], bool]]) -> None:
            nonlocal writing
            done = []
            grams: dict[str, array[int]] = {}
            for fut, is_spam in pending:
                key, tokens, hits, buckets = await fut
                done.append(TrainItem(key, tokens, is_spam))
                grams[key] = buckets
                if fit and len(fit_items) < combine.MAX_FIT_MESSAGES:
                    # interned: messages share most tokens, so the fit's copies stay small
                    fit_items.append(combine.FitItem(key, [sys.intern(t) for t in tokens], is_spam, hits,
                                                     buckets))
            if writing is not None:
                await writing
            writing = asyncio.create_task(write(done, grams))

        pending: list[tuple[asyncio.Future[Learned], bool]] = []
        source = items if isinstance(items, AsyncIterator) else _aiter(items)
        try:
            async for raw, is_spam in source:
                pending.append((loop.run_in_executor(self.executor, learn_features, raw), is_spam))
                if len(pending) >= batch:
                    await flush(pending)
                    pending = []
            if pending:
                await flush(pending)
            if writing is not None:
                await writing
        finally:
            if writing is not None and not writing.done():
                writing.cancel()
        if fit:
            await self.fit_combiner(fit_items, replace=refit)
            if self.fitted is None:  # no fit stored: learn what changed one step at a time
                learned = {it.key: (it.grams, it.is_spam) for it in fit_items if it.key in changed}
                await self.bytes.learn(list(learned.values()))
        counts = await self.model.counts()
        return counts.spam, counts.ham

    async def fit_combiner(self, items: list[combine.FitItem], *,
                           replace: bool = False) -> combine.Combiner | None:
        """Fit the combiner on these messages and store it, returning it; CPU work runs in a
        worker thread. Stores nothing (None, reason in self.fit_note) when a class has too few
        messages, or when the stored combiner was fitted on more messages than these (a small
        training run must not undo a fit on the full corpus) unless `replace`."""
        self.fitted, self.fit_note = None, ""
        with tracer(__name__).start_as_current_span("spam.fit_combiner") as span:
            span.set_attribute("mailmesh.spam.messages", len(items))
            mapper = self.executor.map if self.executor is not None else map
            fitted = await asyncio.get_running_loop().run_in_executor(
                None, functools.partial(combine.fit, items, mapper=mapper))
            if fitted is None:
                self.fit_note = (f"too few messages of a class to cross-validate (fewer than "
                                 f"{combine.MIN_PER_CLASS}); the stored combiner, if any, is unchanged")
                return None
            stored = await self.combiner()
            if stored is not None and not replace and stored.messages > fitted.messages:
                self.fit_note = (f"fitted on {fitted.messages} messages, fewer than the stored combiner's "
                                 f"{stored.messages}: kept the stored one (--refit replaces it)")
                span.set_attribute("mailmesh.spam.kept_stored", True)
                return None
            if fitted.byte_weights is not None:  # first: the combiner weighs this byte model
                await self.bytes.store_fit(fitted.byte_weights)
            await self.model.set_combiner(fitted.to_bytes())
            for name, value in fitted.cv.items():
                if not name.startswith("hits:"):
                    span.set_attribute(f"mailmesh.spam.cv.{name}", value)
            self.fitted = fitted
            return fitted

    async def counts(self, user_id: str = "") -> Counts:
        """Messages trained as spam and ham (global, or one user's adjustments)."""
        return await self.model.counts(user_id)

    @staticmethod
    def headers(verdict: Verdict) -> list[tuple[str, str]]:
        """The header fields that carry a verdict on the delivered message."""
        return [("X-Spam-Score", f"{verdict.score:.1f}"), ("X-Spam-Status", verdict.status)]
