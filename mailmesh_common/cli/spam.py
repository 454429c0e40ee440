"""`mailmesh spam train|eval`: teach the spam filter from folders of raw messages, and measure it.

Both work directly on the spam model's KV store, so the mesh need not be running: the embedded
`{data_dir}/ingest.db`, or FoundationDB when MAILMESH_FDB_CLUSTER_FILE is set (the same store
every svc_ingest replica reads). A folder holds one raw RFC 5322 message per file (an mbox
`From ` first line is fine); subfolders are included, dot files skipped.

`train` also fits the combiner (svc_ingest/spam/combine.py: how the model's indicators, the
byte model's log-odds and the local rules make one score, and the cut at 0.1 % false
positives) by cross-validation inside the folders it was given, stores it with the model
together with the byte model (svc_ingest/spam/bytemodel.py) it trained on the same messages,
and prints the cross-validated figures; train on everything you have in one run so the fit
sees it all (a run on fewer messages than the stored combiner was fitted on keeps the stored
one unless --refit). With --no-fit, --user, or a fit that is not stored, the byte model
instead takes one online step per message that changed the model, as feedback does.

`eval` scores every message through SpamFilter.classify, the function live mail goes through,
with the same rules and threshold, and prints JSON: counts, detection rate, false-positive rate.
Folder mail arrives without an SMTP session, so there are no SPF/DKIM/DMARC results and the
authentication rules never fire; eval never trains.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import multiprocessing
import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from mailmesh_common.cli.command import add_command, add_group, command, settings_of
from mailmesh_common.config import Settings
from mailmesh_common.errors import ConfigError
from mailmesh_common.kv import Database, open_database

T = TypeVar("T")

EVAL_CONCURRENCY = 16
AUTH_NOTE = ("not checked: folder mail has no SMTP session, so the SPF/DKIM/DMARC rules cannot "
             "fire (live mail gets them from the ingest pipeline)")


def _threshold(args: argparse.Namespace, settings: Settings) -> float:
    if getattr(args, "threshold", None) is not None:
        return float(args.threshold)
    return float(getattr(settings, "spam_threshold", 5.0))


def message_files(folders: list[str] | None, max_bytes: int) -> tuple[list[Path], list[str]]:
    """The message files under each folder (sorted, recursive, no dot files) and problems."""
    files: list[Path] = []
    problems: list[str] = []
    for folder in folders or ():
        root = Path(folder)
        if not root.is_dir():
            problems.append(f"{folder}: not a directory")
            continue
        for path in sorted(root.rglob("*")):
            if any(part.startswith(".") for part in path.relative_to(root).parts):
                continue
            if not path.is_file():
                continue
            if path.stat().st_size > max_bytes:
                problems.append(f"{path}: larger than max_message_bytes, skipped")
                continue
            files.append(path)
    return files, problems


def _noop(i: int) -> int:
    return i


def _executor(jobs: int) -> concurrent.futures.Executor | None:
    """Worker processes for parsing and tokenizing (CPU-bound), or None for threads.

    The workers are forked and started here, before the database and the event loop start
    any thread (forking a threaded process is unsafe); where fork does not exist they are
    spawned, which needs the usual `if __name__ == "__main__"` guard of the entry point.
    """
    if jobs <= 1:
        return None
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    executor = concurrent.futures.ProcessPoolExecutor(
        max_workers=jobs, mp_context=multiprocessing.get_context(method))
    list(executor.map(_noop, range(jobs)))
    return executor


def _with_filter(args: argparse.Namespace, settings: Settings,
                 fn: Callable[[Any], Awaitable[T]]) -> T:
    """Run fn(SpamFilter) on the model's store, with worker processes when --jobs > 1."""
    from svc_ingest.spam import SpamFilter, spam_db_url

    executor = _executor(args.jobs)
    try:
        async def go() -> T:
            db: Database = open_database(spam_db_url(settings))
            try:
                return await fn(SpamFilter(db, threshold=_threshold(args, settings), executor=executor))
            finally:
                await db.close()

        return asyncio.run(go())
    finally:
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)


async def _read_all(files: list[tuple[Path, bool]]) -> AsyncIterator[tuple[bytes, bool]]:
    for path, is_spam in files:
        yield path.read_bytes(), is_spam


def _labelled(args: argparse.Namespace, settings: Settings) -> tuple[list[tuple[Path, bool]], list[str]]:
    ham, p1 = message_files(args.ham, settings.max_message_bytes)
    spam, p2 = message_files(args.spam, settings.max_message_bytes)
    return [(p, False) for p in ham] + [(p, True) for p in spam], p1 + p2


def _report_problems(problems: list[str]) -> bool:
    """Print problems; True if a folder was missing (a usage error)."""
    for problem in problems:
        print(f"mailmesh spam: {problem}", file=sys.stderr)
    return any(p.endswith("not a directory") for p in problems)


@command("spam train")
def run_train(args: argparse.Namespace) -> int:
    if not args.ham and not args.spam:
        print("mailmesh spam train: give --ham DIR and/or --spam DIR", file=sys.stderr)
        return 2
    settings = settings_of(args)
    files, problems = _labelled(args, settings)
    if _report_problems(problems):
        return 2
    started = time.monotonic()

    async def go(flt: Any) -> tuple[int, int, Any]:
        spam_msgs, ham_msgs = await flt.train_many(_read_all(files), user_id=args.user or "",
                                                   fit=not args.user and not args.no_fit,
                                                   refit=args.refit)
        return int(spam_msgs), int(ham_msgs), (flt.fitted, flt.fit_note)

    spam_msgs, ham_msgs, fit_result = _with_filter(args, settings, go)
    print(json.dumps({
        "trained": {"ham": sum(1 for _, s in files if not s), "spam": sum(1 for _, s in files if s)},
        "model": {"spam_messages": spam_msgs, "ham_messages": ham_msgs},
        "user": args.user or "",
        "combiner": _combiner_report(fit_result, args),
        "seconds": round(time.monotonic() - started, 1),
    }, indent=2))
    return 0


