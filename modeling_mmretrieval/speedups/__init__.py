"""CPU speedups that leave results unchanged, applied explicitly by whoever wants them.

None of these is imported by the checkpoint files (configuration, modeling, processing, losses): a model
loaded with `from_pretrained` or `trust_remote_code=True` runs plain transformers code. The trainer and the
indexer apply them, and they are on by default there.

- `gap_sampled_dropout`: dropout masks drawn from about `p * n` random numbers instead of `n` (same
  distribution), and an attention implementation that uses them (model, CPU training).
- `length_groups`: training text batches run through their tower in groups of similar length (model, CPU
  training; same pooled states row for row).
- `fast_image_processing`: batched image preprocessing reproducing a PIL image processor (processor).
- `float16_screening`: few-query exact search screened against a float16 copy of the catalogue, then
  rescored (index; used by `retrieval.ProductIndex` by default).

Example:
```python
>>> from modeling_mmretrieval import speedups
>>> speedups.apply(model, processor)            # what the trainer does
>>> speedups.apply(model, gap_sampled_dropout=False, length_groups=False)  # back to the plain model
```
"""

import logging

from .fast_image_processing import FastImageProcessor, UnsupportedImageProcessorError
from .gap_sampled_dropout import use_gap_sampled_dropout
from .length_groups import length_grouped_text_states

logger = logging.getLogger(__name__)


def _towers(model) -> list:
    towers = (model.text_model, model.product_text_model, model.dual_encoder, model.vision_model)
    return [tower for tower in towers if tower is not None]


def apply_to_model(model, *, gap_sampled_dropout: bool = True, length_groups: bool = True) -> None:
    """Switches a `MultimodalRetrievalModel`'s CPU training speedups on (`True`) or back off (`False`).

    Call it after `set_attn_implementation`, which resets the towers' attention to plain `sdpa`.
    Eval-mode and GPU outputs are identical either way; so are saved checkpoints.

    Example:
    ```python
    >>> apply_to_model(model)
    >>> model.text_tower_runner.__name__
    'length_grouped_text_states'
    ```
    """
    for tower in _towers(model):
        use_gap_sampled_dropout(tower, gap_sampled_dropout)
    model.text_tower_runner = length_grouped_text_states if length_groups else None


def apply_to_processor(processor, fast_image_processing: bool | None = None) -> bool:
    """Installs (or removes) the batched image path on a `MultimodalRetrievalProcessor`; returns whether it is on.

    `None` turns it on wherever it reproduces the processor's image processor and logs why where it cannot;
    `True` requires it (raises `UnsupportedImageProcessorError` naming the setting it cannot reproduce);
    `False` turns it off. The choice is recorded in `processor.fast_image_processing`, which is saved.

    Example:
    ```python
    >>> apply_to_processor(processor)  # DINOv2's and CLIP's PIL processors are reproduced
    True
    ```
    """
    processor.batched_image_processor = None
    if processor.image_processor is None:
        return False
    if fast_image_processing is False:
        processor.fast_image_processing = False
        return False
    try:
        processor.batched_image_processor = FastImageProcessor.from_image_processor(processor.image_processor)
    except UnsupportedImageProcessorError as error:
        if fast_image_processing:
            raise
        logger.info(f"Images go through the reference image processor; the fast path cannot reproduce it: {error}")
        processor.fast_image_processing = False
        return False
    processor.fast_image_processing = True
    return True


def apply(
    model=None,
    processor=None,
    *,
    gap_sampled_dropout: bool = True,
    length_groups: bool = True,
    fast_image_processing: bool | None = None,
) -> None:
    """Applies the model speedups to `model` and the image speedup to `processor` (either may be None).

    See `apply_to_model` and `apply_to_processor` for the arguments.

    Example:
    ```python
    >>> speedups.apply(model, processor)
    ```
    """
    if model is not None:
        apply_to_model(model, gap_sampled_dropout=gap_sampled_dropout, length_groups=length_groups)
    if processor is not None:
        apply_to_processor(processor, fast_image_processing)


__all__ = ["apply", "apply_to_model", "apply_to_processor"]
