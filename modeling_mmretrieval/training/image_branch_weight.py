"""The weight on a residual fusion's image branch that a trained model searches with.

A residual fusion adds what its MLP reads from `[text ; image]` to the text vector, and training fits that branch
for the training loss. At search time on products it never saw, the full branch moves products whose text is
silent about their colour into the top 100, but it also orders the top 10 of ordinary queries a little worse than
a weaker branch does. Weighing the branch (`config.image_branch_weight`, `set_image_branch_weight`) trades one for
the other; docs/results_analysis.md shows the weights chosen on validation products and what they give on the test
split. Training runs with the weight the model starts with (1 for a new model); the train command sets the weight
on the final model once training ends, so the model it evaluates, saves and pushes searches with it.

Example:
```python
>>> image_branch_weight(None, MultimodalRetrievalConfig(architecture="4tower", fusion="residual"))
0.5
>>> model.set_image_branch_weight(image_branch_weight(None, model.config))
```
"""

# The weight where the command line leaves it unset, for models with the residual fusion: every seed at both
# budgets chose it on validation products (docs/results_analysis.md).
DEFAULT_IMAGE_BRANCH_WEIGHT = 0.5


class ImageBranchWeightError(ValueError):
    """An image branch weight the model cannot take (the train command's one-line error, exit status 2)."""


def image_branch_weight(requested: float | None, config) -> float:
    """The weight a trained model's image branch searches with: `requested` when given, else
    `DEFAULT_IMAGE_BRANCH_WEIGHT` for models with the residual fusion and 1 (as trained) for the others.
    `ImageBranchWeightError` (a `ValueError`) says why a weight is refused: a negative one, or one other than 1 for
    a model without a residual fusion (the paper's fusions and text-only models have no branch to weigh).

    Example:
    ```python
    >>> image_branch_weight(None, MultimodalRetrievalConfig(architecture="text_only"))
    1.0
    ```
    """
    residual = config.uses_images and config.fusion == "residual"
    if requested is None:
        return DEFAULT_IMAGE_BRANCH_WEIGHT if residual else 1.0
    if not requested >= 0:
        raise ImageBranchWeightError(f"the image branch weight must be 0 or more, got {requested} (--image_branch_weight)")
    if requested != 1 and not residual:
        found = config.architecture if not config.uses_images else f"{config.architecture} with fusion {config.fusion!r}"
        raise ImageBranchWeightError(f"only a residual fusion has an image branch to weigh, not {found} "
                                     "(drop --image_branch_weight)")
    return float(requested)


__all__ = ["DEFAULT_IMAGE_BRANCH_WEIGHT", "ImageBranchWeightError", "image_branch_weight"]
