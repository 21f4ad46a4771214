"""The on-disk format of a `ProductIndex`: its files, their checksums, and how they are written and verified.

A saved index is a directory:

- `embeddings.f32`: the `(count, dim)` matrix, raw little-endian float32, row-major (memory-mappable);
- `ids.json`: the product ids, one per row, in row order;
- `metadata.jsonl` (optional): one small JSON object per row (e.g. the title, for display);
- `index_meta.json`: format version, the model that built the index, `count`, `dim`, dtype, sha256 checksums of
  the three files above, and the shard description for shards of a distributed build. The model is identified by
  `model_fingerprint` (its config and weights, `retrieval.search.model_fingerprint`), which decides whether a
  model may use the index; `model_id` (where it was loaded from) and `config_hash` are kept for people to read.
  `provenance_sha256` covers those fields and the shard description, so an edit of them is noticed.

Format 1 (before the fingerprint) is still read, with `model_fingerprint` None: such an index can be inspected
and merged, but a load that expects a model fingerprint refuses it.

`write_index_files` streams blocks of rows into those files, hashing the bytes as it writes them;
`index_meta.json` is written last, so its presence marks a complete directory. Callers write into a staging
directory (`atomic_files.atomic_directory`) that is renamed into place. `read_index_directory` checks every file
against the meta file before anything is used, raising `IndexIntegrityError` (or, for an index of another
model, `IndexModelMismatchError`).

Example:
    >>> import tempfile, numpy as np
    >>> from pathlib import Path
    >>> directory = Path(tempfile.mkdtemp())
    >>> blocks = [(np.eye(2, dtype=np.float32), ["sku-1", "sku-2"], None)]
    >>> _ = write_index_files(directory, blocks, with_metadata=False, model_id="my-model", model_fingerprint="0a1b")
    >>> files = read_index_directory(directory, mmap=False, verify_checksums=True, expected_model_fingerprint="0a1b")
    >>> files.meta["count"], list(files.ids)
    (2, ['sku-1', 'sku-2'])
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

import numpy as np

from ..atomic_files import flush_durably, write_json_atomically
from .product_ids import DuplicateProductIdError, ProductId, ProductIdTable

INDEX_FORMAT = "mmretrieval-product-index"
INDEX_FORMAT_VERSION = 2
EMBEDDINGS_FILENAME = "embeddings.f32"
IDS_FILENAME = "ids.json"
METADATA_FILENAME = "metadata.jsonl"
META_FILENAME = "index_meta.json"

# Rows copied per step when saving, merging or hashing, so that memory-mapped catalogues stay paged out.
COPY_BLOCK_ROWS = 1 << 16
MAX_METADATA_FIELDS = 16
MAX_METADATA_CHARS = 256

# `(embeddings, ids, metadata)` of consecutive rows: a `(rows, dim)` float32 matrix, one product id per row,
# and one metadata dict per row, or None for an index that keeps no metadata.
RowBlock = tuple[np.ndarray, list, "list | None"]

# Every key the writer of each format version emits; a meta file missing one (or carrying another) was edited or
# corrupted. Format 1 predates the model fingerprint.
_FORMAT_1_META_KEYS = frozenset({
    "format", "format_version", "model_id", "config_hash", "count", "dim", "dtype", "byte_order",
    "embeddings_sha256", "ids_sha256", "metadata_sha256", "shard",
})
_META_KEYS_BY_VERSION = {
    1: _FORMAT_1_META_KEYS,
    INDEX_FORMAT_VERSION: _FORMAT_1_META_KEYS | {"model_fingerprint", "provenance_sha256"},
}
# The fields that say which model built the rows (and which share of the catalogue they are), under one checksum.
_PROVENANCE_KEYS = ("model_id", "config_hash", "model_fingerprint", "shard")


class IndexIntegrityError(ValueError):
    """The files of a saved index are missing, truncated, corrupted or inconsistent with each other."""


class IndexModelMismatchError(ValueError):
    """An index was built by another model (config or weights) than the one expected, or records no model
    fingerprint to compare with (an index of format 1, or one built without it)."""


def bounded_metadata(values: Mapping[str, Any] | None) -> dict[str, str | None]:
    """A product's display metadata as at most `MAX_METADATA_FIELDS` strings of at most `MAX_METADATA_CHARS`
    characters: the index is not a document store.

    Example:
        >>> bounded_metadata({"title": "Red shoes", "price": 49})
        {'title': 'Red shoes', 'price': '49'}
    """
    if values is None:
        return {}
    if not isinstance(values, Mapping):
        raise TypeError(f"product metadata must be a mapping of field name to value, got {type(values).__name__}")
    if len(values) > MAX_METADATA_FIELDS:
        raise ValueError(f"product metadata holds at most {MAX_METADATA_FIELDS} fields, got {len(values)}")
    return {str(field): None if value is None else str(value)[:MAX_METADATA_CHARS] for field, value in values.items()}


def _sha256_of_rows(matrix: np.ndarray) -> str:
    digest = hashlib.sha256()
    for start in range(0, len(matrix), COPY_BLOCK_ROWS):
        digest.update(np.ascontiguousarray(matrix[start : start + COPY_BLOCK_ROWS]).data)
    return digest.hexdigest()


def _provenance_sha256(meta: Mapping[str, Any]) -> str:
    fields = {key: meta[key] for key in _PROVENANCE_KEYS}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, ensure_ascii=True).encode("ascii")).hexdigest()


def _json_array_items(values: Sequence, follow_earlier_items: bool) -> bytes:
    """UTF-8 JSON of `values` as a stretch of a JSON array written in parts: `json.dumps` of a whole list is
    "[", its items joined by ", ", then "]", so the parts add up to exactly the bytes of dumping it at once."""
    items = json.dumps(list(values), ensure_ascii=False)[1:-1]
    return (", " + items if follow_earlier_items else items).encode("utf-8")


class _HashedFile:
    """A file being written whose sha256 is computed from the bytes as they are written."""

    def __init__(self, handle: BinaryIO):
        self.handle = handle
        self._digest = hashlib.sha256()

    def write(self, payload: bytes | memoryview) -> None:
        self.handle.write(payload)
        self._digest.update(payload)

    def hexdigest(self) -> str:
        return self._digest.hexdigest()


class _IndexWriter:
    """Streams rows of an index into open files in order, hashing the bytes as they are written, so a
    catalogue of any size is written with the memory of one block of rows (and a compact table of the ids,
    to refuse duplicates). Open one with `_index_writer`."""

    def __init__(
        self, directory: Path, embeddings_file: BinaryIO, ids_file: BinaryIO, metadata_file: BinaryIO | None
    ):
        self.directory = directory
        self.dim: int | None = None
        self._ids = ProductIdTable()
        self._embeddings_file = _HashedFile(embeddings_file)
        self._ids_file = _HashedFile(ids_file)
        self._metadata_file = None if metadata_file is None else _HashedFile(metadata_file)
        self._ids_file.write(b"[")

    @property
    def count(self) -> int:
        return len(self._ids)

    def append(
        self, embeddings: np.ndarray, ids: Sequence[ProductId], metadata: Sequence[Mapping] | None = None
    ) -> None:
        """Writes the next rows: `(n, dim)` embeddings, their n product ids and (when the directory keeps
        metadata) their n metadata rows. Raises on a duplicate id or a change of dimension."""
        if len(embeddings) != len(ids):
            raise ValueError(f"got {len(embeddings)} embeddings for {len(ids)} product ids")
        if not len(ids):
            return
        if self.dim is None:
            self.dim = embeddings.shape[1]
        elif embeddings.shape[1] != self.dim:
            raise ValueError(f"embedding dimension changed from {self.dim} to {embeddings.shape[1]} while indexing")
        ids_json = _json_array_items(ids, follow_earlier_items=bool(self.count))
        self._ids.append(ids)
        self._embeddings_file.write(np.ascontiguousarray(embeddings, dtype="<f4").data)
        self._ids_file.write(ids_json)
        if self._metadata_file is not None:
            lines = "".join(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n" for row in metadata)
            self._metadata_file.write(lines.encode("utf-8"))

    def finish(
        self,
        *,
        model_id: str | None,
        config_hash: str | None,
        model_fingerprint: str | None,
        shard_info: dict | None,
    ) -> dict:
        """Closes the ids' JSON array and writes `index_meta.json` (last, so its presence marks a complete
        directory); returns the meta."""
        self._ids_file.write(b"]")
        for file in (self._embeddings_file, self._ids_file, self._metadata_file):
            if file is not None:
                flush_durably(file.handle)
        meta = {
            "format": INDEX_FORMAT,
            "format_version": INDEX_FORMAT_VERSION,
            "model_id": model_id,
            "config_hash": config_hash,
            "model_fingerprint": model_fingerprint,
            "count": self.count,
            "dim": self.dim,
            "dtype": "float32",
            "byte_order": "little",
            "embeddings_sha256": self._embeddings_file.hexdigest(),
            "ids_sha256": self._ids_file.hexdigest(),
            "metadata_sha256": None if self._metadata_file is None else self._metadata_file.hexdigest(),
            "shard": shard_info,
        }
        meta["provenance_sha256"] = _provenance_sha256(meta)
        write_json_atomically(self.directory / META_FILENAME, meta)
        return meta


@contextlib.contextmanager
def _index_writer(directory: Path, *, with_metadata: bool) -> Iterator[_IndexWriter]:
    with contextlib.ExitStack() as files:
        embeddings_file = files.enter_context(open(directory / EMBEDDINGS_FILENAME, "wb"))
        ids_file = files.enter_context(open(directory / IDS_FILENAME, "wb"))
        metadata_file = files.enter_context(open(directory / METADATA_FILENAME, "wb")) if with_metadata else None
        yield _IndexWriter(directory, embeddings_file, ids_file, metadata_file)


def write_index_files(
    directory: Path,
    blocks: Iterable[RowBlock],
    *,
    with_metadata: bool,
    model_id: str | None = None,
    config_hash: str | None = None,
    model_fingerprint: str | None = None,
    shard_info: dict | None = None,
) -> dict:
    """Writes a complete index into the empty `directory` from `blocks` of rows, in order, and returns its
    meta. Memory holds one block at a time (and a compact table of the ids, to refuse duplicates); the
    metadata of each block is ignored unless `with_metadata`. `model_fingerprint` identifies the model that
    embedded the rows (`retrieval.search.model_fingerprint`); `model_id` and `config_hash` are for people to read.

    Example:
        >>> import tempfile
        >>> blocks = [(np.eye(2, dtype=np.float32), ["sku-1", "sku-2"], [{"title": "A"}, {"title": "B"}])]
        >>> write_index_files(Path(tempfile.mkdtemp()), blocks, with_metadata=True)["count"]
        2
    """
    with _index_writer(directory, with_metadata=with_metadata) as writer:
        for embeddings, ids, metadata in blocks:
            writer.append(embeddings, ids, metadata)
        return writer.finish(
            model_id=model_id, config_hash=config_hash, model_fingerprint=model_fingerprint, shard_info=shard_info
        )


class IndexFiles(NamedTuple):
    """The verified contents of an index directory."""

    meta: dict
    embeddings: np.ndarray
    ids: ProductIdTable
    metadata: list | None


def _read_meta(directory: Path) -> dict:
    if not directory.is_dir():
        raise FileNotFoundError(f"no product index directory at {directory}")
    path = directory / META_FILENAME
    if not path.is_file():
        raise IndexIntegrityError(
            f"{directory} has no {META_FILENAME}: it is not a product index or was not completely written"
        )
    try:
        meta = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise IndexIntegrityError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(meta, dict) or meta.get("format") != INDEX_FORMAT:
        raise IndexIntegrityError(f"{path} does not describe a {INDEX_FORMAT}")
    version = meta.get("format_version")
    if type(version) is not int or version not in _META_KEYS_BY_VERSION:
        raise IndexIntegrityError(
            f"{path} has format version {version!r}; this code reads versions {sorted(_META_KEYS_BY_VERSION)}"
        )
    expected_keys = _META_KEYS_BY_VERSION[version]
    if set(meta) != expected_keys:
        missing, unknown = sorted(expected_keys - set(meta)), sorted(set(meta) - expected_keys)
        raise IndexIntegrityError(f"{path} was edited or corrupted: missing keys {missing}, unknown keys {unknown}")
    if version == 1:
        meta = {**meta, "model_fingerprint": None, "provenance_sha256": None}
    elif meta["provenance_sha256"] != _provenance_sha256(meta):
        raise IndexIntegrityError(
            f"{path} does not match its provenance checksum: the model or shard it records was edited or corrupted"
        )
    count, dim = meta.get("count"), meta.get("dim")
    if not isinstance(count, int) or count < 0 or not (isinstance(dim, int) and dim > 0 or dim is None and count == 0):
        raise IndexIntegrityError(f"{path} has an invalid count/dim: count={count!r}, dim={dim!r}")
    if meta.get("dtype") != "float32" or meta.get("byte_order") != "little":
        raise IndexIntegrityError(
            f"{path} declares dtype {meta.get('dtype')!r}/{meta.get('byte_order')!r}; expected little-endian float32"
        )
    return meta


def _check_model_fingerprint(meta: dict, expected: str | None, directory: Path) -> None:
    """Raises `IndexModelMismatchError` unless the index records `expected` as its model fingerprint (any index
    passes when `expected` is None). The message names both fingerprints and the index folder."""
    recorded = meta["model_fingerprint"]
    if expected is None or recorded == expected:
        return
    if recorded is None:
        why = (
            "was saved in index format 1, before indexes recorded the model fingerprint"
            if meta["format_version"] == 1 else "records no model fingerprint (it was built without one)"
        )
        raise IndexModelMismatchError(
            f"the index at {directory} {why}, so it cannot be matched to the current model "
            f"(model_fingerprint={expected!r}); rebuild the index with the current model"
        )
    raise IndexModelMismatchError(
        f"the index at {directory} was built by another model: model_fingerprint={recorded!r} (from "
        f"{meta['model_id']!r}) but the current model has {expected!r} (its config or weights differ); rebuild the "
        "index with the current model"
    )


def _check_embeddings_size(directory: Path, meta: dict) -> None:
    path = directory / EMBEDDINGS_FILENAME
    if not path.is_file():
        raise IndexIntegrityError(f"{path} is missing")
    count, dim = meta["count"], meta["dim"] or 0
    expected_bytes = count * dim * 4
    actual_bytes = path.stat().st_size
    if actual_bytes != expected_bytes:
        raise IndexIntegrityError(
            f"{path} holds {actual_bytes} bytes but count={count} x dim={dim} float32 needs {expected_bytes}: "
            "the file is truncated, has trailing data, or belongs to another index"
        )


def _read_embeddings(directory: Path, meta: dict, *, mmap: bool, verify_checksums: bool) -> np.ndarray:
    """The embedding matrix of a directory whose file size `_check_embeddings_size` has accepted."""
    path = directory / EMBEDDINGS_FILENAME
    shape = (meta["count"], meta["dim"] or 0)
    if shape[0] * shape[1] == 0:
        embeddings = np.zeros(shape, dtype=np.float32)
    elif mmap:
        # Copy-on-write mapping: pages stay shared with the file, and torch can wrap it without warnings.
        embeddings = np.memmap(path, dtype="<f4", mode="c", shape=shape)
    else:
        embeddings = np.fromfile(path, dtype="<f4").reshape(shape)
    if verify_checksums and _sha256_of_rows(embeddings) != meta.get("embeddings_sha256"):
        raise IndexIntegrityError(f"{path} does not match its sha256 checksum: the embeddings are corrupted")
    return embeddings


def _read_checked_bytes(path: Path, expected_sha256: str | None) -> bytes:
    if not path.is_file():
        raise IndexIntegrityError(f"{path} is missing")
    payload = path.read_bytes()
    if hashlib.sha256(payload).hexdigest() != expected_sha256:
        raise IndexIntegrityError(f"{path} does not match its sha256 checksum: it was edited or corrupted")
    return payload


def _read_ids(directory: Path, meta: dict) -> ProductIdTable:
    path = directory / IDS_FILENAME
    ids = json.loads(_read_checked_bytes(path, meta.get("ids_sha256")).decode("utf-8"))
    if not isinstance(ids, list) or len(ids) != meta["count"]:
        raise IndexIntegrityError(f"{path} must list exactly count={meta['count']} product ids")
    try:
        return ProductIdTable(ids)
    except (DuplicateProductIdError, TypeError) as error:
        raise IndexIntegrityError(f"{IDS_FILENAME} holds invalid product ids: {error}") from error


def _read_metadata(directory: Path, meta: dict) -> list | None:
    path = directory / METADATA_FILENAME
    if meta["metadata_sha256"] is None:
        if path.exists():
            raise IndexIntegrityError(f"{path} exists but {META_FILENAME} declares no metadata: the meta file was edited")
        return None
    # Only "\n" ends a row: JSON text may hold U+2028/U+0085, which `str.splitlines` would also split on.
    payload = _read_checked_bytes(path, meta["metadata_sha256"]).decode("utf-8")
    lines = payload.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) != meta["count"]:
        raise IndexIntegrityError(f"{path} has {len(lines)} rows but the index has count={meta['count']}")
    rows = []
    for number, line in enumerate(lines):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise IndexIntegrityError(f"{path} row {number} is not valid JSON: {error}") from error
        if not isinstance(row, dict):
            raise IndexIntegrityError(f"{path} row {number} is not a JSON object")
        rows.append(row)
    return rows


def read_index_directory(
    directory: Path,
    *,
    mmap: bool,
    verify_checksums: bool,
    expected_model_fingerprint: str | None = None,
) -> IndexFiles:
    """Reads and verifies a saved index (see the module docstring; `ProductIndex.load` documents the options)."""
    meta = _read_meta(directory)
    _check_model_fingerprint(meta, expected_model_fingerprint, directory)
    # A wrong count shows first in the embeddings' size, which is cheap to check. The ids are read before the
    # matrix: their parsed list (an object per id) is gone, kept as a compact table, before the matrix is read.
    _check_embeddings_size(directory, meta)
    ids = _read_ids(directory, meta)
    return IndexFiles(
        meta=meta,
        embeddings=_read_embeddings(directory, meta, mmap=mmap, verify_checksums=verify_checksums),
        ids=ids,
        metadata=_read_metadata(directory, meta),
    )


__all__ = [
    "COPY_BLOCK_ROWS",
    "EMBEDDINGS_FILENAME",
    "IDS_FILENAME",
    "INDEX_FORMAT",
    "INDEX_FORMAT_VERSION",
    "MAX_METADATA_CHARS",
    "MAX_METADATA_FIELDS",
    "METADATA_FILENAME",
    "META_FILENAME",
    "IndexFiles",
    "IndexIntegrityError",
    "IndexModelMismatchError",
    "RowBlock",
    "bounded_metadata",
    "read_index_directory",
    "write_index_files",
]
