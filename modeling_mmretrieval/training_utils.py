"""Building blocks of the training script (`examples/train.py`): optimizer groups, schedule, data order,
image-feature cache, crash-safe checkpoints, evaluation queries from a query column, results table, Hub upload.

They hold the parts of a training run that must be exactly right (which parameters decay, how a resumed run
finds its place in the data, when a checkpoint counts as written) so the script itself reads as a recipe.

Example:
```python
>>> from modeling_mmretrieval.training_utils import find_latest_checkpoint, parameter_groups
>>> groups = parameter_groups(model, tower_learning_rate=2e-5, head_learning_rate=1e-3, weight_decay=0.01)
>>> [group["name"] for group in groups]  # a frozen image tower is in none of them
['towers', 'towers_no_decay', 'head', 'head_no_decay']
>>> find_latest_checkpoint("outputs/run/checkpoints")  # newest complete checkpoint, or None
```
"""

import hashlib
import json
import math
import os
import random
import re
import shutil
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch
from torch.utils.data import Sampler
from tqdm.auto import tqdm
from transformers import get_scheduler
from transformers.utils import logging

from .data import CatalogueColumns, EvaluationQuery, normalise_value
from .image_loading import DEFAULT_MAX_IMAGE_PIXELS, load_product_image
from .index import fsync_path, row_batches

TOWER_MODULES = ("text_model", "product_text_model", "dual_encoder", "vision_model")
SCHEDULER_TYPES = ("linear", "cosine", "constant")
CHECKPOINT_PREFIX = "checkpoint-"
TEMPORARY_PREFIX = ".tmp-"
COMPLETION_MARKER = "checkpoint_complete.json"
TRAINER_STATE_NAME = "trainer_state.json"
# Image towers that interpolate their position embeddings, so they accept any (patch-multiple) image size.
RESIZABLE_VISION_MODEL_TYPES = ("dinov2", "dinov2_with_registers")
REPORTED_METRICS = ("recall@10", "recall@100", "ndcg@10", "mrr@10", "map")

logger = logging.get_logger(__name__)

_CHECKPOINT_NAME = re.compile(rf"^{re.escape(CHECKPOINT_PREFIX)}(\d+)$")
_HASH_BLOCK_BYTES = 1 << 20


class NonFiniteLossError(FloatingPointError):
    """A training step produced a NaN/inf loss or gradient norm (raised under `nan_policy="stop"`)."""


class CheckpointMismatchError(ValueError):
    """A checkpoint was written by a run whose data order or step arithmetic differs from the current one."""


# ----------------------------------------------------------------------------------------------------------------
# Optimizer, schedule and training length
# ----------------------------------------------------------------------------------------------------------------


def is_tower_parameter(name: str) -> bool:
    """Whether a parameter of `MultimodalRetrievalModel` belongs to a pretrained tower (vs. the head:
    projections, fusion MLPs, the missing-image embedding and the logit scale)."""
    return name.split(".", 1)[0] in TOWER_MODULES


def is_no_decay_parameter(name: str, parameter: torch.Tensor) -> bool:
    """Biases, normalisation weights, the logit scale and other vectors are not weight-decayed.

    Decay pulls weights towards zero, which only makes sense for matrices: shrinking a LayerNorm gain, a bias or
    the (log) temperature changes what the model computes instead of regularising it.
    """
    return parameter.ndim <= 1 or name.endswith("bias") or "logit_scale" in name


