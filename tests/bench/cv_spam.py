"""Nested cross-validation of the spam filter inside the training part of the development
corpus: the measure svc_ingest/spam/combine.py's docstring records its choices by.

    .venv/bin/python -m tests.bench.cv_spam [--assignments 5] [--jobs 2] [--misses]

Only the training part is used (files with sha256(file name) % 5 != 0; the held-out 20 % is
for tests/bench/bench_spam.py's final figure and is never read here). For each fold
assignment (a hash of the message key salted with the assignment number), each of the five
outer folds is scored by what `mailmesh spam train` would fit on the other four: the real
combine.fit (the combiner cross-validated on its own inner folds, with out-of-fold byte model
inputs, its cut at 0.1 % false positives) and the token counts and byte model trained on
those four folds; a held-out message's margin is the combiner's log-odds minus that fit's cut
plus the fixed points of local rules the fit did not learn, as SpamFilter.judge scores it (no
SPF/DKIM/DMARC results for folder mail). The outer folds' margins are pooled per assignment:

    at_ham_1/2/5     detection with the threshold just above the 1st / 2nd / 5th most
                     spam-like ham (2 of ~2490 training ham: the 0.1 % target)
    at_cut           detection and ham flagged at each fit's own cut (margin >= 0): what
                     the live filter would do
    fp_at_99         ham at or above the margin that catches 99 % of the spam

printed as JSON per assignment and as the mean over assignments. --misses adds the spam
missed at the 2-ham threshold and the ham over the cut (training part only), with how many
assignments missed each: what new inputs should look at.

Run time: messages are analysed once (learn_features, in --jobs processes) and cached under
$TMPDIR/cv_spam/ by corpus file list and the source of the spam package and the MIME parser;
the 25 outer fits run in --jobs processes; byte model trainings (deterministic by seed) are
cached by their inputs and code, so a rerun that changes only the combiner or the rules skips
them. Here: ~5 min on 2 cores cold, ~1.5 min with the byte models cached; the cache holds
~130 MB per byte model variant (delete $TMPDIR/cv_spam to reclaim it).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import csv
import hashlib
import inspect
import json
import math
import multiprocessing
import os
import pickle
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import mailmesh_common.mime as mime_package
import svc_ingest.spam as spam_package
from svc_ingest.spam import bytemodel, combine
from svc_ingest.spam.bayes import clues_and_parts
from svc_ingest.spam.filter import learn_features
from svc_ingest.spam.rules import DEFAULT_WEIGHTS, LOCAL_RULES
from tests.svc_ingest.test_spam_filter import CORPUS, held_out

OUTER_FOLDS = 5
CACHE_DIR = Path(os.environ.get("TMPDIR", tempfile.gettempdir())) / "cv_spam"


def _source_digest() -> str:
    """A digest of the source of the spam package and the MIME parser it uses: cached
    analyses are reused only while it is unchanged."""
    h = hashlib.sha256()
    for package in (spam_package, mime_package):
        for f in sorted(Path(str(package.__file__)).parent.glob("*.py")):
            h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


def training_files() -> list[tuple[Path, bool]]:
    """The training part's files (never the held-out ones), ham then spam, sorted."""
    return [(f, cls == "spam") for cls in ("ham", "spam")
            for f in sorted((CORPUS / cls).glob("*.eml")) if not held_out(f.name)]


def _learn(path: Path) -> tuple[Any, ...]:
    return tuple(learn_features(path.read_bytes()))


def _subject(path: Path) -> str:
    for line in path.read_bytes()[:20000].decode("latin-1").splitlines():
        if line.lower().startswith("subject:"):
            return line[8:].strip()[:70]
        if not line:
            break
    return ""


