"""Fits a model's visual-word tagger: a linear classifier from frozen image features to the product's colour.

At search time the tagger writes the colour it reads off a product's image into the product's text tokens when the
text names no colour (`modeling_mmretrieval.VisualWordTagger`), so a text-silent or poorly titled product still
matches "red kurta" through the text tower. Fitting it needs no retrieval training: the image features are the ones
the training run caches anyway (frozen image tower), and the labels are the catalogue's colour column, or, for a
catalogue without one, the colour words its titles and descriptions already name. A few hundred full-batch steps
of logistic regression take seconds.

Example:
```python
>>> report = fit_visual_tagger(model, processor.tokenizer, image_features, catalogue, columns)
>>> print(report.summary())
visual-word tagger: 31 colours from the `base_colour` column, fitted on 2520 products; held-out accuracy 0.71 on 280 (majority colour 0.19)
>>> model.visual_tagger is not None
True
```
"""

import logging
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..data.catalogue import CatalogueColumns
from ..data.visual_words import VisualWords

logger = logging.getLogger(__name__)

# A colour needs this many labelled products with an image to become a tag: rarer ones cannot be learned.
DEFAULT_MIN_EXAMPLES = 10
# A tagger needs this many colours to choose between.
MIN_COLOURS = 2
# The tagger writes its most probable colour only when that colour is more likely right than wrong, so that an image
# it cannot read leaves the text as it is.
DEFAULT_MIN_PROBABILITY = 0.5
FIT_STEPS = 300
FIT_LEARNING_RATE = 1e-2
# L2 strengths tried; the one with the best held-out likelihood is kept.
FIT_WEIGHT_DECAYS = (1e-4, 1e-3, 1e-2, 1e-1)
HELD_OUT_SHARE = 0.1
# Fewer held-out products than this cannot choose the L2 strength or calibrate: a middle strength and no scaling then.
MIN_CALIBRATION_PRODUCTS = 50
FALLBACK_WEIGHT_DECAY = 1e-2


class VisualTaggerError(ValueError):
    """The catalogue cannot teach a tagger (too few labelled products with images, or a single colour)."""


@dataclass(frozen=True)
class VisualTaggerReport:
    """What fitting found: the vocabulary, where its labels came from, and how well it reads held-out images."""

    tags: tuple[str, ...]
    label_source: str
    fitted_products: int
    held_out_products: int
    held_out_accuracy: float
    majority_accuracy: float
    seconds: float

    def summary(self) -> str:
        return (
            f"visual-word tagger: {len(self.tags)} colours from {self.label_source}, fitted on {self.fitted_products} "
            f"products; held-out accuracy {self.held_out_accuracy:.2f} on {self.held_out_products} (majority colour "
            f"{self.majority_accuracy:.2f}); {self.seconds:.1f} s"
        )

    def to_dict(self) -> dict:
        return {"tags": list(self.tags), "label_source": self.label_source, "fitted_products": self.fitted_products,
                "held_out_products": self.held_out_products, "held_out_accuracy": self.held_out_accuracy,
                "majority_accuracy": self.majority_accuracy, "seconds": self.seconds}


def _normalised(value) -> str | None:
    text = " ".join(str(value).lower().split()) if value is not None else ""
    return text if text and text not in ("none", "nan", "na", "n/a") else None


def colour_labels(products: Sequence[Mapping], columns: CatalogueColumns) -> tuple[list[str | None], str]:
    """Each product's colour (lower-case) and where it came from: the catalogue's colour column when it has one,
    else the first colour word its title (then description) names; `None` where neither says.

    Example:
    ```python
    >>> colour_labels([{"title": "Navy Blue Kurta"}, {"title": "Kurta"}], CatalogueColumns(base_colour=None))
    (['navy blue', None], 'colour words in the product texts')
    ```
    """
    column = columns.base_colour
    if column and products and any(column in product for product in products[:100]):
        return [_normalised(product.get(column)) for product in products], f"the `{column}` column"
    colours = VisualWords.colours()
    labels = []
    for product in products:
        found = None
        for field in (columns.title, columns.description):
            text = product.get(field) if field else None
            match = colours.pattern.search(text) if isinstance(text, str) else None
            if match:
                found = _normalised(match.group(0).replace("-", " "))
                break
        labels.append(found)
    return labels, "colour words in the product texts"


def label_rows(products, columns: CatalogueColumns) -> list[Mapping]:
    """The catalogue's rows with only what `colour_labels` reads (a `datasets.Dataset` then decodes no image).

    Example: `colour_labels(label_rows(catalogue, columns), columns)`.
    """
    if hasattr(products, "select_columns"):
        wanted = (columns.product_id, columns.base_colour, columns.title, columns.description)
        products = products.select_columns([name for name in wanted if name and name in products.column_names])
    return list(products)


