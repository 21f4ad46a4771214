"""Dropout for CPU training with masks drawn as gaps between dropped positions.

A dropout mask is a run of independent Bernoulli trials. torch draws one random number per element, which
on a CPU costs more than the rest of dropout together (docs/performance.md has the measurements, from
`benchmarks/profile_training_step.py`). The positions of
the rarer outcome (the dropped ones for p <= 0.5) are the partial sums of geometrically distributed gaps,
so drawing only those gaps yields a mask of exactly the same distribution from about `p * n` random numbers
instead of `n`.

Two pieces use it in the towers of a [`MultimodalRetrievalModel`] (see `use_gap_sampled_dropout`):

- `GapSampledDropout`, an `nn.Dropout` whose CPU training forward draws its mask this way (elsewhere it is
  `nn.functional.dropout`, as GPU kernels draw random numbers at almost no cost);
- the attention implementation `GAP_SAMPLED_SDPA` (registered with transformers' `AttentionInterface`):
  torch's fused CPU attention cannot drop attention probabilities, so with dropout it falls back to an
  unfused path that draws a mask the slow way. This one computes the same unfused attention with a
  gap-sampled mask, and hands every other call (eval mode, no dropout, GPUs) to transformers' `sdpa`.

Masks come from torch's default generator, so `torch.manual_seed` makes them reproducible and the RNG-state
replays of gradient checkpointing and `GradCache` redraw the same ones.

Example:

```python
>>> import torch
>>> torch.manual_seed(0)
>>> keep = bernoulli_keep_mask((1000, 1000), drop_probability=0.1)
>>> round(keep.float().mean().item(), 3)
0.9
```
"""

import math

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

GAP_SAMPLED_SDPA = "sdpa_gap_sampled_dropout"
PLAIN_SDPA = "sdpa"
# Spare draws beyond the expected count, in standard deviations of that count: a shortfall (needing a
# second round of draws) then happens about once in 10^9 masks.
SPARE_DRAW_DEVIATIONS = 6


def _positions_of_successes(count: int, probability: float, generator: torch.Generator | None) -> torch.Tensor:
    """Sorted positions in `[0, count)` of the successes of `count` independent Bernoulli(`probability`) trials."""
    expected = count * probability
    draws = int(expected + SPARE_DRAW_DEVIATIONS * math.sqrt(expected * (1 - probability)) + 16)
    chunks, reached = [], -1
    while reached < count - 1:
        # The gap from one success to the next is Geometric(probability) on {1, 2, ...}.
        positions = torch.empty(draws, dtype=torch.int64).geometric_(probability, generator=generator)
        positions.cumsum_(0).add_(reached)
        chunks.append(positions)
        reached = int(positions[-1])
    positions = chunks[0] if len(chunks) == 1 else torch.cat(chunks)
    return positions[: int(torch.searchsorted(positions, count))]


