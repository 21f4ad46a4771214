"""Tests for modeling_mmretrieval.retrieval.product_ids: the compact, append-only product id table of an index."""

import sys
import threading
import time

import numpy as np
import pytest

from modeling_mmretrieval.retrieval import product_ids
from modeling_mmretrieval.retrieval.product_ids import DuplicateProductIdError, ProductIdTable

ODD_IDS = [
    "", "sku-1", "crème brûlée", "日本語-商品", "🙂" * 3, "x" * 10_000, "\ud800 lone surrogate", "1", 1, 0, -7, 10**30,
]


def assert_holds_exactly(table, ids):
    """`table` holds `ids` in order, each found at its position with its own type."""
    assert len(table) == len(ids)
    assert table.ids_in(0, len(ids)) == ids
    for position, product_id in enumerate(ids):
        assert type(table[position]) is type(product_id) and table[position] == product_id
        assert table.position_of(product_id) == position


def test_ids_round_trip_with_their_types():
    table = ProductIdTable(ODD_IDS)
    assert_holds_exactly(table, ODD_IDS)
    assert table[-1] == 10**30 and table.ids_in(-3, 100) == ODD_IDS[-3:] and table.ids_in(5, 2) == []
    with pytest.raises(IndexError):
        table[len(ODD_IDS)]


def test_numpy_integers_are_stored_and_found_as_ints():
    table = ProductIdTable([np.int64(5), np.uint8(6), np.int32(-1)])
    assert table.ids_in(0, 3) == [5, 6, -1] and all(type(product_id) is int for product_id in table.ids_in(0, 3))
    assert table.position_of(np.int16(6)) == 1 and table.position_of(6) == 1


def test_int_and_str_spellings_are_distinct_ids():
    table = ProductIdTable([1, "1", "01", -1, "-1"])
    assert [table.position_of(product_id) for product_id in (1, "1", "01", -1, "-1")] == [0, 1, 2, 3, 4]
    assert table.position_of(2) is None and table.position_of("2") is None


@pytest.mark.parametrize("wrong_id", [True, False, 1.0, None, b"sku", ("sku",), np.float32(1)])
def test_non_ids_are_refused_on_append_and_absent_on_lookup(wrong_id):
    table = ProductIdTable(["a", 1])
    with pytest.raises(TypeError, match="product ids must be str or int"):
        table.append(["b", wrong_id])
    assert table.ids_in(0, 10) == ["a", 1]
    assert table.position_of(wrong_id) is None


@pytest.mark.parametrize("unhashable", [[1], {"a": 1}, {"a"}, np.array([1])])
def test_unhashable_lookups_are_absent(unhashable):
    assert ProductIdTable(["a", 1]).position_of(unhashable) is None


@pytest.mark.parametrize(
    "batch, repeated",
    [
        (["c", "d", "c", "a"], "'c'"),  # within the batch, before a repeat of an existing id
        (["c", "b", "c"], "'b'"),  # an existing id comes first
        ([7, "7", 7], "7"),
        ([np.int64(3), 3], "3"),
    ],
)
def test_duplicates_name_the_first_repeat_and_leave_the_table_unchanged(batch, repeated):
    table = ProductIdTable(["a", "b"])
    table.append(["x", 9])
    nbytes = table.nbytes
    with pytest.raises(DuplicateProductIdError, match=f"product id {repeated} occurs more than once"):
        table.append(batch)
    assert_holds_exactly(table, ["a", "b", "x", 9])
    assert table.nbytes == nbytes
    assert all(table.position_of(product_id) is None for product_id in batch if product_id not in ("a", "b", "x", 9))
    table.append(["c"])
    assert_holds_exactly(table, ["a", "b", "x", 9, "c"])


def test_empty_appends_change_nothing():
    table = ProductIdTable()
    table.append([])
    assert len(table) == 0 and table.ids_in(0, 5) == [] and table.position_of("a") is None


@pytest.mark.parametrize("colliding_hash", [lambda encoded: 42, lambda encoded: hash(encoded) % 3])
def test_hash_collisions_never_give_wrong_answers(monkeypatch, colliding_hash):
    monkeypatch.setattr(product_ids, "_encoded_id_hash", colliding_hash)
    ids = [f"sku-{number}" for number in range(150)] + list(range(150))
    table = ProductIdTable()
    for start in range(0, len(ids), 7):
        table.append(ids[start : start + 7])
    assert_holds_exactly(table, ids)
    assert table.position_of("sku-150") is None and table.position_of(150) is None
    with pytest.raises(DuplicateProductIdError, match="'sku-3'"):
        table.append(["fresh", "sku-3"])
    with pytest.raises(DuplicateProductIdError, match="'twice'"):
        table.append(["twice", "other", "twice"])
    assert len(table) == len(ids) and table.position_of("fresh") is None


def test_many_small_appends_keep_every_id_findable():
    rng = np.random.default_rng(0)
    table, ids = ProductIdTable(), []
    while len(ids) < 20_000:
        batch = [f"{len(ids) + offset}-{rng.integers(10)}" for offset in range(int(rng.integers(1, 200)))]
        table.append(batch)
        ids.extend(batch)
    assert_holds_exactly(table, ids)
    # Merged runs shrink geometrically, so lookups search a logarithmic number of them.
    assert len(table._state.runs) <= np.log2(len(ids)) + 1


def test_memory_per_id_is_a_few_dozen_bytes():
    ids = [f"{number}-{variant}" for number in range(25_000) for variant in range(4)]
    loaded = ProductIdTable(ids)  # as an index loads its ids.json
    assert loaded.nbytes <= 40 * len(ids)
    streamed = ProductIdTable()  # as an index grows by batches, spare room included
    for start in range(0, len(ids), 64):
        streamed.append(ids[start : start + 64])
    assert streamed.nbytes <= 48 * len(ids)


@pytest.fixture
def frequent_thread_switches():
    """Threads switch every 10 microseconds instead of 5 ms, so readers land in the middle of appends."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    yield
    sys.setswitchinterval(interval)


def test_readers_see_consistent_ids_while_one_thread_appends(frequent_thread_switches):
    batches, batch_size = 400, 25

    def id_at(position):
        return position if position % 3 else f"sku-{position}"

    table = ProductIdTable()
    done = threading.Event()
    failures, counts_seen = [], set()

    def append_all():
        for start in range(0, batches * batch_size, batch_size):
            table.append([id_at(position) for position in range(start, start + batch_size)])
            time.sleep(1e-4)  # as adds arrive in a live index, with reads in between
        done.set()

    def read_until_done(seed):
        rng = np.random.default_rng(seed)
        while not done.is_set():
            count = len(table)
            counts_seen.add(count)
            if not count:
                continue
            positions = rng.integers(0, count, 20).tolist()
            for position in positions:
                if table[position] != id_at(position) or table.position_of(id_at(position)) != position:
                    failures.append(position)
            start = max(0, count - int(rng.integers(1, 200)))
            if table.ids_in(start, count) != [id_at(position) for position in range(start, count)]:
                failures.append((start, count))
            if table.position_of(id_at(batches * batch_size)) is not None:
                failures.append("never appended")

    readers = [threading.Thread(target=read_until_done, args=(seed,)) for seed in range(3)]
    for reader in readers:
        reader.start()
    append_all()
    for reader in readers:
        reader.join()
    assert not failures
    assert len(counts_seen) > batches // 10  # the readers did read while the table grew
    assert_holds_exactly(table, [id_at(position) for position in range(batches * batch_size)])
