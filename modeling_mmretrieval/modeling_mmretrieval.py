"""Multimodal product retrievers: text-only bi-encoder, 4tMM and 3tMM (Liu & Lopez Ramos, arXiv:2501.07365).

Queries and products are embedded into one L2-normalised space and ranked by cosine similarity.
Products without an image follow an explicit text-only path selected by `image_mask`: the image tower
never sees a placeholder image, and its feature is replaced by zeros (concat fusions, so the product is
ranked by its text half alone) or by a learned "missing image" vector (MLP fusions).
"""

import copy
import math
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, PreTrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput

from .configuration_mmretrieval import MLP_FUSIONS, MultimodalRetrievalConfig
from .losses import NTXentLoss


def masked_mean_pool(hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of the token states that the attention mask keeps (sentence-transformers' mean pooling)."""
    mask = attention_mask.unsqueeze(-1).to(hidden_states.dtype)
    return (hidden_states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)


def pool_token_states(hidden_states: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    if pooling == "cls":
        return hidden_states[:, 0]
    return masked_mean_pool(hidden_states, attention_mask)


def pooled_text_states(
    tower: PreTrainedModel,
    token_inputs: dict[str, torch.Tensor],
    attention_mask: torch.Tensor,
    token_type_ids: torch.Tensor | None,
    pooling: str,
) -> torch.Tensor:
    """Runs a text tower over one token batch and pools its last hidden states, shape `(batch, hidden)`.

    `token_inputs` holds `input_ids` (or `inputs_embeds` looked up from them). This is the default
    `MultimodalRetrievalModel.text_tower_runner`; a runner with the same signature may split the batch
    (e.g. `speedups.length_groups`) as long as every row's result is unchanged.

    Example:
    ```python
    >>> pooled = pooled_text_states(model.text_model, {"input_ids": ids}, mask, None, "mean")
    ```
    """
    tower_inputs = {**token_inputs, "attention_mask": attention_mask}
    if token_type_ids is not None:
        tower_inputs["token_type_ids"] = token_type_ids
    hidden_states = tower(**tower_inputs).last_hidden_state
    return pool_token_states(hidden_states, attention_mask, pooling)


def pooled_features(output) -> torch.Tensor:
    """The one vector per example that a tower returns: a tensor, or an output's `pooler_output`.

    transformers 5 returns output objects from `get_text_features`/`get_image_features`; vision models
    without a pooler fall back to their first (CLS) token.
    """
    if isinstance(output, torch.Tensor):
        return output
    pooled = getattr(output, "pooler_output", None)
    if pooled is not None:
        return pooled
    return output.last_hidden_state[:, 0]


def share_config(model: PreTrainedModel, config: PreTrainedConfig) -> None:
    """Makes `config` the config of `model` and of every layer in it, keeping its attention implementation.

    Layers keep references to the config they were built with, so replacing only `model.config` would
    leave them reading the old one (`set_attn_implementation` would then change nothing). A nested model
    (a dual encoder's `text_model`, ...) gets the sub-config stored under the same key in `config`.
    """
    previous = model.config
    config._attn_implementation = previous._attn_implementation
    model.config = config
    _repoint_layers(model, previous, config)


def _repoint_layers(module: nn.Module, previous: PreTrainedConfig, config: PreTrainedConfig) -> None:
    for child in module.children():
        if isinstance(child, PreTrainedModel):
            key = next((key for key, value in vars(previous).items() if value is child.config), None)
            if key is not None and isinstance(getattr(config, key, None), PreTrainedConfig):
                share_config(child, getattr(config, key))
            continue
        if isinstance(getattr(child, "config", None), PreTrainedConfig):
            child.config = config
        _repoint_layers(child, previous, config)


def dual_encoder_embedding_size(config: PreTrainedConfig) -> int:
    """Width of the shared text-image space of a dual encoder (CLIP-like projection, or SigLIP's heads)."""
    if hasattr(config, "projection_dim"):
        return config.projection_dim
    return getattr(config.text_config, "projection_size", None) or config.text_config.hidden_size


class FusionMLP(nn.Module):
    """Feed-forward fusion of concatenated tower vectors into one embedding (GELU between layers)."""

    def __init__(self, input_size: int, hidden_size: int, output_size: int, num_layers: int, dropout: float):
        super().__init__()
        sizes = [input_size] + [hidden_size] * (num_layers - 1) + [output_size]
        layers: list[nn.Module] = []
        for index, (size_in, size_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            if index > 0:
                layers += [nn.GELU(), nn.Dropout(dropout)]
            layers.append(nn.Linear(size_in, size_out))
        self.layers = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features)


def adopt_tower(tower: PreTrainedModel | None, sub_config: PreTrainedConfig, is_text_tower: bool = False) -> PreTrainedModel:
    """The tower as the composite model keeps it: a pretrained one sharing `sub_config`, or a new random one.

    `__init__` never downloads weights: see `MultimodalRetrievalModel.from_towers_pretrained`.
    """
    if tower is None:
        tower = AutoModel.from_config(sub_config)
    else:
        # The tower and the composite config must describe the same weights, so later edits stay in sync; the
        # tower keeps the attention implementation it was loaded with (mask handling depends on it).
        share_config(tower, sub_config)
    if is_text_tower and getattr(tower, "pooler", None) is not None:
        # Token states are pooled here (mean/CLS), so a text tower's own pooler head is never used; frozen, it
        # cannot leave DDP waiting for gradients that never come.
        tower.pooler.requires_grad_(False)
    return tower


# A pixel whose three channels all lie above this (in [0, 1]) is the white background of a product photo.
COLOUR_HISTOGRAM_BACKGROUND = 0.92
# With fewer foreground pixels than this (a white product on white), the colour description reads every pixel.
COLOUR_HISTOGRAM_MIN_FOREGROUND = 20


def image_tower_feature_size(config: MultimodalRetrievalConfig) -> int:
    """Width of the image tower's per-image vector (the dual encoder's space, or the vision hidden size)."""
    if config.architecture == "4tower":
        return dual_encoder_embedding_size(config.dual_encoder_config)
    return config.vision_config.hidden_size


def colour_histogram_size(levels: int) -> int:
    """Width of `colour_histogram_features` for `levels` per channel (0 when off)."""
    return levels**3 + 6 if levels else 0


def image_feature_size(config: MultimodalRetrievalConfig) -> int:
    """Width of `get_image_features`: the image tower's vector, then the colour description when the config asks for
    one (`colour_histogram_levels`)."""
    return image_tower_feature_size(config) + colour_histogram_size(config.colour_histogram_levels)


def fused_image_feature_size(config: MultimodalRetrievalConfig) -> int:
    """How many leading columns of `get_image_features` the product fusion reads: the tower's vector, plus the colour
    description for `mlp`/`residual` fusions when `config.colour_histogram_in_fusion` (a concatenation sets the tower's
    vector beside the dual encoder's text half, so it never reads the colours)."""
    if config.fusion in MLP_FUSIONS and config.colour_histogram_in_fusion:
        return image_feature_size(config)
    return image_tower_feature_size(config)


def colour_histogram_features(
    pixel_values: torch.Tensor, pixel_mean: list[float], pixel_std: list[float], levels: int
) -> torch.Tensor:
    """The colours of each image's product, `(num_images, levels**3 + 6)` float32: the share of its foreground pixels in
    each of `levels**3` RGB cells (square-rooted, so that small coloured areas still count), then the foreground's
    mean and standard deviation per channel. Foreground is every pixel that is not near-white (product photos are
    shot on white), or every pixel when almost none is (a white product). `pixel_mean`/`pixel_std` undo the image
    processor's normalisation.

    Example:
    ```python
    >>> red = torch.zeros(1, 3, 8, 8); red[:, 0] = 1.0
    >>> features = colour_histogram_features(red, [0.0] * 3, [1.0] * 3, levels=2)
    >>> features[0, :8].tolist()  # all pixels in the (high red, low green, low blue) cell
    [0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0]
    ```
    """
    shape = (1, 3, 1, 1)
    mean = torch.tensor(pixel_mean, dtype=torch.float32, device=pixel_values.device).view(shape)
    std = torch.tensor(pixel_std, dtype=torch.float32, device=pixel_values.device).view(shape)
    rgb = (pixel_values.float() * std + mean).clamp(0.0, 1.0).flatten(2)  # (images, 3, pixels)
    foreground = (rgb.min(dim=1).values <= COLOUR_HISTOGRAM_BACKGROUND).float()
    too_few = foreground.sum(dim=-1, keepdim=True) < COLOUR_HISTOGRAM_MIN_FOREGROUND
    weights = torch.where(too_few, torch.ones_like(foreground), foreground)
    cells = (rgb * levels).long().clamp(max=levels - 1)
    cell_index = (cells[:, 0] * levels + cells[:, 1]) * levels + cells[:, 2]
    histogram = rgb.new_zeros((rgb.shape[0], levels**3)).scatter_add_(1, cell_index, weights)
    total = weights.sum(dim=-1, keepdim=True)
    channel_mean = (rgb * weights.unsqueeze(1)).sum(dim=-1) / total
    channel_std = (((rgb - channel_mean.unsqueeze(-1)) ** 2 * weights.unsqueeze(1)).sum(dim=-1) / total).sqrt()
    return torch.cat([(histogram / total).sqrt(), channel_mean, channel_std], dim=-1)


def fusion_mlps(config: MultimodalRetrievalConfig, text_embedding_dim: int) -> tuple[nn.Module | None, nn.Module | None]:
    """The `(query_fusion, product_fusion)` MLPs of the `"mlp"` and `"residual"` fusions; `None` where a side
    concatenates.

    3tower maps the product's `[text ; image]` into the query (text) space; 4tower fuses each side's pair into
    `fusion_output_dim` (the text embedding size by default; always that size for `"residual"`, which adds the
    MLP's output to the text vector).
    """
    if not config.uses_images or config.fusion not in MLP_FUSIONS:
        return None, None
    sizes = dict(hidden_size=config.fusion_hidden_size, num_layers=config.fusion_num_layers, dropout=config.fusion_dropout)
    product_input = text_embedding_dim + fused_image_feature_size(config)
    if config.architecture == "3tower":
        return None, FusionMLP(product_input, output_size=text_embedding_dim, **sizes)
    output_size = text_embedding_dim if config.fusion == "residual" else config.fusion_output_dim or text_embedding_dim
    query_input = text_embedding_dim + dual_encoder_embedding_size(config.dual_encoder_config)
    return FusionMLP(query_input, output_size=output_size, **sizes), FusionMLP(product_input, output_size=output_size, **sizes)


def image_branch_layers(model) -> list[nn.Linear]:
    """The last layer of each residual fusion MLP of `model` (`query_fusion`, `product_fusion`): what the image adds
    to the text vector goes through them, so zeroed they silence it. Empty for the other fusions.

    Example: `[layer.out_features for layer in image_branch_layers(model)]` gives `[384, 384]` for a 4tower MiniLM.
    """
    if model.config.fusion != "residual":
        return []
    return [fusion.layers[-1] for fusion in (model.query_fusion, model.product_fusion) if fusion is not None]


def fuse_features(
    text: torch.Tensor,
    other: torch.Tensor,
    alpha: float,
    fusion_mlp: nn.Module | None = None,
    image_mask: torch.Tensor | None = None,
    missing_image_embedding: torch.Tensor | None = None,
    residual: bool = False,
    branch_weight: float = 1.0,
) -> torch.Tensor:
    """Combines one side's text-tower vector with its dual-encoder/vision vector (both L2-normalised first).

    Concatenation weighs them `[alpha * text ; (1 - alpha) * other]`; an MLP reads `[text ; other]`, and with
    `residual=True` its output, times `branch_weight`, is added to the text vector. Rows where `image_mask` is
    False get a zero image half (concatenation) or `missing_image_embedding` (MLP).

    Example:
    ```python
    >>> fuse_features(torch.ones(2, 4), torch.ones(2, 3), alpha=0.5).shape
    torch.Size([2, 7])
    ```
    """
    other = F.normalize(other.to(text.dtype), dim=-1)
    if image_mask is not None:
        keep = image_mask.unsqueeze(-1)
        if fusion_mlp is not None:
            missing = F.normalize(missing_image_embedding, dim=-1).to(text.dtype)
            other = torch.where(keep, other, missing.expand_as(other))
        else:
            other = other * keep.to(other.dtype)
    text = F.normalize(text, dim=-1)
    if fusion_mlp is not None:
        fused = fusion_mlp(torch.cat([text, other], dim=-1))
        return text + branch_weight * fused if residual else fused
    return torch.cat([alpha * text, (1 - alpha) * other], dim=-1)


def _padding_as_no_token(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """`input_ids` with padding set to -1, so that no phrase matches it (no token id is negative)."""
    return input_ids if attention_mask is None else input_ids.masked_fill(attention_mask == 0, -1)


def token_phrase_starts(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, phrase: list[int]) -> torch.Tensor:
    """Where `phrase` (token ids) starts among each row's real tokens, `(batch, length)` bool; all False for an empty
    phrase or one longer than the rows.

    Example:
    ```python
    >>> token_phrase_starts(torch.tensor([[101, 2417, 3797, 102]]), None, [2417, 3797]).tolist()
    [[False, True, False, False]]
    ```
    """
    starts = torch.zeros(input_ids.shape, dtype=torch.bool, device=input_ids.device)
    if not 0 < len(phrase) <= input_ids.shape[1]:
        return starts
    windows = _padding_as_no_token(input_ids, attention_mask).unfold(1, len(phrase), 1)
    starts[:, : windows.shape[1]] = (windows == torch.tensor(phrase, device=input_ids.device)).all(-1)
    return starts


def find_token_phrases(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None, phrases: list[list[int]]
) -> torch.Tensor:
    """Whether each row's real tokens hold one of `phrases` (token id sequences) as a contiguous run; `(batch,)` bool.
    A phrase at the start of a longer word ("blue" in "Bluebell") counts as found, which errs towards leaving a text
    alone.

    Example:
    ```python
    >>> find_token_phrases(torch.tensor([[101, 2417, 3797, 102], [101, 3797, 102, 0]]), None, [[2417]])
    tensor([ True, False])
    ```
    """
    input_ids = _padding_as_no_token(input_ids, attention_mask)  # once for all phrases
    found = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    for phrase in phrases:
        found |= token_phrase_starts(input_ids, None, phrase).any(-1)
    return found


def named_token_phrases(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None, phrase_forms: list[list[list[int]]]
) -> torch.Tensor:
    """Which phrases each row's real tokens name, `(batch, num_phrases)` bool; each phrase is given by its forms
    (token id sequences, e.g. its casings). A match lying wholly inside a longer phrase's match does not count, so
    that "navy blue" names navy blue, not blue as well.

    Example:
    ```python
    >>> navy_blue, blue, white = [[3212, 2630]], [[2630]], [[2317]]  # MiniLM token ids
    >>> named_token_phrases(torch.tensor([[101, 3212, 2630, 2317, 102]]), None, [navy_blue, blue, white]).tolist()
    [[True, False, True]]
    ```
    """
    input_ids = _padding_as_no_token(input_ids, attention_mask)  # once for all forms
    starts_by_form = [  # (phrase index, form length, (batch, length) bool: where the form starts)
        (index, len(form), token_phrase_starts(input_ids, None, form))
        for index, forms in enumerate(phrase_forms) for form in forms
    ]

    def covered(starts: torch.Tensor, size: int) -> torch.Tensor:  # every token inside a match
        cover = starts.clone()
        for offset in range(1, size):
            cover[:, offset:] |= starts[:, :-offset]
        return cover

    covers = [(size, covered(starts, size)) for _, size, starts in starts_by_form]
    named = torch.zeros(input_ids.shape[0], len(phrase_forms), dtype=torch.bool, device=input_ids.device)
    for index, size, starts in starts_by_form:
        longer = [cover for other_size, cover in covers if other_size > size]
        if longer:
            inside = torch.stack(longer).any(0)
            wholly_inside = inside.clone()
            for offset in range(1, size):
                wholly_inside[:, :-offset] &= inside[:, offset:]
            starts = starts & ~wholly_inside
        named[:, index] |= starts.any(-1)
    return named


def insert_tokens_before_end(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    token_type_ids: torch.Tensor | None,
    insertions: list[list[int]],
    end_token_id: int | None,
    pad_token_id: int = 0,
    max_length: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Row `i`'s real tokens with `insertions[i]` added before its closing token (when that is `end_token_id`, as
    BERT's `[SEP]`), else at its end; returns `(input_ids, attention_mask, token_type_ids)` padded on the side the
    input was, where the new tokens take the segment of the token before them. A row that would exceed `max_length`
    (the tower's position limit) loses text tokens just before the insertion, never the insertion or its ends.

    Example:
    ```python
    >>> ids, mask, _ = insert_tokens_before_end(torch.tensor([[101, 3797, 102]]), None, None, [[2417]], 102)
    >>> ids.tolist(), mask.tolist()
    ([[101, 3797, 2417, 102]], [[1, 1, 1, 1]])
    ```
    """
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    masks = attention_mask.bool().cpu()
    # Left padding: some row starts with padding while every row ends with a real token.
    left_padded = bool((~masks[:, 0]).any() and masks[:, -1].all())
    all_ids = input_ids.cpu().tolist()
    all_types = token_type_ids.cpu().tolist() if token_type_ids is not None else None
    rows, types = [], []
    for position, extra in enumerate(insertions):
        keep = masks[position].tolist()
        tokens = [token for token, kept in zip(all_ids[position], keep) if kept]
        segments = ([segment for segment, kept in zip(all_types[position], keep) if kept] if all_types is not None
                    else [0] * len(tokens))
        cut = len(tokens) - 1 if extra and tokens and end_token_id is not None and tokens[-1] == end_token_id else len(tokens)
        overflow = 0 if max_length is None else max(0, len(tokens) + len(extra) - max_length)
        start = max(1, cut - overflow) if overflow else cut  # keep the opening token ([CLS])
        segment = segments[start - 1] if start > 0 else 0
        rows.append(tokens[:start] + list(extra) + tokens[cut:])
        types.append(segments[:start] + [segment] * len(extra) + segments[cut:])
    width = max(len(row) for row in rows)
    new_ids = torch.full((len(rows), width), pad_token_id, dtype=input_ids.dtype)
    new_mask = torch.zeros((len(rows), width), dtype=attention_mask.dtype)
    new_types = torch.zeros((len(rows), width), dtype=input_ids.dtype) if token_type_ids is not None else None
    for position, (row, segments) in enumerate(zip(rows, types)):
        span = slice(width - len(row), width) if left_padded else slice(0, len(row))
        new_ids[position, span] = torch.tensor(row, dtype=input_ids.dtype)
        new_mask[position, span] = 1
        if new_types is not None:
            new_types[position, span] = torch.tensor(segments, dtype=input_ids.dtype)
    device = input_ids.device
    return new_ids.to(device), new_mask.to(device), None if new_types is None else new_types.to(device)


class VisualWordTagger(nn.Module):
    r"""
    Reads a product's visual word (its colour) off its image features, and writes it into the product text tokens
    when the text names none: a catalogue whose titles omit the colour then still matches "red kurta" through the
    text tower, which understands words far better than an image vector added to its output.

    The vocabulary, its token ids in the product tokenizer, and the colour phrases that count as "the text names a
    colour" live in the config (`visual_tags*`); the linear classifier is fitted on frozen image features
    (`training.visual_tagger.fit_visual_tagger`) and never trained by the retrieval loss (a chosen word has no
    gradient).

    Example:
    ```python
    >>> tagger = model.visual_tagger  # a model whose config has `visual_tags`
    >>> ids, mask, types = tagger.write_tags(input_ids, attention_mask, None, image_features, image_mask)
    ```
    """

    def __init__(self, config: MultimodalRetrievalConfig, feature_size: int):
        super().__init__()
        # Settings are read from the config at every call, so the saved config always says what the model does.
        self.config = config
        self.classifier = nn.Linear(feature_size, len(config.visual_tags))
        self.classifier.requires_grad_(False)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        """Probabilities over the vocabulary, `(num_products, num_tags)`."""
        return torch.softmax(self.classifier(image_features.to(self.classifier.weight.dtype)), dim=-1)

    def chosen_tags(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, image_features: torch.Tensor,
        image_mask: torch.Tensor | None = None,
    ) -> list[int | None]:
        """Per product, the index of the word to write (`None`: the text names a colour, the image is missing, or
        no word is probable enough). With `config.visual_tag_named_token_ids`, a text that names several of the tags
        is an exception: it gets the most probable of those it names, when that one is probable enough among them."""
        if image_mask is None:  # the image tower gives image-less products all-zero features
            image_mask = image_features.abs().sum(dim=-1) > 0
        probabilities = self(image_features).to(input_ids.device)
        best, chosen = probabilities.max(dim=-1)
        # Strictly above: an unfitted (zero) classifier's uniform probabilities never pass.
        write = best > self.config.visual_tag_min_probability
        write &= ~find_token_phrases(input_ids, attention_mask, self.config.visual_tag_mention_token_ids or [])
        if self.config.visual_tag_named_token_ids:
            # A text naming several of the tags ("navy blue and white striped") gets the one its image favours,
            # among those it names: the product's own colour, told apart from its trims.
            named = named_token_phrases(input_ids, attention_mask, self.config.visual_tag_named_token_ids)
            several = named.sum(dim=-1) > 1
            among = probabilities * named
            among_best, among_chosen = (among / among.sum(dim=-1, keepdim=True).clamp_min(1e-12)).max(dim=-1)
            chosen = torch.where(several, among_chosen, chosen)
            write = torch.where(several, among_best > self.config.visual_tag_min_probability, write)
        write &= image_mask.to(device=input_ids.device, dtype=torch.bool)
        return [index if keep else None for index, keep in zip(chosen.tolist(), write.tolist())]

    def write_tags(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        token_type_ids: torch.Tensor | None,
        image_features: torch.Tensor,
        image_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """The product tokens with each chosen word inserted (see `chosen_tags`); unchanged when none is."""
        chosen = self.chosen_tags(input_ids, attention_mask, image_features, image_mask)
        if all(index is None for index in chosen):
            return input_ids, attention_mask, token_type_ids
        token_ids = self.config.visual_tag_token_ids
        insertions = [token_ids[index] if index is not None else [] for index in chosen]
        text_config = self.config.product_text_config if not self.config.share_text_towers else self.config.text_config
        return insert_tokens_before_end(
            input_ids, attention_mask, token_type_ids, insertions, self.config.visual_tag_end_token_id,
            self.config.visual_tag_pad_token_id, max_length=getattr(text_config, "max_position_embeddings", None),
        )


def embed_in_length_order(items: list, lengths: list[int], embed, *, batch_size: int, show_progress_bar: bool = False,
                          to_cpu: bool = True) -> torch.Tensor:
    """Runs `embed` (a batch of items to a tensor or array of rows) over `items` in batches of similar `lengths`
    (less padding) and returns the float32 rows in input order, on the CPU unless `to_cpu=False`.

    Example:
    ```python
    >>> embed_in_length_order(["a", "ccc", "bb"], [1, 3, 2], lambda batch: [[len(x)] for x in batch], batch_size=2)
    tensor([[1.],
            [3.],
            [2.]])
    ```
    """
    from transformers.utils.logging import tqdm

    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}.")
    if not items:
        raise ValueError("Nothing to encode: got an empty list.")
    # One batch pads to its longest item whatever the order: it goes as given (what it reports, too, stays in order).
    order = list(range(len(items)))
    if len(items) > batch_size:
        order.sort(key=lambda index: -lengths[index])
    chunks = []
    for start in tqdm(range(0, len(order), batch_size), desc="Batches", disable=not show_progress_bar):
        rows = torch.as_tensor(embed([items[index] for index in order[start : start + batch_size]])).float()
        chunks.append(rows.cpu() if to_cpu else rows)
    return torch.cat(chunks)[torch.argsort(torch.tensor(order))]


def as_requested_embeddings(embeddings: torch.Tensor, *, single: bool, convert_to_numpy: bool,
                            convert_to_tensor: bool):
    """The `encode_*` return value: the first row alone for a `single` input, as a numpy array unless a tensor is
    asked for (`convert_to_tensor`, or `convert_to_numpy=False`), as sentence-transformers' `encode` returns."""
    if single:
        embeddings = embeddings[0]
    if convert_to_tensor or not convert_to_numpy:
        return embeddings
    return embeddings.numpy()


# The package's model cards (`modeling_mmretrieval.training.model_card`) carry this tag. A model keeps such a card
# (`model.model_card`) and writes it in `save_pretrained` and uploads it in `push_to_hub`, in place of transformers'
# placeholder card; any other README is left alone.
MODEL_CARD_TAG = "mmretrieval"
MODEL_CARD_NAME = "README.md"
# Namespace a card's usage snippet names while the repository is not known yet; pushing fills in the real one.
PLACEHOLDER_NAMESPACE = "your-namespace"
_PLACEHOLDER_REPO_ID = re.compile(rf"\b{PLACEHOLDER_NAMESPACE}/[\w.-]+")
_CARD_HEADER = re.compile(r"\A---\r?\n(.*?)\r?\n---\r?\n", re.DOTALL)  # the YAML metadata block
# `from_pretrained` keywords that say where (and how) to read a file of the checkpoint.
_FILE_LOOKUP_KWARGS = ("cache_dir", "force_download", "proxies", "token", "revision", "local_files_only", "subfolder")


def is_package_model_card(text: str) -> bool:
    r"""Whether a README.md is a model card written by this package (its YAML tags hold `MODEL_CARD_TAG`).

    Example:
    ```python
    >>> is_package_model_card("---\ntags:\n- mmretrieval\n---\n# A retriever")
    True
    ```
    """
    import yaml

    header = _CARD_HEADER.match(text)
    try:
        metadata = yaml.safe_load(header.group(1)) if header else None
    except yaml.YAMLError:
        return False
    tags = metadata.get("tags") if isinstance(metadata, dict) else None
    return isinstance(tags, list) and MODEL_CARD_TAG in tags


def card_for_repo(card: str, repo_id: str, tags: list[str] | None = None) -> str:
    r"""`card` as published at `repo_id`: the placeholder repository (`your-namespace/<name>`) of its usage snippet
    becomes `repo_id`, and `tags` join its YAML tags.

    Example:
    ```python
    >>> card_for_repo('---\ntags:\n- mmretrieval\n---\nfrom_pretrained("your-namespace/shoes")', "me/shoes")
    '---\ntags:\n- mmretrieval\n---\nfrom_pretrained("me/shoes")'
    ```
    """
    card = _PLACEHOLDER_REPO_ID.sub(repo_id, card)
    if not tags:
        return card
    from huggingface_hub import ModelCard

    model_card = ModelCard(card, ignore_metadata_errors=True)
    model_card.data.tags = list(dict.fromkeys([*(model_card.data.tags or []), *tags]))
    return str(model_card)


def read_package_model_card(name_or_path: str | os.PathLike, lookup_kwargs: dict | None = None) -> str | None:
    """The package's model card saved with a checkpoint (a local folder or a Hub repo), or None when it has none.

    A missing or unreadable card never stops a model from loading: it only means the model carries no card.

    Example:
    ```python
    >>> read_package_model_card("outputs/main_job/final").splitlines()[0]
    '---'
    ```
    """
    from transformers.utils import cached_file

    lookup = {key: value for key, value in (lookup_kwargs or {}).items() if key in _FILE_LOOKUP_KWARGS}
    try:
        path = cached_file(
            name_or_path, MODEL_CARD_NAME, _raise_exceptions_for_missing_entries=False,
            _raise_exceptions_for_connection_errors=False, _raise_exceptions_for_gated_repo=False, **lookup,
        )
        text = Path(path).read_text(encoding="utf-8") if path else None
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return text if text and is_package_model_card(text) else None


@dataclass
class MultimodalRetrievalOutput(ModelOutput):
    """
    Output of [`MultimodalRetrievalModel.forward`].

    Args:
        loss (`torch.FloatTensor`, *optional*): symmetric NT-Xent loss, when `return_loss=True`.
        logits_per_query (`torch.FloatTensor` of shape `(num_queries, num_products)`):
            `scale * cosine(query, product)`; products are the positives then any hard negatives.
        query_embeds (`torch.FloatTensor` of shape `(num_queries, embedding_dim)`): L2-normalised.
        product_embeds (`torch.FloatTensor` of shape `(num_products, embedding_dim)`): L2-normalised.
        logit_scale (`torch.FloatTensor`): the scale `1 / temperature` used.
        query_text_embeds, product_text_embeds (`torch.FloatTensor`, *optional*): the text towers' vectors before
            any fusion, L2-normalised; returned with `output_text_embeds=True`.
    """

    loss: torch.FloatTensor | None = None
    logits_per_query: torch.FloatTensor | None = None
    query_embeds: torch.FloatTensor | None = None
    product_embeds: torch.FloatTensor | None = None
    logit_scale: torch.FloatTensor | None = None
    query_text_embeds: torch.FloatTensor | None = None
    product_text_embeds: torch.FloatTensor | None = None


class MultimodalRetrievalPreTrainedModel(PreTrainedModel):
    # `model_card`: the README.md text (the package's model card) that `save_pretrained` writes and `push_to_hub`
    # uploads; `from_pretrained` restores it from a checkpoint that has one. None: transformers' behaviour. A model
    # whose weights change after loading still carries the old card: replace it (or set None) before saving.
    config_class = MultimodalRetrievalConfig
    config: MultimodalRetrievalConfig
    base_model_prefix = "mmretrieval"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    model_card: str | None = None

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        r"""
        Loads a checkpoint from the Hub or a local folder, from safetensors weights only.

        Pickle weights (`pytorch_model.bin`) can execute code when unpickled, so they are refused: convert a
        trusted pickle checkpoint once with `safetensors` and load that. Passing `use_safetensors=False`
        explicitly lifts the refusal (transformers then unpickles with `weights_only=True`).
        """
        kwargs.setdefault("use_safetensors", True)
        try:
            loaded = super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        except OSError as error:
            if kwargs["use_safetensors"] and "safetensors" in str(error):
                raise OSError(
                    f"{pretrained_model_name_or_path} has no safetensors weights. MultimodalRetrievalModel loads only "
                    "safetensors, because pickle files (pytorch_model.bin) can run arbitrary code when loaded. If you "
                    "trust this checkpoint, convert it: `safetensors.torch.save_file(torch.load(path, "
                    "weights_only=True), 'model.safetensors')`, or pass use_safetensors=False."
                ) from error
            raise
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # (model, loading_info) on request
        model.model_card = read_package_model_card(pretrained_model_name_or_path, kwargs)
        return loaded

    # ----- model card: saved with the weights, uploaded in place of transformers' placeholder ----------------
    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        is_main_process: bool = True,
        state_dict: dict | None = None,
        push_to_hub: bool = False,
        **kwargs,
    ):
        """Saves the model as transformers does, plus its model card (`model.model_card`) as README.md.

        With `push_to_hub=True` the folder, card included, is uploaded to `repo_id` (default: the folder's name in
        the token's namespace); `commit_message`, `commit_description`, `private`, `create_pr` and `revision` go to
        the Hub. A model without a card saves and pushes exactly as transformers does.

        Example:
        ```python
        >>> model.save_pretrained("retriever")  # model.safetensors, config.json, the code files, README.md
        ```
        """
        if self.model_card is None:
            return super().save_pretrained(save_directory, is_main_process=is_main_process, state_dict=state_dict,
                                           push_to_hub=push_to_hub, **kwargs)
        hub_options = {
            name: kwargs.pop(name)
            for name in ("repo_id", "commit_message", "commit_description", "private", "create_pr", "revision")
            if name in kwargs
        }
        super().save_pretrained(save_directory, is_main_process=is_main_process, state_dict=state_dict, **kwargs)
        if not is_main_process:
            return None
        card = self.model_card
        if push_to_hub:
            from huggingface_hub import HfApi

            repo_id = hub_options.pop("repo_id", Path(save_directory).name)
            token = kwargs.get("token")
            repo_id = HfApi(token=token).create_repo(
                repo_id, private=hub_options.pop("private", None), exist_ok=True
            ).repo_id
            card = card_for_repo(card, repo_id, self.model_tags)
        Path(save_directory, MODEL_CARD_NAME).write_text(card, encoding="utf-8")
        if push_to_hub:
            return self._upload_modified_files(save_directory, repo_id, files_timestamps={}, token=kwargs.get("token"),
                                               **hub_options)
        return None

    def push_to_hub(
        self,
        repo_id: str,
        *,
        commit_message: str | None = None,
        commit_description: str | None = None,
        private: bool | None = None,
        token: bool | str | None = None,
        revision: str | None = None,
        create_pr: bool = False,
        max_shard_size: int | str | None = "50GB",
        tags: list[str] | None = None,
    ):
        """Uploads the model to the Hub as transformers' `push_to_hub` does (same arguments), with the package's
        model card (`model.model_card`, its usage snippet naming `repo_id`) instead of the placeholder card.

        A model carries a card when it was loaded from a checkpoint that has one or trained by `mmretrieval train`;
        without one, this is transformers' `push_to_hub`.

        Example:
        ```python
        >>> model = AutoModel.from_pretrained("outputs/main_job/final", trust_remote_code=True)
        >>> model.push_to_hub("my-user/fashion-retriever", private=True)
        CommitInfo(commit_url='https://huggingface.co/my-user/fashion-retriever/commit/...', ...)
        ```
        """
        hub_arguments = dict(
            commit_message=commit_message, commit_description=commit_description, private=private, token=token,
            revision=revision, create_pr=create_pr, max_shard_size=max_shard_size, tags=tags,
        )
        if self.model_card is None:
            return super().push_to_hub(repo_id, **hub_arguments)
        from huggingface_hub import HfApi

        repo_id = HfApi(token=token).create_repo(repo_id, private=private, exist_ok=True).repo_id
        tags = list(dict.fromkeys([*(self.model_tags or []), *([tags] if isinstance(tags, str) else tags or [])]))
        with tempfile.TemporaryDirectory() as folder:
            super().save_pretrained(folder, max_shard_size=max_shard_size)
            Path(folder, MODEL_CARD_NAME).write_text(card_for_repo(self.model_card, repo_id, tags), encoding="utf-8")
            return self._upload_modified_files(
                folder, repo_id, files_timestamps={}, commit_message=commit_message, token=token,
                create_pr=create_pr, revision=revision, commit_description=commit_description,
            )

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, MultimodalRetrievalModel):
            init.constant_(module.logit_scale, math.log(module.config.logit_scale_init_value))
            if module.missing_image_embedding is not None:
                # Only its direction is used (it is normalised); a zero start would make that gradient explode.
                size = module.missing_image_embedding.shape[0]
                init.normal_(module.missing_image_embedding, std=size**-0.5)
            if module.visual_tagger is not None:
                # An unfitted tagger gives every word the same probability: it writes nothing above a threshold.
                init.zeros_(module.visual_tagger.classifier.weight)
                init.zeros_(module.visual_tagger.classifier.bias)
            # The image branch starts silent: a new model ranks exactly as its text tower does.
            for layer in image_branch_layers(module):
                init.zeros_(layer.weight)
                init.zeros_(layer.bias)


class MultimodalRetrievalModel(MultimodalRetrievalPreTrainedModel):
    r"""
    A product-search retriever: query and product towers plus fusion, trained with symmetric NT-Xent.

    Build it from a config (random towers), from pretrained towers with [`from_towers_pretrained`], or
    load a trained checkpoint with `from_pretrained`.

    Example:

    ```python
    >>> from modeling_mmretrieval import MultimodalRetrievalModel, MultimodalRetrievalProcessor
    >>> model = MultimodalRetrievalModel.from_towers_pretrained(
    ...     "sentence-transformers/all-MiniLM-L6-v2", "openai/clip-vit-base-patch32",
    ...     architecture="4tower", fusion="concat")
    >>> processor = MultimodalRetrievalProcessor.from_towers_pretrained(
    ...     "sentence-transformers/all-MiniLM-L6-v2", "openai/clip-vit-base-patch32", config=model.config)
    >>> queries = processor.encode_queries(["red running shoes for men"])
    >>> query_embeds = model.get_query_embeddings(**queries)
    ```
    """

    def __init__(
        self,
        config: MultimodalRetrievalConfig,
        text_model: PreTrainedModel | None = None,
        product_text_model: PreTrainedModel | None = None,
        dual_encoder: PreTrainedModel | None = None,
        vision_model: PreTrainedModel | None = None,
    ):
        super().__init__(config)
        # Towers passed in (pretrained) are adopted as they are; otherwise they are built randomly from the
        # sub-configs. `__init__` never downloads weights: see `from_towers_pretrained`.
        self.text_model = adopt_tower(text_model, config.text_config, is_text_tower=True)
        self.product_text_model = None
        if not config.share_text_towers:
            self.product_text_model = adopt_tower(product_text_model, config.product_text_config, is_text_tower=True)
        self.dual_encoder = adopt_tower(dual_encoder, config.dual_encoder_config) if config.architecture == "4tower" else None
        self.vision_model = adopt_tower(vision_model, config.vision_config) if config.architecture == "3tower" else None

        text_size = config.text_config.hidden_size
        self.text_projection = None
        self.product_text_projection = None
        if config.projection_dim is not None:
            self.text_projection = nn.Linear(text_size, config.projection_dim, bias=False)
            if not config.share_text_towers:
                self.product_text_projection = nn.Linear(
                    config.product_text_config.hidden_size, config.projection_dim, bias=False
                )
        self.text_embedding_dim = config.projection_dim or text_size

        self.query_fusion, self.product_fusion = fusion_mlps(config, self.text_embedding_dim)
        self.missing_image_embedding = None
        if self.product_fusion is not None:
            # A learned stand-in for the image half of image-less products, so the MLP never reads a feature
            # computed from a fake image.
            size = fused_image_feature_size(config)
            self.missing_image_embedding = nn.Parameter(torch.randn(size) * size**-0.5)

        self.visual_tagger = VisualWordTagger(config, image_feature_size(config)) if config.visual_tags else None

        self.logit_scale = nn.Parameter(torch.tensor(math.log(config.logit_scale_init_value)))
        self.logit_scale.requires_grad_(config.learn_logit_scale)
        self.loss_function_module = NTXentLoss()
        # How a text tower runs over a token batch: `pooled_text_states` when None. An explicit hook, so a
        # caller can install a faster runner with the same results (`speedups.apply`) without this class
        # knowing about it.
        self.text_tower_runner = None
        self.post_init()
        self._apply_image_tower_lock()

    def install_visual_tagger(
        self,
        tags: list[str],
        token_ids: list[list[int]],
        mention_token_ids: list[list[int]],
        end_token_id: int | None,
        weight: torch.Tensor,
        bias: torch.Tensor,
        pad_token_id: int = 0,
        min_probability: float = 0.5,
        named_token_ids: list[list[list[int]]] | None = None,
    ) -> None:
        """Gives the model a fitted visual-word tagger (`VisualWordTagger`): its vocabulary and token ids go into the
        config, the classifier's `weight` `(num_tags, image_feature_size)` and `bias` into the weights. Use
        `training.visual_tagger.fit_visual_tagger`, which computes all of them. `named_token_ids` (each tag's forms
        in product texts) also tags texts that name several of the tags (`VisualWordTagger.chosen_tags`).

        Example: `model.install_visual_tagger(["red", "blue"], [[2417], [2630]], [[2417], [2630]], 102, weight, bias)`.
        """
        if not self.config.uses_images:
            raise ValueError("`architecture='text_only'` has no image features to tag from.")
        if tuple(weight.shape) != (len(tags), self.image_feature_size):
            raise ValueError(f"the tagger's weight must be ({len(tags)}, {self.image_feature_size}), got {tuple(weight.shape)}")
        settings = dict(
            visual_tags=list(tags), visual_tag_token_ids=[list(ids) for ids in token_ids],
            visual_tag_mention_token_ids=[list(ids) for ids in mention_token_ids], visual_tag_end_token_id=end_token_id,
            visual_tag_pad_token_id=pad_token_id, visual_tag_min_probability=float(min_probability),
            visual_tag_named_token_ids=None if named_token_ids is None else [
                [list(ids) for ids in forms] for forms in named_token_ids],
        )
        candidate = copy.deepcopy(self.config)  # checked before the model's own config changes
        for name, value in settings.items():
            setattr(candidate, name, value)
        candidate.validate_visual_tags()
        for name, value in settings.items():
            setattr(self.config, name, value)
        tagger = VisualWordTagger(self.config, self.image_feature_size).to(self.logit_scale.device)
        with torch.no_grad():
            tagger.classifier.weight.copy_(weight)
            tagger.classifier.bias.copy_(bias)
        self.visual_tagger = tagger

    def set_image_branch_weight(self, weight: float) -> None:
        """Sets the weight on what the residual fusions add to the text vectors (`config.image_branch_weight`), so
        that each embedding is `text + weight * branch` before normalisation: 1 is the model as trained, 0 ranks by
        the text towers alone, and a weight in between trades the image's recall on text-silent products for top-10
        precision on the others. A search-time setting, best chosen on a validation split; a saved model keeps it.

        Example: `model.set_image_branch_weight(0.5)`.
        """
        if self.config.fusion != "residual":
            raise ValueError(f"only the residual fusion has an image branch to weigh, not {self.config.fusion!r}")
        if not (math.isfinite(weight) and weight >= 0):
            raise ValueError(f"the image branch weight must be a finite number >= 0, got {weight}")
        self.config.image_branch_weight = float(weight)

    def silence_image_branch(self) -> None:
        """Turns the residual fusions' image branch off (weight 0), as at initialisation: the model then ranks by its
        text towers alone (and the visual tags its tagger writes into product texts). Shows what a trained image
        branch adds. Example: `model.silence_image_branch()`."""
        self.set_image_branch_weight(0.0)

    def remove_visual_tagger(self) -> None:
        """Drops the visual-word tagger (module and config), e.g. before training without one from a checkpoint
        that has one. Example: `model.remove_visual_tagger()`."""
        self.visual_tagger = None
        self.config.visual_tags = self.config.visual_tag_token_ids = self.config.visual_tag_mention_token_ids = None
        self.config.visual_tag_named_token_ids = None
        self.config.visual_tag_end_token_id = None

    def lock_image_tower(self, locked: bool = True) -> None:
        """Freezes (no gradients, eval mode) or unfreezes the image tower, and records it in the config.

        Under LiT (`config.train_dual_text_tower`) only the dual encoder's vision tower is locked; its text
        tower and projections keep training. A locked tower's features can be computed once and cached
        (`image_features_are_frozen`).

        Example:
        ```python
        >>> model.lock_image_tower(False)  # fine-tune the image tower too
        >>> model.config.freeze_image_towers
        False
        ```
        """
        if self.image_tower is None:
            return
        self.config.freeze_image_towers = locked
        self.image_tower.requires_grad_(True)
        self.image_tower.train(self.training)  # an unlocked tower follows the model's mode again
        self._apply_image_tower_lock()

    def _apply_image_tower_lock(self) -> None:
        if self.visual_tagger is not None:  # fitted, never trained: a loaded checkpoint must not make it trainable
            self.visual_tagger.requires_grad_(False)
        if not self.config.freeze_image_towers or self.image_tower is None:
            return
        if self.config.train_dual_text_tower:
            # LiT: only the dual encoder's vision tower is locked; its text tower and projections train.
            self.dual_encoder.vision_model.requires_grad_(False)
            self.dual_encoder.vision_model.eval()
            return
        self.image_tower.requires_grad_(False)
        self.image_tower.eval()

    def check_image_queries_supported(self) -> None:
        """Raises a `ValueError` explaining why unless this model can embed image queries."""
        if self.config.architecture != "4tower" or self.config.fusion in MLP_FUSIONS:
            raise ValueError(
                "Image queries need a 4tower model with `fusion='concat'` or `'alpha_concat'`: the product "
                "index then holds the dual encoder's image half, which an image query can match. "
                f"This model is architecture={self.config.architecture!r}, fusion={self.config.fusion!r}."
                + (" Photos of products are still searchable through a visual-similarity index of the image tower's "
                   "features (`retrieval.visual_index`, `search_images(..., visual_index=...)`)."
                   if self.config.uses_images else "")
            )

    @property
    def image_features_are_frozen(self) -> bool:
        """Whether `get_image_features` is fixed during training, so it can be computed once and cached."""
        return self.config.freeze_image_towers and not self.config.train_dual_text_tower

    @property
    def image_tower(self) -> PreTrainedModel | None:
        return self.dual_encoder if self.dual_encoder is not None else self.vision_model

    @property
    def embedding_dim(self) -> int:
        """Size of the query and product embeddings."""
        if self.config.architecture == "4tower":
            if self.config.fusion in MLP_FUSIONS:
                return self.query_fusion.layers[-1].out_features
            return self.text_embedding_dim + dual_encoder_embedding_size(self.dual_encoder.config)
        return self.text_embedding_dim

    @property
    def image_feature_size(self) -> int:
        """Width of `get_image_features`: the image tower's vector plus the colour description, if any."""
        return image_feature_size(self.config)

    @property
    def image_tower_feature_size(self) -> int:
        """Width of the image tower's own vector (the dual encoder's space, or the vision hidden size): the first
        columns of `get_image_features`."""
        return image_tower_feature_size(self.config)

    @property
    def residual_fusion(self) -> bool:
        return self.config.fusion == "residual"

    @property
    def fusion_alpha(self) -> float:
        return 0.5 if self.config.fusion == "concat" else self.config.fusion_alpha

    def train(self, mode: bool = True):
        super().train(mode)
        # Frozen towers keep eval mode (no dropout) so their features are deterministic and cacheable.
        self._apply_image_tower_lock()
        return self

    # ----- tower encoders -------------------------------------------------------------------------------
    def _encode_text(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        token_type_ids: torch.Tensor | None,
        side: str,
    ) -> torch.Tensor:
        use_product_tower = side == "product" and self.product_text_model is not None
        tower = self.product_text_model if use_product_tower else self.text_model
        projection = self.product_text_projection if use_product_tower else self.text_projection
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        run_tower = self.text_tower_runner or pooled_text_states
        pooled = run_tower(tower, {"input_ids": input_ids}, attention_mask, token_type_ids, self.config.pooling)
        return projection(pooled) if projection is not None else pooled

    def _run_image_tower(self, pixel_values: torch.Tensor) -> torch.Tensor:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.image_features_are_frozen):
            if self.dual_encoder is not None:
                return pooled_features(self.dual_encoder.get_image_features(pixel_values=pixel_values))
            return pooled_features(self.vision_model(pixel_values=pixel_values))

    def _image_tower_and_colours(self, pixel_values: torch.Tensor) -> torch.Tensor:
        features = self._run_image_tower(pixel_values)
        levels = self.config.colour_histogram_levels
        if not levels:
            return features
        colours = colour_histogram_features(
            pixel_values, self.config.colour_histogram_pixel_mean, self.config.colour_histogram_pixel_std, levels
        )
        return torch.cat([features, colours.to(features.dtype)], dim=-1)

    def get_image_features(
        self, pixel_values: torch.Tensor, image_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Raw image-tower features, shape `(num_images, image_feature_size)`, zero where `image_mask` is False; with
        `config.colour_histogram_levels` the colour description (`colour_histogram_features`) follows the tower's
        `image_tower_feature_size` columns.

        Only rows with a real image go through the tower. With a frozen tower these features can be
        computed once and passed back as `image_features=` to skip the tower on later epochs.
        """
        if self.image_tower is None:
            raise ValueError("`architecture='text_only'` has no image tower.")
        if image_mask is None:
            return self._image_tower_and_colours(pixel_values)
        image_mask = image_mask.to(device=pixel_values.device, dtype=torch.bool)
        features = torch.zeros(
            (pixel_values.shape[0], self.image_feature_size), dtype=self.logit_scale.dtype, device=pixel_values.device
        )
        if image_mask.any():
            features[image_mask] = self._image_tower_and_colours(pixel_values[image_mask]).to(features.dtype)
        return features

    def _dual_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.image_features_are_frozen):
            output = self.dual_encoder.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
        return pooled_features(output)

    # ----- public embedding API -------------------------------------------------------------------------
    def get_query_embeddings(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        dual_input_ids: torch.Tensor | None = None,
        dual_attention_mask: torch.Tensor | None = None,
        normalize: bool = True,
    ) -> torch.Tensor:
        r"""
        Embeds text queries, shape `(num_queries, embedding_dim)`.

        `input_ids`/`attention_mask` come from the text-tower tokenizer; 4tower models also need
        `dual_input_ids`/`dual_attention_mask` from the dual encoder's tokenizer (the processor's
        `encode_queries` returns both).

        Example:
        ```python
        >>> inputs = processor.encode_queries(["black formal shoes"])
        >>> model.get_query_embeddings(**inputs).shape
        ```
        """
        text = self._encode_text(input_ids, attention_mask, token_type_ids, side="query")
        return self._fuse_query_features(text, dual_input_ids, dual_attention_mask, normalize)

    def _fuse_query_features(
        self, text: torch.Tensor, dual_input_ids: torch.Tensor | None, dual_attention_mask: torch.Tensor | None,
        normalize: bool = True,
    ) -> torch.Tensor:
        """The query embedding from the query text tower's vector (and, for 4tower, the dual encoder's text side)."""
        if self.config.architecture != "4tower":
            embeddings = text
        else:
            if dual_input_ids is None:
                raise ValueError(
                    "4tower queries need `dual_input_ids` (tokens of the dual encoder's tokenizer); use "
                    "`MultimodalRetrievalProcessor.encode_queries`, which produces them."
                )
            dual = self._dual_text_features(dual_input_ids, dual_attention_mask)
            embeddings = fuse_features(text, dual, self.fusion_alpha, self.query_fusion, residual=self.residual_fusion,
                                       branch_weight=self.config.image_branch_weight)
        return F.normalize(embeddings, dim=-1) if normalize else embeddings

    def get_product_text_features(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
        image_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        r"""
        The product text tower's vector (pooled, projected where the model projects), before any fusion, shape
        `(num_products, text_embedding_dim)`. [`fuse_product_features`] turns it into the product embedding.
        With a visual-word tagger (`config.visual_tags`) and the products' `image_features`, the colour read off
        each image is first written into the tokens of the texts that name none (`VisualWordTagger`).

        Example:
        ```python
        >>> inputs = processor.encode_products([{"title": "Nike Men Red Running Shoes"}])
        >>> text = model.get_product_text_features(inputs["input_ids"], inputs["attention_mask"])
        ```
        """
        if self.visual_tagger is not None and image_features is not None:
            input_ids, attention_mask, token_type_ids = self.visual_tagger.write_tags(
                input_ids, attention_mask, token_type_ids, image_features, image_mask
            )
        return self._encode_text(input_ids, attention_mask, token_type_ids, side="product")

    def fuse_product_features(
        self,
        text_features: torch.Tensor,
        image_features: torch.Tensor | None = None,
        image_mask: torch.Tensor | None = None,
        normalize: bool = True,
    ) -> torch.Tensor:
        r"""
        The product embedding from the text tower's vector ([`get_product_text_features`]) and the image tower's
        (`image_features`, from [`get_image_features`]), through the model's fusion; `image_mask` (bool,
        `(num_products,)`) marks the products with a real image (default: all, when `image_features` is given).
        [`get_product_embeddings`] is the text tower followed by this.

        Example:
        ```python
        >>> text = model.get_product_text_features(**text_inputs)
        >>> model.fuse_product_features(text, model.get_image_features(pixel_values)).shape
        ```
        """
        if not self.config.uses_images:
            return F.normalize(text_features, dim=-1) if normalize else text_features
        num_products = text_features.shape[0]
        if image_mask is None:
            image_mask = torch.full((num_products,), image_features is not None, dtype=torch.bool)
        image_mask = image_mask.to(device=text_features.device, dtype=torch.bool)
        if image_features is None:
            if image_mask.any():
                raise ValueError("`image_mask` marks products with images but no `pixel_values` or `image_features` were given.")
            image_features = text_features.new_zeros((num_products, self.image_feature_size))
        image_features = image_features[..., : fused_image_feature_size(self.config)]
        embeddings = fuse_features(
            text_features, image_features, self.fusion_alpha, self.product_fusion, image_mask,
            self.missing_image_embedding, residual=self.residual_fusion, branch_weight=self.config.image_branch_weight,
        )
        return F.normalize(embeddings, dim=-1) if normalize else embeddings

    def get_product_embeddings(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_mask: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
        normalize: bool = True,
    ) -> torch.Tensor:
        r"""
        Embeds products from their text and (for 4tower/3tower) their image, shape `(num_products, embedding_dim)`.

        `image_mask` (bool, `(num_products,)`) marks which products have a real image. Image-less products
        take the documented text-only path: their image half is zero (concat fusions) or the learned
        `missing_image_embedding` (MLP fusions). Without `pixel_values` and `image_features` every product
        is image-less. Precomputed `image_features` (from [`get_image_features`]) replace `pixel_values`.

        Example:
        ```python
        >>> inputs = processor.encode_products([{"title": "Nike Men Red Running Shoes"}], images=[image])
        >>> model.get_product_embeddings(**inputs).shape
        ```
        """
        _, embeddings = self._product_text_and_embeddings(
            input_ids, attention_mask, token_type_ids, pixel_values, image_mask, image_features, normalize
        )
        return embeddings

    def _product_text_and_embeddings(
        self, input_ids, attention_mask, token_type_ids, pixel_values, image_mask, image_features, normalize=True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`(the product text tower's vector, the product embedding)` of one forward pass over the text tower."""
        if not self.config.uses_images:
            text = self.get_product_text_features(input_ids, attention_mask, token_type_ids)
            return text, (F.normalize(text, dim=-1) if normalize else text)
        if image_mask is None:
            has_images = pixel_values is not None or image_features is not None
            image_mask = torch.full((input_ids.shape[0],), has_images, dtype=torch.bool)
        image_mask = image_mask.to(device=input_ids.device, dtype=torch.bool)
        if image_features is None and pixel_values is not None:
            image_features = self.get_image_features(pixel_values, image_mask)
        text = self.get_product_text_features(input_ids, attention_mask, token_type_ids, image_features, image_mask)
        return text, self.fuse_product_features(text, image_features, image_mask, normalize=normalize)

    def get_image_query_embeddings(
        self, pixel_values: torch.Tensor | None = None, image_features: torch.Tensor | None = None, normalize: bool = True
    ) -> torch.Tensor:
        r"""
        Embeds query images for image-to-product search (4tower with `concat`/`alpha_concat` fusion).

        The query vector carries the dual encoder's image feature in the image half and zeros in the
        text half, so its cosine with a product is the image-image similarity of their dual-encoder
        features. MLP fusions and 3tower have no image-only entry into the fused space and raise.

        Example:
        ```python
        >>> pixel_values = processor.encode_images([image])["pixel_values"]
        >>> model.get_image_query_embeddings(pixel_values=pixel_values)
        ```
        """
        self.check_image_queries_supported()
        if image_features is None:
            if pixel_values is None:
                raise ValueError("Pass `pixel_values` or precomputed `image_features`.")
            image_features = self.get_image_features(pixel_values)
        image_features = image_features[..., : self.image_tower_feature_size]
        text_half = image_features.new_zeros((image_features.shape[0], self.text_embedding_dim))
        embeddings = torch.cat([text_half, (1 - self.fusion_alpha) * F.normalize(image_features, dim=-1)], dim=-1)
        return F.normalize(embeddings, dim=-1) if normalize else embeddings

    def forward(
        self,
        query_input_ids: torch.Tensor,
        product_input_ids: torch.Tensor,
        query_attention_mask: torch.Tensor | None = None,
        query_token_type_ids: torch.Tensor | None = None,
        query_dual_input_ids: torch.Tensor | None = None,
        query_dual_attention_mask: torch.Tensor | None = None,
        product_attention_mask: torch.Tensor | None = None,
        product_token_type_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_mask: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
        false_negative_mask: torch.Tensor | None = None,
        return_loss: bool = True,
        output_text_embeds: bool = False,
        **kwargs,
    ) -> MultimodalRetrievalOutput:
        r"""
        Embeds a batch of (query, product) pairs and scores every query against every product.

        Product rows are the B positives (row i belongs to query i) followed by any extra hard-negative
        products. With `return_loss=True` the output carries the symmetric NT-Xent loss with in-batch
        negatives; `scale = 1 / temperature = exp(logit_scale)`, clamped to `max_logit_scale`.
        `false_negative_mask` (bool, `(num_queries, num_products)`) marks in-batch products that also satisfy
        a query (e.g. another product of the same type and colour); the loss leaves them out of the softmax.
        `output_text_embeds=True` also returns the text towers' own vectors, before any fusion, L2-normalised
        (`query_text_embeds`, `product_text_embeds`), from the same pass.

        Example:
        ```python
        >>> batch = processor(queries=["red shirt"], products=[{"title": "Red Shirt"}], images=[image])
        >>> model(**batch).loss
        ```
        """
        query_text = self._encode_text(query_input_ids, query_attention_mask, query_token_type_ids, side="query")
        query_embeds = self._fuse_query_features(query_text, query_dual_input_ids, query_dual_attention_mask)
        product_text, product_embeds = self._product_text_and_embeddings(
            product_input_ids, product_attention_mask, product_token_type_ids, pixel_values, image_mask, image_features
        )
        output = self.score(query_embeds, product_embeds, return_loss=return_loss, false_negative_mask=false_negative_mask)
        if output_text_embeds:
            output["query_text_embeds"] = F.normalize(query_text, dim=-1)
            output["product_text_embeds"] = F.normalize(product_text, dim=-1)
        return output

    def score(
        self,
        query_embeds: torch.Tensor,
        product_embeds: torch.Tensor,
        return_loss: bool = True,
        false_negative_mask: torch.Tensor | None = None,
    ) -> MultimodalRetrievalOutput:
        """Logits and (optionally) the NT-Xent loss for already computed, normalised embeddings."""
        scale = self.logit_scale.exp().clamp(max=self.config.max_logit_scale)
        if return_loss:
            loss, logits = self.loss_function_module(query_embeds, product_embeds, scale, false_negative_mask)
        else:
            loss, logits = None, scale * query_embeds @ product_embeds.t()
        return MultimodalRetrievalOutput(
            loss=loss, logits_per_query=logits, query_embeds=query_embeds, product_embeds=product_embeds, logit_scale=scale
        )

    # ----- encoding in one call (in the manner of sentence-transformers' encode_query / encode_document) ------
    def get_processor(self, processor=None):
        """The processor that the `encode_*` methods use: `processor` when given, else the one saved with this
        checkpoint, loaded once from `name_or_path` (the folder or Hub id `from_pretrained` read).

        Example:
        ```python
        >>> model = MultimodalRetrievalModel.from_pretrained("outputs/main_job/final")
        >>> model.get_processor().max_query_length
        32
        ```
        """
        if processor is not None:
            return processor
        cached = self.__dict__.get("_checkpoint_processor")
        if cached is not None:
            return cached
        if not self.name_or_path:
            raise ValueError(
                "This model was not loaded from a checkpoint, so it has no processor to find: pass "
                "processor=MultimodalRetrievalProcessor(...) (or from_towers_pretrained) to encode_*."
            )
        from .processing_mmretrieval import MultimodalRetrievalProcessor

        try:
            loaded = MultimodalRetrievalProcessor.from_pretrained(self.name_or_path)
        except (OSError, ValueError) as error:
            raise ValueError(
                f"No processor could be loaded from {self.name_or_path!r} ({error}); pass processor= to encode_*."
            ) from error
        self.__dict__["_checkpoint_processor"] = loaded  # not a submodule: never saved, moved or copied as weights
        return loaded

    def encode_queries(
        self,
        queries: str | list[str],
        processor=None,
        batch_size: int = 32,
        show_progress_bar: bool = False,
        normalize: bool = True,
        convert_to_numpy: bool = True,
        convert_to_tensor: bool = False,
        device: str | torch.device | None = None,
    ):
        r"""
        Embeds text queries in batches: a `(num_queries, embedding_dim)` float32 numpy array (a tensor with
        `convert_to_tensor=True`, a vector for a single string), equal to `get_query_embeddings` of the processor's
        `encode_queries`. `processor` defaults to the checkpoint's ([`get_processor`]); `device` moves the model.

        Example:
        ```python
        >>> model = AutoModel.from_pretrained("outputs/main_job/final", trust_remote_code=True)
        >>> queries = model.encode_queries(["red running shoes", "black formal shoes"])
        >>> products = model.encode_products([{"title": "Nike Men Red Running Shoes"}])
        >>> model.similarity(queries, products).shape
        torch.Size([2, 1])
        ```
        """
        from .processing_mmretrieval import validate_texts

        processor = self.get_processor(processor)
        texts = validate_texts(queries, "Query")
        return self._encode_in_batches(
            texts, [len(text) for text in texts],
            lambda rows: self.get_query_embeddings(**self._on_device(processor.encode_queries(rows)), normalize=normalize),
            single=isinstance(queries, str), batch_size=batch_size, show_progress_bar=show_progress_bar,
            convert_to_numpy=convert_to_numpy, convert_to_tensor=convert_to_tensor, device=device,
        )

    def encode_products(
        self,
        products,
        images: list | None = None,
        processor=None,
        batch_size: int = 32,
        show_progress_bar: bool = False,
        normalize: bool = True,
        convert_to_numpy: bool = True,
        convert_to_tensor: bool = False,
        device: str | torch.device | None = None,
    ):
        r"""
        Embeds products in batches, as [`encode_queries`] embeds queries, equal to `get_product_embeddings` of the
        processor's `encode_products`. `products` are catalogue rows (mappings whose `product_text_fields` make the
        product text; a `datasets.Dataset` or a pandas DataFrame works too) or product texts. `images` aligns with
        them: PIL images, `None` for an image-less product (4tower/3tower models).

        Example:
        ```python
        >>> embeddings = model.encode_products(
        ...     [{"title": "Nike Men Red Running Shoes", "description": "Mesh upper"}, {"title": "Black Formal Shoes"}],
        ...     images=[shoe_image, None])
        >>> embeddings.shape
        (2, 384)
        ```
        """
        processor = self.get_processor(processor)
        rows = as_product_rows(products, processor.product_text_fields[0])
        if images is not None and len(images) != len(rows):
            raise ValueError(f"Got {len(images)} images for {len(rows)} products; pass None for missing images.")
        lengths = [len(text) for text in processor.product_texts(rows)]  # checks every row, naming its position
        items = list(zip(rows, images)) if images is not None else [(row, None) for row in rows]

        def embed(batch):
            batch_rows = [row for row, _ in batch]
            batch_images = [image for _, image in batch] if images is not None else None
            inputs = processor.encode_products(batch_rows, images=batch_images)
            return self.get_product_embeddings(**self._on_device(inputs), normalize=normalize)

        return self._encode_in_batches(
            items, lengths, embed, single=False, batch_size=batch_size, show_progress_bar=show_progress_bar,
            convert_to_numpy=convert_to_numpy, convert_to_tensor=convert_to_tensor, device=device,
        )

    def encode_images(
        self,
        images: list,
        processor=None,
        batch_size: int = 32,
        show_progress_bar: bool = False,
        normalize: bool = True,
        convert_to_numpy: bool = True,
        convert_to_tensor: bool = False,
        device: str | torch.device | None = None,
    ):
        r"""
        Embeds query images (PIL) for image-to-product search, as [`get_image_query_embeddings`] does: 4tower models
        with a concat fusion; other models raise a `ValueError` saying why.

        Example:
        ```python
        >>> model.similarity(model.encode_images([photo]), model.encode_products(rows, images=product_images))
        ```
        """
        self.check_image_queries_supported()
        processor = self.get_processor(processor)
        images = list(images)
        for position, image in enumerate(images):
            if image is None:
                raise ValueError(f"Image {position} is None: an image query needs an image.")
        return self._encode_in_batches(
            images, [0] * len(images),
            lambda batch: self.get_image_query_embeddings(
                pixel_values=processor.encode_images(batch)["pixel_values"].to(self.device), normalize=normalize
            ),
            single=False, batch_size=batch_size, show_progress_bar=show_progress_bar,
            convert_to_numpy=convert_to_numpy, convert_to_tensor=convert_to_tensor, device=device,
        )

    @staticmethod
    def similarity(embeddings1, embeddings2) -> torch.Tensor:
        """Cosine similarity of every row of `embeddings1` with every row of `embeddings2` (numpy arrays or
        tensors, one vector or a matrix each), shape `(len(embeddings1), len(embeddings2))`, as sentence-transformers'
        `similarity`.

        Example:
        ```python
        >>> model.similarity(model.encode_queries(["red shoes"]), model.encode_products(["Red Shoes"])).shape
        torch.Size([1, 1])
        ```
        """
        first, second = (torch.atleast_2d(torch.as_tensor(value)) for value in (embeddings1, embeddings2))
        return F.normalize(first.float(), dim=-1) @ F.normalize(second.float(), dim=-1).to(first.device).t()

    def _on_device(self, inputs) -> dict:
        return {key: value.to(self.device) for key, value in inputs.items()}

    def _encode_in_batches(
        self, items: list, lengths: list[int], embed, *, single: bool, batch_size: int, show_progress_bar: bool,
        convert_to_numpy: bool, convert_to_tensor: bool, device,
    ):
        """Runs `embed` over `items` (`embed_in_length_order`) in eval mode without gradients, on `device`."""
        if device is not None:
            self.to(device)
        was_training = self.training
        self.eval()
        try:
            with torch.inference_mode():
                embeddings = embed_in_length_order(items, lengths, embed, batch_size=batch_size,
                                                   show_progress_bar=show_progress_bar, to_cpu=not convert_to_tensor)
        finally:
            self.train(was_training)
        return as_requested_embeddings(embeddings, single=single, convert_to_numpy=convert_to_numpy,
                                       convert_to_tensor=convert_to_tensor)

    # ----- saving: a checkpoint is also a sentence-transformers model --------------------------------------
    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs):
        """Saves as [`MultimodalRetrievalPreTrainedModel.save_pretrained`] does, plus `modules.json`,
        `config_sentence_transformers.json` and `custom_pipelines` in `config.json`, so that
        `SentenceTransformer(folder, trust_remote_code=True)` and `pipeline("feature-extraction", model=folder,
        trust_remote_code=True)` load it (through `integrations_mmretrieval.py`, copied with the code files).

        Example:
        ```python
        >>> model.save_pretrained("retriever")
        >>> SentenceTransformer("retriever", trust_remote_code=True).encode_query(["red shoes"]).shape
        ```
        """
        result = super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", args[0] if args else True):
            self._write_integration_files(save_directory)
        return result

    def _upload_modified_files(self, working_dir: str | os.PathLike, *args, **kwargs):
        # Every upload (`push_to_hub`, `save_pretrained(push_to_hub=True)`) passes here with the folder it saved.
        self._write_integration_files(working_dir)
        return super()._upload_modified_files(working_dir, *args, **kwargs)

    @staticmethod
    def _write_integration_files(save_directory: str | os.PathLike) -> None:
        from .integrations_mmretrieval import write_integration_files

        # Only beside the module file they name: a model saved without its code (no `auto_map`) gets none.
        if Path(save_directory, f"{write_integration_files.__module__.split('.')[-1]}.py").is_file():
            write_integration_files(save_directory)

    # ----- composition from pretrained towers -----------------------------------------------------------
    @classmethod
    def from_towers_pretrained(
        cls,
        text_model: str | PreTrainedModel,
        vision_or_dual_encoder: str | PreTrainedModel | None = None,
        *,
        architecture: str | None = None,
        product_text_model: str | PreTrainedModel | None = None,
        tower_kwargs: dict | None = None,
        **config_kwargs,
    ) -> "MultimodalRetrievalModel":
        r"""
        Composes a retriever from pretrained towers (Hub ids, local folders or loaded models).

        `vision_or_dual_encoder` is an aligned text-image model (CLIP, SigLIP, `VisionTextDualEncoderModel`)
        for `architecture="4tower"`, or a vision model (DINOv2, ViT, CLIP/SigLIP vision; from a CLIP
        checkpoint the vision half is taken) for `"3tower"`. Without it the model is `"text_only"`.
        The architecture is inferred from the tower when not given. Fusion layers, projections and the
        logit scale start from their initialisation; the towers keep their pretrained weights.

        Example:
        ```python
        >>> model = MultimodalRetrievalModel.from_towers_pretrained(
        ...     "sentence-transformers/all-MiniLM-L6-v2", "facebook/dinov2-small", fusion="mlp")
        >>> model.config.architecture
        '3tower'
        ```
        """
        config, towers = compose_towers(
            text_model, vision_or_dual_encoder, architecture, product_text_model, tower_kwargs or {}, config_kwargs
        )
        return cls(config, **towers)


