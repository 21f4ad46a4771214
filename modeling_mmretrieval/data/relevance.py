"""Relevance of products to attribute-derived queries, and hard negatives that differ in one visible attribute.

A product is relevant to a query when it satisfies every attribute the query constrains (`product_matches`);
`AttributeIndex` gives that whole-catalogue relevance set at once. A man or a woman searching for a product also
wants the unisex ones. Relevance is only as complete and as clean as the catalogue's attributes (docs/data.md).
"""

import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence

import datasets

from .catalogue import CatalogueColumns, known_value, normalise_value, parse_attributes, product_records, product_rng

# A man or a woman searching for a product also wants the unisex ones; kids' queries do not.
UNISEX = "unisex"
_GENDERS_SERVED_BY_UNISEX = frozenset({"men", "women"})


def product_facets(product: Mapping, columns: CatalogueColumns | None = None) -> dict[str, str]:
    """The known query-able attributes of one product: top-level facet columns, then `attribute_keys`.

    Keys are the column names (and attribute keys) so they can be looked up again on any product; placeholder
    values ("NA", "", "Other") are left out. A top-level column wins over an attribute key of the same name.

    Example:
    ```python
    >>> product_facets({"article_type": "Shirts", "gender": "Men", "base_colour": "Blue", "usage": "NA",
    ...                 "brand": "Arrow", "attributes": '{"Fit": "Slim Fit"}'})
    {'article_type': 'Shirts', 'gender': 'Men', 'base_colour': 'Blue', 'brand': 'Arrow', 'Fit': 'Slim Fit'}
    ```
    """
    columns = columns or CatalogueColumns()
    facets = {}
    for name in columns.facet_columns:
        value = known_value(product.get(name))
        if value is not None:
            facets[name] = value
    if columns.attributes is not None:
        extra = parse_attributes(product.get(columns.attributes))
        for key in columns.attribute_keys:
            value = known_value(extra.get(key))
            if value is not None and key not in facets:
                facets[key] = value
    return facets


def _genders_accepted_for(gender: str) -> frozenset[str]:
    """Normalised product genders that answer a query for `gender` (normalised)."""
    return frozenset({gender, UNISEX}) if gender in _GENDERS_SERVED_BY_UNISEX else frozenset({gender})


def _values_accepted_for(key: str, wanted: str, columns: CatalogueColumns) -> frozenset[str]:
    """Normalised product values that satisfy a query constraint `key == wanted`."""
    wanted = normalise_value(wanted)
    return _genders_accepted_for(wanted) if key == columns.gender else frozenset({wanted})


def _genders_compatible(first: str | None, second: str | None) -> bool:
    """Whether products of two (normalised) genders could answer the same query; an unknown gender always could."""
    if first is None or second is None:
        return True
    return first in _genders_accepted_for(second) or second in _genders_accepted_for(first)


def product_matches(product: Mapping, attributes: Mapping[str, str], columns: CatalogueColumns | None = None) -> bool:
    """Whether a product satisfies every attribute constraint of a query (the relevance rule).

    Values compare case- and whitespace-insensitively; a product lacking an attribute does not match it; a
    "men" or "women" gender constraint is also met by unisex products.

    Example:
    ```python
    >>> product_matches({"gender": "Unisex", "base_colour": "Black"}, {"gender": "Men", "base_colour": "black"})
    True
    ```
    """
    columns = columns or CatalogueColumns()
    facets = {key: normalise_value(value) for key, value in product_facets(product, columns).items()}
    return all(facets.get(key) in _values_accepted_for(key, wanted, columns) for key, wanted in attributes.items())


class AttributeIndex:
    """Inverted index (attribute, normalised value) -> product ids, giving whole-catalogue relevance sets.

    Example:
    ```python
    >>> products = [{"product_id": "1", "article_type": "Shirts", "gender": "Unisex"},
    ...             {"product_id": "2", "article_type": "Shirts", "gender": "Women"}]
    >>> sorted(AttributeIndex(products, CatalogueColumns()).matching_ids({"article_type": "shirts", "gender": "Men"}))
    ['1']
    ```
    """

    def __init__(self, records: Sequence[Mapping], columns: CatalogueColumns):
        self.columns = columns
        self.postings: dict[tuple[str, str], set[str]] = defaultdict(set)
        for record in records:
            product_id = record[columns.product_id]
            for key, value in product_facets(record, columns).items():
                self.postings[(key, normalise_value(value))].add(product_id)

    def _ids_satisfying(self, key: str, wanted: str) -> set[str]:
        accepted = _values_accepted_for(key, wanted, self.columns)
        return set().union(*(self.postings.get((key, value), set()) for value in accepted))

    def matching_ids(self, attributes: Mapping[str, str]) -> set[str]:
        """Ids of every product satisfying all `attributes` (same rule as `product_matches`)."""
        candidate_sets = sorted((self._ids_satisfying(key, value) for key, value in attributes.items()), key=len)
        if not candidate_sets:
            raise ValueError("a query needs at least one attribute constraint")
        return candidate_sets[0].intersection(*candidate_sets[1:])


