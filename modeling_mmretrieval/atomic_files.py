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
import ctypes
import errno
import json
import os
import shutil
import sys
import tempfile
import time
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


# renameat2(2) flag: swap two existing paths in one step (Linux 3.15+, on ext4, xfs, btrfs, tmpfs and others).
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_EXCHANGE_UNSUPPORTED = {errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV}


def _renameat2():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    except OSError:
        return None


def exchange_paths(first: str | os.PathLike, second: str | os.PathLike) -> bool:
    """Swaps two existing paths in one atomic step (Linux `renameat2(RENAME_EXCHANGE)`); returns False, changing
    nothing, where the system or filesystem cannot.

    Example:
        >>> root = Path(tempfile.mkdtemp())
        >>> (root / "new").mkdir(); (root / "old").mkdir(); (root / "new" / "weights").touch()
        >>> exchange_paths(root / "new", root / "old") and [p.name for p in (root / "old").iterdir()] == ["weights"]
        True
    """
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE) == 0:
        return True
    error = ctypes.get_errno()
    if error in _EXCHANGE_UNSUPPORTED:
        return False
    raise OSError(error, os.strerror(error), str(first), None, str(second))


def _retired_copies(target: Path) -> list[Path]:
    """The earlier versions of `target` that `publish_directory` moved aside, most recently retired first."""
    if not target.parent.is_dir():
        return []
    prefix = f".{target.name}."
    retired = [p for p in target.parent.iterdir() if p.name.startswith(prefix) and p.name.endswith(".old")]
    return sorted(retired, key=lambda path: path.lstat().st_ctime_ns, reverse=True)


def recover_directory(target: str | os.PathLike) -> Path | None:
    """Repairs what a kill in the middle of `publish_directory` can leave: when `target` is missing but a complete
    earlier version was moved aside (`.<name>.<id>.old`), that version is renamed back; every other retired
    copy is deleted. Returns the restored directory, or None. `publish_directory` calls it first, so the next
    publish of the same target cleans up; it assumes one publisher per target at a time (as the trainer's
    main process is for `final/` and checkpoints).

    Example:
        >>> root = Path(tempfile.mkdtemp())
        >>> (root / ".final.1234.old").mkdir()  # killed after moving the old final/ aside
        >>> recover_directory(root / "final") == root / "final"
        True
    """
    target = Path(target)
    retired = _retired_copies(target)
    restored = None
    if retired and not target.exists():
        os.rename(retired.pop(0), target)
        restored = target
    for path in retired:
        shutil.rmtree(path, ignore_errors=True)
    if restored is not None or retired:
        fsync_path(target.parent)
    return restored


def publish_directory(finished: str | os.PathLike, target: str | os.PathLike, *, overwrite: bool = True) -> Path:
    """Renames the completely written directory `finished` to `target` and returns `target`.

    An empty or absent `target` is simply replaced. A non-empty one is replaced when `overwrite`, and otherwise
    raises `FileExistsError` and leaves `finished` where it is. The replacement never deletes the old directory
    before the new one is in place: on Linux the two are swapped in one atomic rename (`exchange_paths`), so
    `target` always names a complete directory, old or new; elsewhere the old one is renamed aside
    (`.<name>.<id>.old`), the new one renamed in, and only then the old one deleted, so a kill leaves either a
    complete `target` or a complete retired copy that the next publish (or `recover_directory`) renames back.
    Leftover retired copies are deleted on the next publish. Both directories must be on one filesystem.

    Example:
        >>> root = Path(tempfile.mkdtemp())
        >>> (root / ".tmp-checkpoint-10").mkdir()
        >>> publish_directory(root / ".tmp-checkpoint-10", root / "checkpoint-10").name
        'checkpoint-10'
    """
    finished, target = Path(finished), Path(target)
    fsync_path(finished)
    recover_directory(target)
    if _is_non_empty_directory(target):
        if not overwrite:
            raise FileExistsError(f"{target} already exists and is not empty; pass overwrite=True to replace it")
        retired = target.with_name(f".{target.name}.{uuid.uuid4().hex}.old")
        if exchange_paths(finished, target):
            os.rename(finished, retired)  # `finished` now names the old directory
        else:
            os.rename(target, retired)
            os.rename(finished, target)
        fsync_path(target.parent)  # the new `target` is durable before the old one goes
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


# A staging directory's name carries its writer (`.<target>.<host>-<pid>.<random>.partial`), so the next writer of
# the same target can tell the leftovers of a killed one from a directory another live process is still filling.
_STAGING_SUFFIX = ".partial"
_FOREIGN_STAGING_MAX_AGE_S = 24 * 3600


def _process_is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def remove_abandoned_staging(target: str | os.PathLike) -> list[Path]:
    """Deletes the staging directories of `target` that a killed writer left behind: those of a process of this host
    that no longer runs, and those of another host (a shared filesystem) older than a day. Returns what it deleted.
    `atomic_directory` calls it before each write.

    Example:
        >>> root = Path(tempfile.mkdtemp())
        >>> (root / ".index.otherhost-1.abc.partial").mkdir()
        >>> remove_abandoned_staging(root / "index")  # another host's, and recent: left alone
        []
    """
    target = Path(target)
    if not target.parent.is_dir():
        return []
    host = _host_name()
    removed = []
    for candidate in target.parent.glob(f".{target.name}.*{_STAGING_SUFFIX}"):
        writer = candidate.name[len(target.name) + 2:].split(".", 1)[0]
        writer_host, _, pid = writer.rpartition("-")
        try:
            if writer_host == host and pid.isdigit():
                abandoned = not _process_is_alive(int(pid))
            else:
                abandoned = time.time() - candidate.stat().st_mtime > _FOREIGN_STAGING_MAX_AGE_S
        except OSError:  # another writer removed or published it meanwhile
            continue
        if abandoned and candidate.is_dir():
            shutil.rmtree(candidate, ignore_errors=True)
            removed.append(candidate)
    return removed


def _host_name() -> str:
    return "".join(char if char.isalnum() else "_" for char in os.uname().nodename) or "host"


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
    remove_abandoned_staging(target)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.{_host_name()}-{os.getpid()}.", suffix=_STAGING_SUFFIX,
                                    dir=target.parent))
    try:
        yield staging
        publish_directory(staging, target, overwrite=overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


__all__ = [
    "atomic_directory",
    "exchange_paths",
    "flush_durably",
    "fsync_path",
    "publish_directory",
    "recover_directory",
    "remove_abandoned_staging",
    "write_bytes_atomically",
    "write_json_atomically",
]
