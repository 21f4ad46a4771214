"""Attribute-derived queries: templated phrases built from a product's own catalogue attributes.

The catalogue has products but no user queries, so queries are *attribute-derived* ("red casual tshirt for men",
"nike running shoes"), phrased with a small English singulariser. They are not user behaviour, and their relevance
sets (every product matching all of the query's attributes, see `relevance`) are only as complete and as clean as
the catalogue's attributes. All randomness is seeded per product, so the same seed gives the same queries.
See docs/data.md.
"""

import json
import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import datasets
from transformers.utils import logging

from .catalogue import CatalogueColumns, known_value, product_records, product_rng, with_lazy_images
from .relevance import UNISEX, AttributeIndex, colour_absent_from_titles, product_facets

logger = logging.get_logger(__name__)

QUERY_ATTRIBUTES_COLUMN = "query_attributes"

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
class DerivedQuery:
    """An attribute-derived query: its `text`, the `attributes` it constrains and the layout `template` used.

    Example:
    ```python
    >>> DerivedQuery(text="blue shirt", attributes={"article_type": "Shirts", "base_colour": "Blue"},
    ...              template="{base_colour} {article_type}").template.format(base_colour="red", article_type="kurta")
    'red kurta'
    ```
    """

    text: str
    attributes: dict[str, str]
    template: str


@dataclass(frozen=True)
class EvaluationQuery:
    """An attribute-derived evaluation query with its relevance set.

    `relevant_ids` holds every product of the dataset matching all of `attributes` (see `product_matches`), not
    only `source_product_id`, the product the query was derived from. `colour_absent_from_titles` marks the
    "image must matter" slice: the query names a colour that no relevant product's title mentions.

    Example:
    ```python
    >>> query = make_evaluation_queries(load_catalogue(split="test"), seed=0, num_queries=1)[0]
    >>> query.query_id, query.source_product_id in query.relevant_ids
    ('q00000', True)
    ```
    """

    query_id: str
    text: str
    attributes: dict[str, str]
    relevant_ids: set[str]
    source_product_id: str
    colour_absent_from_titles: bool
    template: str


# --------------------------------------------------------------------------------------------------------------
# Phrasing: words and phrases
# --------------------------------------------------------------------------------------------------------------


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
    if word == UNISEX:  # an adjective, not a group of people: no "unisex's" or "for unisex"
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


# --------------------------------------------------------------------------------------------------------------
# One query, training pairs, evaluation queries
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QueryAttributes:
    """What one attribute-derived query constrains, before it is phrased: the article type as the noun it is
    said with, and the further attributes in English adjective order (`ordered_keys` into `facets`)."""

    article_type: str
    noun: str
    facets: dict[str, str]
    ordered_keys: list[str]
    article_type_key: str  # the catalogue's article-type column (`CatalogueColumns.article_type`)

    @property
    def attributes(self) -> dict[str, str]:
        """What the query constrains, keyed by the catalogue's own column names (as relevance matching reads them)."""
        return {self.article_type_key: self.article_type, **{key: self.facets[key] for key in self.ordered_keys}}


def choose_query_attributes(product: Mapping, rng: random.Random, columns: CatalogueColumns) -> QueryAttributes:
    """The article type (and its noun) plus one to three further attributes of `product`, drawn with `rng`:
    colour and gender most often, then brand, usage and `attribute_keys`. Every query phrasing starts here.

    Example:
    ```python
    >>> product = {"article_type": "Tshirts", "gender": "Men", "base_colour": "Red", "usage": "Casual"}
    >>> choose_query_attributes(product, random.Random(3), CatalogueColumns()).ordered_keys
    ['gender', 'usage']
    ```
    """
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
    return QueryAttributes(article_type, noun, facets, ordered_keys, columns.article_type)


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
    chosen = choose_query_attributes(product, rng, columns)
    facets, noun, ordered_keys = chosen.facets, chosen.noun, chosen.ordered_keys
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
    return DerivedQuery(
        text=" ".join(phrase for phrase, _ in pieces),
        attributes=chosen.attributes,
        template=" ".join(slot for _, slot in pieces),
    )


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
    records = product_records(dataset, columns)
    rounds = []
    for round_index in range(queries_per_product):
        queries = [
            derive_query(record, product_rng(seed, record[columns.product_id], f"train{round_index}"), columns)
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
    phrase: Callable[[Mapping, random.Random, CatalogueColumns], DerivedQuery] | None = None,
) -> list[EvaluationQuery]:
    """Distinct attribute-derived evaluation queries, each with every relevant product of `dataset`.

    Products are visited in a seeded random order; each yields one query (deterministic per seed and product),
    kept if its text is new and its relevance set has between `min_relevant` and `max_relevant` products. Fewer
    than `num_queries` are returned (with a warning) when the dataset runs out of distinct queries. `phrase`
    words each query (default `derive_query`, the training phrasing); `held_out_phrasing.derive_held_out_query`
    words the same attributes in a family that training never uses.

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
    records = product_records(dataset, columns)
    index = AttributeIndex(records, columns)
    titles = {record[columns.product_id]: str(record.get(columns.title) or "") for record in records}
    visiting_order = sorted(records, key=lambda record: record[columns.product_id])
    random.Random(seed).shuffle(visiting_order)

    queries, seen_texts = [], set()
    for record in visiting_order:
        if len(queries) == num_queries:
            break
        product_id = record[columns.product_id]
        if known_value(record.get(columns.article_type)) is None:
            continue
        derived = (phrase or derive_query)(record, product_rng(seed, product_id, "evaluation"), columns)
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
