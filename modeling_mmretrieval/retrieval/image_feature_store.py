"""The persistent image-feature store: a frozen image tower's features of product photos, kept on disk between runs.

A frozen image tower gives a photo the same features in every run, so training (`precompute_image_features`),
indexing (`build_product_index`, `build_visual_index`) and evaluation read them back instead of running the tower
again. Entries are keyed by

- the sha256 of the image's encoded bytes (the file's bytes for a path; the decoded pixels for a PIL image), and
- a namespace: a hash of what `model.get_image_features` depends on (the image tower's config and weights: the
  vision model, plus the dual encoder's visual projection for 4tower), the image processor's settings (size,
  crop, normalisation, and whether the batched fast path makes the pixels) and the device type (accelerators
  compute slightly different features).

A changed tower, image size or device therefore never reads another's entries. Each namespace is a folder of
shards (`shard-*.npy`, one structured array per write: key, problem, float32 feature), each written to a hidden
temporary file and renamed into place (`atomic_files.write_bytes_atomically`), so a run killed mid-write leaves at
most a hidden `.partial` file that readers ignore (removed once stale), and concurrent writers (two training runs,
every process of a distributed run) never touch each other's files. Photos that cannot be decoded whatever the
settings (corrupt, truncated, degenerate) are remembered too, so they are not decoded again; a missing file, a URL
that was not fetched or an image over the size limit is not.

The default location is `$MMRETRIEVAL_CACHE/image_features`, `~/.cache/mmretrieval/image_features` without it.

Example:
```python
>>> store = ImageFeatureStore()  # ~/.cache/mmretrieval/image_features
>>> features = image_features_for_rows(model, processor, rows, CatalogueColumns(), store=store)
>>> store.flush(), (store.hits, store.computed)
(48, (0, 48))
>>> again = ImageFeatureStore()  # a later run
>>> image_features_for_rows(model, processor, rows, CatalogueColumns(), store=again)[0].equal(features[0])
True
>>> again.hits, again.computed
(48, 0)
```
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import time
import uuid
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import PIL
import torch

from ..atomic_files import write_bytes_atomically, write_json_atomically
from ..data.catalogue import CatalogueColumns
from ..data.images import (
    DEFAULT_MAX_IMAGE_PIXELS,
    ImageDecodeError,
    ImageLoadResult,
    ImageProblem,
    ImageReport,
    ImageStatus,
    is_image_url,
    load_product_image,
)
from ..data.images import (
    _resolve_source as resolve_image_source,  # the bytes `load_product_image` decodes
)

logger = logging.getLogger(__name__)

CACHE_ENV = "MMRETRIEVAL_CACHE"
DEFAULT_CACHE_DIR = Path("~/.cache/mmretrieval")
STORE_FOLDER = "image_features"
# Bumped when the way features are computed or stored changes, so old entries are never read.
STORE_FORMAT = 1
SHARD_PREFIX, SHARD_SUFFIX = "shard-", ".npy"
NAMESPACE_FILE = "namespace.json"
# Entries buffered before a shard is written: a killed run loses at most this many computed features.
FLUSH_ENTRIES = 4096
# More shards than this in a namespace are merged into one at the next write, so reads open few files.
MAX_SHARDS = 32
# A hidden temporary file older than this belongs to a writer that was killed; younger ones may be in flight.
STALE_PARTIAL_SECONDS = 3600
# Failures that depend on the image bytes alone (never on a size limit, a flag or the network): safe to remember.
REMEMBERED_PROBLEMS = (
    ImageProblem.UNDECODABLE, ImageProblem.TRUNCATED, ImageProblem.ZERO_SIZE, ImageProblem.DEGENERATE,
    ImageProblem.UNSUPPORTED_MODE,
)
_KEY_BYTES, _PROBLEM_BYTES = 64, 16  # hex sha256; the longest `ImageProblem` value


def default_image_feature_store_dir() -> Path:
    """Where the store lives by default: `$MMRETRIEVAL_CACHE/image_features`, else `~/.cache/mmretrieval/image_features`.

    Example: `default_image_feature_store_dir()` is `Path("/home/me/.cache/mmretrieval/image_features")`.
    """
    root = os.environ.get(CACHE_ENV) or DEFAULT_CACHE_DIR
    return Path(root).expanduser() / STORE_FOLDER


# ----------------------------------------------------------------------------------------------------------------
# Keys
# ----------------------------------------------------------------------------------------------------------------


def _digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def image_content_key(value: Any, *, fetch_urls: bool = False) -> tuple[str, Any]:
    """`(sha256 of the image's bytes, what to decode)` for a catalogue image value.

    Encoded bytes (a `datasets.Image` dict, raw bytes, a file's contents, a downloaded URL) are hashed as they are;
    a PIL image by its mode, size and pixels. What to decode is the value itself, or the downloaded bytes for a
    URL so it is not fetched twice. A value with nothing to hash raises `ImageDecodeError` (missing, empty, a URL
    without `fetch_urls`); a value of an unsupported type raises `TypeError`.

    Example:
    ```python
    >>> key, _ = image_content_key({"bytes": png_bytes, "path": None})
    >>> key == hashlib.sha256(png_bytes).hexdigest()
    True
    ```
    """
    source = resolve_image_source(value, fetch_urls)
    if isinstance(source, bytes):
        path = value.get("path") if isinstance(value, Mapping) and value.get("bytes") is None else value
        return hashlib.sha256(source).hexdigest(), source if is_image_url(path) else value
    # Everything decoding reads besides the pixels: the palette, transparency and EXIF orientation.
    details = (source.mode, source.size, source.getpalette(), source.info.get("transparency"),
               source.getexif().get(0x0112))
    digest = hashlib.sha256(f"pil\0{details}\0".encode())
    digest.update(source.tobytes())
    return digest.hexdigest(), value


def _image_tower_parts(model) -> tuple[list[torch.nn.Module], Any]:
    """The modules `model.get_image_features` runs, and the config that describes them."""
    tower = model.image_tower
    if getattr(model, "dual_encoder", None) is None:
        return [tower], tower.config
    # A dual encoder's image features are its vision model plus (CLIP, VisionTextDualEncoder) its visual projection;
    # its text half never changes them.
    parts = [getattr(tower, name) for name in ("vision_model", "visual_projection") if getattr(tower, name, None) is not None]
    config = getattr(tower.config, "vision_config", None) or tower.config
    return (parts or [tower]), {"vision": config, "projection_dim": getattr(tower.config, "projection_dim", None)}


def _config_dict(config) -> Any:
    if isinstance(config, Mapping):
        return {key: _config_dict(value) for key, value in config.items()}
    return config.to_dict() if hasattr(config, "to_dict") else config


def image_tower_fingerprint(model) -> str:
    """A hash of everything `model.get_image_features` depends on: the image tower's class, config and weights
    (the dual encoder's vision model and visual projection for 4tower; nothing of the text towers or fusion), and the
    colour description's settings when the model appends one.

    Example:
    ```python
    >>> image_tower_fingerprint(model) == image_tower_fingerprint(MultimodalRetrievalModel.from_pretrained(folder))
    True
    ```
    """
    from .search import (  # search imports this module
        config_fingerprint,
        weights_fingerprint,
    )

    parts, config = _image_tower_parts(model)
    described = {"config": _config_dict(config), "tower": type(model.image_tower).__name__}
    levels = getattr(model.config, "colour_histogram_levels", 0)
    if levels:  # the colour description follows the tower's features (absent: the namespaces stay those of before)
        described["colour_histogram"] = [levels, model.config.colour_histogram_pixel_mean,
                                         model.config.colour_histogram_pixel_std]
    # `config_fingerprint` takes anything with `to_dict` and drops load-time keys (paths, dtype) at any depth.
    settings = SimpleNamespace(to_dict=lambda: described)
    return _digest(STORE_FORMAT, config_fingerprint(settings), [weights_fingerprint(part) for part in parts])


def image_processor_settings(processor) -> dict:
    """The settings that decide the pixels the tower sees: the image processor's (size, crop, rescale,
    normalisation; not its bookkeeping keys) and, when on, the batched fast path's.

    Example: `image_processor_settings(processor)["size"]` is `{'shortest_edge': 112}`.
    """
    settings = {key: value for key, value in processor.image_processor.to_dict().items()
                if not key.startswith("_") and key != "processor_class"}
    batched = processor.batched_image_processor
    settings["batched_image_processor"] = repr(batched) if batched is not None else None
    return settings


def image_feature_namespace(model, processor) -> str:
    """The store's namespace of `model`'s image features as `processor` feeds them: tower fingerprint, image
    processor settings, device type and Pillow version, hashed (see the module docstring).

    Example: `image_feature_namespace(model, processor)` is a 32-character hex string.
    """
    device = next(model.parameters()).device.type
    # Pillow decides which images decode (and how): another version starts a fresh namespace.
    return _digest(image_tower_fingerprint(model), image_processor_settings(processor), device, PIL.__version__)[:32]


# ----------------------------------------------------------------------------------------------------------------
# The store
# ----------------------------------------------------------------------------------------------------------------


def _shard_dtype(feature_size: int) -> np.dtype:
    return np.dtype([("key", f"S{_KEY_BYTES}"), ("problem", f"S{_PROBLEM_BYTES}"), ("feature", "<f4", (feature_size,))])


class ImageFeatureNamespace:
    """The entries of one namespace (one image tower fed by one image processor on one device type): `lookup`
    reads them, `add` buffers new ones and `flush` writes them as one shard. Made by `ImageFeatureStore.namespace`."""

    def __init__(self, store: "ImageFeatureStore", name: str, feature_size: int, description: Mapping | None = None):
        self.store, self.name, self.feature_size = store, name, int(feature_size)
        self.directory = store.directory / name
        self.description = dict(description or {})
        self._entries: dict[str, tuple[np.ndarray, int]] = {}
        self._shards_read: set[str] = set()
        self._pending: list[tuple[str, np.ndarray | None, ImageProblem | None]] = []

    def _shard_names(self) -> list[str]:
        try:
            return sorted(entry.name for entry in os.scandir(self.directory)
                          if entry.name.startswith(SHARD_PREFIX) and entry.name.endswith(SHARD_SUFFIX))
        except FileNotFoundError:
            return []
        except OSError as error:  # unreadable: run as if empty, it is only a cache
            logger.warning(f"image-feature store: cannot list {self.directory}: {error}")
            return []

    def _read_shard(self, name: str, mmap: bool = True) -> np.ndarray | None:
        """A shard's rows, or None (with a warning) when it vanished (merged by another process) or is unreadable."""
        try:
            rows = np.load(self.directory / name, mmap_mode="r" if mmap else None, allow_pickle=False)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as error:
            logger.warning(f"image-feature store: skipping unreadable shard {self.directory / name}: {error}")
            return None
        if rows.dtype != _shard_dtype(self.feature_size) or rows.ndim != 1:
            logger.warning(f"image-feature store: skipping shard {self.directory / name} of another layout {rows.dtype}")
            return None
        return rows

    def _refresh(self) -> None:
        """Index the shards written since the last look (by this process or any other)."""
        for name in self._shard_names():
            if name in self._shards_read:
                continue
            self._shards_read.add(name)
            rows = self._read_shard(name)
            if rows is None:
                continue
            for position, key in enumerate(rows["key"].tolist()):
                self._entries.setdefault(key.decode(), (rows, position))

    def lookup(self, keys: Sequence[str]) -> dict[str, torch.Tensor | ImageProblem]:
        """The stored entry of every key found: a float32 feature, or the `ImageProblem` of an undecodable image.

        Example: `namespace.lookup([key])` is `{key: tensor([...])}` once `key` was added and flushed.
        """
        self._refresh()
        found = {}
        for key in keys:
            entry = self._entries.get(key)
            if entry is None:
                continue
            rows, position = entry
            problem = rows["problem"][position].decode()
            found[key] = ImageProblem(problem) if problem else torch.from_numpy(np.array(rows["feature"][position]))
        return found

    def add(self, key: str, feature: torch.Tensor | None = None, problem: ImageProblem | None = None) -> None:
        """Buffer one entry (a feature, or the problem of an image that cannot be decoded); a shard is written
        every `FLUSH_ENTRIES` entries and at `flush`."""
        if (feature is None) == (problem is None):
            raise ValueError("an entry is either a feature or a problem")
        if feature is not None:
            feature = feature.detach().float().cpu().numpy()
            if feature.shape != (self.feature_size,):
                raise ValueError(f"feature of shape {feature.shape} in a namespace of width {self.feature_size}")
        self._pending.append((key, feature, problem))
        if len(self._pending) >= FLUSH_ENTRIES:
            self.flush()

    def flush(self) -> int:
        """Write the buffered entries as one new shard (atomically; nothing when none are buffered); returns how many.
        A store that cannot be written (read-only, disk full) is warned about, never fatal: it is a cache."""
        pending, self._pending = self._pending, []
        if not pending:
            return 0
        rows = np.zeros(len(pending), dtype=_shard_dtype(self.feature_size))
        for position, (key, feature, problem) in enumerate(pending):
            rows[position]["key"] = key.encode()
            if feature is not None:
                rows[position]["feature"] = feature
            else:
                rows[position]["problem"] = problem.value.encode()
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            if not (self.directory / NAMESPACE_FILE).exists():  # for people: what the namespace holds
                write_json_atomically(self.directory / NAMESPACE_FILE, {"format": STORE_FORMAT, **self.description})
            self._write_shard(rows)
            self._tidy()
        except OSError as error:
            logger.warning(f"image-feature store: could not write {len(rows)} entries to {self.directory}: {error}")
            return 0
        return len(rows)

    def _write_shard(self, rows: np.ndarray) -> None:
        payload = io.BytesIO()
        np.save(payload, rows, allow_pickle=False)
        # Unique per writer and write: concurrent writers never share a file, and names sort by time.
        name = f"{SHARD_PREFIX}{time.time_ns():020d}-{os.getpid()}-{uuid.uuid4().hex[:8]}{SHARD_SUFFIX}"
        write_bytes_atomically(self.directory / name, payload.getvalue())

    def _tidy(self) -> None:
        """Remove temporary files left by killed writers, and merge the shards when there are too many."""
        now = time.time()
        for entry in os.scandir(self.directory):
            if entry.name.startswith(".") and entry.name.endswith(".partial"):
                try:
                    if now - entry.stat().st_mtime > STALE_PARTIAL_SECONDS:
                        os.unlink(entry.path)
                except FileNotFoundError:
                    pass
        names = self._shard_names()
        if len(names) > MAX_SHARDS:
            self.compact(names)

    def compact(self, names: Sequence[str] | None = None) -> None:
        """Merge shards (all of them by default) into one, then delete them.

        Safe with concurrent readers and writers: the merged shard is complete before any old one goes, a reader
        that already opened an old shard keeps reading it, and shards written meanwhile are left alone. Two
        processes merging at once only leave duplicate entries, which read the same.
        """
        names = list(names if names is not None else self._shard_names())
        parts = [rows for rows in (self._read_shard(name, mmap=False) for name in names) if rows is not None]
        if parts:
            merged = np.concatenate(parts)
            _, first = np.unique(merged["key"], return_index=True)
            self._write_shard(merged[np.sort(first)])
        for name in names:
            (self.directory / name).unlink(missing_ok=True)


class ImageFeatureStore:
    """The persistent image-feature store in `directory` (default: `default_image_feature_store_dir()`): one
    sub-folder per namespace (`image_feature_namespace`), with `hits` and `computed` counts of its use.

    Example:
    ```python
    >>> store = ImageFeatureStore("/data/cache/image_features")
    >>> cache = precompute_image_features(model, processor, catalogue, store=store)
    >>> store.summary()
    'image-feature store: 970 read, 30 computed (/data/cache/image_features)'
    ```
    """

    def __init__(self, directory: str | os.PathLike | None = None):
        self.directory = Path(directory).expanduser() if directory is not None else default_image_feature_store_dir()
        self.hits = 0  # products answered from disk (a feature, or a remembered undecodable image)
        self.computed = 0  # products whose image went through the tower
        self._namespaces: dict[str, ImageFeatureNamespace] = {}
        # id(model) -> (a weak reference to it, the signature its namespace was computed for, the namespace)
        self._fingerprints: dict[int, tuple[weakref.ref, tuple, str]] = {}

    def __repr__(self) -> str:
        return f"ImageFeatureStore({str(self.directory)!r})"

    def namespace(self, model, processor) -> ImageFeatureNamespace:
        """The namespace of `model`'s image features as `processor` feeds them (see `image_feature_namespace`).

        The weights are hashed again only when one of them changed (tensor version counters), so calling this
        for every batch costs nothing.
        """
        parts, _ = _image_tower_parts(model)
        tensors = [tensor for part in parts for tensor in (*part.parameters(), *part.buffers())]
        signature = (tuple((id(tensor), tensor._version) for tensor in tensors),
                     json.dumps(image_processor_settings(processor), sort_keys=True, default=str),
                     next(model.parameters()).device.type)
        known = self._fingerprints.get(id(model))
        if known is None or known[0]() is not model or known[1] != signature:
            known = (weakref.ref(model), signature, image_feature_namespace(model, processor))
            self._fingerprints[id(model)] = known
        name = known[2]
        if name not in self._namespaces:
            description = {"image_tower": type(model.image_tower).__name__,
                           "model": getattr(model.config, "name_or_path", None), "device": signature[2],
                           "image_processor": image_processor_settings(processor)}
            self._namespaces[name] = ImageFeatureNamespace(self, name, model.image_feature_size, description)
        return self._namespaces[name]

    def flush(self) -> int:
        """Write every namespace's buffered entries; returns how many were written."""
        return sum(namespace.flush() for namespace in self._namespaces.values())

    def summary(self) -> str:
        """One line for a run's log: entries read and computed, and where."""
        return f"image-feature store: {self.hits} read, {self.computed} computed ({self.directory})"


def image_feature_store_from_args(args) -> ImageFeatureStore | None:
    """The store named by a command's `--image_feature_store DIR` / `--no_image_feature_store` flags
    (`commands.common.add_image_arguments`): the default location unless turned off; None for a namespace that
    has no such flags.

    Example: `image_feature_store_from_args(parser.parse_args(["--no_image_feature_store"]))` is None.
    """
    if getattr(args, "no_image_feature_store", False) or not hasattr(args, "image_feature_store"):
        return None
    return ImageFeatureStore(args.image_feature_store)


# ----------------------------------------------------------------------------------------------------------------
# Image features of product rows
# ----------------------------------------------------------------------------------------------------------------


def _computed_features(model, processor, images: list) -> tuple[torch.Tensor, list[bool]]:
    inputs = processor.encode_images(images)
    device = next(model.parameters()).device
    features = model.get_image_features(inputs["pixel_values"].to(device), inputs["image_mask"].to(device))
    return features.float().cpu(), inputs["image_mask"].tolist()


def _load_image(row: Mapping, value: Any, columns: CatalogueColumns, max_image_pixels, fetch_images) -> ImageLoadResult:
    try:
        return load_product_image(value, max_pixels=max_image_pixels, fetch_urls=fetch_images)
    except TypeError as error:  # a wrong-typed image value, e.g. a number
        raise TypeError(f"product {row.get(columns.product_id)!r}, column {columns.image!r}: {error}") from error


def _stored_problem_result(problem: ImageProblem) -> ImageLoadResult:
    return ImageLoadResult(image=None, reason=problem,
                           error=f"{problem.value.replace('_', ' ')} image (remembered by the image-feature store)")


@torch.no_grad()
def image_features_for_rows(model, processor, rows: Sequence[Mapping], columns: CatalogueColumns,
                            max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS, *, fetch_images: bool = False,
                            report: ImageReport | None = None,
                            store: ImageFeatureStore | None = None) -> list[torch.Tensor | None]:
    """Image-tower features (float32, CPU) of product rows, `None` for a product without a decodable image.

    `fetch_images` downloads `http(s)://` images (refused by default); `report` counts how each image loaded.
    With a `store`, every row is looked up first and only the misses are decoded and run through the tower (in
    float32, outside any autocast, so stored entries are exact); their features are buffered into the store
    (call `store.flush()` when done). The features equal those computed without the store.

    Example:
    ```python
    >>> features = image_features_for_rows(model, processor, catalogue.select(range(4)).to_list(), CatalogueColumns())
    >>> [None if feature is None else tuple(feature.shape) for feature in features]
    [(384,), (384,), None, (384,)]
    ```
    """
    report = report if report is not None else ImageReport()
    values = [row.get(columns.image) for row in rows]
    if store is None or model.image_tower.training:  # a tower with live dropout has no fixed features to keep
        results = [_load_image(row, value, columns, max_image_pixels, fetch_images) for row, value in zip(rows, values)]
        for row, result in zip(rows, results):
            report.add(row.get(columns.product_id), result)
        features, has_image = _computed_features(model, processor, [result.image for result in results])
        return [feature if present else None for feature, present in zip(features, has_image)]

    namespace = store.namespace(model, processor)
    keys: list[str | None] = [None] * len(rows)
    for position, (row, value) in enumerate(zip(rows, values)):
        try:
            keys[position], values[position] = image_content_key(value, fetch_urls=fetch_images)
        except ImageDecodeError:
            pass  # nothing to hash (missing, empty, a refused URL): decoding below says why, cheaply
        except TypeError as error:
            raise TypeError(f"product {row.get(columns.product_id)!r}, column {columns.image!r}: {error}") from error
    stored = namespace.lookup([key for key in keys if key is not None])
    outputs: list[torch.Tensor | None] = [None] * len(rows)
    misses, miss_results = [], []
    for position, (row, key) in enumerate(zip(rows, keys)):
        product_id = row.get(columns.product_id)
        entry = stored.get(key) if key is not None else None
        if isinstance(entry, torch.Tensor):
            outputs[position] = entry
            report.record(product_id, ImageStatus.OK)
        elif entry is not None:
            report.add(product_id, _stored_problem_result(entry))
        else:
            result = _load_image(row, values[position], columns, max_image_pixels, fetch_images)
            report.add(product_id, result)
            misses.append(position)
            miss_results.append(result)
    store.hits += len(rows) - len(misses)
    if any(result.has_image for result in miss_results):
        device_type = next(model.parameters()).device.type
        with torch.autocast(device_type, enabled=False):
            features, has_image = _computed_features(model, processor, [result.image for result in miss_results])
        for position, feature, present in zip(misses, features, has_image):
            if present:
                outputs[position] = feature
                store.computed += 1
                if keys[position] is not None:
                    namespace.add(keys[position], feature)
    for position, result in zip(misses, miss_results):
        if keys[position] is not None and result.reason in REMEMBERED_PROBLEMS:
            namespace.add(keys[position], problem=result.reason)
    return outputs


class _BatchImageFeatures(dict):
    """One batch's features by product id, with the report of how their images loaded (read by the collator)."""

    def __init__(self, *args, image_report: ImageReport, feature_size: int | None = None):
        super().__init__(*args)
        self.image_report, self.feature_size = image_report, feature_size


class ImageFeatureStoreCollator:
    """A product `RetrievalCollator` whose images come through an `ImageFeatureStore`: each batch's features are
    read from the store (the misses computed and added), then handed to the collator as cached features.
    Everything else is the wrapped collator's (`columns`, `image_report`, ...). Call `flush` at the end.

    Example:
    ```python
    >>> collator = with_image_feature_store(RetrievalCollator(processor, with_queries=False), model, processor, store)
    >>> batch = collator(rows)  # image_features + image_mask instead of pixel_values
    >>> collator.flush()
    ```
    """

    def __init__(self, collator, model, processor, store: ImageFeatureStore):
        self.collator, self.model, self.processor, self.store = collator, model, processor, store

    def __getattr__(self, name: str):
        return getattr(self.collator, name)

    def __call__(self, rows: Sequence[Mapping]) -> dict:
        collator, batch_report = self.collator, ImageReport()
        features = image_features_for_rows(
            self.model, self.processor, rows, collator.columns, collator.max_image_pixels,
            fetch_images=collator.fetch_images, report=batch_report, store=self.store,
        )
        ids = [str(row.get(collator.columns.product_id)) for row in rows]
        collator.image_features = _BatchImageFeatures(zip(ids, features), image_report=batch_report)
        try:
            return collator(rows)
        finally:
            collator.image_features = None

    def flush(self) -> int:
        return self.store.flush()


def with_image_feature_store(collator, model, processor, store: ImageFeatureStore | None):
    """`collator` reading its images' features through `store` (`ImageFeatureStoreCollator`), or `collator` itself
    when there is no store, the model takes no images, the collator already has cached features, or it must stop
    at the first bad image (`on_image_error="raise"`, which needs the images decoded).

    Example: `collator = with_image_feature_store(collator, model, processor, ImageFeatureStore())`.
    """
    usable = (store is not None and collator.uses_images and collator.image_features is None
              and collator.on_image_error == "mask" and model.image_tower is not None)
    return ImageFeatureStoreCollator(collator, model, processor, store) if usable else collator


__all__ = [
    "CACHE_ENV",
    "ImageFeatureNamespace",
    "ImageFeatureStore",
    "ImageFeatureStoreCollator",
    "default_image_feature_store_dir",
    "image_content_key",
    "image_feature_namespace",
    "image_feature_store_from_args",
    "image_features_for_rows",
    "image_processor_settings",
    "image_tower_fingerprint",
    "with_image_feature_store",
]
