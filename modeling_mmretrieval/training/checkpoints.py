"""Crash-safe checkpoints of a training run, and finding the one to resume from.

A checkpoint is the folder `checkpoints/checkpoint-<step>`: accelerate's state (model, optimizer, scheduler, RNG
states of every process), `trainer_state.json` (the loop's position and the run signature) and the completion
marker `checkpoint_complete.json`, which lists every file with its size and SHA-256. It is written under a
temporary name and renamed once complete (`modeling_mmretrieval.atomic_files`), so a run killed at any moment
leaves either no new checkpoint or a complete one, and resuming skips anything the marker does not vouch for.

Example:
Every checkpoint also holds `model/`, the model as `save_pretrained` writes it (config, weights, modelling code,
processor files and model card), so `AutoModel.from_pretrained("checkpoint-400/model", trust_remote_code=True)`
loads it as it loads `final/`.

One folder of checkpoints holds one lineage: resuming from a checkpoint (or starting afresh) first moves every
checkpoint of a later step into `checkpoints/.abandoned/` (`start_lineage`), so that neither `latest` nor
`--checkpoints_total_limit` ever mixes the abandoned run's checkpoints with the new run's. The move is journaled
(`.rollback.json` is written before anything moves and removed after), so a run killed in the middle of it is
completed by the next run before it looks for a checkpoint.

Example:
```python
>>> save_training_checkpoint(accelerator, "outputs/run/checkpoints", {"completed_steps": 400, ...}, keep=2,
...                          model=model, processor=processor, model_card=card)
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
import uuid
from collections.abc import Mapping
from pathlib import Path

from transformers.utils import logging

from ..atomic_files import fsync_path, publish_directory, write_json_atomically

CHECKPOINT_PREFIX = "checkpoint-"
TEMPORARY_PREFIX = ".tmp-"
COMPLETION_MARKER = "checkpoint_complete.json"
TRAINER_STATE_NAME = "trainer_state.json"
MODEL_SUBDIR = "model"
ABANDONED_DIR = ".abandoned"
ROLLBACK_JOURNAL = ".rollback.json"

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


def save_model_folder(accelerator, model, processor, directory: str | os.PathLike, model_card: str | None = None
                      ) -> Path:
    """Write what `from_pretrained` loads: the model (safetensors, config, modelling code), the processor and the
    model card (README.md). Every process must call it (gathering the weights is a collective operation under
    DeepSpeed and FSDP); the main process writes.

    Example:
    ```python
    >>> save_model_folder(accelerator, model, processor, "outputs/run/.tmp-final", model_card=card)
    ```
    """
    directory = Path(directory)
    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        if model_card is not None:
            unwrapped.model_card = model_card  # saved as README.md, and what `push_to_hub` uploads
        unwrapped.save_pretrained(directory, state_dict=state_dict)
        if processor is not None:
            processor.save_pretrained(directory)
    return directory


def save_training_checkpoint(accelerator, checkpoints_dir: str | os.PathLike, trainer_state: Mapping,
                             keep: int | None = None, *, model=None, processor=None,
                             model_card: str | None = None) -> Path:
    """Write a crash-safe checkpoint of a run: accelerate state + `trainer_state.json` + completion marker, and,
    given `model`, the loadable model folder `model/` (`save_model_folder`: config, processor, card).

    Every process writes its part (model, optimizer, scheduler, its RNG states; weights as safetensors) into a
    temporary directory; the main process then records file sizes and hashes in the marker and renames the
    directory to `checkpoint-<step>`. A run killed at any point leaves either no new checkpoint or a complete
    one. `keep` prunes older checkpoints.

    Example:
    ```python
    >>> save_training_checkpoint(accelerator, "outputs/run/checkpoints", state, keep=3, model=model,
    ...                          processor=processor)
    ```
    """
    step = trainer_state["completed_steps"]
    temporary = temporary_dir_for(checkpoints_dir, step)
    if accelerator.is_main_process:
        remove_temporary_checkpoints(checkpoints_dir)
        temporary.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(temporary), safe_serialization=True)
    if model is not None:
        save_model_folder(accelerator, model, processor, temporary / MODEL_SUBDIR, model_card)
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


def abandon_checkpoints_after(checkpoints_dir: str | os.PathLike, step: int) -> list[Path]:
    """Move every checkpoint-named folder of a step after `step` (complete or not) into
    `checkpoints/.abandoned/after-<step>-<id>/`, so the folder holds one lineage; returns where they went.

    The plan is written first (`.rollback.json`), then carried out (`finish_abandoning`): a kill in between
    leaves the plan, which the next run completes before it resolves `latest`.

    Example:
    ```python
    >>> abandon_checkpoints_after("outputs/run/checkpoints", 400)  # resuming from checkpoint-400
    [PosixPath('outputs/run/checkpoints/.abandoned/after-400-1f2e3d4c/checkpoint-600')]
    ```
    """
    checkpoints_dir = Path(checkpoints_dir)
    newer = [path.name for found, path in list_checkpoints(checkpoints_dir) if found > step]
    if not newer:
        return []
    destination = f"{ABANDONED_DIR}/after-{step}-{uuid.uuid4().hex[:8]}"
    write_json_atomically(checkpoints_dir / ROLLBACK_JOURNAL,
                          {"resume_step": step, "destination": destination, "checkpoints": newer})
    return finish_abandoning(checkpoints_dir)


def finish_abandoning(checkpoints_dir: str | os.PathLike) -> list[Path]:
    """Carry out a pending `.rollback.json` (see `abandon_checkpoints_after`), then remove it; returns where the
    checkpoints went (`[]` when nothing was pending).

    Example:
    ```python
    >>> finish_abandoning("outputs/run/checkpoints")  # a run killed while moving checkpoints aside
    [PosixPath('outputs/run/checkpoints/.abandoned/after-400-1f2e3d4c/checkpoint-600')]
    ```
    """
    checkpoints_dir = Path(checkpoints_dir)
    journal = checkpoints_dir / ROLLBACK_JOURNAL
    if not journal.is_file():
        return []
    plan = json.loads(journal.read_text(encoding="utf-8"))
    destination = checkpoints_dir / plan["destination"]
    destination.mkdir(parents=True, exist_ok=True)
    moved = []
    for name in plan["checkpoints"]:
        if (checkpoints_dir / name).exists():
            os.rename(checkpoints_dir / name, destination / name)
        moved.append(destination / name)
    fsync_path(destination)
    fsync_path(checkpoints_dir)
    journal.unlink()
    fsync_path(checkpoints_dir)
    logger.warning(f"Moved the checkpoints after step {plan['resume_step']} ({', '.join(plan['checkpoints'])}) of "
                   f"an abandoned run to {destination}; delete that folder once you no longer need them.")
    return moved


def start_lineage(accelerator, resume_from_checkpoint: str | None, checkpoints_dir: str | os.PathLike
                  ) -> Path | None:
    """The checkpoint a run resumes from (`resolve_checkpoint`), with `checkpoints_dir` made to hold only its
    lineage: leftovers of interrupted writes are deleted, an interrupted move completed, and every checkpoint of a
    later step (all of them when starting afresh) moved aside (`abandon_checkpoints_after`). Every process calls
    it; the main process changes the folder.

    Example:
    ```python
    >>> start_lineage(accelerator, "outputs/run/checkpoints/checkpoint-200", "outputs/run/checkpoints")
    PosixPath('outputs/run/checkpoints/checkpoint-200')  # checkpoint-400 and -600 moved to .abandoned/
    ```
    """
    if accelerator.is_main_process:
        finish_abandoning(checkpoints_dir)
        remove_temporary_checkpoints(checkpoints_dir)
    accelerator.wait_for_everyone()
    checkpoint = resolve_checkpoint(resume_from_checkpoint, checkpoints_dir)
    accelerator.wait_for_everyone()  # every process resolved before anything moves
    if accelerator.is_main_process:
        step = load_trainer_state(checkpoint)["completed_steps"] if checkpoint is not None else 0
        abandon_checkpoints_after(checkpoints_dir, step)
    accelerator.wait_for_everyone()
    return checkpoint


# Signature entries added after checkpoints without them were written, with the value those checkpoints ran with.
SIGNATURE_DEFAULTS = {"text_tower_anchor": 0.0, "tag_among_named_colours": False}
# Signature entries added later whose value older checkpoints did not record and cannot be inferred (the default
# changed over time): a checkpoint without one resumes unchecked on it, as it did before.
SIGNATURE_UNRECORDED_BEFORE = ("visual_word_restoration",)


def check_run_signature(saved: Mapping, current: Mapping, checkpoint: str | os.PathLike) -> None:
    """Raise `CheckpointMismatchError` when the settings that fix data order and step arithmetic changed.

    Example:
    ```python
    >>> check_run_signature({"seed": 42}, {"seed": 7}, "checkpoint-400")
    Traceback (most recent call last):
    CheckpointMismatchError: checkpoint-400 was written by a run with other settings (seed: checkpoint 42 vs now 7); ...
    ```
    """
    saved = {**SIGNATURE_DEFAULTS, **saved}
    compared = {key: value for key, value in current.items() if key in saved or key not in SIGNATURE_UNRECORDED_BEFORE}
    differences = {key: (saved.get(key), value) for key, value in compared.items() if saved.get(key) != value}
    if differences:
        listed = ", ".join(f"{key}: checkpoint {old!r} vs now {new!r}" for key, (old, new) in differences.items())
        raise CheckpointMismatchError(
            f"{checkpoint} was written by a run with other settings ({listed}); resuming would not continue it. "
            "Use the original settings or start a new --output_dir."
        )


__all__ = [
    "ABANDONED_DIR",
    "CHECKPOINT_PREFIX",
    "COMPLETION_MARKER",
    "MODEL_SUBDIR",
    "ROLLBACK_JOURNAL",
    "TEMPORARY_PREFIX",
    "TRAINER_STATE_NAME",
    "CheckpointMismatchError",
    "abandon_checkpoints_after",
    "check_run_signature",
    "checkpoint_dir_for",
    "checkpoint_problem",
    "find_latest_checkpoint",
    "finish_abandoning",
    "list_checkpoints",
    "load_trainer_state",
    "mark_complete",
    "prune_checkpoints",
    "publish_checkpoint",
    "remove_temporary_checkpoints",
    "resolve_checkpoint",
    "save_model_folder",
    "save_training_checkpoint",
    "start_lineage",
    "temporary_dir_for",
]
