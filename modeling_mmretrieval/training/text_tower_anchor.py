"""Keeping the text tower a retriever of its own while the image fusion trains: the text-tower anchor.

A residual fusion starts as the text model (its image branch is zero), but once trained jointly the shared text
tower co-adapts with the fusion: it leaves to the fusion part of what a text-only run would have learned, and the
fused model can then rank below the text-only model trained with the same data and steps (docs/results_analysis.md
measures it on the full training split). This loss adds the text-only model's own objective on the same pass:

- the model's forward also returns the text towers' vectors before any fusion (`output_text_embeds=True`), so the
  towers run once;
- the symmetric NT-Xent loss of the query text vectors against the product text vectors (same logit scale, same
  false-negative mask) is added to the fused loss with a weight.

The towers then keep learning what a text-only run learns, and the fusion can only add to it.

Example:
```python
>>> loss_fn = TextTowerAnchorLoss(weight=1.0)
>>> loss_fn
TextTowerAnchorLoss(weight=1.0)
>>> loss = loss_fn(model, collator(rows))  # model(**batch).loss + 1.0 * the text vectors' NT-Xent loss
```
"""

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

# The anchor's weight where the command line leaves it unset, for models with the residual fusion (docs/results.md).
DEFAULT_TEXT_TOWER_ANCHOR = 1.0


class TextTowerAnchorError(ValueError):
    """A text-tower anchor weight the model cannot take (the train command's one-line error, exit status 2)."""


def text_tower_anchor_weight(requested: float | None, config) -> float:
    """The anchor's weight for a run: `requested` when given (0 is off; a positive weight for a text-only model
    raises `ValueError`: its text vectors are its embeddings already), else `DEFAULT_TEXT_TOWER_ANCHOR` for models
    with the residual fusion and 0 for the others (the paper's fusions train as the paper trains them).
    `TextTowerAnchorError` (a `ValueError`) says why a weight is refused.

    Example:
    ```python
    >>> text_tower_anchor_weight(None, MultimodalRetrievalConfig(architecture="text_only"))
    0.0
    ```
    """
    if requested is None:
        return DEFAULT_TEXT_TOWER_ANCHOR if config.uses_images and config.fusion == "residual" else 0.0
    if requested < 0:
        raise TextTowerAnchorError(f"the text-tower anchor weight must be 0 or more, got {requested}")
    if requested and not config.uses_images:
        raise TextTowerAnchorError("the text-tower anchor keeps a fused model's text tower a retriever of its own: "
                                   "a text_only model has no fusion (drop --text_tower_anchor)")
    return float(requested)


class TextTowerAnchorLoss:
    """`model(**batch).loss + weight * NT-Xent(query text vectors, product text vectors)`: the fused model's loss
    plus the text-only model's, from one forward pass (module docstring).

    Args:
        weight: the text vectors' term's weight (> 0).

    Example:
    ```python
    >>> TextTowerAnchorLoss(weight=0.5)
    TextTowerAnchorLoss(weight=0.5)
    ```
    """

    def __init__(self, weight: float):
        if not weight > 0:
            raise ValueError(f"the text-tower anchor weight must be positive, got {weight}")
        self.weight = weight

    def __call__(self, model: nn.Module, batch: dict) -> torch.Tensor:
        output = model(**batch, output_text_embeds=True)
        module = model.module if isinstance(model, DistributedDataParallel) else model
        text_loss, _ = module.loss_function_module(
            output.query_text_embeds, output.product_text_embeds, output.logit_scale, batch.get("false_negative_mask")
        )
        return output.loss + self.weight * text_loss

    def __repr__(self) -> str:
        return f"{type(self).__name__}(weight={self.weight})"


__all__ = ["DEFAULT_TEXT_TOWER_ANCHOR", "TextTowerAnchorError", "TextTowerAnchorLoss", "text_tower_anchor_weight"]
