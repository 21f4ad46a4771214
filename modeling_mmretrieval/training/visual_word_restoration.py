"""A training signal that needs the image and leaves the text towers alone: visual-word restoration.

Attribute-derived training pairs rarely need the image: the queried colour is almost always in the product's
title. Stripping it from some training texts (`--visual_word_dropout`) forces the image branch to carry it, but
also teaches the text towers on damaged texts, which costs more on ordinary products than it gains
(docs/results.md). This loss gives the image branch the same lesson without touching the towers:

- the collator adds a stripped copy of every positive product's text (`data.visual_words.StrippedTextView`:
  no colour or pattern words);
- the text tower embeds it without gradients, the queries are embedded without gradients, and the cached or
  frozen image features are reused;
- the NT-Xent loss of the queries against the fused stripped products (the logit scale detached) then reaches
  only the fusion (the MLP and the missing-image embedding): it learns to restore from the image what the text
  no longer says.

The total loss is `base_loss + weight * restoration_loss`. It needs a fusion with trained parameters (`residual`
or `mlp`); `concat` and `alpha_concat` have none.

Example:
```python
>>> loss_fn = VisualWordRestorationLoss(model_loss, weight=1.0)
>>> loss_fn
VisualWordRestorationLoss(weight=1.0, base_loss=model_loss)
>>> collator = RetrievalCollator(processor, stripped_view=StrippedTextView())
>>> loss = loss_fn(model, collator(rows))
```
"""

from collections.abc import Callable

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..data.collator import STRIPPED_VIEW_PREFIX
from ..processing_mmretrieval import split_model_inputs
from .cached_loss import CachedNTXentLoss

TRAINED_FUSIONS = ("residual", "mlp")
# The loss's weight where the command line leaves it unset, for models whose fusion it can train (docs/results.md).
DEFAULT_VISUAL_WORD_RESTORATION = 1.0


class VisualWordRestorationError(ValueError):
    """A restoration setting the model or the run cannot take (the train command's one-line error, exit status 2)."""


def check_restoration_supported(config) -> None:
    """Raises a one-line `VisualWordRestorationError` (a `ValueError`) unless the model has a trained fusion of text
    and image for the loss to train.

    Example:
    ```python
    >>> check_restoration_supported(MultimodalRetrievalConfig(architecture="text_only"))
    Traceback (most recent call last):
    VisualWordRestorationError: visual-word restoration trains the image fusion: it needs a 3tower or 4tower model with fusion 'residual' or 'mlp', not text_only (--visual_word_restoration)
    ```
    """
    if not config.uses_images or config.fusion not in TRAINED_FUSIONS:
        found = config.architecture if not config.uses_images else f"{config.architecture} with fusion {config.fusion!r}"
        raise VisualWordRestorationError("visual-word restoration trains the image fusion: it needs a 3tower or 4tower "
                                         f"model with fusion 'residual' or 'mlp', not {found} (--visual_word_restoration)")


def restoration_weight(requested: float | None, config) -> float:
    """The restoration loss's weight for a run: `requested` when given (0 is off; a positive weight for a model
    without a trained fusion raises `ValueError`), else `DEFAULT_VISUAL_WORD_RESTORATION` where the model's
    fusion can use it and 0 elsewhere.

    Example:
    ```python
    >>> restoration_weight(None, MultimodalRetrievalConfig(architecture="text_only"))
    0.0
    ```
    """
    if requested is None:
        supported = config.uses_images and config.fusion in TRAINED_FUSIONS
        return DEFAULT_VISUAL_WORD_RESTORATION if supported else 0.0
    if requested:
        check_restoration_supported(config)
    return float(requested)