def _combiner_report(result: Any, args: argparse.Namespace) -> dict[str, Any]:
    """What train says about the combiner it fitted (or why it stored none)."""
    fitted, note = result
    if args.user:
        return {"fitted": False, "why": "per-user training adjusts token counts only"}
    if args.no_fit:
        return {"fitted": False, "why": "--no-fit: the stored combiner is unchanged"}
    if fitted is None:
        return {"fitted": False, "why": note}
    cv = fitted.cv
    return {"fitted": True, "cut": round(fitted.cut, 4),
            "cross_validation": {"folds": 5, "spam": int(cv.get("spam", 0)), "ham": int(cv.get("ham", 0)),
                                 "detection_rate": cv.get("detection_rate"),
                                 "false_positive_rate": cv.get("false_positive_rate")}}


async def _bounded(items: list[T], limit: int, fn: Callable[[T], Awaitable[Any]]) -> list[Any]:
    """fn over items with at most `limit` in flight, results in order."""
    results: list[Any] = [None] * len(items)
    it: Iterator[tuple[int, T]] = iter(enumerate(items))

    async def worker() -> None:
        for i, item in it:
            results[i] = await fn(item)

    await asyncio.gather(*(worker() for _ in range(min(limit, len(items)) or 1)))
    return results


def _rate(num: int, den: int) -> float | None:
    return round(num / den, 6) if den else None


@command("spam eval")
def run_eval(args: argparse.Namespace) -> int:
    if not args.ham and not args.spam:
        print("mailmesh spam eval: give --ham DIR and/or --spam DIR", file=sys.stderr)
        return 2
    settings = settings_of(args)
    files, problems = _labelled(args, settings)
    if _report_problems(problems):
        return 2
    started = time.monotonic()

    async def go(flt: Any) -> tuple[list[Any], Any, float, bool]:
        async def one(item: tuple[Path, bool]) -> Any:
            return await flt.classify(item[0].read_bytes(), auth=None, user_id=args.user or "")

        verdicts = await _bounded(files, EVAL_CONCURRENCY, one)
        has_combiner = await flt.combiner() is not None
        return verdicts, await flt.counts(), flt.threshold, has_combiner

    verdicts, counts, threshold, has_combiner = _with_filter(args, settings, go)
    n_ham = sum(1 for _, s in files if not s)
    n_spam = len(files) - n_ham
    tp = sum(1 for (_, s), v in zip(files, verdicts, strict=True) if s and v.is_spam)
    fp = sum(1 for (_, s), v in zip(files, verdicts, strict=True) if not s and v.is_spam)
    report: dict[str, Any] = {
        "ham": {"messages": n_ham, "flagged_spam": fp, "passed": n_ham - fp},
        "spam": {"messages": n_spam, "flagged_spam": tp, "missed": n_spam - tp},
        "detection_rate": _rate(tp, n_spam),
        "false_positive_rate": _rate(fp, n_ham),
        "threshold": threshold,
        "model": {"spam_messages": counts.spam, "ham_messages": counts.ham},
        "combiner": has_combiner,
        "auth": AUTH_NOTE,
        "seconds": round(time.monotonic() - started, 1),
    }
    if counts.spam < 20 or counts.ham < 20:
        report["warning"] = "the model is (nearly) untrained: only the rules scored these messages"
    if args.details:
        report["misclassified"] = [
            {"file": str(path), "class": "spam" if s else "ham", "score": v.score, "status": v.status}
            for (path, s), v in zip(files, verdicts, strict=True) if s != v.is_spam]
    print(json.dumps(report, indent=2))
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ham", action="append", metavar="DIR", help="folder of legitimate raw messages (repeatable)")
    p.add_argument("--spam", action="append", metavar="DIR", help="folder of spam raw messages (repeatable)")
    p.add_argument("--user", help="a user id: also use (train) that user's adjustments")
    p.add_argument("--jobs", type=int, default=min(os.cpu_count() or 1, 8),
                   help="worker processes for parsing (default: CPUs, at most 8)")


def add_spam_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """`mailmesh spam train|eval`."""
    ssub = add_group(sub, "spam", "train and evaluate the spam filter")
    p = add_command(ssub, "train", run_train, "learn from folders of raw ham and spam messages")
    _common(p)
    p.add_argument("--no-fit", action="store_true",
                   help="only count tokens; keep the stored combiner (default: refit it on these folders)")
    p.add_argument("--refit", action="store_true",
                   help="store the new fit even if the stored combiner was fitted on more messages")
    p = add_command(ssub, "eval", run_eval, "score folders of raw messages as live mail is scored; print JSON")
    _common(p)
    p.add_argument("--threshold", type=float, help="spam threshold (default: settings, 5.0)")
    p.add_argument("--details", action="store_true", help="also list the misclassified files")


def main(argv: list[str] | None = None) -> int:
    """`python -m mailmesh_common.cli.spam train|eval ...`: the same as `mailmesh spam ...`."""
    parser = argparse.ArgumentParser(prog="mailmesh")
    add_spam_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["spam", *(sys.argv[1:] if argv is None else argv)])
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"mailmesh: configuration error: {exc.message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