def _load_tower(model_or_path: str | PreTrainedModel, tower_kwargs: dict) -> PreTrainedModel:
    if isinstance(model_or_path, PreTrainedModel):
        return model_or_path
    config = AutoConfig.from_pretrained(model_or_path, **tower_kwargs)
    return AutoModel.from_pretrained(model_or_path, config=config, **tower_kwargs)



def compose_towers(
    text_model: str | PreTrainedModel,
    vision_or_dual_encoder: str | PreTrainedModel | None,
    architecture: str | None,
    product_text_model: str | PreTrainedModel | None,
    tower_kwargs: dict,
    config_kwargs: dict,
) -> tuple[MultimodalRetrievalConfig, dict]:
    """The composite config and the loaded towers of `MultimodalRetrievalModel.from_towers_pretrained`."""
    tower_kwargs = tower_kwargs or {}
    text = _load_tower(text_model, tower_kwargs)
    product_text = _load_tower(product_text_model, tower_kwargs) if product_text_model is not None else None
    image_tower = _load_tower(vision_or_dual_encoder, tower_kwargs) if vision_or_dual_encoder is not None else None
    if architecture is None:
        if image_tower is None:
            architecture = "text_only"
        else:
            architecture = "4tower" if hasattr(image_tower, "get_text_features") else "3tower"
    if architecture == "3tower" and image_tower is not None and hasattr(image_tower, "get_image_features"):
        if not hasattr(image_tower, "vision_model"):
            raise ValueError(f"Cannot take a vision tower out of {type(image_tower).__name__}.")
        image_tower = image_tower.vision_model
    if architecture == "3tower":
        config_kwargs.setdefault("fusion", "mlp")
    if config_kwargs.get("share_text_towers") is False and product_text is None:
        # Separate towers start from the same pretrained weights and drift apart in training.
        product_text = copy.deepcopy(text)
    towers = {"text_model": text, "product_text_model": product_text}
    if product_text is not None:
        config_kwargs.setdefault("share_text_towers", False)
    towers["dual_encoder" if architecture == "4tower" else "vision_model"] = image_tower
    # Copies: building the composite config resets attention settings on the configs it is given.
    tower_configs = {
        "text_config": text,
        "product_text_config": product_text,
        "dual_encoder_config": image_tower if architecture == "4tower" else None,
        "vision_config": image_tower if architecture == "3tower" else None,
    }
    for key, tower in tower_configs.items():
        if tower is not None:
            config_kwargs[key] = copy.deepcopy(tower.config)
    config = MultimodalRetrievalConfig(architecture=architecture, **config_kwargs)
    return config, towers


def as_product_rows(products, text_field: str) -> list:
    """Product rows from rows, texts (as the `text_field` of a row), a `datasets.Dataset` or a pandas DataFrame: what
    every `encode_products` accepts (this model's, and the ONNX encoder's).

    Example: `as_product_rows(["Red Kurta"], "title")` is `[{"title": "Red Kurta"}]`.
    """
    if hasattr(products, "to_dict") and hasattr(products, "columns"):  # a pandas DataFrame
        products = products.to_dict("records")
    if isinstance(products, (str, dict)):
        raise TypeError("Pass a list of products (rows or texts), not a single one.")
    return [{text_field: product} if isinstance(product, str) else product for product in products]


__all__ = [
    "MODEL_CARD_NAME", "MODEL_CARD_TAG", "PLACEHOLDER_NAMESPACE", "MultimodalRetrievalModel",
    "MultimodalRetrievalOutput", "MultimodalRetrievalPreTrainedModel", "as_requested_embeddings", "card_for_repo",
    "embed_in_length_order", "is_package_model_card", "read_package_model_card",
]