def colours_to_learn(products, columns: CatalogueColumns | None = None,
                     min_examples: int = DEFAULT_MIN_EXAMPLES) -> list[str]:
    """The colours a tagger fitted on `products` could learn: those with at least `min_examples` labelled products
    (`colour_labels`). Decided from the labels alone, before any image is read, so that a run can leave out what
    only the tagger would use when fewer than `MIN_COLOURS` qualify (images missing later can still make the fit
    fail).

    Example:
    ```python
    >>> colours_to_learn([{"title": "Red Kurta"}] * 10 + [{"title": "Blue Kurta"}] * 10, CatalogueColumns(base_colour=None))
    ['blue', 'red']
    ```
    """
    columns = columns or CatalogueColumns()
    labels, _ = colour_labels(label_rows(products, columns), columns)
    return _frequent_colours(labels, min_examples)


def _frequent_colours(labels: Sequence[str | None], min_examples: int) -> list[str]:
    counts = Counter(label for label in labels if label is not None)
    return sorted(label for label, count in counts.items() if count >= min_examples)


def phrase_token_ids(tokenizer, phrases: Sequence[str]) -> list[list[int]]:
    """Each phrase's token ids as it reads inside a text (after a space), without special tokens."""
    return [list(tokenizer(" " + phrase, add_special_tokens=False)["input_ids"]) for phrase in phrases]


def written_forms(tokenizer, phrases: Sequence[str]) -> list[list[int]]:
    """The token id sequences of `phrases` as texts write them: lower-case, title-case and upper-case (a cased
    tokenizer gives "Red" other ids than "red"), at a word start or after a space; each sequence once.

    Example: `written_forms(tokenizer, ["red"])` is `[[2417]]` for MiniLM's uncased tokenizer.
    """
    variants = sorted({form for phrase in phrases for form in (phrase, phrase.title(), phrase.upper())})
    forms = phrase_token_ids(tokenizer, variants) + [list(tokenizer(form, add_special_tokens=False)["input_ids"])
                                                     for form in variants]
    return [ids for position, ids in enumerate(forms) if ids and ids not in forms[:position]]


def fit_linear_classifier(features: torch.Tensor, labels: torch.Tensor, num_classes: int, seed: int,
                          weight_decay: float = FALLBACK_WEIGHT_DECAY) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression on standardised features, folded back into one `(weight, bias)` on raw ones:
    the tagger's fit (seeded full-batch Adam, `weight_decay` its L2 strength).

    Example:
    ```python
    >>> weight, bias = fit_linear_classifier(torch.randn(40, 8), torch.randint(0, 3, (40,)), num_classes=3, seed=0)
    >>> (features @ weight.T + bias).argmax(-1)  # most likely class of each row of `features`
    ```
    """
    mean, scale = features.mean(0), features.std(0) + 1e-6
    standardised = (features - mean) / scale
    generator = torch.Generator().manual_seed(seed)
    weight = (torch.randn(num_classes, features.shape[1], generator=generator) * 0.01).requires_grad_()
    bias = torch.zeros(num_classes, requires_grad=True)
    optimizer = torch.optim.Adam([weight, bias], lr=FIT_LEARNING_RATE, weight_decay=weight_decay)
    with torch.enable_grad():
        for _ in range(FIT_STEPS):
            optimizer.zero_grad()
            F.cross_entropy(standardised @ weight.T + bias, labels).backward()
            optimizer.step()
    weight, bias = weight.detach(), bias.detach()
    folded = weight / scale
    return folded, bias - folded @ mean


def _calibrating_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The temperature whose scaled logits give held-out labels the highest likelihood (temperature scaling), so
    that "probability at least p" means about "right at least p of the time"."""
    candidates = torch.logspace(-1, 1.3, 60)
    losses = [F.cross_entropy(logits / temperature, labels).item() for temperature in candidates]
    return float(candidates[int(torch.tensor(losses).argmin())])


