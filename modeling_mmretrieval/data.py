"""Product catalogue loading, attribute-derived queries, relevance sets and hard negatives.

The catalogue has products but no user queries, so queries are *attribute-derived*: templated phrases built from a
product's own catalogue attributes ("red casual tshirt for men", "nike running shoes"). They are not user
behaviour, and their relevance sets (every product matching all of the query's attributes) are only as complete
and as clean as the catalogue's attributes. See docs/data.md.

Images stay encoded (`datasets.Image(decode=False)`, rows carry `{"bytes", "path"}`) until a batch needs them;
`modeling_mmretrieval.image_loading.load_product_image` then decodes them one by one.
"""

import argparse
import glob
import json
import math
import os
import random
import re
import statistics
import sys
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
from transformers.utils import logging

from .image_loading import DEFAULT_MAX_IMAGE_PIXELS, load_product_image

logger = logging.get_logger(__name__)

SAMPLE_DATA_DIR = Path(__file__).resolve().parent / "sample_data"
DATA_DIR_ENV = "MMRETRIEVAL_DATA_DIR"
QUERY_ATTRIBUTES_COLUMN = "query_attributes"

_REPO_ROOT = Path(__file__).resolve().parents[1]
_SHARED_DATA_RELATIVE = Path("..", "shared", "data", "fashion-products")
_BUILDERS_BY_SUFFIX = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv"}
_SPLIT_NAME_SEPARATORS = re.compile(r"[-_.]")
_SPLIT_NAMES = ("train", "validation", "valid", "dev", "test", "eval")  # also the order splits are listed in
# CatalogueColumns fields every split must have, and those needed only when queries must be derived.
_ALWAYS_NEEDED_FIELDS = ("product_id", "title", "description", "image")
_QUERY_DERIVATION_FIELDS = ("article_type", "gender", "base_colour", "usage", "brand", "attributes")

# Catalogue placeholders that carry no information and must never become a query constraint.
_MISSING_VALUES = frozenset({"", "na", "n/a", "none", "null", "nan", "other", "others", "unknown", "-"})

# English nouns whose singular is missing or means something else ("short", "brief", "flat", "glass").
_PLURAL_ONLY_NOUNS = frozenset(
    "bottoms boxers briefs capris chinos clothes dungarees essentials flats glasses goggles heels jeans jeggings "
    "joggers knickers leggings overalls pajamas pants pyjamas shorts stockings sunglasses suspenders tights trousers "
    "trunks".split()
)
# Plural endings whose singular no rule can tell: "accessories" -> "accessory" but "booties" -> "bootie",
# "scarves" -> "scarf" but "valves" -> "valve". ("sleeves", "gloves" are regular.)
_AMBIGUOUS_PLURAL_ENDINGS = ("ies", "lves", "rves")
_SIBILANT_PLURAL_ENDINGS = ("sses", "shes", "ches", "xes")
_SINGULAR_S_ENDINGS = ("ss", "us")

# A man or a woman searching for a product also wants the unisex ones; kids' queries do not.
_UNISEX = "unisex"
_GENDERS_SERVED_BY_UNISEX = frozenset({"men", "women"})

# How many attributes a query adds to the article type, and how often; colour and gender dominate real queries.
_EXTRA_FACET_COUNTS = (1, 2, 3)
_EXTRA_FACET_COUNT_WEIGHTS = (3, 4, 2)
_GENDER_AND_COLOUR_WEIGHT = 3.0
_BRAND_WEIGHT = 1.5
_OTHER_FACET_WEIGHT = 1.0
_GENDER_AFTER_PROBABILITY = 0.45
_COLOUR_AFTER_PROBABILITY = 0.2
_MODIFIER_AFTER_PROBABILITY = 0.5