def load_items(jobs: int) -> tuple[list[combine.FitItem], list[Path]]:
    """The training part as FitItems (as SpamFilter.train_many builds them) and their files;
    cached per file list and package source."""
    files = training_files()
    digest = hashlib.sha256(_source_digest().encode() + "\n".join(f.name for f, _ in files).encode())
    cache = CACHE_DIR / f"items-{digest.hexdigest()[:16]}.pickle"
    if cache.exists():
        with open(cache, "rb") as fh:
            learned = pickle.load(fh)
    else:
        paths = [f for f, _ in files]
        if jobs > 1:
            with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork")) as ex:
                learned = list(ex.map(_learn, paths, chunksize=32))
        else:
            learned = [_learn(p) for p in paths]
        CACHE_DIR.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        with open(tmp, "wb") as fh:
            pickle.dump(learned, fh, protocol=pickle.HIGHEST_PROTOCOL)
        tmp.replace(cache)
    items = [combine.FitItem(key, tokens, is_spam, hits, *rest)
             for (key, tokens, hits, *rest), (_, is_spam) in zip(learned, files, strict=True)]
    return items, [f for f, _ in files]


def caching_mapper(fn: Callable[[Any], Any], tasks: Iterable[Any]) -> Iterable[Any]:
    """map() that keeps each result on disk by a digest of the function's source, bytemodel.py's
    source and the task (byte model trainings are deterministic by their seed)."""
    code = (inspect.getsource(fn) + Path(bytemodel.__file__).read_text()).encode()
    out = []
    for task in tasks:
        blob = pickle.dumps(task, protocol=pickle.HIGHEST_PROTOCOL)
        key = hashlib.sha256(code + b"\0" + blob).hexdigest()[:24]
        path = CACHE_DIR / "tasks" / f"{key}.pickle"
        try:
            with open(path, "rb") as fh:
                out.append(pickle.load(fh))
            continue
        except (OSError, EOFError, pickle.UnpicklingError):
            pass
        result = fn(task)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        with open(tmp, "wb") as fh:
            pickle.dump(result, fh, protocol=pickle.HIGHEST_PROTOCOL)
        tmp.replace(path)
        out.append(result)
    return out


_ITEMS: list[combine.FitItem] = []  # set before the worker processes fork


def outer_fold(assignment: int, item: combine.FitItem) -> int:
    return int(hashlib.sha256(f"outer:{assignment}:{item.key}".encode()).hexdigest(), 16) % OUTER_FOLDS


def score_fold(job: tuple[int, int]) -> tuple[int, int, float, list[tuple[int, float]]]:
    """Fit on every outer fold but `fold` of `assignment`, score that fold's messages:
    (assignment, fold, the fit's cut, [(item index, margin)])."""
    assignment, fold = job
    folds = [outer_fold(assignment, it) for it in _ITEMS]
    train = [it for it, f in zip(_ITEMS, folds, strict=True) if f != fold]
    comb = combine.fit(train, mapper=caching_mapper)
    assert comb is not None and comb.byte_weights is not None
    # the model state `spam train` leaves: token counts of each key's last training
    unique = {it.key: it for it in train}
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    nspam = nham = 0
    for it in unique.values():
        i = 0 if it.is_spam else 1
        if it.is_spam:
            nspam += 1
        else:
            nham += 1
        for t in it.tokens:
            counts[t][i] += 1
    weights = comb.byte_weights
    scored = []
    for idx, (it, f) in enumerate(zip(_ITEMS, folds, strict=True)):
        if f != fold:
            continue
        seen = {t: (float(counts[t][0]), float(counts[t][1])) for t in it.tokens if t in counts}
        prob, _clues, parts = clues_and_parts(seen, float(nspam), float(nham))
        byte_logit = sum(map(weights.__getitem__, it.grams))
        x = combine.features(prob, parts, it.hits, byte_logit)
        fixed = sum(DEFAULT_WEIGHTS[r] for r in it.hits if r in LOCAL_RULES and not comb.learned(r))
        scored.append((idx, comb.log_odds(x) - comb.cut + fixed))
    return assignment, fold, comb.cut, scored


