"""Ingest ids: 32 hex digits, time-ordered by their first 12, unique — in a forked worker too."""

from __future__ import annotations

import os
import re
import sys

import pytest

from svc_ingest.pipeline import new_ingest_id


def test_ingest_ids_are_unique_and_time_ordered() -> None:
    ids = [new_ingest_id() for _ in range(20_000)]
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)
    assert len(set(ids)) == len(ids)
    assert len({i[12:] for i in ids}) == len(ids)  # the random part alone never repeats
    assert [i[:12] for i in ids] == sorted(i[:12] for i in ids)


@pytest.mark.skipif(not hasattr(os, "fork") or sys.platform == "darwin", reason="needs fork")
def test_a_forked_process_never_repeats_its_parents_ids() -> None:
    new_ingest_id()  # the parent has random bytes in hand
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its next ids and leave at once
        try:
            os.write(write, "".join(new_ingest_id()[12:] for _ in range(5)).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as f:
        child = f.read().decode()
    os.waitpid(pid, 0)
    parent = "".join(new_ingest_id()[12:] for _ in range(5))
    assert len(child) == len(parent) == 100
    assert {child[k:k + 20] for k in range(0, 100, 20)}.isdisjoint(parent[k:k + 20] for k in range(0, 100, 20))
