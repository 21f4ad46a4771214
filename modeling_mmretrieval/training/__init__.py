"""Training: the optimiser and schedule, crash-safe checkpoints and resume, the frozen image-feature cache,
GradCache as a loss, the model card, and the training run itself (`mmretrieval train`).

- `optimization`: parameter groups, warmup and schedule, training length, the epoch-seeded data order, checks;
- `checkpoints`: writing, verifying, finding and resuming checkpoints;
- `image_feature_cache`: frozen image-tower features computed once, and the image size the tower is fed;
- `cached_loss`: `CachedNTXentLoss`, GradCache as a loss (batches larger than memory, same gradients);
- `model_card`, `reporting`, `hub`: the model card (from `model_card_template.md`), the results table, Hub upload;
- `model_builder`, `training_data`, `trainer`: the run (`trainer.run_training`), imported on demand only.

Example:
```python
>>> from modeling_mmretrieval.training import CachedNTXentLoss, parameter_groups
>>> optimizer = torch.optim.AdamW(parameter_groups(model, tower_learning_rate=2e-5, head_learning_rate=1e-3,
...                                                weight_decay=0.01))
>>> loss = CachedNTXentLoss(mini_batch_size=32)(model, batch)
>>> loss.backward()
```
"""

from .cached_loss import CachedNTXentLoss
from .checkpoints import (
    CheckpointMismatchError,
    find_latest_checkpoint,
    resolve_checkpoint,
    save_training_checkpoint,
)
from .hub import push_folder_to_hub
from .image_feature_cache import check_cached_image_features, precompute_image_features, resize_image_processor
from .model_card import ModelCardInfo, render_model_card
from .optimization import (
    EpochSeededSampler,
    NonFiniteLossError,
    build_lr_scheduler,
    parameter_groups,
    training_length,
    warmup_steps_for,
)
from .reporting import REPORTED_METRICS, format_results_table

__all__ = [
    "REPORTED_METRICS",
    "CachedNTXentLoss",
    "CheckpointMismatchError",
    "EpochSeededSampler",
    "ModelCardInfo",
    "NonFiniteLossError",
    "build_lr_scheduler",
    "check_cached_image_features",
    "find_latest_checkpoint",
    "format_results_table",
    "parameter_groups",
    "precompute_image_features",
    "push_folder_to_hub",
    "render_model_card",
    "resize_image_processor",
    "resolve_checkpoint",
    "save_training_checkpoint",
    "training_length",
    "warmup_steps_for",
]
