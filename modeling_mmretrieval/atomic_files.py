"""Crash-safe writes: a reader sees a file or directory either as it was before or complete, never half-written.

Everything the package writes for later reading (indexes, checkpoints, training results, converted towers)
goes through these helpers. A file is written to a hidden sibling and renamed over its target; a directory
is filled in a hidden sibling staging directory and renamed into place. Both are flushed to disk (`fsync`)
before the rename, and the rename itself is made durable by syncing the parent directory.

Example:
    >>> import json, tempfile
    >>> from pathlib import Path
    >>> root = Path(tempfile.mkdtemp())
    >>> write_json_atomically(root / "results.json", {"recall@10": 0.5})
    >>> json.loads((root / "results.json").read_text())
    {'recall@10': 0.5}
    >>> with atomic_directory(root / "index") as staging:
    ...     write_bytes_atomically(staging / "ids.json", b'["sku-1"]')
    >>> sorted(path.name for path in (root / "index").iterdir())
    ['ids.json']
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO


def fsync_path(path: str | os.PathLike) -> None:
    """Flushes a file's contents, or a directory's entries, to disk.

    A rename is durable only once the directory holding it is synced: call this on the parent afterwards.

    Example:
        >>> fsync_path(tempfile.gettempdir())
    """
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def flush_durably(handle: BinaryIO) -> None:
    """Flushes an open file's buffers to the operating system and then to disk.

    Example:
        >>> with tempfile.TemporaryFile() as handle:
        ...     _ = handle.write(b"rows")
        ...     flush_durably(handle)
    """
    handle.flush()
    os.fsync(handle.fileno())


def write_bytes_atomically(path: str | os.PathLike, payload: bytes) -> None:
    """Writes `payload` to `path` through a hidden sibling file renamed over it, so readers never see half
    a file; after a crash `path` holds the old contents or the new ones.

    Example:
        >>> write_bytes_atomically(Path(tempfile.mkdtemp()) / "ids.json", b'["sku-1", "sku-2"]')
    """
    path = Path(path)
    # A unique name, so concurrent writers never share a temporary file; `open` (not mkstemp) keeps the
    # permissions the umask gives an ordinary file.
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.partial")
    try:
        with open(temporary, "xb") as handle:
            handle.write(payload)
            flush_durably(handle)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def write_json_atomically(path: str | os.PathLike, payload: Any) -> None:
    """Writes `payload` as indented JSON with sorted keys (values JSON cannot hold are written with `str`),
    atomically as `write_bytes_atomically` does.

    Example:
        >>> write_json_atomically(Path(tempfile.mkdtemp()) / "trainer_state.json", {"completed_steps": 10})
    """
    text = json.dumps(payload, indent=2, sort_keys=True, default=str)
    write_bytes_atomically(path, text.encode("utf-8"))


def _is_non_empty_directory(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


def publish_directory(finished: str | os.PathLike, target: str | os.PathLike, *, overwrite: bool = True) -> Path:
    """Renames the completely written directory `finished` to `target` and returns `target`.

    An empty or absent `target` is simply replaced. A non-empty one is replaced when `overwrite` (moved
    aside first, so `target` always names a complete directory, then deleted) and otherwise raises
    `FileExistsError` and leaves `finished` where it is. Both directories must be on one filesystem.

    Example:
        >>> root = Path(tempfile.mkdtemp())
        >>> (root / ".tmp-checkpoint-10").mkdir()
        >>> publish_directory(root / ".tmp-checkpoint-10", root / "checkpoint-10").name
        'checkpoint-10'
    """
    finished, target = Path(finished), Path(target)
    fsync_path(finished)
    if _is_non_empty_directory(target):
        if not overwrite:
            raise FileExistsError(f"{target} already exists and is not empty; pass overwrite=True to replace it")
        retired = target.with_name(f".{target.name}.{uuid.uuid4().hex}.old")
        os.rename(target, retired)
        os.rename(finished, target)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        try:
            os.replace(finished, target)
        except OSError as error:
            if not _is_non_empty_directory(target):
                raise
            # Another process published a complete directory there after the check above.
            raise FileExistsError(f"{target} was written by someone else while this one was being written") from error
    fsync_path(target.parent)
    return target


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yields an empty staging directory beside `target`; when the block completes, the staging directory is
    renamed onto `target` (`publish_directory`), and when it raises, it is deleted. Readers of `target` see
    either what was there before or the complete new directory.

    A non-empty `target` raises `FileExistsError` up front unless `overwrite`, and also when another process
    fills `target` while the block runs (the caller can then use that directory instead). The staging
    directory is private to its owner (mode 0700), as `tempfile.mkdtemp` makes it.

    Example:
        >>> target = Path(tempfile.mkdtemp()) / "catalogue_index"
        >>> with atomic_directory(target) as staging:
        ...     write_json_atomically(staging / "index_meta.json", {"count": 0})
        >>> [path.name for path in target.iterdir()]
        ['index_meta.json']
    """
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"{target} exists and is not a directory")
    if not overwrite and _is_non_empty_directory(target):
        raise FileExistsError(f"{target} already exists and is not empty; pass overwrite=True to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    try:
        yield staging
        publish_directory(staging, target, overwrite=overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


__all__ = [
    "atomic_directory",
    "flush_durably",
    "fsync_path",
    "publish_directory",
    "write_bytes_atomically",
    "write_json_atomically",
]