def split_stripped_view(batch: dict) -> tuple[dict, dict]:
    """`(the model's batch, the stripped view's text inputs)`: the collator's `stripped_product_*` keys moved out.

    Example:
    ```python
    >>> model_batch, stripped = split_stripped_view({"query_input_ids": q, "stripped_product_input_ids": s})
    >>> sorted(model_batch), sorted(stripped)
    (['query_input_ids'], ['input_ids'])
    ```
    """
    model_batch, stripped = {}, {}
    for key, value in batch.items():
        if key.startswith(STRIPPED_VIEW_PREFIX):
            stripped[key.removeprefix(STRIPPED_VIEW_PREFIX)] = value
        else:
            model_batch[key] = value
    return model_batch, stripped


def restoration_loss(model: nn.Module, batch: dict, stripped: dict) -> torch.Tensor:
    """The NT-Xent loss of the batch's queries against its positive products embedded from their stripped texts
    and their images; only the fusion's parameters receive gradients.

    Example:
    ```python
    >>> model_batch, stripped = split_stripped_view(collator(rows))
    >>> restoration_loss(model, model_batch, stripped).backward()  # gradients in model.product_fusion only
    ```
    """
    query_inputs, product_inputs = split_model_inputs(batch)
    num_positives = query_inputs["input_ids"].shape[0]
    positives = {key: value[:num_positives] for key, value in product_inputs.items()}
    with torch.no_grad():
        queries = model.get_query_embeddings(**query_inputs)
        text = model.get_product_text_features(**stripped)
        image_mask = positives.get("image_mask")
        image_features = positives.get("image_features")
        if image_features is None and "pixel_values" in positives:
            image_features = model.get_image_features(positives["pixel_values"], image_mask)
    products = model.fuse_product_features(text, image_features, image_mask)
    scale = model.logit_scale.detach().exp().clamp(max=model.config.max_logit_scale)
    false_negatives = batch.get("false_negative_mask")
    if false_negatives is not None:
        false_negatives = false_negatives[:, :num_positives]
    loss, _ = model.loss_function_module(queries, products, scale, false_negatives)
    return loss


class VisualWordRestorationLoss:
    """`base_loss + weight * restoration_loss`: the run's loss, plus the image branch learning to restore the
    visual words stripped from the products' texts (module docstring). Batches without a stripped view get the
    base loss alone.

    Args:
        base_loss: the run's loss function, `loss(model, batch)` (`model_loss` or `CachedNTXentLoss`).
        weight: the restoration term's weight (> 0).

    Example:
    ```python
    >>> VisualWordRestorationLoss(CachedNTXentLoss(16), weight=0.5)
    VisualWordRestorationLoss(weight=0.5, base_loss=CachedNTXentLoss(mini_batch_size=16))
    ```
    """

    def __init__(self, base_loss: Callable[[nn.Module, dict], torch.Tensor], weight: float):
        if not weight > 0:
            raise ValueError(f"the visual-word restoration weight must be positive, got {weight}")
        self.base_loss, self.weight = base_loss, weight

    def __call__(self, model: nn.Module, batch: dict) -> torch.Tensor:
        model_batch, stripped = split_stripped_view(batch)
        loss = self.base_loss(model, model_batch)
        if not stripped:
            return loss
        module = model.module if isinstance(model, DistributedDataParallel) else model
        if module is not model and isinstance(self.base_loss, CachedNTXentLoss):
            # GradCache averages gradients across processes inside its own backward hook, which may run before
            # this term's gradients arrive.
            raise VisualWordRestorationError("visual-word restoration does not combine with --mini_batch_size across "
                                             "several processes; drop one of them")
        check_restoration_supported(module.config)
        return loss + self.weight * restoration_loss(module, model_batch, stripped)

    def __repr__(self) -> str:
        base = getattr(self.base_loss, "__name__", None) or repr(self.base_loss)
        return f"{type(self).__name__}(weight={self.weight}, base_loss={base})"


__all__ = ["DEFAULT_VISUAL_WORD_RESTORATION", "VisualWordRestorationError", "VisualWordRestorationLoss", "check_restoration_supported", "restoration_weight", "restoration_loss", "split_stripped_view"]
