"""A query phrasing family that training never uses, for evaluating on phrasings a model has not seen.

Training queries (`queries.derive_query`) put the attributes before the noun in English adjective order
("mens red casual tshirts"), or after it with "for", "in" and "with" ("tshirt in red for men"). A model
evaluated on the same templates can score well by learning the templates. This family words the same
attributes another way — the noun first, then each attribute as a comma-separated descriptor, with
synonyms training never says:

- gender: "ladies" / "female" (women), "gents" / "male" (men), "junior boys", "junior girls",
  "gender neutral" (unisex);
- colour: "<colour> coloured" or "colour <colour>";
- brand: "by <brand>"; any other attribute: "<value> style".

The attributes themselves are drawn exactly as for training queries (`queries.choose_query_attributes`), so
relevance sets are comparable; only the words differ. `HELD_OUT_MARKERS` are words every query of this
family contains one or more of and no training query contains (tests check both).

Example:
```python
>>> product = {"article_type": "Tshirts", "gender": "Men", "base_colour": "Red", "usage": "Casual"}
>>> derive_held_out_query(product, random.Random(3)).text
'tshirts, casual style, male'
```
"""

import random
from collections.abc import Mapping

from .catalogue import CatalogueColumns
from .queries import DerivedQuery, choose_query_attributes, singular_noun
from .relevance import UNISEX

_GENDER_SYNONYMS = {
    "men": ("gents", "male"),
    "women": ("ladies", "female"),
    "boys": ("junior boys",),
    "girls": ("junior girls",),
    UNISEX: ("gender neutral",),
}
_COLOUR_FORMS = ("{} coloured", "colour {}")
# Words that only this family says: every held-out query has one ("," joins its descriptors).
HELD_OUT_MARKERS = frozenset(
    {",", "gents", "male", "ladies", "female", "junior", "neutral", "coloured", "colour", "by", "style"}
)


def _gender_phrase(value: str, rng: random.Random) -> str:
    word = value.lower()
    synonyms = _GENDER_SYNONYMS.get(word) or _GENDER_SYNONYMS.get(singular_noun(word) + "s")
    return rng.choice(synonyms) if synonyms else f"{word} style"


def derive_held_out_query(
    product: Mapping, rng: random.Random, columns: CatalogueColumns | None = None
) -> DerivedQuery:
    """One query of the held-out family for `product` (see the module docstring): same attributes as
    `derive_query` would draw from `rng`, other words and order.

    Example:
    ```python
    >>> kurta = {"article_type": "Kurtas", "gender": "Women", "base_colour": "Green", "brand": "Biba"}
    >>> query = derive_held_out_query(kurta, random.Random(0))
    >>> query.text, query.template
    ('kurta, female, colour green', '{article_type}, {gender}, colour {base_colour}')
    ```
    """
    columns = columns or CatalogueColumns()
    chosen = choose_query_attributes(product, rng, columns)
    descriptors, slots = [], []
    for key in chosen.ordered_keys:
        value = chosen.facets[key]
        if key == columns.gender:
            phrase, slot = _gender_phrase(value, rng), f"{{{key}}}"
        elif key == columns.base_colour:
            form = rng.choice(_COLOUR_FORMS)
            phrase, slot = form.format(value.lower()), form.format(f"{{{key}}}")
        elif key == columns.brand:
            phrase, slot = f"by {value.lower()}", f"by {{{key}}}"
        else:
            phrase, slot = f"{value.lower()} style", f"{{{key}}} style"
        descriptors.append(phrase)
        slots.append(slot)
    order = list(range(len(descriptors)))
    rng.shuffle(order)
    text = ", ".join([chosen.noun, *(descriptors[i] for i in order)])
    template = ", ".join([f"{{{columns.article_type}}}", *(slots[i] for i in order)])
    return DerivedQuery(text=text, attributes=chosen.attributes, template=template)


__all__ = ["HELD_OUT_MARKERS", "derive_held_out_query"]