def bernoulli_keep_mask(
    shape: tuple[int, ...] | torch.Size, drop_probability: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """A CPU bool mask, True where an element is kept: independent trials, each dropped with `drop_probability`.

    The same distribution as `torch.rand(shape) >= drop_probability`, from about `min(p, 1 - p) * numel`
    random numbers instead of `numel`.
    """
    if not 0.0 <= drop_probability <= 1.0:
        raise ValueError(f"drop_probability must be within [0, 1], got {drop_probability}")
    count = math.prod(shape)
    rare_is_drop = drop_probability <= 0.5
    rare_probability = drop_probability if rare_is_drop else 1.0 - drop_probability
    mask = torch.full((count,), rare_is_drop, dtype=torch.bool)
    if count and rare_probability > 0.0:
        mask[_positions_of_successes(count, rare_probability, generator)] = not rare_is_drop
    return mask.view(shape)


def _zero_where_dropped(inputs: torch.Tensor, drop_probability: float) -> torch.Tensor:
    """`inputs` with a gap-sampled share of its elements zeroed (not rescaled).

    One `torch.where` pass forward and one backward; `masked_fill` costs a copy and a fill each way. Its
    output is fresh and its backward needs only the mask, so callers may scale it in place.
    """
    return torch.where(bernoulli_keep_mask(inputs.shape, drop_probability), inputs, inputs.new_zeros(()))


def gap_sampled_dropout(inputs: torch.Tensor, drop_probability: float, training: bool = True) -> torch.Tensor:
    """`nn.functional.dropout`, with the mask drawn by `bernoulli_keep_mask` for CPU tensors.

    Example:

    ```python
    >>> hidden = torch.ones(4, 128, 384)
    >>> dropped = gap_sampled_dropout(hidden, 0.1)
    >>> sorted(dropped.unique().tolist())  # zeros, and survivors scaled by 1 / (1 - p)
    [0.0, 1.1111111640930176]
    ```
    """
    if not training or drop_probability == 0.0:
        return inputs
    if inputs.device.type != "cpu":
        return nn.functional.dropout(inputs, drop_probability, training=True)
    if drop_probability == 1.0:
        return inputs * 0.0
    return _zero_where_dropped(inputs, drop_probability).mul_(1.0 / (1.0 - drop_probability))


class GapSampledDropout(nn.Dropout):
    """`nn.Dropout` that draws its CPU training masks with `bernoulli_keep_mask` (same distribution, less work)."""

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if self.inplace or inputs.device.type != "cpu":
            return super().forward(inputs)
        return gap_sampled_dropout(inputs, self.p, self.training)


def _add_attention_mask_(scores: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Masks `scores` in place. Adding a float mask passes gradients straight through in backward, where
    filling a bool one would cost a masked copy of every score."""
    if attention_mask is None:
        return scores
    if attention_mask.dtype == torch.bool:  # sdpa masks: True where attending is allowed
        # (batch, 1, query or 1, key): small, as it has no head dimension.
        additive = torch.zeros(attention_mask.shape, dtype=scores.dtype, device=scores.device)
        attention_mask = additive.masked_fill_(~attention_mask, torch.finfo(scores.dtype).min)
    return scores.add_(attention_mask)


def gap_sampled_sdpa(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' `sdpa` attention, except that CPU training with attention dropout draws gap-sampled masks.

    Inputs and outputs follow transformers' attention interface: `(batch, heads, length, head_dim)` in, the
    attention output as `(batch, length, heads, head_dim)` out.
    """
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", False)
    unsupported = causal or key.shape[1] != query.shape[1] or kwargs.get("s_aux") is not None
    if not 0.0 < dropout < 1.0 or query.device.type != "cpu" or unsupported:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    # Scaling the queries (length x head size) rather than the scores (length x length) saves a pass, and the
    # product's backward does not need its output, so the mask goes in place.
    scores = _add_attention_mask_(torch.matmul(query * scaling, key.transpose(-1, -2)), attention_mask)
    probabilities = scores.softmax(dim=-1)
    # Scaling the (smaller) output instead of the probabilities saves a pass over a length x length tensor.
    attention = torch.matmul(_zero_where_dropped(probabilities, dropout), value).mul_(1.0 / (1.0 - dropout))
    return attention.transpose(1, 2).contiguous(), None


AttentionInterface.register(GAP_SAMPLED_SDPA, gap_sampled_sdpa)
# Masks are built per implementation name; this one takes exactly what `sdpa` takes.
AttentionMaskInterface.register(GAP_SAMPLED_SDPA, sdpa_mask)


def _sub_configs(config) -> list:
    return [config, *(getattr(config, key) for key in getattr(config, "sub_configs", {}) if getattr(config, key, None))]


def use_gap_sampled_dropout(tower: nn.Module, enabled: bool = True) -> None:
    """Switches a tower's dropout layers and its `sdpa` attention to the gap-sampled versions, or back.

    Only towers (and sub-towers) using `sdpa` switch attention; other implementations (eager, flash) are left
    as they are. Weights, configs as saved, and eval-mode outputs are unchanged either way.

    Example:

    ```python
    >>> from transformers import BertConfig, BertModel
    >>> tower = BertModel(BertConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
    ...                              intermediate_size=128), add_pooling_layer=False)
    >>> use_gap_sampled_dropout(tower)
    >>> tower.config._attn_implementation
    'sdpa_gap_sampled_dropout'
    ```
    """
    source, target = (PLAIN_SDPA, GAP_SAMPLED_SDPA) if enabled else (GAP_SAMPLED_SDPA, PLAIN_SDPA)
    for config in {id(c): c for module in tower.modules() if hasattr(module, "config")
                   for c in _sub_configs(module.config)}.values():
        if getattr(config, "_attn_implementation", None) == source:
            config._attn_implementation_internal = target
    dropout_class = GapSampledDropout if enabled else nn.Dropout
    for parent in list(tower.modules()):
        for name, child in list(parent.named_children()):
            if type(child) in (nn.Dropout, GapSampledDropout) and type(child) is not dropout_class:
                # A new module starts in train mode: it must keep the mode of the one it replaces (a frozen
                # image tower stays in eval mode).
                setattr(parent, name, dropout_class(child.p, child.inplace).train(child.training))
