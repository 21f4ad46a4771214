"""Crash-safe checkpoints of a training run, and finding the one to resume from.

A checkpoint is the folder `checkpoints/checkpoint-<step>`: accelerate's state (model, optimizer, scheduler, RNG
states of every process), `trainer_state.json` (the loop's position and the run signature) and the completion
marker `checkpoint_complete.json`, which lists every file with its size and SHA-256. It is written under a
temporary name and renamed once complete (`modeling_mmretrieval.atomic_files`), so a run killed at any moment
leaves either no new checkpoint or a complete one, and resuming skips anything the marker does not vouch for.

Example:
```python
>>> save_training_checkpoint(accelerator, "outputs/run/checkpoints", {"completed_steps": 400, ...}, keep=2)
PosixPath('outputs/run/checkpoints/checkpoint-400')
>>> resolve_checkpoint("latest", "outputs/run/checkpoints")  # newest complete checkpoint, or None
PosixPath('outputs/run/checkpoints/checkpoint-400')
```
"""

import hashlib
import json
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path

from transformers.utils import logging

from ..atomic_files import fsync_path, publish_directory, write_json_atomically

CHECKPOINT_PREFIX = "checkpoint-"
TEMPORARY_PREFIX = ".tmp-"
COMPLETION_MARKER = "checkpoint_complete.json"
TRAINER_STATE_NAME = "trainer_state.json"

logger = logging.get_logger(__name__)

_CHECKPOINT_NAME = re.compile(rf"^{re.escape(CHECKPOINT_PREFIX)}(\d+)$")
_HASH_BLOCK_BYTES = 1 << 20


class CheckpointMismatchError(ValueError):
    """A checkpoint was written by a run whose data order or step arithmetic differs from the current one."""


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_HASH_BLOCK_BYTES), b""):
            digest.update(block)
    return digest.hexdigest()


def _checkpoint_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name != COMPLETION_MARKER)


# ----------------------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------------------


def checkpoint_dir_for(checkpoints_dir: str | os.PathLike, step: int) -> Path:
    """Where the checkpoint of `step` is published.

    Example:
    ```python
    >>> checkpoint_dir_for("outputs/run/checkpoints", 400)
    PosixPath('outputs/run/checkpoints/checkpoint-400')
    ```
    """
    return Path(checkpoints_dir) / f"{CHECKPOINT_PREFIX}{step}"


def temporary_dir_for(checkpoints_dir: str | os.PathLike, step: int) -> Path:
    """Where the checkpoint of `step` is written before it is published: its final name behind the temporary
    prefix, which `latest` never matches (`.tmp-checkpoint-400` for step 400)."""
    final = checkpoint_dir_for(checkpoints_dir, step)
    return final.with_name(f"{TEMPORARY_PREFIX}{final.name}")


def mark_complete(directory: str | os.PathLike, step: int) -> None:
    """Flush every file of a written checkpoint to disk and record their sizes and SHA-256 in the marker.

    Example:
    ```python
    >>> mark_complete("outputs/run/checkpoints/.tmp-checkpoint-400", 400)
    ```
    """
    directory = Path(directory)
    files = {}
    for path in _checkpoint_files(directory):
        fsync_path(path)
        files[path.relative_to(directory).as_posix()] = {"size": path.stat().st_size, "sha256": _sha256_of(path)}
    write_json_atomically(directory / COMPLETION_MARKER, {"format": 1, "step": step, "files": files})


