"""The weight on a residual fusion's image branch that a trained model searches with.

A residual fusion adds what its MLP reads from `[text ; image]` to the text vector, and training fits that branch
for the training loss. At search time on products it never saw, the full branch moves products whose text is
silent about their colour into the top 100, but after long training on a large catalogue it also orders the top
10 of ordinary queries worse than a weaker branch does. Weighing the branch (`config.image_branch_weight`,
`set_image_branch_weight`) trades one for the other, and the best weight depends on the run: docs/results_analysis.md
shows the weights chosen at two budgets and what they give on the test split.

Training runs with the weight the model starts with (1 for a new model). Once training ends, the train command
sets the weight of the final model, which it then evaluates, saves and pushes: by default (`"auto"`) the candidate
whose nDCG@10 on the evaluation split is highest, with the queries phrased as training phrases them (never the
held-out family that the reported evaluation uses, and drawn with another seed); without an evaluation split, the
weight the model already has. The reported evaluation is then on the products the weight was chosen on: a choice
among four values, so its "after" figures may flatter the model slightly; docs/results_analysis.md measures it on a
test split that the choice never sees.

Example:
```python
>>> image_branch_weight(None, MultimodalRetrievalConfig(architecture="3tower", fusion="residual"))
'auto'
>>> chosen, scores = choose_image_branch_weight(lambda weight: 0.83 - 0.02 * abs(weight - 0.5))
>>> chosen
0.5
```
"""

import math
from collections.abc import Callable, Sequence

AUTO = "auto"
# The weights `"auto"` chooses from: 1 is the model as trained (1.5 and 2 were tried and lost on validation at every
# seed: docs/results_analysis.md).
CANDIDATE_IMAGE_BRANCH_WEIGHTS = (0.25, 0.5, 0.75, 1.0)


class ImageBranchWeightError(ValueError):
    """An image branch weight the model cannot take (the train command's one-line error, exit status 2)."""


def parse_image_branch_weight(text: str) -> float | str:
    """`--image_branch_weight`'s value: `"auto"` or a number of 0 or more (`ValueError` otherwise).

    Example: `parse_image_branch_weight("0.5")` is 0.5.
    """
    if text.strip().lower() == AUTO:
        return AUTO
    try:
        weight = float(text)
    except ValueError:
        weight = float("nan")
    if not (math.isfinite(weight) and weight >= 0):
        raise ValueError(f"must be 'auto' or a number of 0 or more, got {text!r}")
    return weight


def image_branch_weight(requested: float | str | None, config) -> float | str:
    """The weight a trained model's image branch searches with: `requested` when given (a number, or `"auto"`:
    chosen on the evaluation split), else `"auto"` for models with the residual fusion and 1 (as trained) for the
    others. `ImageBranchWeightError` (a `ValueError`) says why a weight is refused: a negative one, or anything but 1
    for a model without a residual fusion (the paper's fusions and text-only models have no branch to weigh).

    Example:
    ```python
    >>> image_branch_weight(None, MultimodalRetrievalConfig(architecture="text_only"))
    1.0
    ```
    """
    residual = config.uses_images and config.fusion == "residual"
    if requested is None:
        return AUTO if residual else 1.0
    if requested != AUTO and not (math.isfinite(requested) and requested >= 0):
        raise ImageBranchWeightError(f"the image branch weight must be 0 or more, got {requested} (--image_branch_weight)")
    if requested != 1 and not residual:
        found = config.architecture if not config.uses_images else f"{config.architecture} with fusion {config.fusion!r}"
        raise ImageBranchWeightError(f"only a residual fusion has an image branch to weigh, not {found} "
                                     "(drop --image_branch_weight)")
    return requested if requested == AUTO else float(requested)


def choose_image_branch_weight(
    score: Callable[[float], float], candidates: Sequence[float] = CANDIDATE_IMAGE_BRANCH_WEIGHTS,
) -> tuple[float, dict[float, float]]:
    """`(best weight, {weight: score})`: `score(weight)` (e.g. nDCG@10 on validation products with the branch so
    weighted) for every candidate, and the highest-scoring one (the earlier candidate on a tie).

    Example:
    ```python
    >>> choose_image_branch_weight(lambda weight: 1 - abs(weight - 0.75))
    (0.75, {0.25: 0.5, 0.5: 0.75, 0.75: 1.0, 1.0: 0.75})
    ```
    """
    if not candidates:
        raise ValueError("no candidate weights to choose from")
    scores = {float(weight): float(score(float(weight))) for weight in candidates}
    return max(scores, key=scores.get), scores


__all__ = ["AUTO", "CANDIDATE_IMAGE_BRANCH_WEIGHTS", "ImageBranchWeightError", "choose_image_branch_weight",
           "image_branch_weight", "parse_image_branch_weight"]
