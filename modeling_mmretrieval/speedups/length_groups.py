"""Length-grouped text batches: a CPU training speedup with unchanged results.

A training batch of product texts mixes short and long rows, and padding every row to the longest wastes
tower compute on padding. `length_grouped_text_states` runs the rows in groups of similar length, each
padded only to its own longest row, and puts the pooled states back in batch order: padding is masked out,
so every row's result (and gradient) is the same as with the whole batch. It applies only where it pays:
training on the CPU with right-padded batches; anything else runs the batch whole.

Install it with `speedups.apply(model)` (it becomes the model's `text_tower_runner`).

Example:
```python
>>> length_groups([128, 12, 126, 10, 127, 11], call_cost_tokens=16)
[[0, 4, 2], [1, 5, 3]]
```
"""

import math
from collections.abc import Sequence

import torch
from transformers import PreTrainedModel

from ..modeling_mmretrieval import pooled_text_states

# Cost of one more tower call, in padded tokens, when deciding how to split a text batch by length. On a
# CPU a call's fixed cost (dispatch, small matrix products) is about that of a few dozen tokens; GPUs are
# launch-bound at these sizes, so batches are only split on the CPU.
LENGTH_GROUP_CALL_COST_TOKENS = 64
# Group widths round up to a multiple of this, as the processor pads its batches (`pad_to_multiple_of`), so
# that few distinct input shapes reach the towers.
LENGTH_GROUP_WIDTH_MULTIPLE = 8


def length_groups(lengths: Sequence[int], call_cost_tokens: int = LENGTH_GROUP_CALL_COST_TOKENS) -> list[list[int]]:
    """Splits a batch into groups of rows of similar length, each to be padded only to its own longest row.

    The groups minimise padded tokens plus `call_cost_tokens` per group (one tower call each), exactly,
    by dynamic programming over the rows sorted longest first; every row's result is unchanged because
    padding is masked out. Returns the row indices of each group, longest rows first.

    Example:
        >>> length_groups([128, 12, 126, 10, 127, 11], call_cost_tokens=16)
        [[0, 4, 2], [1, 5, 3]]
    """
    if not lengths:
        return []
    order = sorted(range(len(lengths)), key=lambda row: -lengths[row])
    sorted_lengths = [lengths[row] for row in order]
    # Groups only need to start where the length changes: splitting rows of equal length adds a call and
    # saves no padding. That keeps the search to (distinct lengths)^2 steps, however large the batch.
    starts = [row for row in range(len(order)) if row == 0 or sorted_lengths[row] != sorted_lengths[row - 1]]
    # best[j]: the cheapest split of the j longest rows (j a group boundary); start[j]: where its last group begins.
    best, start = {0: 0}, {}
    for end in [*starts[1:], len(order)]:
        best[end] = math.inf
        for first in (row for row in starts if row < end):
            cost = best[first] + (end - first) * sorted_lengths[first] + call_cost_tokens
            if cost < best[end]:
                best[end], start[end] = cost, first
    groups, end = [], len(order)
    while end:
        groups.append(order[start[end] : end])
        end = start[end]
    return groups[::-1]


# Towers whose embedding layer treats `inputs_embeds` exactly as the lookup of `input_ids` (positions included):
# RoBERTa-style towers, for one, number positions from the ids' padding, but not from embeddings.
EMBEDS_LIKE_INPUT_IDS_MODEL_TYPES = ("bert",)


def _embeds_like_input_ids(tower: PreTrainedModel) -> bool:
    return getattr(tower.config, "model_type", None) in EMBEDS_LIKE_INPUT_IDS_MODEL_TYPES


def _right_padded(attention_mask: torch.Tensor) -> bool:
    """Whether every row's tokens come first and its padding last (so a row can be cut to its length)."""
    return bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all())


def text_length_groups(attention_mask: torch.Tensor, training: bool) -> list[tuple[list[int], int]]:
    """`(rows, width)` groups of a text batch by length (`length_groups`, widths rounded up to
    `LENGTH_GROUP_WIDTH_MULTIPLE`) when training on the CPU; one group of every row at the batch's width
    otherwise.

    Only training: its batches are random in length, while index builds sort their rows by length already,
    and inference would gain little from splitting but would multiply the input shapes whose kernels torch's
    CPU backend caches (each cached kernel pins heap memory).
    """
    rows, width = list(range(attention_mask.shape[0])), attention_mask.shape[1]
    if not training or attention_mask.device.type != "cpu" or len(rows) < 2:
        return [(rows, width)]
    if not _right_padded(attention_mask):  # left padding: rows cannot be cut to their length
        return [(rows, width)]
    multiple = LENGTH_GROUP_WIDTH_MULTIPLE
    widths = [min(width, -(-length // multiple) * multiple) for length in attention_mask.sum(dim=1).tolist()]
    return [(group, widths[group[0]]) for group in length_groups(widths)]


def length_grouped_text_states(
    tower: PreTrainedModel, token_inputs: dict[str, torch.Tensor], attention_mask: torch.Tensor,
    token_type_ids: torch.Tensor | None, pooling: str,
) -> torch.Tensor:
    """A `text_tower_runner` (see `modeling_mmretrieval.pooled_text_states`) that runs a training batch in
    groups of similar length; same pooled states, row for row.

    Example:
    ```python
    >>> model.text_tower_runner = length_grouped_text_states  # what `speedups.apply(model)` does
    ```
    """
    input_ids = token_inputs["input_ids"]
    groups = text_length_groups(attention_mask, tower.training)
    if len(groups) == 1:
        return pooled_text_states(tower, token_inputs, attention_mask, token_type_ids, pooling)
    # One lookup for the batch: each tower call's own would build, in backward, a dense gradient of the whole
    # vocabulary-by-hidden table to zero, fill and add up.
    embeds = tower.get_input_embeddings()(input_ids) if _embeds_like_input_ids(tower) else None
    parts = []
    for rows, width in groups:
        rows = torch.tensor(rows, device=input_ids.device)
        types = None if token_type_ids is None else token_type_ids[rows, :width]
        if embeds is not None:
            inputs = {"inputs_embeds": embeds[rows, :width]}
        else:
            inputs = {"input_ids": input_ids[rows, :width]}
        parts.append(pooled_text_states(tower, inputs, attention_mask[rows, :width], types, pooling))
    order = torch.tensor([row for rows, _ in groups for row in rows], device=input_ids.device)
    return torch.cat(parts)[torch.argsort(order)]


__all__ = ["length_grouped_text_states", "length_groups", "text_length_groups"]