def parameter_groups(
    model: torch.nn.Module, *, tower_learning_rate: float, head_learning_rate: float, weight_decay: float
) -> list[dict]:
    """AdamW parameter groups: towers and head at their own learning rate, each split into decay / no-decay.

    Frozen parameters (`requires_grad=False`, e.g. a frozen image tower) are left out. Each group carries a
    `name` for logging. Empty groups are dropped.

    Example:
    ```python
    >>> optimizer = torch.optim.AdamW(parameter_groups(model, tower_learning_rate=2e-5, head_learning_rate=1e-3,
    ...                                                weight_decay=0.01))
    ```
    """
    buckets: dict[str, list[torch.nn.Parameter]] = {
        "towers": [], "towers_no_decay": [], "head": [], "head_no_decay": []
    }
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        part = "towers" if is_tower_parameter(name) else "head"
        buckets[part + ("_no_decay" if is_no_decay_parameter(name, parameter) else "")].append(parameter)
    settings = {
        "towers": (tower_learning_rate, weight_decay),
        "towers_no_decay": (tower_learning_rate, 0.0),
        "head": (head_learning_rate, weight_decay),
        "head_no_decay": (head_learning_rate, 0.0),
    }
    groups = [
        {"name": name, "params": params, "lr": settings[name][0], "weight_decay": settings[name][1]}
        for name, params in buckets.items()
        if params
    ]
    if not groups:
        raise ValueError("The model has no trainable parameters; check the freeze settings.")
    return groups


def warmup_steps_for(total_steps: int, warmup_steps: int | None, warmup_ratio: float) -> int:
    """Warmup length: `warmup_steps` when given, else `ceil(warmup_ratio * total_steps)`."""
    if warmup_steps is not None:
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        return warmup_steps
    if not 0.0 <= warmup_ratio < 1.0:
        raise ValueError(f"warmup_ratio must lie in [0, 1), got {warmup_ratio}")
    return math.ceil(warmup_ratio * total_steps)


def build_lr_scheduler(optimizer, scheduler_type: str, *, num_warmup_steps: int, num_training_steps: int):
    """A `transformers` schedule: linear or cosine decay after warmup, or constant after warmup."""
    if scheduler_type not in SCHEDULER_TYPES:
        raise ValueError(f"lr_scheduler_type must be one of {list(SCHEDULER_TYPES)}, got {scheduler_type!r}")
    name = "constant_with_warmup" if scheduler_type == "constant" else scheduler_type
    return get_scheduler(name, optimizer, num_warmup_steps=num_warmup_steps, num_training_steps=num_training_steps)


def training_length(
    batches_per_epoch: int, gradient_accumulation_steps: int, num_train_epochs: float, max_train_steps: int | None
) -> tuple[int, int, int]:
    """`(update_steps_per_epoch, max_train_steps, num_epochs)` of a run.

    An epoch's last, incomplete accumulation window still makes an optimizer step (accelerate syncs at the end
    of the dataloader). `max_train_steps`, when given, wins over `num_train_epochs`.
    """
    if batches_per_epoch < 1:
        raise ValueError("The training dataloader is empty: fewer training pairs than one batch (drop_last=True).")
    steps_per_epoch = math.ceil(batches_per_epoch / gradient_accumulation_steps)
    if max_train_steps is None:
        if num_train_epochs <= 0:
            raise ValueError(f"num_train_epochs must be > 0, got {num_train_epochs}")
        max_train_steps = math.ceil(num_train_epochs * steps_per_epoch)
    elif max_train_steps < 1:
        raise ValueError(f"max_train_steps must be >= 1, got {max_train_steps}")
    return steps_per_epoch, max_train_steps, math.ceil(max_train_steps / steps_per_epoch)


def check_mixed_precision_supported(mixed_precision: str, device: torch.device) -> None:
    """Raise for a mixed-precision mode the device cannot run (accelerate silently trains fp16 on CPU in fp32)."""
    if mixed_precision == "fp16" and device.type == "cpu":
        raise ValueError("--mixed_precision fp16 needs a GPU; on CPU use --mixed_precision bf16 or no.")
    if mixed_precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError("This GPU does not support bf16; use --mixed_precision fp16 (with its loss scaler) or no.")


def all_finite(*values: torch.Tensor | float | None) -> bool:
    """Whether every given number is finite (`None` entries are ignored)."""
    return all(bool(torch.isfinite(torch.as_tensor(value)).all()) for value in values if value is not None)


# ----------------------------------------------------------------------------------------------------------------
# Data order
# ----------------------------------------------------------------------------------------------------------------


