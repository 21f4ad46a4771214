"""Product ids of an index, held compactly: one bytes buffer and a few numpy arrays, no Python object per id.

A list of ids plus a dict id -> position costs about 100 bytes per short string id. `ProductIdTable` stores
each id encoded (a one-byte type tag, then UTF-8 text or decimal digits, so that `1` and `"1"` stay distinct
and each id comes back with its type) in one growing buffer, with the ids' byte offsets in a numpy array.
Ids are found through 64-bit hashes of their encodings, kept in sorted runs: each run covers a contiguous
range of positions and stores its sort order as offsets within that range. Runs of similar size are merged
as ids arrive, so appends cost O(n log n) in all and a lookup is one binary search per run (at most about
log2(n) runs). Equal hashes are always confirmed against the stored bytes, so collisions cost time, never
a wrong answer. For short ids the table holds about 30 bytes per id.

Concurrency: appends are serialised by a lock, and each publishes a new immutable `_TableState`. The buffer
and offset arrays are shared between states while they have room: an append writes only past the bytes and
offsets that earlier states can see, and grows them by copying into new arrays. Readers take one state and
never see a half-written id.
"""

from __future__ import annotations

import itertools
import operator
import threading
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import numpy as np

ProductId = str | int

_STR_TAG = b"s"
_INT_TAG = b"i"
# Python's bytes hash (SipHash, salted per process) is fast and well spread, and the table is never persisted.
_encoded_id_hash = hash
# A run is merged into the run before it while that one holds at most this many times its ids, so the runs
# left shrink geometrically from the oldest to the newest.
RUN_MERGE_RATIO = 2


class DuplicateProductIdError(ValueError):
    """The same product id was given to one index more than once."""


def validated_product_id(value: Any) -> ProductId:
    """`value` as a product id: a str or an int (numpy integers become ints); anything else raises TypeError.

    Example:
        >>> validated_product_id(np.int64(7)), validated_product_id("sku-7")
        (7, 'sku-7')
    """
    if isinstance(value, np.integer):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise TypeError(f"product ids must be str or int, got {type(value).__name__} {value!r}")
    return value


def _encoded_id(product_id: ProductId) -> bytes:
    """The tagged bytes stored for a validated id."""
    if isinstance(product_id, str):
        # Python strings may hold lone surrogates, which strict UTF-8 refuses to encode.
        return _STR_TAG + product_id.encode("utf-8", "surrogatepass")
    return _INT_TAG + b"%d" % product_id


def _decoded_id(encoded: bytes) -> ProductId:
    if encoded.startswith(_STR_TAG):
        return encoded[1:].decode("utf-8", "surrogatepass")
    return int(encoded[1:])


def _lookup_key(product_id: object) -> bytes | None:
    """The encoding `product_id` would be stored under, or None for a value that can never be an id."""
    try:
        return _encoded_id(validated_product_id(product_id))
    except (TypeError, ValueError):  # ValueError: an int too long to convert to decimal digits
        return None


def _hashes_of(encoded_ids: Sequence[bytes]) -> np.ndarray:
    return np.fromiter(map(_encoded_id_hash, encoded_ids), dtype=np.int64, count=len(encoded_ids))


def _relative_position_dtype(size: int) -> type:
    return np.uint32 if size <= np.iinfo(np.uint32).max else np.int64


def _with_room(array: np.ndarray, used: int, needed: int) -> np.ndarray:
    """`array` itself when it holds `needed` items, else a copy of its first `used` items with room for
    `needed` (at least double, so that appends cost amortised O(1) per item)."""
    if len(array) >= needed:
        return array
    grown = np.empty(max(needed, 2 * len(array)), dtype=array.dtype)
    grown[:used] = array[:used]
    return grown


class _SortedRun(NamedTuple):
    """Hashes of the ids at positions `first_position`, `first_position + 1`, ..., in ascending order, each with
    its position minus `first_position`."""

    first_position: int
    hashes: np.ndarray
    relative_positions: np.ndarray


def _sorted_run(hashes: np.ndarray, first_position: int) -> _SortedRun:
    order = np.argsort(hashes)
    return _SortedRun(first_position, hashes[order], order.astype(_relative_position_dtype(len(hashes))))