def figures(margins: Sequence[float], labels: Sequence[bool]) -> dict[str, Any]:
    """The pooled figures of one assignment (see the module docstring)."""
    ham = sorted((m for m, s in zip(margins, labels, strict=True) if not s), reverse=True)
    spam = sorted(m for m, s in zip(margins, labels, strict=True) if s)
    out: dict[str, Any] = {}
    for k in (1, 2, 5):
        out[f"at_ham_{k}"] = round(sum(1 for m in spam if m > ham[k]) / len(spam), 4)
    out["at_cut"] = {"detection": round(sum(1 for m in spam if m >= 0) / len(spam), 4),
                     "ham_over": sum(1 for m in ham if m >= 0)}
    t99 = spam[math.floor(0.01 * len(spam))]
    out["fp_at_99"] = sum(1 for m in ham if m >= t99)
    return out


def run(assignments: int, jobs: int, misses: bool) -> dict[str, Any]:
    global _ITEMS
    started = time.monotonic()
    cpu0 = os.times()
    items, paths = load_items(jobs)
    _ITEMS = items
    load_s = time.monotonic() - started
    jobs_list = [(a, f) for a in range(assignments) for f in range(OUTER_FOLDS)]
    if jobs > 1:
        with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork")) as ex:
            results = list(ex.map(score_fold, jobs_list))
    else:
        results = [score_fold(j) for j in jobs_list]
    labels = [it.is_spam for it in items]
    per: list[dict[str, Any]] = []
    missed: dict[int, list[float]] = defaultdict(list)
    over: dict[int, list[float]] = defaultdict(list)
    for a in range(assignments):
        margins = [0.0] * len(items)
        cuts = []
        for ra, _fold, cut, scored in results:
            if ra == a:
                cuts.append(cut)
                for idx, m in scored:
                    margins[idx] = m
        fig = figures(margins, labels)
        fig["cut_range"] = [round(min(cuts), 2), round(max(cuts), 2)]
        per.append(fig)
        ham2 = sorted((m for m, s in zip(margins, labels, strict=True) if not s), reverse=True)[2]
        for idx, (m, s) in enumerate(zip(margins, labels, strict=True)):
            if s and m <= ham2:
                missed[idx].append(m)
            elif not s and m >= 0:
                over[idx].append(m)
    mean: dict[str, Any] = {k: round(statistics.fmean(p[k] for p in per), 4)
                            for k in ("at_ham_1", "at_ham_2", "at_ham_5")}
    mean["at_cut"] = {"detection": round(statistics.fmean(p["at_cut"]["detection"] for p in per), 4),
                      "ham_over": round(statistics.fmean(p["at_cut"]["ham_over"] for p in per), 2)}
    mean["fp_at_99"] = round(statistics.fmean(p["fp_at_99"] for p in per), 2)
    cpu1 = os.times()
    out: dict[str, Any] = {
        "training_part": {"ham": labels.count(False), "spam": labels.count(True)},
        "assignments": assignments,
        "mean": mean,
        "per_assignment": per,
        "seconds": {"load": round(load_s, 1), "total": round(time.monotonic() - started, 1),
                    "cpu": round(sum(cpu1[:4]) - sum(cpu0[:4]), 1)},
    }
    if misses:
        try:
            with open(CORPUS / "MANIFEST.tsv", newline="") as fh:
                src = {row["sha256"] + ".eml": row["source_folder"] for row in csv.DictReader(fh, delimiter="\t")}
        except OSError:
            src = {}

        def listing(found: dict[int, list[float]]) -> list[dict[str, Any]]:
            return [{"file": paths[i].name[:16], "source": src.get(paths[i].name, "?"), "times": len(ms),
                     "margin": round(statistics.fmean(ms), 2), "subject": _subject(paths[i])}
                    for i, ms in sorted(found.items(), key=lambda kv: (-len(kv[1]), statistics.fmean(kv[1])))]

        out["missed_spam_at_ham_2"] = listing(missed)
        out["ham_over_cut"] = listing(over)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--assignments", type=int, default=5, help="fold assignments (each 5 outer folds)")
    ap.add_argument("--jobs", type=int, default=2, help="worker processes")
    ap.add_argument("--misses", action="store_true", help="list missed spam and flagged ham")
    args = ap.parse_args()
    if not (CORPUS / "ham").is_dir():
        raise SystemExit(f"spam corpus not found at {CORPUS}")
    print(json.dumps(run(args.assignments, args.jobs, args.misses), indent=2))


if __name__ == "__main__":
    main()