class EpochSeededSampler(Sampler[int]):
    """Shuffles `range(num_rows)` with a permutation that depends only on `(seed, epoch)`.

    Every process computes the same order (accelerate then gives each its share of every batch) and a resumed
    run recomputes exactly the order of the interrupted epoch, so skipping the batches already seen puts it
    at the same position. Global RNG state is never touched.

    Example:
    ```python
    >>> sampler = EpochSeededSampler(5, seed=0)
    >>> sampler.set_epoch(1)
    >>> sorted(sampler) == [0, 1, 2, 3, 4]
    True
    ```
    """

    def __init__(self, num_rows: int, seed: int):
        self.num_rows = num_rows
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.num_rows, generator=generator).tolist())

    def __len__(self) -> int:
        return self.num_rows


# ----------------------------------------------------------------------------------------------------------------
# Image processor size and the frozen image-feature cache
# ----------------------------------------------------------------------------------------------------------------


def resize_image_processor(image_processor, image_size: int) -> None:
    """Make `image_processor` output `image_size x image_size` pixels, keeping its resize-then-crop recipe.

    Catalogue photos are small (60x80 for the fashion catalogue), so upscaling them to 224 px only multiplies
    the image tower's cost by 4 (ViT cost grows with the number of 14x14 patches). The shortest edge is
    resized to `image_size` and, for processors that centre-crop, the crop is `image_size` square.
    """
    if image_size < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    size = dict(image_processor.size)
    if "shortest_edge" in size:
        image_processor.size = {"shortest_edge": image_size}
    else:
        image_processor.size = {"height": image_size, "width": image_size}
    if getattr(image_processor, "do_center_crop", False):
        image_processor.crop_size = {"height": image_size, "width": image_size}


def check_image_size_supported(image_tower, image_size: int) -> None:
    """Raise unless `image_tower` can embed `image_size` images.

    DINOv2 interpolates its position embeddings to any input; CLIP, SigLIP and ViT towers only do so when
    called with `interpolate_pos_encoding=True`, which the retrieval model does not pass, so they must get
    their native size.
    """
    config = image_tower.config
    vision_config = getattr(config, "vision_config", None) or config
    native = getattr(vision_config, "image_size", None)
    if vision_config.model_type in RESIZABLE_VISION_MODEL_TYPES or image_size == native:
        return
    raise ValueError(
        f"--image_size {image_size} is not supported by a {config.model_type!r} image tower (native size {native}); "
        f"only {list(RESIZABLE_VISION_MODEL_TYPES)} towers interpolate their position embeddings. Leave --image_size "
        "unset for this tower."
    )


def set_image_tower_frozen(model, frozen: bool) -> None:
    """Freeze (eval mode, no gradients) or unfreeze the image tower and record it in the config."""
    if model.image_tower is None:
        return
    model.config.freeze_image_towers = frozen
    model.image_tower.requires_grad_(True)
    model.train(model.training)  # the model re-applies its freezing rules (which parts, eval mode) from the config


def _images_of(rows: Sequence[Mapping], columns: CatalogueColumns, max_image_pixels: int | None) -> list:
    return [load_product_image(row.get(columns.image), max_pixels=max_image_pixels).image for row in rows]


