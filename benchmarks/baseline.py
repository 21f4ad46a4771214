"""The training baseline: the design of the popular unofficial implementation of the paper, re-created.

Three separate BERT-style towers embed the query, the product title and the product description; the query
tower sees nothing but the query. The frozen image tower (the vision tower, or the dual encoder's image
side) runs on every training step, and the product vector is a linear projection of the concatenated
title, description and image vectors. Texts are padded to the maximum length and attention is eager, as
in that implementation. It is trained with the same symmetric NT-Xent loss as `MultimodalRetrievalModel`.
"""

import copy
import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from modeling_mmretrieval.data.images import load_product_image
from modeling_mmretrieval.losses import NTXentLoss
from modeling_mmretrieval.modeling_mmretrieval import masked_mean_pool, pooled_features


def _eager_copy(tower: PreTrainedModel) -> PreTrainedModel:
    tower = copy.deepcopy(tower)
    tower.set_attn_implementation("eager")
    return tower


class ThreeTowerBaseline(nn.Module):
    """Query, title and description towers (+ a frozen image tower run every step), concat and project.

    `image_tower` is a vision model (3tMM-style) or a dual encoder (4tMM-style: its image side embeds
    products and its text side adds a second query vector). `None` gives the text-only baseline.

    Example:
    ```python
    >>> baseline = ThreeTowerBaseline(AutoModel.from_pretrained(minilm_path), image_tower=dinov2)
    >>> loss = baseline(**baseline_batch(rows, tokenizer, image_processor))
    ```
    """

    def __init__(
        self, text_tower: PreTrainedModel, image_tower: PreTrainedModel | None = None, logit_scale: float = 20.0
    ):
        super().__init__()
        self.query_tower = _eager_copy(text_tower)
        self.title_tower = _eager_copy(text_tower)
        self.description_tower = _eager_copy(text_tower)
        self.image_tower = image_tower
        self.is_dual_encoder = image_tower is not None and hasattr(image_tower, "get_text_features")
        hidden = text_tower.config.hidden_size
        image_size = 0
        if image_tower is not None:
            image_tower.requires_grad_(False)
            image_tower.eval()
            image_size = image_tower.config.projection_dim if self.is_dual_encoder else image_tower.config.hidden_size
        self.product_projection = nn.Linear(2 * hidden + image_size, hidden)
        self.query_projection = nn.Linear(hidden + image_size, hidden) if self.is_dual_encoder else None
        self.logit_scale = nn.Parameter(torch.tensor(math.log(logit_scale)))
        self.loss_function = NTXentLoss()

    def train(self, mode: bool = True):
        super().train(mode)
        if self.image_tower is not None:
            self.image_tower.eval()
        return self

    @staticmethod
    def _embed_text(tower: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden_states = tower(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return masked_mean_pool(hidden_states, attention_mask)

    def _frozen_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            if self.is_dual_encoder:
                return pooled_features(self.image_tower.get_image_features(pixel_values=pixel_values))
            return pooled_features(self.image_tower(pixel_values=pixel_values))

    def forward(
        self,
        query_input_ids: torch.Tensor,
        query_attention_mask: torch.Tensor,
        title_input_ids: torch.Tensor,
        title_attention_mask: torch.Tensor,
        description_input_ids: torch.Tensor,
        description_attention_mask: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Symmetric NT-Xent loss of a batch of (query, product) pairs."""
        query = self._embed_text(self.query_tower, query_input_ids, query_attention_mask)
        product_parts = [
            self._embed_text(self.title_tower, title_input_ids, title_attention_mask),
            self._embed_text(self.description_tower, description_input_ids, description_attention_mask),
        ]
        if self.image_tower is not None:
            product_parts.append(self._frozen_image_features(pixel_values))
        if self.is_dual_encoder:
            with torch.no_grad():
                dual_query = pooled_features(
                    self.image_tower.get_text_features(input_ids=query_input_ids, attention_mask=query_attention_mask)
                )
            query = self.query_projection(torch.cat([query, dual_query], dim=-1))
        product = self.product_projection(torch.cat(product_parts, dim=-1))
        scale = self.logit_scale.exp().clamp(max=100.0)
        loss, _ = self.loss_function(F.normalize(query, dim=-1), F.normalize(product, dim=-1), scale)
        return loss


def baseline_batch(
    rows: Sequence[Mapping],
    tokenizer,
    image_processor=None,
    *,
    max_query_length: int,
    max_text_length: int,
) -> dict[str, torch.Tensor]:
    """The baseline's inputs for training rows: each text field padded to its maximum length, and
    `pixel_values` from the reference (per-image PIL) processor."""

    def tokens(texts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        encoded = tokenizer(texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
        return encoded["input_ids"], encoded["attention_mask"]

    batch = {}
    for name, column, max_length in (
        ("query", "query", max_query_length),
        ("title", "title", max_text_length),
        ("description", "description", max_text_length),
    ):
        batch[f"{name}_input_ids"], batch[f"{name}_attention_mask"] = tokens(
            [str(row.get(column) or "") for row in rows], max_length
        )
    if image_processor is not None:
        images = [load_product_image(row.get("image"), on_error="raise").image for row in rows]
        batch["pixel_values"] = image_processor(images=images, return_tensors="pt")["pixel_values"]
    return batch
