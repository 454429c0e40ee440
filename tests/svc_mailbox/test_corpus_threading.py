"""Threading of a real mailing-list archive (jailhouse-dev, see /work/shared/corpus/mail/README.md)
compared with the corpus index's threads (groups connected by Message-ID / In-Reply-To /
References, named by thread_first_sha256).

A sample of whole threads is appended in date order with internal_date = Date. Every message
whose parent is in the sample must share its parent's thread, and (nearly) every index thread
must map to exactly one of our threads. Our subject fallback may join index threads (a patch
resent under the same subject to the same list); that is measured and bounded.
"""

from __future__ import annotations

import csv
import time
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from mailmesh.v1 import mailbox_service_pb2 as pb

from tests.svc_mailbox.conftest import Mesh

CORPUS = Path(__file__).resolve().parents[2].parent / "shared" / "corpus" / "mail"
SAMPLE_MESSAGES = 300
MIN_ONE_TO_ONE = 0.98


@dataclass(frozen=True)
class Row:
    date: datetime
    sha256: str
    message_id: str
    parent: str
    thread: str


def _date(text: str) -> datetime:
    d = datetime.fromisoformat(text)
    return d if d.tzinfo is not None else d.replace(tzinfo=UTC)  # a few Date headers have no zone


def load_index() -> list[Row]:
    index = CORPUS / "INDEX.tsv"
    if not index.is_file() or not (CORPUS / "jailhouse-dev").is_dir():
        pytest.skip(f"mail corpus not found at {CORPUS}")
    with index.open(newline="") as f:
        return [Row(_date(r["date"]), r["sha256"], r["message_id"], r["parent_message_id"],
                    r["thread_first_sha256"]) for r in csv.DictReader(f, delimiter="\t")]


def sample(rows: list[Row]) -> list[Row]:
    """Whole threads, earliest first, until about SAMPLE_MESSAGES messages; returned in date order."""
    groups: dict[str, list[Row]] = defaultdict(list)
    for r in rows:
        groups[r.thread].append(r)
    chosen: list[Row] = []
    for thread in sorted(groups, key=lambda t: min(r.date for r in groups[t])):
        if len(chosen) >= SAMPLE_MESSAGES:
            break
        chosen.extend(groups[thread])
    return sorted(chosen, key=lambda r: (r.date, r.sha256))


async def test_corpus_threads_match_index(mesh: Mesh, users: dict[str, str]) -> None:
    rows = sample(load_index())
    alice = users["alice"]
    start = time.monotonic()
    ours: dict[str, str] = {}  # sha256 → message id
    for r in rows:
        raw = (CORPUS / "jailhouse-dev" / f"{r.sha256}.eml").read_bytes()
        when = Timestamp()
        when.FromDatetime(r.date)
        res = await mesh.stub.AppendMessage(pb.AppendMessageRequest(
            parent=f"users/{alice}", raw=raw, label_ids=["INBOX"], unread=True, internal_date=when),
            metadata=mesh.md(alice))
        ours[r.sha256] = res.message.id
    append_s = time.monotonic() - start
    # thread ids after every merge: read them back now
    thread_of: dict[str, str] = {}
    for r in rows:
        got = await mesh.stub.GetMessage(pb.GetMessageRequest(name=f"users/me/messages/{ours[r.sha256]}"),
                                         metadata=mesh.md(alice))
        thread_of[r.sha256] = got.message.thread_id

    # 1. every reply whose parent is in the sample is in its parent's thread
    by_mid = {r.message_id: r for r in rows}
    edges = [(r, by_mid[r.parent]) for r in rows if r.parent and r.parent in by_mid]
    broken = [(r.sha256, p.sha256) for r, p in edges if thread_of[r.sha256] != thread_of[p.sha256]]
    assert not broken, f"{len(broken)} of {len(edges)} replies not in their parent's thread: {broken[:5]}"

    # 2. index threads → our threads
    index_threads: dict[str, set[str]] = defaultdict(set)
    for r in rows:
        index_threads[r.thread].add(thread_of[r.sha256])
    one_to_one = sum(1 for ts in index_threads.values() if len(ts) == 1) / len(index_threads)

    # 3. our threads that hold more than one index thread (subject fallback)
    holders: dict[str, set[str]] = defaultdict(set)
    for r in rows:
        holders[thread_of[r.sha256]].add(r.thread)
    joined = sum(len(v) for v in holders.values() if len(v) > 1)

    # the service's own thread listing agrees with the per-message view
    listed: list[str] = []
    token = ""
    while True:
        page = await mesh.stub.ListThreads(pb.ListThreadsRequest(parent="users/me", label_id="INBOX", page_size=500,
                                                                 page_token=token), metadata=mesh.md(alice))
        listed.extend(t.id for t in page.threads)
        for t in page.threads:
            assert t.message_count == sum(1 for v in thread_of.values() if v == t.id)
        token = page.next_page_token
        if not token:
            break
    assert sorted(listed) == sorted(set(thread_of.values()))

    print(f"\ncorpus threading: {len(rows)} messages, {len(index_threads)} index threads, "
          f"{len(holders)} of our threads; {one_to_one:.1%} of index threads map to exactly one thread; "
          f"{joined} index threads joined with another by subject; reply edges {len(edges)} all kept; "
          f"append {append_s:.1f}s")
    assert one_to_one >= MIN_ONE_TO_ONE
    # subject fallback joins some resent or same-subject threads, but few
    assert joined <= 0.05 * len(index_threads)