@torch.no_grad()
def image_features_for_rows(model, processor, rows: Sequence[Mapping], columns: CatalogueColumns,
                            max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> list[torch.Tensor | None]:
    """Image-tower features (float32, CPU) of product rows, `None` for a product without a decodable image."""
    inputs = processor.encode_images(_images_of(rows, columns, max_image_pixels))
    device = next(model.parameters()).device
    features = model.get_image_features(inputs["pixel_values"].to(device), inputs["image_mask"].to(device))
    features = features.float().cpu()
    return [feature if has_image else None for feature, has_image in zip(features, inputs["image_mask"].tolist())]


def precompute_image_features(
    model,
    processor,
    catalogue,
    *,
    columns: CatalogueColumns | None = None,
    batch_size: int = 64,
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    show_progress: bool = True,
) -> dict[str, torch.Tensor | None]:
    """Image-tower features of every product of `catalogue`, by product id, for `RetrievalCollator(image_features=)`.

    Only valid for a frozen image tower: it runs in eval mode without autograd, so its features are the same
    at every step and computing them once replaces `epochs x` tower passes by one. Products whose image cannot
    be decoded map to `None` (image-less, as the collator would have made them).

    Example:
    ```python
    >>> cache = precompute_image_features(model, processor, catalogue)
    >>> collator = RetrievalCollator(processor, image_features=cache)
    ```
    """
    columns = columns or CatalogueColumns()
    if model.image_tower is None:
        raise ValueError("A text-only model has no image tower whose features could be cached.")
    if not model.image_features_are_frozen:
        raise ValueError(
            "Cached image features are only valid for a frozen image tower (and, for 4tower, a frozen projection); "
            "a trained one changes them at every step. Drop --cache_image_features or keep --freeze_image_towers."
        )
    cache: dict[str, torch.Tensor | None] = {}
    batches = row_batches(catalogue, batch_size)
    progress = tqdm(batches, total=math.ceil(len(catalogue) / batch_size), desc="Caching image features",
                    disable=not show_progress)
    for rows in progress:
        features = image_features_for_rows(model, processor, rows, columns, max_image_pixels)
        cache.update({str(row[columns.product_id]): feature for row, feature in zip(rows, features)})
    return cache


CACHED_FEATURE_TOLERANCE_CPU = 1e-4
CACHED_FEATURE_TOLERANCE_ACCELERATOR = 1e-2


def check_cached_image_features(
    model, processor, rows: Sequence[Mapping], cache: Mapping[str, torch.Tensor | None], *,
    columns: CatalogueColumns | None = None, tolerance: float | None = None
) -> float:
    """Recompute the features of `rows` and compare them with `cache`; returns the largest absolute difference.

    Raises `ValueError` when they disagree by more than `tolerance` (default: 1e-4 for a model on the CPU,
    1e-2 on an accelerator, whose TF32 convolutions differ by about 1e-3 between batch sizes), e.g. because the
    image tower runs with dropout or the processor changed after the cache was built.
    """
    columns = columns or CatalogueColumns()
    if tolerance is None:
        # GPUs convolve in TF32 by default and pick kernels by batch size: about 1e-3 apart between batches.
        on_cpu = next(model.parameters()).device.type == "cpu"
        tolerance = CACHED_FEATURE_TOLERANCE_CPU if on_cpu else CACHED_FEATURE_TOLERANCE_ACCELERATOR
    recomputed = image_features_for_rows(model, processor, rows, columns)
    largest = 0.0
    for row, fresh in zip(rows, recomputed):
        cached = cache[str(row[columns.product_id])]
        if (cached is None) != (fresh is None):
            raise ValueError(f"Cached image of product {row[columns.product_id]!r} disagrees on being decodable.")
        if fresh is not None:
            largest = max(largest, float((cached - fresh).abs().max()))
    if largest > tolerance:
        raise ValueError(
            f"Cached image features differ from recomputed ones by {largest:.2e} (> {tolerance:g}); is the image "
            "tower really frozen and in eval mode?"
        )
    return largest


# ----------------------------------------------------------------------------------------------------------------
# Datasets that already carry queries
# ----------------------------------------------------------------------------------------------------------------


def unique_products(dataset, columns: CatalogueColumns):
    """The first row of every product id (a catalogue built from (query, product) rows)."""
    seen: set[str] = set()
    keep = []
    for index, product_id in enumerate(dataset[columns.product_id]):
        if str(product_id) not in seen:
            seen.add(str(product_id))
            keep.append(index)
    return dataset if len(keep) == len(dataset) else dataset.select(keep)


def evaluation_queries_from_column(
    dataset, *, columns: CatalogueColumns, num_queries: int, seed: int
) -> list[EvaluationQuery]:
    """Evaluation queries read from the dataset's query column: every product a query text is paired with is
    relevant to it. Queries are sampled (seeded) when there are more than `num_queries`.

    Example:
    ```python
    >>> queries = evaluation_queries_from_column(split, columns=CatalogueColumns(query="search_term"),
    ...                                          num_queries=500, seed=0)
    ```
    """
    relevant: dict[str, set[str]] = {}
    texts: dict[str, str] = {}
    for text, product_id in zip(dataset[columns.query], dataset[columns.product_id]):
        if not isinstance(text, str) or not text.strip():
            continue
        key = normalise_value(text)
        texts.setdefault(key, text.strip())
        relevant.setdefault(key, set()).add(str(product_id))
    keys = sorted(relevant)
    random.Random(seed).shuffle(keys)
    return [
        EvaluationQuery(
            query_id=f"q{position:05d}",
            text=texts[key],
            attributes={},
            relevant_ids=relevant[key],
            source_product_id=min(relevant[key]),
            colour_absent_from_titles=False,
            template="dataset",
        )
        for position, key in enumerate(keys[:num_queries])
    ]


# ----------------------------------------------------------------------------------------------------------------
# Crash-safe checkpoints
# ----------------------------------------------------------------------------------------------------------------


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_HASH_BLOCK_BYTES), b""):
            digest.update(block)
    return digest.hexdigest()


