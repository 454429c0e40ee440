"""The KV contract: every driver (SQLite always, FoundationDB when configured) passes these."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from pathlib import Path

import fdb.tuple
import pytest

from mailmesh_common.errors import LimitExceeded, MailmeshError, Unavailable
from mailmesh_common.kv import (
    MAX_KEY_SIZE,
    MAX_TRANSACTION_SECONDS,
    MAX_VALUE_SIZE,
    Database,
    ReadOnlyTransactionError,
    Subspace,
    Transaction,
    TransactionTimedOut,
    TransactionTooLarge,
    clear_chunked,
    decode_counter,
    encode_counter,
    get_chunked,
    open_database,
    root_subspace,
    set_chunked,
)


class Boom(MailmeshError):
    """A domain error raised inside a transaction function."""


async def _dump(db: Database, space: Subspace) -> list[tuple[bytes, bytes]]:
    return await db.run(lambda tr: tr.get_range_startswith(space.key), readonly=True)


async def _get(db: Database, key: bytes) -> bytes | None:
    return await db.run(lambda tr: tr.get(key), readonly=True)


async def _set_all(db: Database, items: list[tuple[bytes, bytes]]) -> None:
    def fn(tr: Transaction) -> None:
        for key, value in items:
            tr.set(key, value)

    await db.run(fn)


# Basic operations.


async def test_get_set_clear_round_trip(db: Database, space: Subspace) -> None:
    key = space.pack(("k",))
    assert await _get(db, key) is None
    await db.run(lambda tr: tr.set(key, b"v1"))
    assert await _get(db, key) == b"v1"
    await db.run(lambda tr: tr.set(key, b"v2"))
    assert await _get(db, key) == b"v2"
    await db.run(lambda tr: tr.clear(key))
    assert await _get(db, key) is None
    await db.run(lambda tr: tr.clear(key))  # clearing a missing key is fine


async def test_run_returns_the_function_result(db: Database, space: Subspace) -> None:
    key = space.pack(("k",))

    def write(tr: Transaction) -> str:
        tr.set(key, b"x")
        return "done"

    assert await db.run(write) == "done"
    assert await db.run(lambda tr: tr.get(key), readonly=True) == b"x"


async def _fill(db: Database, space: Subspace, n: int) -> list[bytes]:
    keys = [space.pack((i,)) for i in range(n)]

    def fill(tr: Transaction) -> None:
        for i, k in enumerate(keys):
            tr.set(k, b"%d" % i)

    await db.run(fill)
    return keys


async def test_get_range_is_ordered_half_open_and_limited(db: Database, space: Subspace) -> None:
    keys = await _fill(db, space, 10)

    def read(tr: Transaction) -> dict[str, list[tuple[bytes, bytes]]]:
        return {
            "all": tr.get_range(keys[0], space.key + b"\xff"),
            "half_open": tr.get_range(keys[2], keys[5]),
            "limit": tr.get_range(keys[2], keys[8], limit=3),
            "reverse": tr.get_range(keys[2], keys[5], reverse=True),
            "reverse_limit": tr.get_range(keys[0], keys[9], limit=2, reverse=True),
            "empty": tr.get_range(keys[5], keys[5]),
            "inverted": tr.get_range(keys[6], keys[5]),
        }

    r = await db.run(read, readonly=True)
    assert [k for k, _ in r["all"]] == keys
    assert r["half_open"] == [(keys[2], b"2"), (keys[3], b"3"), (keys[4], b"4")]  # end excluded
    assert [k for k, _ in r["limit"]] == keys[2:5]
    assert [k for k, _ in r["reverse"]] == [keys[4], keys[3], keys[2]]
    assert [k for k, _ in r["reverse_limit"]] == [keys[8], keys[7]]
    assert r["empty"] == [] and r["inverted"] == []


async def test_get_range_orders_by_key_bytes(db: Database, space: Subspace) -> None:
    raw = [b"a", b"a\x00", b"ab", b"b", b"\x01", b"\xfe\xff"]

    def fill(tr: Transaction) -> None:
        for suffix in raw:
            tr.set(space.key + suffix, suffix)

    await db.run(fill)
    rows = await _dump(db, space)
    assert [v for _, v in rows] == sorted(raw)


async def test_get_range_startswith(db: Database, space: Subspace) -> None:
    await _set_all(db, [(space.key + s, s) for s in (b"ab", b"abc", b"ac", b"b")])
    rows = await db.run(lambda tr: tr.get_range_startswith(space.key + b"ab"), readonly=True)
    assert [v for _, v in rows] == [b"ab", b"abc"]
    rows = await db.run(lambda tr: tr.get_range_startswith(space.key + b"a", limit=1, reverse=True),
                        readonly=True)
    assert [v for _, v in rows] == [b"ac"]


async def test_clear_range_is_half_open(db: Database, space: Subspace) -> None:
    keys = await _fill(db, space, 6)
    await db.run(lambda tr: tr.clear_range(keys[1], keys[4]))
    assert [k for k, _ in await _dump(db, space)] == [keys[0], keys[4], keys[5]]


async def test_reads_see_the_transactions_own_writes(db: Database, space: Subspace) -> None:
    a, b, c = space.pack(("a",)), space.pack(("b",)), space.pack(("c",))
    await db.run(lambda tr: tr.set(b, b"old"))

    def fn(tr: Transaction) -> list[object]:
        seen: list[object] = []
        tr.set(a, b"1")
        seen.append(tr.get(a))
        tr.clear(b)
        seen.append(tr.get(b))
        tr.set(c, b"3")
        seen.append(tr.get_range_startswith(space.key))
        tr.add(a + b"n", 5)
        tr.add(a + b"n", 2)
        seen.append(decode_counter(tr.get(a + b"n")))
        tr.clear_range(a, c)
        seen.append(tr.get_range_startswith(space.key))
        return seen

    seen = await db.run(fn)
    assert seen == [b"1", None, [(a, b"1"), (c, b"3")], 7, [(c, b"3")]]
    assert await _dump(db, space) == [(c, b"3")]


# Atomic add and concurrency.


async def test_add_is_little_endian_and_starts_at_zero(db: Database, space: Subspace) -> None:
    key = space.pack(("n",))
    await db.run(lambda tr: tr.add(key, 3))
    assert await _get(db, key) == encode_counter(3) == (3).to_bytes(8, "little")
    await db.run(lambda tr: tr.add(key, -5))
    assert decode_counter(await _get(db, key)) == -2
    assert decode_counter(None) == 0


async def test_add_wraps_extends_short_values_and_is_read_back_in_its_transaction(
        db: Database, space: Subspace) -> None:
    top, short, fresh = space.pack(("top",)), space.pack(("short",)), space.pack(("fresh",))
    def setup(tr: Transaction) -> None:
        tr.set(top, encode_counter(2**63 - 1))
        tr.set(short, b"\x05")

    await db.run(setup)

    def fn(tr: Transaction) -> tuple[bytes | None, bytes | None, bytes | None]:
        tr.add(top, 2)  # FDB's ADD wraps around modulo 2**64
        tr.add(short, 1)  # a shorter stored value is extended with zero bytes
        tr.add(fresh, -1)
        tr.add(fresh, -1)
        return tr.get(top), tr.get(short), tr.get(fresh)

    seen = await db.run(fn)
    assert seen == (encode_counter(-(2**63) + 1), encode_counter(6), encode_counter(-2))
    assert [await _get(db, k) for k in (top, short, fresh)] == list(seen)


async def test_concurrent_atomic_adds_all_count(db: Database, space: Subspace) -> None:
    key = space.pack(("counter",))
    await asyncio.gather(*(db.run(lambda tr: tr.add(key, 1)) for _ in range(50)))
    assert decode_counter(await _get(db, key)) == 50


async def test_concurrent_read_modify_write_never_loses_an_update(db: Database, space: Subspace) -> None:
    key = space.pack(("plain",))

    def increment(tr: Transaction) -> None:
        current = tr.get(key)
        tr.set(key, b"%d" % (int(current or b"0") + 1))

    await asyncio.gather(*(db.run(increment) for _ in range(100)))
    assert await _get(db, key) == b"100"


async def test_readers_do_not_see_uncommitted_writes(db: Database, space: Subspace) -> None:
    key = space.pack(("k",))
    await db.run(lambda tr: tr.set(key, b"old"))
    written, release = threading.Event(), threading.Event()

    def slow_writer(tr: Transaction) -> None:
        tr.set(key, b"new")
        written.set()
        assert release.wait(timeout=3)

    writer = asyncio.create_task(db.run(slow_writer))
    try:
        assert await asyncio.to_thread(written.wait, 3)
        assert await asyncio.wait_for(_get(db, key), timeout=2) == b"old"
    finally:
        release.set()
    await writer
    assert await _get(db, key) == b"new"


# Failures roll back.


async def test_exception_in_fn_rolls_back_everything(db: Database, space: Subspace) -> None:
    keep = space.pack(("keep",))
    await db.run(lambda tr: tr.set(keep, b"v"))

    def fails(tr: Transaction) -> None:
        tr.set(space.pack(("new",)), b"x")
        tr.clear(keep)
        tr.add(space.pack(("n",)), 1)
        raise Boom("domain rule violated")

    with pytest.raises(Boom, match="domain rule violated") as info:
        await db.run(fails)
    assert type(info.value) is Boom
    assert await _dump(db, space) == [(keep, b"v")]


async def test_a_failing_fn_does_not_affect_concurrent_transactions(db: Database, space: Subspace) -> None:
    def fn(i: int) -> Callable[[Transaction], None]:
        def write(tr: Transaction) -> None:
            tr.set(space.pack(("ok", i)), b"1")

        def fails(tr: Transaction) -> None:
            tr.set(space.pack(("bad",)), b"x")
            raise ValueError("nope")

        return write if i % 3 else fails

    results = await asyncio.gather(*(db.run(fn(i)) for i in range(30)), return_exceptions=True)
    assert [type(r) for r in results] == [ValueError if i % 3 == 0 else type(None) for i in range(30)]
    rows = await _dump(db, space)
    assert [k for k, _ in rows] == sorted(space.pack(("ok", i)) for i in range(30) if i % 3)


async def test_value_over_100kb_is_rejected_and_nothing_written(db: Database, space: Subspace) -> None:
    def fn(tr: Transaction) -> None:
        tr.set(space.pack(("small",)), b"x")
        tr.set(space.pack(("max",)), b"v" * MAX_VALUE_SIZE)  # exactly at the limit: allowed
        tr.set(space.pack(("big",)), b"v" * (MAX_VALUE_SIZE + 1))

    with pytest.raises(TransactionTooLarge, match=r"value too large: 100001 bytes") as info:
        await db.run(fn)
    assert isinstance(info.value, LimitExceeded)
    assert await _dump(db, space) == []


async def test_key_over_10kb_is_rejected_and_nothing_written(db: Database, space: Subspace) -> None:
    def fn(tr: Transaction) -> None:
        tr.set(space.pack(("small",)), b"x")
        tr.set(space.key + b"k" * (MAX_KEY_SIZE + 1 - len(space.key)), b"v")

    with pytest.raises(TransactionTooLarge, match=r"key too large: 10001 bytes"):
        await db.run(fn)
    assert await _dump(db, space) == []


async def test_transaction_over_10mb_is_rejected_and_nothing_written(db: Database, space: Subspace) -> None:
    value = b"v" * 99_000

    def fn(tr: Transaction) -> None:
        for i in range(110):
            tr.set(space.pack((i,)), value)

    with pytest.raises(TransactionTooLarge, match=r"transaction too large: \d+ bytes"):
        await db.run(fn)
    assert await _dump(db, space) == []


async def test_transaction_over_5s_is_aborted_and_nothing_written(db: Database, space: Subspace) -> None:
    def slow(tr: Transaction) -> None:
        tr.set(space.pack(("early",)), b"x")
        time.sleep(MAX_TRANSACTION_SECONDS + 0.1)
        tr.set(space.pack(("late",)), b"x")

    started = time.monotonic()
    with pytest.raises(TransactionTimedOut, match="5 s limit") as info:
        await db.run(slow)
    assert isinstance(info.value, Unavailable)
    assert time.monotonic() - started < MAX_TRANSACTION_SECONDS + 2
    assert await _dump(db, space) == []


async def test_readonly_transaction_cannot_write(db: Database, space: Subspace) -> None:
    key = space.pack(("k",))
    for write in (lambda tr: tr.set(key, b"x"), lambda tr: tr.clear(key), lambda tr: tr.add(key, 1),
                  lambda tr: tr.clear_range(key, key + b"\x00")):
        with pytest.raises(ReadOnlyTransactionError):
            await db.run(write, readonly=True)
    assert await _dump(db, space) == []


async def test_transaction_cannot_be_used_after_fn_returns(db: Database, space: Subspace) -> None:
    leaked: list[Transaction] = []
    await db.run(lambda tr: leaked.append(tr))
    with pytest.raises(MailmeshError, match="after its function returned"):
        leaked[0].get(space.pack(("k",)))


# Durability.


async def test_sqlite_data_survives_close_and_reopen(tmp_path: Path) -> None:
    space = root_subspace()
    db = open_database(tmp_path / "kv.db")
    await _set_all(db, [(space.pack(("k", i)), b"v%d" % i) for i in range(100)])
    await db.close()
    with pytest.raises(Unavailable, match="closed"):
        await db.run(lambda tr: tr.get(b"k"))

    db = open_database(f"sqlite://{tmp_path / 'kv.db'}")
    try:
        rows = await db.run(lambda tr: tr.get_range(*space.range(("k",))), readonly=True)
        assert rows == [(space.pack(("k", i)), b"v%d" % i) for i in range(100)]
        assert db.run_sync(lambda tr: tr.get(space.pack(("k", 7))), readonly=True) == b"v7"
    finally:
        await db.close()


# Subspaces and chunked values (pure key encoding: no driver needed).


def test_subspace_pack_unpack_round_trip() -> None:
    s = Subspace(("mm",))
    t = ("user", 42, b"raw", None, ("nested", 1))
    assert s.unpack(s.pack(t)) == t
    assert s.contains(s.pack(t))
    assert not s.contains(Subspace(("mn",)).pack(t))
    assert s.subspace(("user", 42)).pack(("x",)) == s.pack(("user", 42, "x"))
    assert s["user"].unpack(s.pack(("user", 1))) == (1,)
    assert s.pack(()) == s.key == fdb.tuple.pack(("mm",))


def test_subspace_orders_ints_numerically_and_strings_lexically() -> None:
    s = Subspace(("mm",))
    ints = [-1000, -1, 0, 1, 2, 9, 10, 255, 256, 10**12]
    assert sorted(s.pack((i,)) for i in ints) == [s.pack((i,)) for i in ints]
    words = ["", "A", "a", "ab", "b", "é"]
    assert sorted(s.pack((w,)) for w in words) == [s.pack((w,)) for w in words]


def test_subspace_range_holds_only_keys_strictly_inside() -> None:
    s = Subspace(("mm",))
    begin, end = s.range(("a",))
    inside = [s.pack(("a", 1)), s.pack(("a", "z")), s.pack(("a", ("x",)))]
    outside = [s.pack(("a",)), s.pack(("ab",)), s.pack(("ab", 1)), s.pack(("b",)), s.pack(("",))]
    assert all(begin <= k < end for k in inside)
    assert not any(begin <= k < end for k in outside)


async def test_subspace_range_on_a_driver(db: Database, space: Subspace) -> None:
    keys = [space.pack(t) for t in [("a",), ("a", 1), ("a", 2), ("ab",), ("ab", 1), ("b", 0)]]
    await _set_all(db, [(k, b"") for k in keys])
    rows = await db.run(lambda tr: tr.get_range(*space.range(("a",))), readonly=True)
    assert [space.unpack(k) for k, _ in rows] == [("a", 1), ("a", 2)]


async def test_chunked_value_round_trips_and_clears(db: Database, space: Subspace) -> None:
    prefix = space.pack(("blob",))
    neighbour = space.pack(("blob", "meta"))
    big = bytes(range(256)) * 1400  # 358,400 bytes: 4 chunks
    await db.run(lambda tr: tr.set(neighbour, b"keep"))
    await db.run(lambda tr: set_chunked(tr, prefix, big))
    assert await db.run(lambda tr: get_chunked(tr, prefix), readonly=True) == big

    await db.run(lambda tr: set_chunked(tr, prefix, b"small"))  # replacing drops extra chunks
    assert await db.run(lambda tr: get_chunked(tr, prefix), readonly=True) == b"small"
    assert len(await _dump(db, space)) == 2

    await db.run(lambda tr: set_chunked(tr, prefix, b""))
    assert await db.run(lambda tr: get_chunked(tr, prefix), readonly=True) == b""

    await db.run(lambda tr: clear_chunked(tr, prefix))
    assert await db.run(lambda tr: get_chunked(tr, prefix), readonly=True) is None
    assert await _dump(db, space) == [(neighbour, b"keep")]


async def test_open_database_rejects_in_memory_sqlite() -> None:
    with pytest.raises(MailmeshError):
        open_database("sqlite::memory:")