def publish_checkpoint(temporary: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Give a completed temporary checkpoint its final name; refuses one without the completion marker.

    Example:
    ```python
    >>> publish_checkpoint(temporary_dir_for(checkpoints, 400), checkpoint_dir_for(checkpoints, 400))
    ```
    """
    if not (Path(temporary) / COMPLETION_MARKER).is_file():
        raise FileNotFoundError(f"{temporary} has no {COMPLETION_MARKER}; call mark_complete first.")
    return publish_directory(temporary, target)


def save_training_checkpoint(accelerator, checkpoints_dir: str | os.PathLike, trainer_state: Mapping,
                             keep: int | None = None) -> Path:
    """Write a crash-safe checkpoint of a run: accelerate state + `trainer_state.json` + completion marker.

    Every process writes its part (model, optimizer, scheduler, its RNG states; weights as safetensors) into a
    temporary directory; the main process then records file sizes and hashes in the marker and renames the
    directory to `checkpoint-<step>`. A run killed at any point leaves either no new checkpoint or a complete
    one. `keep` prunes older checkpoints.

    Example:
    ```python
    >>> save_training_checkpoint(accelerator, "outputs/run/checkpoints", state, keep=3)
    ```
    """
    step = trainer_state["completed_steps"]
    temporary = temporary_dir_for(checkpoints_dir, step)
    if accelerator.is_main_process:
        remove_temporary_checkpoints(checkpoints_dir)
        temporary.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(temporary), safe_serialization=True)
    accelerator.wait_for_everyone()
    target = checkpoint_dir_for(checkpoints_dir, step)
    if accelerator.is_main_process:
        write_json_atomically(temporary / TRAINER_STATE_NAME, dict(trainer_state))
        mark_complete(temporary, step)
        publish_checkpoint(temporary, target)
        prune_checkpoints(checkpoints_dir, keep)
    accelerator.wait_for_everyone()
    return target


def remove_temporary_checkpoints(checkpoints_dir: str | os.PathLike) -> list[Path]:
    """Delete leftovers of checkpoints whose writing was interrupted; returns what was removed.

    Example:
    ```python
    >>> remove_temporary_checkpoints("outputs/run/checkpoints")
    [PosixPath('outputs/run/checkpoints/.tmp-checkpoint-600')]
    ```
    """
    checkpoints_dir = Path(checkpoints_dir)
    if not checkpoints_dir.is_dir():
        return []
    leftovers = [path for path in checkpoints_dir.iterdir() if path.name.startswith(TEMPORARY_PREFIX)]
    for path in leftovers:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return leftovers


def prune_checkpoints(checkpoints_dir: str | os.PathLike, keep: int | None) -> list[Path]:
    """Delete all but the `keep` newest checkpoints (`None` keeps everything); returns what was removed.

    Example:
    ```python
    >>> prune_checkpoints("outputs/run/checkpoints", keep=2)
    [PosixPath('outputs/run/checkpoints/checkpoint-200')]
    ```
    """
    if keep is None:
        return []
    if keep < 1:
        raise ValueError(f"checkpoints_total_limit must be >= 1, got {keep}")
    removed = [path for _, path in list_checkpoints(checkpoints_dir)[keep:]]
    for path in removed:
        shutil.rmtree(path)
    return removed


# ----------------------------------------------------------------------------------------------------------------
# Reading and resuming
# ----------------------------------------------------------------------------------------------------------------


def checkpoint_problem(directory: str | os.PathLike, verify_hashes: bool = True) -> str | None:
    """Why `directory` is not a complete checkpoint, or `None` when it is.

    Complete means: the completion marker parses, and every file it lists exists with the recorded size (and
    SHA-256). A directory killed mid-write has no marker; a file truncated afterwards fails the size/hash check.

    Example:
    ```python
    >>> checkpoint_problem("outputs/run/checkpoints/checkpoint-8")
    'no checkpoint_complete.json (interrupted while writing?)'
    ```
    """
    directory = Path(directory)
    marker = directory / COMPLETION_MARKER
    if not marker.is_file():
        return f"no {COMPLETION_MARKER} (interrupted while writing?)"
    try:
        listed = json.loads(marker.read_text(encoding="utf-8"))["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        return f"unreadable {COMPLETION_MARKER}: {error}"
    if not listed or TRAINER_STATE_NAME not in listed:
        return f"{COMPLETION_MARKER} lists no {TRAINER_STATE_NAME}"
    for name, expected in listed.items():
        path = directory / name
        if not path.is_file():
            return f"missing file {name}"
        if path.stat().st_size != expected["size"]:
            return f"{name} has {path.stat().st_size} bytes, expected {expected['size']}"
        if verify_hashes and _sha256_of(path) != expected["sha256"]:
            return f"{name} does not match its recorded SHA-256"
    return None


def list_checkpoints(checkpoints_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """`(step, path)` of every directory named like a checkpoint, newest first (complete or not).

    Example:
    ```python
    >>> [step for step, _ in list_checkpoints("outputs/run/checkpoints")]
    [400, 200]
    ```
    """
    checkpoints_dir = Path(checkpoints_dir)
    if not checkpoints_dir.is_dir():
        return []
    found = []
    for path in checkpoints_dir.iterdir():
        match = _CHECKPOINT_NAME.match(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found, reverse=True)


def find_latest_checkpoint(checkpoints_dir: str | os.PathLike, verify_hashes: bool = True) -> Path | None:
    """The newest complete checkpoint in `checkpoints_dir`, or `None`. Incomplete ones are skipped (and logged).

    Example:
    ```python
    >>> find_latest_checkpoint("outputs/run/checkpoints")
    PosixPath('outputs/run/checkpoints/checkpoint-400')
    ```
    """
    for _, path in list_checkpoints(checkpoints_dir):
        problem = checkpoint_problem(path, verify_hashes=verify_hashes)
        if problem is None:
            return path
        logger.warning(f"Skipping incomplete checkpoint {path}: {problem}")
    return None


def resolve_checkpoint(resume_from_checkpoint: str | None, checkpoints_dir: str | os.PathLike) -> Path | None:
    """`--resume_from_checkpoint` -> a complete checkpoint directory.

    `"latest"` is the newest complete checkpoint of `checkpoints_dir` or `None` when there is none yet (so a
    preemptible job can always be launched with the same command). A path must be a complete checkpoint.

    Example:
    ```python
    >>> resolve_checkpoint("latest", "outputs/new_run/checkpoints") is None  # nothing saved yet: start afresh
    True
    ```
    """
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "latest":
        return find_latest_checkpoint(checkpoints_dir)
    path = Path(resume_from_checkpoint)
    problem = checkpoint_problem(path) if path.is_dir() else "not a directory"
    if problem is not None:
        raise FileNotFoundError(f"Cannot resume from {path}: {problem}.")
    return path


def load_trainer_state(checkpoint: str | os.PathLike) -> dict:
    """The `trainer_state.json` of a checkpoint: the loop's position, metrics so far and the run signature.

    Example:
    ```python
    >>> load_trainer_state("outputs/run/checkpoints/checkpoint-400")["completed_steps"]
    400
    ```
    """
    return json.loads((Path(checkpoint) / TRAINER_STATE_NAME).read_text(encoding="utf-8"))


def check_run_signature(saved: Mapping, current: Mapping, checkpoint: str | os.PathLike) -> None:
    """Raise `CheckpointMismatchError` when the settings that fix data order and step arithmetic changed.

    Example:
    ```python
    >>> check_run_signature({"seed": 42}, {"seed": 7}, "checkpoint-400")
    Traceback (most recent call last):
    CheckpointMismatchError: checkpoint-400 was written by a run with other settings (seed: checkpoint 42 vs now 7); ...
    ```
    """
    differences = {key: (saved.get(key), value) for key, value in current.items() if saved.get(key) != value}
    if differences:
        listed = ", ".join(f"{key}: checkpoint {old!r} vs now {new!r}" for key, (old, new) in differences.items())
        raise CheckpointMismatchError(
            f"{checkpoint} was written by a run with other settings ({listed}); resuming would not continue it. "
            "Use the original settings or start a new --output_dir."
        )


__all__ = [
    "CHECKPOINT_PREFIX",
    "COMPLETION_MARKER",
    "TEMPORARY_PREFIX",
    "TRAINER_STATE_NAME",
    "CheckpointMismatchError",
    "check_run_signature",
    "checkpoint_dir_for",
    "checkpoint_problem",
    "find_latest_checkpoint",
    "list_checkpoints",
    "load_trainer_state",
    "mark_complete",
    "prune_checkpoints",
    "publish_checkpoint",
    "remove_temporary_checkpoints",
    "resolve_checkpoint",
    "save_training_checkpoint",
    "temporary_dir_for",
]
