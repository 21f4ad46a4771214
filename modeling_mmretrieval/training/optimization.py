"""What one optimizer step does and how many there are: parameter groups, warmup and schedule, training length,
the data order of every epoch, and the checks that stop a run going wrong silently (mixed precision the device
cannot run, a NaN/inf loss).

Example:
```python
>>> groups = parameter_groups(model, tower_learning_rate=2e-5, head_learning_rate=1e-3, weight_decay=0.01)
>>> [group["name"] for group in groups]  # a frozen image tower is in none of them
['towers', 'towers_no_decay', 'head', 'head_no_decay']
>>> training_length(batches_per_epoch=10, gradient_accumulation_steps=4, num_train_epochs=2.0, max_train_steps=None)
(3, 6, 2)
```
"""

import math
from collections.abc import Iterator

import torch
from torch.utils.data import Sampler
from transformers import get_scheduler

TOWER_MODULES = ("text_model", "product_text_model", "dual_encoder", "vision_model")
SCHEDULER_TYPES = ("linear", "cosine", "constant")


class NonFiniteLossError(FloatingPointError):
    """A training step produced a NaN/inf loss or gradient norm (raised under `nan_policy="stop"`)."""


# ----------------------------------------------------------------------------------------------------------------
# Parameter groups, schedule and training length
# ----------------------------------------------------------------------------------------------------------------


def is_tower_parameter(name: str) -> bool:
    """Whether a parameter of `MultimodalRetrievalModel` belongs to a pretrained tower (vs. the head:
    projections, fusion MLPs, the missing-image embedding and the logit scale).

    Example:
    ```python
    >>> is_tower_parameter("text_model.encoder.layer.0.output.dense.weight"), is_tower_parameter("logit_scale")
    (True, False)
    ```
    """
    return name.split(".", 1)[0] in TOWER_MODULES


def is_no_decay_parameter(name: str, parameter: torch.Tensor) -> bool:
    """Biases, normalisation weights, the logit scale and other vectors are not weight-decayed.

    Decay pulls weights towards zero, which only makes sense for matrices: shrinking a LayerNorm gain, a bias or
    the (log) temperature changes what the model computes instead of regularising it.

    Example:
    ```python
    >>> is_no_decay_parameter("head.bias", torch.zeros(4)), is_no_decay_parameter("head.weight", torch.zeros(4, 4))
    (True, False)
    ```
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
    """Warmup length: `warmup_steps` when given, else `ceil(warmup_ratio * total_steps)`.

    Example:
    ```python
    >>> warmup_steps_for(87, None, 0.1), warmup_steps_for(87, 5, 0.1)
    (9, 5)
    ```
    """
    if warmup_steps is not None:
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        return warmup_steps
    if not 0.0 <= warmup_ratio < 1.0:
        raise ValueError(f"warmup_ratio must lie in [0, 1), got {warmup_ratio}")
    return math.ceil(warmup_ratio * total_steps)


def build_lr_scheduler(optimizer, scheduler_type: str, *, num_warmup_steps: int, num_training_steps: int):
    """A `transformers` schedule: linear or cosine decay after warmup, or constant after warmup.

    Example:
    ```python
    >>> scheduler = build_lr_scheduler(optimizer, "cosine", num_warmup_steps=10, num_training_steps=100)
    ```
    """
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

    Example:
    ```python
    >>> training_length(10, 4, 2.0, None)  # the last partial window still steps
    (3, 6, 2)
    ```
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


# ----------------------------------------------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------------------------------------------


def check_mixed_precision_supported(mixed_precision: str, device: torch.device) -> None:
    """Raise for a mixed-precision mode the device cannot run (accelerate silently trains fp16 on CPU in fp32).

    Example:
    ```python
    >>> check_mixed_precision_supported("bf16", torch.device("cpu"))  # fine; "fp16" would raise
    ```
    """
    if mixed_precision == "fp16" and device.type == "cpu":
        raise ValueError("--mixed_precision fp16 needs a GPU; on CPU use --mixed_precision bf16 or no.")
    if mixed_precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError("This GPU does not support bf16; use --mixed_precision fp16 (with its loss scaler) or no.")


def all_finite(*values: torch.Tensor | float | None) -> bool:
    """Whether every given number is finite (`None` entries are ignored).

    Example:
    ```python
    >>> all_finite(torch.tensor(1.0), None, 2.5), all_finite(float("nan"))
    (True, False)
    ```
    """
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


__all__ = [
    "EpochSeededSampler",
    "NonFiniteLossError",
    "all_finite",
    "build_lr_scheduler",
    "check_mixed_precision_supported",
    "is_no_decay_parameter",
    "is_tower_parameter",
    "parameter_groups",
    "training_length",
    "warmup_steps_for",
]