def _fit_calibrated(features: torch.Tensor, labels: torch.Tensor, num_classes: int, seed: int,
                    fitted: torch.Tensor, held_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Chooses the L2 strength on the held-out products, calibrates the temperature there, then refits on every
    product; returns `(weight, bias, held-out accuracy)` with the temperature folded into the weights."""
    if len(held_out) < MIN_CALIBRATION_PRODUCTS:
        weight, bias = fit_linear_classifier(features[fitted], labels[fitted], num_classes, seed, FALLBACK_WEIGHT_DECAY)
        accuracy = ((features[held_out] @ weight.T + bias).argmax(-1) == labels[held_out]).float().mean().item()
        weight, bias = fit_linear_classifier(features, labels, num_classes, seed, FALLBACK_WEIGHT_DECAY)
        return weight, bias, accuracy
    best = None
    for weight_decay in FIT_WEIGHT_DECAYS:
        weight, bias = fit_linear_classifier(features[fitted], labels[fitted], num_classes, seed, weight_decay)
        logits = features[held_out] @ weight.T + bias
        loss = F.cross_entropy(logits, labels[held_out]).item()
        if best is None or loss < best[0]:
            best = (loss, weight_decay, logits)
    _, weight_decay, logits = best
    temperature = _calibrating_temperature(logits, labels[held_out])
    accuracy = (logits.argmax(-1) == labels[held_out]).float().mean().item()
    # Every product teaches the tagger.
    weight, bias = fit_linear_classifier(features, labels, num_classes, seed, weight_decay)
    return weight / temperature, bias / temperature, accuracy


def fit_visual_tagger(
    model,
    tokenizer,
    image_features: Mapping[str, torch.Tensor | None],
    products,
    columns: CatalogueColumns | None = None,
    *,
    min_examples: int = DEFAULT_MIN_EXAMPLES,
    min_probability: float = DEFAULT_MIN_PROBABILITY,
    seed: int = 0,
    among_named: bool = False,
) -> VisualTaggerReport:
    """Fits `model`'s visual-word tagger on the products' frozen image features and installs it (config and weights).

    Args:
        model ([`MultimodalRetrievalModel`]): a model with an image tower; its config gains `visual_tags*`.
        tokenizer: the product text tokenizer (`processor.tokenizer`), for the tags' token ids.
        image_features: the image tower's features by `str(product_id)` (`None`: no image), e.g. the training
            run's `precompute_image_features` cache.
        products (`datasets.Dataset` or rows): the catalogue the features belong to.
        columns ([`CatalogueColumns`]): where the id, colour, title and description are.
        min_examples (`int`): a colour needs this many labelled products with an image to become a tag.
        min_probability (`float`): the tagger writes a colour only above this probability.
        seed (`int`): seeds the held-out split and the fit (the same seed gives the same tagger).
        among_named (`bool`): also tag texts that name several of the colours, with the one of them the image
            favours (`VisualWordTagger.chosen_tags`).

    Raises `VisualTaggerError` when fewer than two colours have `min_examples` labelled products with an image.

    Example:
    ```python
    >>> fit_visual_tagger(model, processor.tokenizer, cache, catalogue).held_out_accuracy
    0.71
    ```
    """
    if not model.config.uses_images:
        raise VisualTaggerError("a text-only model has no image to read colours from")
    started = time.perf_counter()
    columns = columns or CatalogueColumns()
    rows = label_rows(products, columns)
    labels, source = colour_labels(rows, columns)
    examples = [(image_features.get(str(row[columns.product_id])), label) for row, label in zip(rows, labels)]
    examples = [(feature, label) for feature, label in examples if feature is not None and label is not None]
    tags = _frequent_colours([label for _, label in examples], min_examples)
    if len(tags) < MIN_COLOURS:
        raise VisualTaggerError(
            f"cannot fit the visual-word tagger: {len(examples)} products with an image and a colour (from "
            f"{source}), and {len(tags)} colours with at least {min_examples} of them; it needs {MIN_COLOURS}"
        )
    examples = [(feature, label) for feature, label in examples if label in tags]
    features = torch.stack([torch.as_tensor(feature).float().flatten() for feature, _ in examples])
    targets = torch.tensor([tags.index(label) for _, label in examples])
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed))
    held_out = order[: max(1, round(HELD_OUT_SHARE * len(examples)))]
    fitted = order[len(held_out):]
    weight, bias, accuracy = _fit_calibrated(features, targets, len(tags), seed, fitted, held_out)
    majority = (targets[held_out] == Counter(targets[fitted].tolist()).most_common(1)[0][0]).float().mean().item()
    # Every colour the catalogue or the vocabulary knows means "the text names a colour".
    colours = set(VisualWords.colours(label for label in labels if label).phrases)
    model.install_visual_tagger(
        tags=tags, token_ids=phrase_token_ids(tokenizer, tags),
        mention_token_ids=written_forms(tokenizer, sorted(colours)),
        end_token_id=tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id or 0, weight=weight, bias=bias, min_probability=min_probability,
        named_token_ids=[written_forms(tokenizer, [tag]) for tag in tags] if among_named else None,
    )
    report = VisualTaggerReport(
        tags=tuple(tags), label_source=source, fitted_products=len(examples), held_out_products=len(held_out),
        held_out_accuracy=accuracy, majority_accuracy=majority, seconds=time.perf_counter() - started,
    )
    logger.info(report.summary())
    return report


__all__ = ["DEFAULT_MIN_EXAMPLES", "DEFAULT_MIN_PROBABILITY", "MIN_COLOURS", "VisualTaggerError", "VisualTaggerReport",
           "colour_labels", "colours_to_learn", "fit_visual_tagger", "label_rows", "phrase_token_ids", "written_forms"]