def colour_absent_from_titles(colour: str, titles: Iterable[str]) -> bool:
    """Whether no word of `colour` appears as a whole word in any of `titles` (case-insensitive).

    Conservative on purpose: a title mentioning only part of "navy blue" ("Blue Shirt") still leaks the colour,
    so it is not absent.

    Example:
    ```python
    >>> colour_absent_from_titles("Navy Blue", ["Nike Men Running Shoes", "Puma Cap"])
    True
    >>> colour_absent_from_titles("Navy Blue", ["Blue Tee"])
    False
    ```
    """
    colour_words = {word for word in normalise_value(colour).split()}
    return all(colour_words.isdisjoint(re.findall(r"[a-z]+", title.casefold())) for title in titles)


# --------------------------------------------------------------------------------------------------------------
# Hard negatives
# --------------------------------------------------------------------------------------------------------------


def _hard_negative_pools(
    group: Mapping[tuple[str | None, str | None], list[str]], gender: str | None, colour: str | None
) -> tuple[list[str], list[str]]:
    """Within one article type: (ids of a compatible gender but another known colour, ids of an incompatible
    gender), each in a fixed order so that seeded sampling from them is deterministic."""
    other_colour, other_gender = [], []
    for other_gender_value, other_colour_value in sorted(group, key=lambda key: tuple(part or "" for part in key)):
        ids = sorted(group[(other_gender_value, other_colour_value)])
        if not _genders_compatible(gender, other_gender_value):
            other_gender.extend(ids)
        elif None not in (colour, other_colour_value) and colour != other_colour_value:
            other_colour.extend(ids)
    return other_colour, other_gender


def find_hard_negatives(
    dataset: datasets.Dataset | Sequence[Mapping],
    *,
    seed: int,
    negatives_per_product: int = 4,
    columns: CatalogueColumns | None = None,
) -> dict[str, list[str]]:
    """For each product id, up to `negatives_per_product` ids of the same article type that differ in colour or
    in (incompatible) gender.

    Same-type products of another colour and a compatible gender come first (only the colour, which the image
    shows, separates them); products of an incompatible gender fill the rest. Products of unknown colour or
    gender are never picked for the attribute they lack. Deterministic for a seed.

    Example:
    ```python
    >>> negatives = find_hard_negatives(load_catalogue(split="validation"), seed=0, negatives_per_product=2)
    >>> all(len(ids) <= 2 for ids in negatives.values())
    True
    ```
    """
    columns = columns or CatalogueColumns()
    if negatives_per_product < 0:
        raise ValueError(f"negatives_per_product must be >= 0, got {negatives_per_product}")
    # article type -> (gender, colour) -> product ids, all values normalised (None when unknown)
    groups: dict[str, dict[tuple[str | None, str | None], list[str]]] = defaultdict(lambda: defaultdict(list))
    negatives: dict[str, list[str]] = {}
    for record in product_records(dataset, columns):
        facets = {key: normalise_value(value) for key, value in product_facets(record, columns).items()}
        negatives[record[columns.product_id]] = []
        if columns.article_type in facets:
            key = (facets.get(columns.gender), facets.get(columns.base_colour))
            groups[facets[columns.article_type]][key].append(record[columns.product_id])

    for group in groups.values():
        for gender, colour in group:
            other_colour, other_gender = _hard_negative_pools(group, gender, colour)
            for product_id in group[(gender, colour)]:
                rng = product_rng(seed, product_id, "hard-negatives")
                picked = rng.sample(other_colour, min(negatives_per_product, len(other_colour)))
                shortfall = negatives_per_product - len(picked)
                negatives[product_id] = picked + rng.sample(other_gender, min(shortfall, len(other_gender)))
    return negatives