def _checkpoint_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name != COMPLETION_MARKER)


def write_json_atomically(path: str | os.PathLike, payload) -> None:
    """Write JSON to `path` through a temporary file and `os.replace`, so readers never see half a file."""
    path = Path(path)
    temporary = path.with_name(f"{TEMPORARY_PREFIX}{path.name}")
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=2, sort_keys=True, default=str)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def checkpoint_dir_for(checkpoints_dir: str | os.PathLike, step: int) -> Path:
    return Path(checkpoints_dir) / f"{CHECKPOINT_PREFIX}{step}"


def temporary_dir_for(checkpoints_dir: str | os.PathLike, step: int) -> Path:
    """Where a checkpoint is written before it is published: a name `latest` never matches."""
    return Path(checkpoints_dir) / f"{TEMPORARY_PREFIX}{CHECKPOINT_PREFIX}{step}"


def mark_complete(directory: str | os.PathLike, step: int) -> None:
    """Flush every file of a written checkpoint to disk and record their sizes and SHA-256 in the marker."""
    directory = Path(directory)
    files = {}
    for path in _checkpoint_files(directory):
        fsync_path(path)
        files[path.relative_to(directory).as_posix()] = {"size": path.stat().st_size, "sha256": _sha256_of(path)}
    write_json_atomically(directory / COMPLETION_MARKER, {"format": 1, "step": step, "files": files})
    fsync_path(directory)