@dataclass(frozen=True)
class CatalogueColumns:
    """Names of the catalogue columns this module reads; defaults match the fashion-products catalogue.

    Set an optional column to `None` when a catalogue lacks it. `attributes` holds a JSON object (or a mapping)
    of free-form product attributes; `attribute_keys` are the keys of it that queries may use, in the order they
    are placed before the product noun (`usage` comes last, right before the noun: "striped slim fit casual
    shirt"). `query` is only read when a catalogue already has queries.

    Example:
    ```python
    >>> columns = CatalogueColumns(product_id="sku", brand=None, attribute_keys=("Pattern",))
    >>> columns.facet_columns
    ('article_type', 'gender', 'base_colour', 'usage')
    ```
    """

    product_id: str = "product_id"
    title: str = "title"
    description: str | None = "description"
    image: str = "image"
    query: str | None = "query"
    gender: str | None = "gender"
    base_colour: str | None = "base_colour"
    article_type: str | None = "article_type"
    usage: str | None = "usage"
    brand: str | None = "brand"
    attributes: str | None = "attributes"
    attribute_keys: tuple[str, ...] = ("Pattern", "Sleeve Length", "Fit", "Neck", "Fabric", "Sport")

    @property
    def facet_columns(self) -> tuple[str, ...]:
        """The top-level columns that queries can constrain (article type first)."""
        names = (self.article_type, self.gender, self.base_colour, self.usage, self.brand)
        return tuple(name for name in names if name is not None)

    @property
    def record_columns(self) -> tuple[str, ...]:
        """The columns query derivation, relevance and hard negatives read (never the image)."""
        names = (self.product_id, self.title, *self.facet_columns, self.attributes)
        return tuple(dict.fromkeys(name for name in names if name is not None))


@dataclass(frozen=True)
class DerivedQuery:
    """An attribute-derived query: its `text`, the `attributes` it constrains and the layout `template` used."""

    text: str
    attributes: dict[str, str]
    template: str


@dataclass(frozen=True)
class EvaluationQuery:
    """An attribute-derived evaluation query with its relevance set.

    `relevant_ids` holds every product of the dataset matching all of `attributes` (see `product_matches`), not
    only `source_product_id`, the product the query was derived from. `colour_absent_from_titles` marks the
    "image must matter" slice: the query names a colour that no relevant product's title mentions.
    """

    query_id: str
    text: str
    attributes: dict[str, str]
    relevant_ids: set[str]
    source_product_id: str
    colour_absent_from_titles: bool
    template: str


class CatalogueColumnError(KeyError):
    """A configured catalogue column is missing from the data."""

    def __str__(self) -> str:
        # KeyError.__str__ shows the repr of its argument, which would wrap this multi-part message in quotes.
        return str(self.args[0])


# --------------------------------------------------------------------------------------------------------------
# Small pure helpers: values, words, phrases
# --------------------------------------------------------------------------------------------------------------


def normalise_value(value: Any) -> str:
    """Case- and whitespace-insensitive form of an attribute value, used for every comparison."""
    return " ".join(str(value).split()).casefold()