def _merged_runs(earlier: _SortedRun, later: _SortedRun) -> _SortedRun:
    """One run over two adjacent runs' positions."""
    hashes = np.concatenate([earlier.hashes, later.hashes])
    relative_positions = np.empty(len(hashes), dtype=_relative_position_dtype(len(hashes)))
    relative_positions[: len(earlier.hashes)] = earlier.relative_positions
    relative_positions[len(earlier.hashes) :] = later.relative_positions
    relative_positions[len(earlier.hashes) :] += len(earlier.hashes)
    # A stable sort is a timsort, which merges the two sorted halves in linear time.
    order = np.argsort(hashes, kind="stable")
    return _SortedRun(earlier.first_position, hashes[order], relative_positions[order])


def _runs_with(runs: Sequence[_SortedRun], run: _SortedRun) -> tuple[_SortedRun, ...]:
    """`runs` followed by `run`, merging the newest runs while they are of similar size."""
    merged = [*runs, run]
    while len(merged) > 1 and len(merged[-2].hashes) <= RUN_MERGE_RATIO * len(merged[-1].hashes):
        later = merged.pop()
        merged[-1] = _merged_runs(merged[-1], later)
    return tuple(merged)


def _first_repeat_within(encoded_ids: Sequence[bytes], run: _SortedRun) -> int | None:
    """Index of the first of `encoded_ids` equal to an earlier one, given the batch's own sorted run."""
    tied = np.flatnonzero(run.hashes[1:] == run.hashes[:-1])
    # Equal ids have equal hashes, so only ids sharing a hash with another one can repeat.
    candidates = np.sort(run.relative_positions[np.union1d(tied, tied + 1)])
    seen = set()
    for index in candidates.tolist():
        if encoded_ids[index] in seen:
            return index
        seen.add(encoded_ids[index])
    return None


class _TableState(NamedTuple):
    """One immutable view of the table: id `i` is `buffer[byte_offsets[i]:byte_offsets[i + 1]]` for `i < count`.
    The arrays may be longer (room for later appends, invisible to this view)."""

    buffer: np.ndarray
    byte_offsets: np.ndarray
    count: int
    runs: tuple[_SortedRun, ...]

    def encoded_at(self, position: int) -> bytes:
        return self.buffer[self.byte_offsets[position] : self.byte_offsets[position + 1]].tobytes()

    def position_in_run(self, run: _SortedRun, key: bytes, key_hash: int, slot: int) -> int | None:
        """Position of `key` among the run's ids whose hash equals `key_hash`, starting at sorted slot `slot`
        (the first with that hash), or None."""
        while slot < len(run.hashes) and run.hashes[slot] == key_hash:
            position = run.first_position + int(run.relative_positions[slot])
            if self.encoded_at(position) == key:
                return position
            slot += 1
        return None

    def first_known(self, encoded_ids: Sequence[bytes], hashes: np.ndarray) -> int | None:
        """Index of the first of `encoded_ids` already in this state."""
        known = []
        for run in self.runs:
            slots = np.searchsorted(run.hashes, hashes)
            hits = np.flatnonzero(run.hashes[np.minimum(slots, len(run.hashes) - 1)] == hashes)
            known.extend(
                index
                for index in hits.tolist()
                if self.position_in_run(run, encoded_ids[index], int(hashes[index]), int(slots[index])) is not None
            )
        return min(known, default=None)

    def appended(self, encoded_ids: Sequence[bytes], run: _SortedRun) -> _TableState:
        """The state holding these ids after this state's (writing only past what this state can see)."""
        payload = b"".join(encoded_ids)
        used_bytes = int(self.byte_offsets[self.count])
        buffer = _with_room(self.buffer, used_bytes, used_bytes + len(payload))
        buffer[used_bytes : used_bytes + len(payload)] = np.frombuffer(payload, dtype=np.uint8)
        count = self.count + len(encoded_ids)
        byte_offsets = _with_room(self.byte_offsets, self.count + 1, count + 1)
        lengths = np.fromiter(map(len, encoded_ids), dtype=np.int64, count=len(encoded_ids))
        np.cumsum(lengths, out=byte_offsets[self.count + 1 : count + 1])
        byte_offsets[self.count + 1 : count + 1] += used_bytes
        return _TableState(buffer, byte_offsets, count, _runs_with(self.runs, run))


