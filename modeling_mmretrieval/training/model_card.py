"""Model card (README.md) of a trained retriever: what it is, what it was trained on, how well it did, how to use it.

The card's text is the template `model_card_template.md` (package data, `string.Template` placeholders), filled
in by `render_model_card`; this module only computes the parts that vary (tables, metrics, the usage snippet,
the limitations that apply). The card is written next to the saved model by the train command and uploaded with
it by `--push_to_hub`. Its YAML header is produced by `huggingface_hub.ModelCardData`, so the Hub reads the
metadata as it expects.

Example:
```python
>>> card = ModelCardInfo(repo_id="me/fashion-retriever", config=model.config,
...                      towers={"text": "sentence-transformers/all-MiniLM-L6-v2"}, dataset="fashion sample",
...                      queries_are_derived=True, num_train_pairs=2800, eval_split="validation",
...                      training_settings={"epochs": 1}, before={}, after={"eval/recall@10": 0.4})
>>> text = render_model_card(card)
>>> text.startswith("---")
True
```
"""

import re
import string
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources

from .reporting import REPORTED_METRICS

PAPER_URL = "https://arxiv.org/abs/2501.07365"
TEMPLATE_NAME = "model_card_template.md"
# What a Hub model id looks like; local paths (offline towers) are described in the text, not as `base_model`.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

_ARCHITECTURE_SUMMARIES = {
    "text_only": "a text-only bi-encoder: queries and product texts go through the text tower",
    "4tower": (
        "a 4-tower multimodal retriever (4tMM): query = [text tower ; dual-encoder text], product = [text tower ; "
        "dual-encoder image], fused by {fusion}"
    ),
    "3tower": (
        "a 3-tower multimodal retriever (3tMM): query = text tower, product = MLP([text tower ; vision tower]) "
        "mapped into the query space"
    ),
}
_ENCODE_PRODUCTS = {
    True: (
        'image = Image.open("product.jpg")\n'
        'products = processor.encode_products([{"title": "Nike Men Red Running Shoes"}], images=[image])\n'
    ),
    False: 'products = processor.encode_products([{"title": "Nike Men Red Running Shoes"}])\n',
}
_DERIVED_QUERIES_LIMITATION = (
    "Training and evaluation queries are **attribute-derived**: templated phrases built from each product's "
    "catalogue attributes (article type, colour, gender, brand, usage, ...), not real user searches. Relevance "
    "is \"matches every attribute of the query\", so it is only as complete as the catalogue's attributes, "
    "and the metrics above measure attribute matching rather than real search quality."
)
_FROZEN_IMAGE_TOWER_LIMITATION = (
    "The image tower was frozen: only the text tower(s) and the fusion and projection layers were trained."
)
_IMAGE_SIZE_LIMITATION = (
    "Images are resized to {image_size} px (shortest edge, then centre crop) for speed on small catalogue photos; "
    "the saved processor does the same, so use it rather than the image tower's own one."
)
_DOMAIN_SHIFT_LIMITATION = (
    "Trained on {num_train_pairs} (query, product) pairs from {dataset}; expect a domain shift on other "
    "catalogues, languages or photo styles."
)


@dataclass
class ModelCardInfo:
    """Everything the card reports. `towers` maps a role ("text", "vision", "dual encoder") to a description
    of the tower (a Hub id or where the weights came from); `before`/`after` are evaluator metrics."""

    config: object
    towers: Mapping[str, str]
    dataset: str
    queries_are_derived: bool
    num_train_pairs: int
    eval_split: str | None
    training_settings: Mapping[str, object]
    before: Mapping[str, float] = field(default_factory=dict)
    after: Mapping[str, float] = field(default_factory=dict)
    repo_id: str | None = None
    image_size: int | None = None
    metric_prefix: str = "eval/"


def _front_matter(info: ModelCardInfo) -> str:
    from huggingface_hub import ModelCardData

    base_models = sorted({tower for tower in info.towers.values() if _HUB_ID.match(tower)})
    data = ModelCardData(
        library_name="transformers",
        pipeline_tag="feature-extraction",
        tags=["mmretrieval", "product-search", "multimodal", "dense-retrieval", "contrastive-learning"],
        base_model=base_models or None,
    )
    return f"---\n{data.to_yaml()}\n---"


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _evaluation(info: ModelCardInfo) -> str:
    if not info.after:
        return "Not evaluated (training ran without an evaluation split)."
    prefix = info.metric_prefix
    rows = []
    for name in REPORTED_METRICS:
        after = info.after.get(prefix + name)
        if after is None:
            continue
        before = info.before.get(prefix + name)
        rows.append((name, "-" if before is None else f"{before:.4f}", f"{after:.4f}"))
    num_queries = int(info.after.get(prefix + "num_queries", 0))
    return (
        f"On the `{info.eval_split}` split ({num_queries} queries, every product of the split indexed), before "
        "training (the starting model: pretrained towers with fresh fusion layers, or the initial checkpoint) and "
        "after:\n\n"
        + _table(("metric", "before training", "after training"), rows)
    )


def _limitations(info: ModelCardInfo) -> str:
    points = []
    if info.queries_are_derived:
        points.append(_DERIVED_QUERIES_LIMITATION)
    if info.config.uses_images and info.config.freeze_image_towers:
        points.append(_FROZEN_IMAGE_TOWER_LIMITATION)
    if info.image_size is not None:
        points.append(_IMAGE_SIZE_LIMITATION.format(image_size=info.image_size))
    points.append(_DOMAIN_SHIFT_LIMITATION.format(num_train_pairs=info.num_train_pairs, dataset=info.dataset))
    return "\n".join(f"- {point}" for point in points)


def render_model_card(info: ModelCardInfo) -> str:
    """The README.md text of a trained retriever (YAML metadata header + Markdown body), from the card template.

    Example:
    ```python
    >>> print(render_model_card(info).split("\n## ")[1])
    Towers
    ...
    ```
    """
    config = info.config
    template = string.Template(resources.files(__package__).joinpath(TEMPLATE_NAME).read_text(encoding="utf-8"))
    return template.substitute(
        front_matter=_front_matter(info),
        title=info.repo_id.split("/")[-1] if info.repo_id else "Multimodal product retriever",
        paper_url=PAPER_URL,
        summary=_ARCHITECTURE_SUMMARIES[config.architecture].format(fusion=f"`{config.fusion}`"),
        towers_table=_table(("role", "tower"), [(role, f"`{tower}`") for role, tower in info.towers.items()]),
        pooling=config.pooling,
        projection_dim=config.projection_dim,
        fusion=config.fusion,
        share_text_towers=config.share_text_towers,
        freeze_image_towers=config.freeze_image_towers,
        max_query_length=config.max_query_length,
        max_product_length=config.max_product_length,
        product_text_fields=list(config.product_text_fields),
        num_train_pairs=info.num_train_pairs,
        dataset=info.dataset,
        query_source=(
            "attribute-derived queries (see Limitations)" if info.queries_are_derived
            else "the dataset's own query column"
        ),
        settings_table=_table(
            ("setting", "value"), [(name, f"`{value}`") for name, value in info.training_settings.items()]
        ),
        evaluation=_evaluation(info),
        image_import="from PIL import Image\n" if config.uses_images else "",
        location=info.repo_id or "path/to/this/folder",
        encode_products=_ENCODE_PRODUCTS[bool(config.uses_images)],
        limitations=_limitations(info),
    )


__all__ = ["ModelCardInfo", "render_model_card"]