def _known_value(value: Any) -> str | None:
    """The stripped value, or `None` for missing placeholders ("", "NA", "Other", NaN, None)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    text = " ".join(str(value).split())
    return None if text.casefold() in _MISSING_VALUES else text


def parse_attributes(raw: Any) -> dict[str, str]:
    """The free-form attributes of a product as a `{key: value}` dict; invalid or missing JSON gives `{}`."""
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError:
            return {}
    if not isinstance(raw, Mapping):
        return {}
    return {str(key): str(value) for key, value in raw.items() if value is not None}


def singular_noun(word: str) -> str:
    """Singular of a lower-case English plural, or the word unchanged when the rule would be a guess.

    Example:
    ```python
    >>> [singular_noun(word) for word in ("tshirts", "dresses", "watches", "jeans", "accessories", "kurta")]
    ['tshirt', 'dress', 'watch', 'jeans', 'accessories', 'kurta']
    ```
    """
    if (
        word in _PLURAL_ONLY_NOUNS
        or not word.endswith("s")
        or word.endswith(_SINGULAR_S_ENDINGS)
        or word.endswith(_AMBIGUOUS_PLURAL_ENDINGS)
    ):
        return word
    if word.endswith(_SIBILANT_PLURAL_ENDINGS):
        return word[:-2]
    return word[:-1]


def article_type_phrases(article_type: str) -> tuple[str, ...]:
    """Natural lower-case phrasings of a catalogue article type: as given and, when known, its singular.

    Only the head noun (last word) changes; "X and Y" types name a set and keep their wording.

    Example:
    ```python
    >>> article_type_phrases("Sports Shoes"), article_type_phrases("Track Pants")
    (('sports shoes', 'sports shoe'), ('track pants',))
    ```
    """
    words = article_type.lower().split()
    if not words:
        return ()
    phrase = " ".join(words)
    if "and" in words or "&" in words:
        return (phrase,)
    singular = " ".join([*words[:-1], singular_noun(words[-1])])
    return (phrase,) if singular == phrase else (phrase, singular)


@dataclass(frozen=True)
class _Phrasing:
    """Ways to say one attribute: before the noun ("men's", "blue") or after it ("for men", "in blue")."""

    before: tuple[str, ...]
    after: tuple[str, ...] = ()
    after_probability: float = 0.0


def _gender_phrasing(gender: str) -> _Phrasing:
    word = gender.lower()
    if word == _UNISEX:  # an adjective, not a group of people: no "unisex's" or "for unisex"
        return _Phrasing(before=(word,))
    possessives = (f"{word}'",) if word.endswith("s") else (f"{word}'s", f"{word}s")
    return _Phrasing(before=(word, *possessives), after=(f"for {word}",), after_probability=_GENDER_AFTER_PROBABILITY)


def _modifier_phrasing(value: str) -> _Phrasing:
    words = value.lower().split()
    singular_head = singular_noun(words[-1])
    # "Short Sleeves" reads as "short sleeve shirt" or "shirt with short sleeves"; single words stay adjectives.
    if len(words) > 1 and singular_head != words[-1]:
        return _Phrasing(
            before=(" ".join([*words[:-1], singular_head]),),
            after=(f"with {' '.join(words)}",),
            after_probability=_MODIFIER_AFTER_PROBABILITY,
        )
    return _Phrasing(before=(" ".join(words),))


def _phrasing(key: str, value: str, columns: CatalogueColumns) -> _Phrasing:
    if key == columns.gender:
        return _gender_phrasing(value)
    if key == columns.base_colour:
        colour = value.lower()
        return _Phrasing(before=(colour,), after=(f"in {colour}",), after_probability=_COLOUR_AFTER_PROBABILITY)
    if key == columns.brand:
        return _Phrasing(before=(value.lower(),))
    return _modifier_phrasing(value)


def _facet_weight(key: str, columns: CatalogueColumns) -> float:
    if key in (columns.gender, columns.base_colour):
        return _GENDER_AND_COLOUR_WEIGHT
    return _BRAND_WEIGHT if key == columns.brand else _OTHER_FACET_WEIGHT


def _weighted_sample(rng: random.Random, items: Sequence[str], weights: Sequence[float], count: int) -> list[str]:
    """`count` distinct items, each draw proportional to the remaining weights."""
    pool = dict(zip(items, weights, strict=True))
    chosen = []
    for _ in range(min(count, len(pool))):
        item = rng.choices(list(pool), weights=list(pool.values()))[0]
        chosen.append(item)
        del pool[item]
    return chosen


def _phrase_words(phrase: str) -> set[str]:
    return {singular_noun(word) for word in re.split(r"[\s']+", phrase.lower()) if word}


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
# Product attributes and matching
# --------------------------------------------------------------------------------------------------------------


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
        value = _known_value(product.get(name))
        if value is not None:
            facets[name] = value
    if columns.attributes is not None:
        extra = parse_attributes(product.get(columns.attributes))
        for key in columns.attribute_keys:
            value = _known_value(extra.get(key))
            if value is not None and key not in facets:
                facets[key] = value
    return facets


def _genders_accepted_for(gender: str) -> frozenset[str]:
    """Normalised product genders that answer a query for `gender` (normalised)."""
    return frozenset({gender, _UNISEX}) if gender in _GENDERS_SERVED_BY_UNISEX else frozenset({gender})


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


# --------------------------------------------------------------------------------------------------------------
# Attribute-derived queries
# --------------------------------------------------------------------------------------------------------------


def derive_query(product: Mapping, rng: random.Random, columns: CatalogueColumns | None = None) -> DerivedQuery:
    """Build one attribute-derived query from a product's catalogue attributes.

    The article type is always expressed; one to three further attributes (colour and gender most often, then
    brand, usage and `attribute_keys`) are drawn with `rng`, and so are their phrasing and placement: "men's",
    "mens" or "for men"; "blue shirt" or "shirt in blue"; singular or plural noun. Colour words are kept as the
    catalogue writes them. All randomness comes from `rng`, so a seeded `random.Random` makes it deterministic.

    Example:
    ```python
    >>> product = {"article_type": "Tshirts", "gender": "Men", "base_colour": "Red", "usage": "Casual"}
    >>> query = derive_query(product, random.Random(3))
    >>> query.text, query.template
    ('mens casual tshirts', '{gender} {usage} {article_type}')
    >>> query.attributes
    {'article_type': 'Tshirts', 'gender': 'Men', 'usage': 'Casual'}
    ```
    """
    columns = columns or CatalogueColumns()
    if columns.article_type is None:
        raise ValueError("deriving queries needs an article type column; CatalogueColumns.article_type is None")
    facets = product_facets(product, columns)
    article_type = facets.pop(columns.article_type, None)
    if article_type is None:
        product_id = product.get(columns.product_id)
        raise ValueError(
            f"product {product_id!r} has no article type ({columns.article_type!r}); no query can name it"
        )

    noun = rng.choice(article_type_phrases(article_type))
    # An attribute the noun already says ("casual" in "casual shoes") would only repeat itself.
    candidates = [key for key, value in facets.items() if not _phrase_words(value) <= _phrase_words(noun)]
    weights = [_facet_weight(key, columns) for key in candidates]
    extra_count = rng.choices(_EXTRA_FACET_COUNTS, weights=_EXTRA_FACET_COUNT_WEIGHTS)[0]
    chosen = set(_weighted_sample(rng, candidates, weights, extra_count))

    # English adjective order before the noun: brand, who, colour, pattern/fit/fabric..., purpose.
    ordered_keys = [
        key
        for key in (columns.brand, columns.gender, columns.base_colour, *columns.attribute_keys, columns.usage)
        if key in chosen
    ]
    before, after = [], []
    for key in ordered_keys:
        phrasing = _phrasing(key, facets[key], columns)
        if phrasing.after and rng.random() < phrasing.after_probability:
            phrase = rng.choice(phrasing.after)
            after.append((phrase, f"{phrase.split()[0]} {{{key}}}"))
        else:
            before.append((rng.choice(phrasing.before), f"{{{key}}}"))
    # After the noun the order mirrors it: "shirt with short sleeves in blue for men".
    pieces = [*before, (noun, f"{{{columns.article_type}}}"), *reversed(after)]
    attributes = {columns.article_type: article_type, **{key: facets[key] for key in ordered_keys}}
    return DerivedQuery(
        text=" ".join(phrase for phrase, _ in pieces),
        attributes=attributes,
        template=" ".join(slot for _, slot in pieces),
    )


# --------------------------------------------------------------------------------------------------------------
# Whole-catalogue building blocks: records, relevance index, per-product randomness
# --------------------------------------------------------------------------------------------------------------


def _product_rng(seed: int, product_id: str, purpose: str) -> random.Random:
    # A string seed is hashed with SHA-512 by `random`, so this is stable across processes and Python runs, and a
    # product's queries do not depend on which other products are in the dataset or in what order.
    return random.Random(f"{seed}:{purpose}:{product_id}")


def _product_records(dataset: datasets.Dataset | Sequence[Mapping], columns: CatalogueColumns) -> list[dict]:
    """The text columns of every product (never the images), with string product ids, checked unique."""
    if isinstance(dataset, datasets.Dataset):
        present = [name for name in columns.record_columns if name in dataset.column_names]
        records = dataset.select_columns(present).to_list()
    else:
        records = [dict(product) for product in dataset]
    for record in records:
        record[columns.product_id] = str(record[columns.product_id])
    duplicates = [pid for pid, count in Counter(r[columns.product_id] for r in records).items() if count > 1]
    if duplicates:
        raise ValueError(f"product ids must be unique; repeated: {sorted(duplicates)[:10]}")
    return records


class _AttributeIndex:
    """Inverted index (attribute, normalised value) -> product ids, giving whole-catalogue relevance sets."""

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


def with_lazy_images(dataset: datasets.Dataset, columns: CatalogueColumns | None = None) -> datasets.Dataset:
    """`dataset` with its image column as `datasets.Image(decode=False)`: rows carry `{"bytes", "path"}`.

    Accepts an image column that is a decoding `Image` feature, file paths (strings) or raw bytes.
    """
    columns = columns or CatalogueColumns()
    if columns.image not in dataset.column_names:
        raise CatalogueColumnError(
            f"no image column {columns.image!r} (CatalogueColumns.image); available columns: {dataset.column_names}"
        )
    feature = dataset.features[columns.image]
    if isinstance(feature, datasets.Image) and not feature.decode:
        return dataset
    return dataset.cast_column(columns.image, datasets.Image(decode=False))


# --------------------------------------------------------------------------------------------------------------
# Public dataset builders: training pairs, evaluation queries, hard negatives
# --------------------------------------------------------------------------------------------------------------


def make_training_pairs(
    dataset: datasets.Dataset,
    *,
    seed: int,
    queries_per_product: int = 1,
    columns: CatalogueColumns | None = None,
) -> datasets.Dataset:
    """(attribute-derived query, product) training pairs: the product rows plus a `query` column.

    Each product gets `queries_per_product` rows (whole rounds over the dataset, concatenated without copying the
    images, which stay encoded). A `query_attributes` column holds the JSON of the attributes each query
    constrains, so a collator can spot in-batch products that also satisfy a query (false negatives). Queries
    depend only on `seed` and the product, not on the dataset's order.

    Raises:
        ValueError: a product has no article type, `queries_per_product < 1`, or the columns to add already exist.

    Example:
    ```python
    >>> catalogue = load_catalogue(split="train")
    >>> pairs = make_training_pairs(catalogue, seed=0, queries_per_product=2)
    >>> len(pairs) == 2 * len(catalogue), pairs.column_names[-2:]
    (True, ['query', 'query_attributes'])
    ```
    """
    columns = columns or CatalogueColumns()
    if queries_per_product < 1:
        raise ValueError(f"queries_per_product must be at least 1, got {queries_per_product}")
    if columns.query is None:
        raise ValueError("CatalogueColumns.query names the query column to add; it is None")
    for name in (columns.query, QUERY_ATTRIBUTES_COLUMN):
        if name in dataset.column_names:
            raise ValueError(f"the dataset already has a {name!r} column; use it as is or name another query column")
    dataset = with_lazy_images(dataset, columns)
    records = _product_records(dataset, columns)
    rounds = []
    for round_index in range(queries_per_product):
        queries = [
            derive_query(record, _product_rng(seed, record[columns.product_id], f"train{round_index}"), columns)
            for record in records
        ]
        with_queries = dataset.add_column(columns.query, [query.text for query in queries])
        rounds.append(
            with_queries.add_column(QUERY_ATTRIBUTES_COLUMN, [json.dumps(query.attributes) for query in queries])
        )
    return rounds[0] if len(rounds) == 1 else datasets.concatenate_datasets(rounds)


def make_evaluation_queries(
    dataset: datasets.Dataset | Sequence[Mapping],
    *,
    seed: int,
    num_queries: int,
    columns: CatalogueColumns | None = None,
    min_relevant: int = 1,
    max_relevant: int | None = None,
) -> list[EvaluationQuery]:
    """Distinct attribute-derived evaluation queries, each with every relevant product of `dataset`.

    Products are visited in a seeded random order; each yields one query (deterministic per seed and product),
    kept if its text is new and its relevance set has between `min_relevant` and `max_relevant` products. Fewer
    than `num_queries` are returned (with a warning) when the dataset runs out of distinct queries.

    Example:
    ```python
    >>> queries = make_evaluation_queries(load_catalogue(split="test"), seed=0, num_queries=500)
    >>> query = queries[0]
    >>> query.source_product_id in query.relevant_ids
    True
    ```
    """
    columns = columns or CatalogueColumns()
    if num_queries < 0 or min_relevant < 1 or (max_relevant is not None and max_relevant < min_relevant):
        raise ValueError(
            f"need num_queries >= 0 and 1 <= min_relevant <= max_relevant; got {num_queries=}, {min_relevant=}, "
            f"{max_relevant=}"
        )
    records = _product_records(dataset, columns)
    index = _AttributeIndex(records, columns)
    titles = {record[columns.product_id]: str(record.get(columns.title) or "") for record in records}
    visiting_order = sorted(records, key=lambda record: record[columns.product_id])
    random.Random(seed).shuffle(visiting_order)

    queries, seen_texts = [], set()
    for record in visiting_order:
        if len(queries) == num_queries:
            break
        product_id = record[columns.product_id]
        if _known_value(record.get(columns.article_type)) is None:
            continue
        derived = derive_query(record, _product_rng(seed, product_id, "evaluation"), columns)
        if derived.text in seen_texts:
            continue
        seen_texts.add(derived.text)
        relevant = index.matching_ids(derived.attributes)
        if len(relevant) < min_relevant or (max_relevant is not None and len(relevant) > max_relevant):
            continue
        colour = derived.attributes.get(columns.base_colour) if columns.base_colour else None
        queries.append(
            EvaluationQuery(
                query_id=f"q{len(queries):05d}",
                text=derived.text,
                attributes=derived.attributes,
                relevant_ids=relevant,
                source_product_id=product_id,
                colour_absent_from_titles=colour is not None
                and colour_absent_from_titles(colour, (titles[pid] for pid in relevant)),
                template=derived.template,
            )
        )
    if len(queries) < num_queries:
        logger.warning(f"only {len(queries)} distinct evaluation queries could be derived ({num_queries} asked)")
    return queries


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
    for record in _product_records(dataset, columns):
        facets = {key: normalise_value(value) for key, value in product_facets(record, columns).items()}
        negatives[record[columns.product_id]] = []
        if columns.article_type in facets:
            key = (facets.get(columns.gender), facets.get(columns.base_colour))
            groups[facets[columns.article_type]][key].append(record[columns.product_id])

    for group in groups.values():
        for gender, colour in group:
            other_colour, other_gender = _hard_negative_pools(group, gender, colour)
            for product_id in group[(gender, colour)]:
                rng = _product_rng(seed, product_id, "hard-negatives")
                picked = rng.sample(other_colour, min(negatives_per_product, len(other_colour)))
                shortfall = negatives_per_product - len(picked)
                negatives[product_id] = picked + rng.sample(other_gender, min(shortfall, len(other_gender)))
    return negatives


# --------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------


def default_data_dir() -> Path:
    """Where `load_catalogue()` reads from without a `source`.

    In order: the directory in the `MMRETRIEVAL_DATA_DIR` environment variable; `../shared/data/fashion-products`
    next to the working directory or to this repository, if it holds parquet files; else the committed sample
    (`SAMPLE_DATA_DIR`).
    """
    configured = os.environ.get(DATA_DIR_ENV)
    if configured:
        path = Path(configured).expanduser()
        if not _data_files_in(path):
            raise FileNotFoundError(f"{DATA_DIR_ENV}={configured!r} is not a directory of .parquet/.json/.csv files")
        return path
    for base in dict.fromkeys((Path.cwd(), _REPO_ROOT)):
        candidate = base / _SHARED_DATA_RELATIVE
        if any(candidate.glob("*.parquet")):
            return candidate.resolve()
    return SAMPLE_DATA_DIR


def _data_files_in(directory: Path) -> list[Path]:
    """The data files of one kind (parquet first, then json, then csv) directly inside `directory`."""
    if not directory.is_dir():
        return []
    files = sorted(path for path in directory.iterdir() if path.suffix.lower() in _BUILDERS_BY_SUFFIX)
    for builder in dict.fromkeys(_BUILDERS_BY_SUFFIX.values()):
        of_kind = [path for path in files if _BUILDERS_BY_SUFFIX[path.suffix.lower()] == builder]
        if of_kind:
            return of_kind
    return []


def _local_paths(source: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path] | None:
    """The local data files `source` names (directory, file, glob or list), or `None` for a Hub dataset name."""
    if isinstance(source, (list, tuple)):
        return [Path(item) for item in source]
    text = os.fspath(source)
    if any(character in text for character in "*?["):
        return sorted(Path(match) for match in glob.glob(text))
    path = Path(text).expanduser()
    if path.is_dir():
        return _data_files_in(path)
    if path.exists() or path.suffix.lower() in _BUILDERS_BY_SUFFIX or text.startswith((".", "/", "~")):
        return [path]
    return None


def _split_files(paths: Sequence[Path], source: Any) -> tuple[str, dict[str, list[str]]]:
    """(builder, {split: files}): splits come from file names like `train.parquet` / `test-00001.parquet`, else
    every file is "train"."""
    if not paths:
        raise FileNotFoundError(f"no .parquet/.json/.jsonl/.csv files found at {source!r}")
    missing = [str(path) for path in paths if not path.is_file()]
    if missing:
        raise FileNotFoundError(f"catalogue file(s) not found: {missing}")
    builders = {_BUILDERS_BY_SUFFIX.get(path.suffix.lower()) for path in paths}
    if len(builders) != 1 or None in builders:
        raise ValueError(
            f"cannot read {[str(path) for path in paths]}: give files of one kind (.parquet, .json/.jsonl or .csv)"
        )
    prefixes = [_SPLIT_NAME_SEPARATORS.split(path.name, maxsplit=1)[0].lower() for path in paths]
    if not set(prefixes) <= set(_SPLIT_NAMES):
        return builders.pop(), {"train": [str(path) for path in paths]}
    by_split: dict[str, list[str]] = defaultdict(list)
    for prefix, path in zip(prefixes, paths, strict=True):
        by_split[prefix].append(str(path))
    return builders.pop(), {name: by_split[name] for name in _SPLIT_NAMES if name in by_split}


def _builder_for(data_files: str | Sequence[str] | Mapping[str, str | Sequence[str]]) -> str:
    groups = data_files.values() if isinstance(data_files, Mapping) else [data_files]
    files = [name for group in groups for name in ([group] if isinstance(group, str) else group)]
    builders = {_BUILDERS_BY_SUFFIX.get(Path(name).suffix.lower()) for name in files}
    if len(builders) != 1 or None in builders:
        raise ValueError(f"cannot tell how to read {files}; pass source='parquet', 'csv' or 'json' with data_files")
    return builders.pop()


def _check_columns(column_names: Sequence[str], columns: CatalogueColumns, where: str) -> None:
    needed = list(_ALWAYS_NEEDED_FIELDS)
    if columns.query is None or columns.query not in column_names:
        if columns.article_type is None:
            raise ValueError(
                f"{where} has no query column and CatalogueColumns.article_type is None: "
                "queries can neither be read nor derived"
            )
        needed += _QUERY_DERIVATION_FIELDS
    missing = {name: getattr(columns, name) for name in needed if getattr(columns, name) not in (None, *column_names)}
    if missing:
        listed = ", ".join(f"{column!r} (CatalogueColumns.{name})" for name, column in missing.items())
        raise CatalogueColumnError(
            f"{where} has no column {listed}; available columns: {sorted(column_names)}. Pass CatalogueColumns(...) "
            "naming the catalogue's own columns, or None for an optional column it lacks."
        )


def _prepare_split(dataset: datasets.Dataset, columns: CatalogueColumns, where: str) -> datasets.Dataset:
    _check_columns(dataset.column_names, columns, where)
    dataset = with_lazy_images(dataset, columns)
    if dataset.features[columns.product_id] != datasets.Value("string"):
        dataset = dataset.cast_column(columns.product_id, datasets.Value("string"))
    return dataset


def load_catalogue(
    source: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    *,
    split: str | None = None,
    columns: CatalogueColumns | None = None,
    data_files: str | Sequence[str] | Mapping[str, str | Sequence[str]] | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> datasets.DatasetDict | datasets.Dataset:
    """Load a product catalogue as a `DatasetDict` (or the `split` asked for), images kept encoded.

    Args:
        source: a local directory (its `train`/`validation`/`test` files become splits), data file(s) or a glob,
            or a Hugging Face Hub dataset name; with `data_files`, the `datasets` builder ("parquet", "csv",
            "json") or Hub name. `None` reads `default_data_dir()`: the shared fashion catalogue when present,
            else the committed sample.
        split: return only this split (for local files only its files are read).
        columns: the catalogue's column names; validated on every split.
        data_files: passed to `datasets.load_dataset` as is.
        cache_dir: the `datasets` cache directory.

    Raises:
        CatalogueColumnError: (a `KeyError`) a configured column is missing; the message lists the available ones.
        FileNotFoundError: a local source does not exist or holds no data files.

    Example:
    ```python
    >>> catalogue = load_catalogue()  # ../shared/data/fashion-products, else the committed sample
    >>> sorted(catalogue)
    ['test', 'train', 'validation']
    >>> catalogue["train"][0]["image"].keys()  # encoded: decode per batch with load_product_image
    dict_keys(['bytes', 'path'])
    ```
    """
    columns = columns or CatalogueColumns()
    if data_files is None:
        source = default_data_dir() if source is None else source
        local_paths = _local_paths(source)
        if local_paths is not None:
            builder, split_files = _split_files(local_paths, source)
            if split is not None:
                if split not in split_files:
                    raise KeyError(f"no {split!r} split in {source!r}; splits found: {sorted(split_files)}")
                split_files = {split: split_files[split]}
            source, data_files = builder, split_files
    elif source is None:
        source = _builder_for(data_files)
    loaded = datasets.load_dataset(os.fspath(source), data_files=data_files, split=split, cache_dir=cache_dir)
    if isinstance(loaded, datasets.Dataset):
        return _prepare_split(loaded, columns, f"split {split!r}")
    # Listed train, validation, test whatever order the `datasets` cache recorded them in.
    names = sorted(loaded, key=lambda name: _SPLIT_NAMES.index(name) if name in _SPLIT_NAMES else len(_SPLIT_NAMES))
    return datasets.DatasetDict({name: _prepare_split(loaded[name], columns, f"split {name!r}") for name in names})


# --------------------------------------------------------------------------------------------------------------
# Statistics and the `data-stats` command
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SplitStats:
    """Summary of one catalogue split; image counts are `None` when images were not decoded."""

    products: int
    article_types: int
    derived_queries: int
    relevant_per_query_mean: float
    relevant_per_query_median: float
    relevant_per_query_max: int
    colour_absent_queries: int
    images_ok: int | None = None
    image_problems: dict[str, int] = field(default_factory=dict)


def count_image_problems(
    dataset: datasets.Dataset,
    *,
    columns: CatalogueColumns | None = None,
    max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    batch_size: int = 512,
) -> tuple[int, dict[str, int]]:
    """Decode every image with `load_product_image`: (decodable count, {problem reason: count})."""
    columns = columns or CatalogueColumns()
    images = with_lazy_images(dataset, columns).select_columns([columns.image])
    problems: Counter[str] = Counter()
    decodable = 0
    for batch in images.iter(batch_size=batch_size):
        for value in batch[columns.image]:
            result = load_product_image(value, max_pixels=max_pixels)
            if result.has_image:
                decodable += 1
            else:
                problems[result.reason.value] += 1
    return decodable, dict(problems)


def catalogue_stats(
    catalogue: datasets.DatasetDict | datasets.Dataset,
    *,
    seed: int = 0,
    num_queries: int = 1000,
    columns: CatalogueColumns | None = None,
    decode_images: bool = True,
    max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
) -> dict[str, SplitStats]:
    """Per-split statistics: products, article types, derived evaluation queries and their relevance-set sizes,
    "image must matter" queries (colour absent from relevant titles) and, optionally, image decoding outcomes.

    Example:
    ```python
    >>> stats = catalogue_stats(load_catalogue(split="validation"), num_queries=100, decode_images=False)
    >>> stats["validation"].derived_queries
    100
    ```
    """
    columns = columns or CatalogueColumns()
    splits = catalogue if isinstance(catalogue, datasets.DatasetDict) else {str(catalogue.split or "data"): catalogue}
    stats = {}
    for name, dataset in splits.items():
        queries = make_evaluation_queries(dataset, seed=seed, num_queries=num_queries, columns=columns)
        sizes = [len(query.relevant_ids) for query in queries] or [0]
        images_ok, image_problems = (
            count_image_problems(dataset, columns=columns, max_pixels=max_pixels) if decode_images else (None, {})
        )
        stats[name] = SplitStats(
            products=len(dataset),
            article_types=len({normalise_value(value) for value in dataset[columns.article_type] if value}),
            derived_queries=len(queries),
            relevant_per_query_mean=statistics.fmean(sizes),
            relevant_per_query_median=statistics.median(sizes),
            relevant_per_query_max=max(sizes),
            colour_absent_queries=sum(query.colour_absent_from_titles for query in queries),
            images_ok=images_ok,
            image_problems=image_problems,
        )
    return stats


def format_stats_table(stats: Mapping[str, SplitStats]) -> str:
    """A plain-text table of `catalogue_stats` output, one row per split."""
    header = (
        "split",
        "products",
        "article types",
        "queries",
        "relevant mean",
        "median",
        "max",
        "colour not in titles",
        "images ok",
        "image problems",
    )
    rows = [header]
    for name, split in stats.items():
        problems = ", ".join(f"{reason}={count}" for reason, count in sorted(split.image_problems.items())) or "-"
        rows.append(
            (
                name,
                str(split.products),
                str(split.article_types),
                str(split.derived_queries),
                f"{split.relevant_per_query_mean:.1f}",
                f"{split.relevant_per_query_median:g}",
                str(split.relevant_per_query_max),
                str(split.colour_absent_queries),
                "-" if split.images_ok is None else str(split.images_ok),
                problems if split.images_ok is not None else "-",
            )
        )
    widths = [max(len(row[position]) for row in rows) for position in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows
    )


def run_data_stats(argv: Sequence[str] | None = None) -> int:
    """`data-stats` command: print catalogue statistics. Returns the process exit status.

    Example:
    ```bash
    python -m modeling_mmretrieval.data --split validation --num-queries 200
    ```
    """
    parser = argparse.ArgumentParser(
        prog="data-stats", description="Statistics of a product catalogue and of its attribute-derived queries."
    )
    parser.add_argument(
        "--source", default=None, help="directory, file(s) glob or Hub name (default: shared data, else the sample)"
    )
    parser.add_argument("--split", default=None, help="only this split")
    parser.add_argument("--seed", type=int, default=0, help="seed of the attribute-derived queries")
    parser.add_argument("--num-queries", type=int, default=1000, help="evaluation queries derived per split")
    parser.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS)
    parser.add_argument("--skip-images", action="store_true", help="do not decode the images")
    args = parser.parse_args(argv)
    try:
        catalogue = load_catalogue(args.source, split=args.split)
    except (KeyError, FileNotFoundError, ValueError) as error:
        print(f"data-stats: {error}", file=sys.stderr)
        return 2
    stats = catalogue_stats(
        catalogue,
        seed=args.seed,
        num_queries=args.num_queries,
        decode_images=not args.skip_images,
        max_pixels=args.max_image_pixels,
    )
    print(f"source: {args.source or default_data_dir()}  (queries are attribute-derived, seed {args.seed})")
    print(format_stats_table(stats))
    return 0


if __name__ == "__main__":
    raise SystemExit(run_data_stats())