def publish_directory(temporary: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Move a fully written directory to its final name, replacing an older one (a rename: atomic on one
    filesystem, so `target` is never seen half-written)."""
    temporary, target = Path(temporary), Path(target)
    if target.exists():
        shutil.rmtree(target)
    os.replace(temporary, target)
    fsync_path(target.parent)
    return target


def publish_checkpoint(temporary: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Give a completed temporary checkpoint its final name; refuses one without the completion marker."""
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


def checkpoint_problem(directory: str | os.PathLike, verify_hashes: bool = True) -> str | None:
    """Why `directory` is not a complete checkpoint, or `None` when it is.

    Complete means: the completion marker parses, and every file it lists exists with the recorded size (and
    SHA-256). A directory killed mid-write has no marker; a file truncated afterwards fails the size/hash check.
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
    """`(step, path)` of every directory named like a checkpoint, newest first (complete or not)."""
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


def remove_temporary_checkpoints(checkpoints_dir: str | os.PathLike) -> list[Path]:
    """Delete leftovers of checkpoints whose writing was interrupted; returns what was removed."""
    checkpoints_dir = Path(checkpoints_dir)
    if not checkpoints_dir.is_dir():
        return []
    leftovers = [path for path in checkpoints_dir.iterdir() if path.name.startswith(TEMPORARY_PREFIX)]
    for path in leftovers:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return leftovers


def prune_checkpoints(checkpoints_dir: str | os.PathLike, keep: int | None) -> list[Path]:
    """Delete all but the `keep` newest checkpoints (`None` keeps everything); returns what was removed."""
    if keep is None:
        return []
    if keep < 1:
        raise ValueError(f"checkpoints_total_limit must be >= 1, got {keep}")
    removed = [path for _, path in list_checkpoints(checkpoints_dir)[keep:]]
    for path in removed:
        shutil.rmtree(path)
    return removed


def load_trainer_state(checkpoint: str | os.PathLike) -> dict:
    return json.loads((Path(checkpoint) / TRAINER_STATE_NAME).read_text(encoding="utf-8"))


def check_run_signature(saved: Mapping, current: Mapping, checkpoint: str | os.PathLike) -> None:
    """Raise `CheckpointMismatchError` when the settings that fix data order and step arithmetic changed."""
    differences = {key: (saved.get(key), value) for key, value in current.items() if saved.get(key) != value}
    if differences:
        listed = ", ".join(f"{key}: checkpoint {old!r} vs now {new!r}" for key, (old, new) in differences.items())
        raise CheckpointMismatchError(
            f"{checkpoint} was written by a run with other settings ({listed}); resuming would not continue it. "
            "Use the original settings or start a new --output_dir."
        )


# ----------------------------------------------------------------------------------------------------------------
# Reporting and publishing
# ----------------------------------------------------------------------------------------------------------------


def format_results_table(before: Mapping[str, float], after: Mapping[str, float], prefix: str = "eval/") -> str:
    """Plain-text table of the reported metrics before and after training, with the change.

    Example:
    ```python
    >>> print(format_results_table({"eval/recall@10": 0.1}, {"eval/recall@10": 0.3}))
    metric     before  after   change
    recall@10  0.1000  0.3000  +0.2000
    ```
    """
    # The main metrics, then the same metrics of every named slice ("eval/colour_not_in_title/recall@10").
    slices = sorted({key[len(prefix):].rsplit("/", 1)[0] + "/" for key in {**before, **after}
                     if key.startswith(prefix) and "/" in key[len(prefix):]})
    names = [scope + name for scope in ["", *slices] for name in REPORTED_METRICS
             if f"{prefix}{scope}{name}" in after or f"{prefix}{scope}{name}" in before]

    def cell(values: Mapping[str, float], name: str) -> str:
        value = values.get(f"{prefix}{name}")
        return "-" if value is None else f"{value:.4f}"

    rows = [("metric", "before", "after", "change")]
    for name in names:
        old, new = before.get(f"{prefix}{name}"), after.get(f"{prefix}{name}")
        change = "-" if old is None or new is None else f"{new - old:+.4f}"
        rows.append((name, cell(before, name), cell(after, name), change))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)


def push_folder_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str = "Upload trained retriever",
) -> str:
    """Create `repo_id` (if needed) and upload `folder` with `huggingface_hub`; returns the commit URL.

    The endpoint is `HF_ENDPOINT` (huggingface_hub's own setting), the token `token` or the logged-in one.

    Example:
    ```python
    >>> push_folder_to_hub("outputs/run/final", "my-user/fashion-retriever", private=True)
    'https://huggingface.co/my-user/fashion-retriever/commit/...'
    ```
    """
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    repo_url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    commit = api.upload_folder(repo_id=repo_url.repo_id, folder_path=str(folder), commit_message=commit_message)
    return commit.commit_url


__all__ = [
    "CheckpointMismatchError",
    "EpochSeededSampler",
    "NonFiniteLossError",
    "all_finite",
    "build_lr_scheduler",
    "check_cached_image_features",
    "check_image_size_supported",
    "check_mixed_precision_supported",
    "check_run_signature",
    "checkpoint_dir_for",
    "checkpoint_problem",
    "evaluation_queries_from_column",
    "find_latest_checkpoint",
    "format_results_table",
    "image_features_for_rows",
    "is_no_decay_parameter",
    "is_tower_parameter",
    "list_checkpoints",
    "load_trainer_state",
    "mark_complete",
    "parameter_groups",
    "precompute_image_features",
    "prune_checkpoints",
    "publish_checkpoint",
    "publish_directory",
    "push_folder_to_hub",
    "remove_temporary_checkpoints",
    "resize_image_processor",
    "resolve_checkpoint",
    "save_training_checkpoint",
    "set_image_tower_frozen",
    "temporary_dir_for",
    "training_length",
    "unique_products",
    "warmup_steps_for",
    "write_json_atomically",
]