def _empty_state() -> _TableState:
    return _TableState(np.empty(0, dtype=np.uint8), np.zeros(1, dtype=np.int64), 0, ())


class ProductIdTable:
    """An append-only sequence of unique product ids (str or int) with id -> position lookup, stored without a
    Python object per id. Reads are safe while another thread appends.

    Example:
        >>> table = ProductIdTable(["sku-1", 2])
        >>> table.append(["2", np.int64(3)])
        >>> len(table), table[2], table.position_of(2), table.position_of(3)
        (4, '2', 1, 3)
        >>> table.ids_in(1, 4)
        [2, '2', 3]
    """

    def __init__(self, ids: Iterable[ProductId] = ()):
        self._state = _empty_state()
        self._append_lock = threading.Lock()
        self.append(ids)

    def append(self, ids: Iterable[ProductId]) -> None:
        """Adds `ids` at the next positions. Raises TypeError for an id that is not a str or int and
        `DuplicateProductIdError` for an id given twice or already present, leaving the table unchanged.

        Example:
            >>> table = ProductIdTable(["a"])
            >>> table.append(["b", 3])
            >>> table.ids_in(0, 3)
            ['a', 'b', 3]
        """
        ids = [validated_product_id(product_id) for product_id in ids]
        if not ids:
            return
        encoded_ids = [_encoded_id(product_id) for product_id in ids]
        hashes = _hashes_of(encoded_ids)
        with self._append_lock:
            state = self._state
            run = _sorted_run(hashes, state.count)
            repeats = [_first_repeat_within(encoded_ids, run), state.first_known(encoded_ids, hashes)]
            first_repeat = min((index for index in repeats if index is not None), default=None)
            if first_repeat is not None:
                raise DuplicateProductIdError(
                    f"product id {ids[first_repeat]!r} occurs more than once; product ids must be unique"
                )
            self._state = state.appended(encoded_ids, run)

    def __len__(self) -> int:
        return self._state.count

    def __getitem__(self, position: int) -> ProductId:
        state = self._state
        index = operator.index(position)
        if index < 0:
            index += state.count
        if not 0 <= index < state.count:
            raise IndexError(f"position {position} is out of range for {state.count} product ids")
        return _decoded_id(state.encoded_at(index))

    def __repr__(self) -> str:
        return f"ProductIdTable(count={len(self)}, nbytes={self.nbytes})"

    def ids_in(self, start: int, stop: int) -> list[ProductId]:
        """The ids at positions `start:stop` (clipped like a list slice).

        Example:
            >>> ProductIdTable(["a", "b", "c"]).ids_in(1, 10)
            ['b', 'c']
        """
        state = self._state
        start, stop, _ = slice(start, stop).indices(state.count)
        if start >= stop:
            return []
        # One copy of the block's bytes, then cheap slices of it, rather than one numpy slice per id.
        first_byte = int(state.byte_offsets[start])
        block = state.buffer[first_byte : state.byte_offsets[stop]].tobytes()
        bounds = (state.byte_offsets[start : stop + 1] - first_byte).tolist()
        return [_decoded_id(block[begin:end]) for begin, end in itertools.pairwise(bounds)]

    def position_of(self, product_id: object) -> int | None:
        """Position of `product_id`, or None when it is absent or is no valid id (an unhashable object, a
        float, a bool). Numpy integers are looked up as the ints they equal.

        Example:
            >>> table = ProductIdTable(["a", 1])
            >>> table.position_of(1), table.position_of("1"), table.position_of([1])
            (1, None, None)
        """
        key = _lookup_key(product_id)
        if key is None:
            return None
        key_hash = _encoded_id_hash(key)
        state = self._state
        for run in state.runs:
            position = state.position_in_run(run, key, key_hash, int(np.searchsorted(run.hashes, key_hash)))
            if position is not None:
                return position
        return None

    @property
    def nbytes(self) -> int:
        """Bytes held by the table's buffer and arrays, spare room included."""
        state = self._state
        runs = sum(run.hashes.nbytes + run.relative_positions.nbytes for run in state.runs)
        return state.buffer.nbytes + state.byte_offsets.nbytes + runs
