"""Model card (README.md) of a trained retriever: what it is, what it was trained on, how well it did, how to use it.

The card is written next to the saved model by `examples/train.py` and uploaded with it by `--push_to_hub`.
Its YAML header is produced by `huggingface_hub.ModelCardData`, so the Hub reads the metadata as it expects.

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
from collections.abc import Mapping
from dataclasses import dataclass, field

from .training_utils import REPORTED_METRICS

PAPER_URL = "https://arxiv.org/abs/2501.07365"
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
    return f"---\n{data.to_yaml()}\n---\n"


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _results_section(info: ModelCardInfo) -> str:
    if not info.after:
        return "Not evaluated (training ran without an evaluation split).\n"
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
        + "\n"
    )


def _usage_section(info: ModelCardInfo) -> str:
    location = info.repo_id or "path/to/this/folder"
    image_line = (
        "image = Image.open(\"product.jpg\")\n"
        "products = processor.encode_products([{\"title\": \"Nike Men Red Running Shoes\"}], images=[image])\n"
        if info.config.uses_images
        else "products = processor.encode_products([{\"title\": \"Nike Men Red Running Shoes\"}])\n"
    )
    return (
        "```python\n"
        "import torch\n"
        + ("from PIL import Image\n" if info.config.uses_images else "")
        + "import modeling_mmretrieval  # registers the classes; or pass trust_remote_code=True\n"
        "from transformers import AutoModel, AutoProcessor\n\n"
        f"model = AutoModel.from_pretrained(\"{location}\").eval()\n"
        f"processor = AutoProcessor.from_pretrained(\"{location}\")\n"
        "queries = processor.encode_queries([\"red running shoes for men\"])\n"
        + image_line
        + "with torch.no_grad():\n"
        "    scores = model.get_query_embeddings(**queries) @ model.get_product_embeddings(**products).T\n"
        "```\n"
    )


def _limitations_section(info: ModelCardInfo) -> str:
    points = []
    if info.queries_are_derived:
        points.append(
            "Training and evaluation queries are **attribute-derived**: templated phrases built from each product's "
            "catalogue attributes (article type, colour, gender, brand, usage, ...), not real user searches. Relevance "
            "is \"matches every attribute of the query\", so it is only as complete as the catalogue's attributes, "
            "and the metrics above measure attribute matching rather than real search quality."
        )
    if info.config.uses_images and info.config.freeze_image_towers:
        points.append("The image tower was frozen: only the text tower(s) and the fusion and projection layers "
                      "were trained.")
    if info.image_size is not None:
        points.append(
            f"Images are resized to {info.image_size} px (shortest edge, then centre crop) for speed on small "
            "catalogue photos; the saved processor does the same, so use it rather than the image tower's own one."
        )
    points.append(
        f"Trained on {info.num_train_pairs} (query, product) pairs from {info.dataset}; expect a domain shift on "
        "other catalogues, languages or photo styles."
    )
    return "".join(f"- {point}\n" for point in points)


def render_model_card(info: ModelCardInfo) -> str:
    """The README.md text of a trained retriever (YAML metadata header + Markdown body)."""
    config = info.config
    summary = _ARCHITECTURE_SUMMARIES[config.architecture].format(fusion=f"`{config.fusion}`")
    title = info.repo_id.split("/")[-1] if info.repo_id else "Multimodal product retriever"
    tower_rows = [(role, f"`{tower}`") for role, tower in info.towers.items()]
    settings_rows = [(name, f"`{value}`") for name, value in info.training_settings.items()]
    query_source = (
        "attribute-derived queries (see Limitations)" if info.queries_are_derived else "the dataset's own query column"
    )
    return (
        _front_matter(info)
        + f"\n# {title}\n\n"
        f"A product-search retriever after [Multimodal Semantic Retrieval for Product Search]({PAPER_URL}) "
        f"(Liu & Lopez Ramos): {summary}. Queries and products are embedded into one L2-normalised "
        "space and ranked by cosine similarity; training used the symmetric NT-Xent loss "
        "with in-batch negatives.\n\n"
        "## Towers\n\n"
        + _table(("role", "tower"), tower_rows)
        + f"\n\nPooling `{config.pooling}`, projection `{config.projection_dim}`, fusion `{config.fusion}`, "
        f"shared text towers `{config.share_text_towers}`, frozen image towers `{config.freeze_image_towers}`, "
        f"max query / product length {config.max_query_length} / {config.max_product_length} tokens, product text "
        f"fields {list(config.product_text_fields)}.\n\n"
        "## Training data\n\n"
        f"{info.num_train_pairs} (query, product) pairs from {info.dataset}, with {query_source}.\n\n"
        "## Training settings\n\n"
        + _table(("setting", "value"), settings_rows)
        + "\n\n## Evaluation\n\n"
        + _results_section(info)
        + "\n## Usage\n\n"
        + _usage_section(info)
        + "\n## Limitations\n\n"
        + _limitations_section(info)
    )


__all__ = ["ModelCardInfo", "render_model_card"]
