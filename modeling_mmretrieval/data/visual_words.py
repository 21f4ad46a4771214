"""Visual attribute words (colours, patterns) in product texts: find them, strip them, tell when text is silent.

The image is the only witness of a product's colour when its title and description never say it, as on
marketplaces with poor titles. Three uses share these helpers:

- training (`VisualWordDropout`): strip the visual words from a seeded fraction of the product texts a batch
  sees, so that matching a colour query sometimes needs the image; or (`StrippedTextView`) add a stripped copy
  of every product text, from which the image branch alone learns to restore them
  (`training.visual_word_restoration`);
- evaluation, degraded-text variant (`degrade_product_texts`): strip them from a seeded share of the test
  products, as a catalogue with poor titles would have them;
- evaluation, text-silent slice (`text_is_silent_about`): relevant products whose title and description
  never name the queried colour or pattern.

Words are matched whole and case-insensitively, longest phrase first ("navy blue" before "blue"), in the
product's text fields only; every other word is kept in order.

Example:
```python
>>> words = VisualWords.default()
>>> words.strip("Nike Men Navy Blue Striped Polo T-shirt")
'Nike Men Polo T-shirt'
```
"""

import random
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

# Colour and pattern vocabulary of English product titles, beyond the catalogue's own values.
COLOUR_WORDS = (
    "black white blue red green yellow orange purple pink brown grey gray silver gold beige cream maroon navy olive "
    "khaki teal turquoise lavender magenta mustard peach rust tan charcoal coral burgundy violet indigo copper bronze "
    "nude skin steel fluorescent multi multicolour multicolor multicoloured off-white offwhite melange"
).split()
PATTERN_WORDS = (
    "striped stripes stripe checked checks check checkered plaid printed print prints floral solid plain polka dots "
    "dotted camouflage camo embroidered colourblocked colorblocked self-design paisley geometric abstract"
).split()
_SEPARATORS = re.compile(r"\s+")
# A stripped phrase leaves this mark, so that the joiners next to it ("blue-green", "black/white") go too, and
# only those ("Reid & Taylor" keeps its "&").
_MARK = "\x00"
_JOINERS_AT_MARKS = re.compile(rf"{_MARK}\s*[-/&+]+\s*(?={_MARK})|[-/&+]+(?={_MARK})|(?<={_MARK})[-/&+]+")


@dataclass(frozen=True)
class VisualWords:
    """A vocabulary of visual attribute phrases and a compiled matcher for them.

    Example:
    ```python
    >>> VisualWords.from_values(["Sea Green"]).strip("Sea Green Kurta for women")
    'Kurta for women'
    ```
    """

    phrases: tuple[str, ...]

    @classmethod
    def default(cls) -> "VisualWords":
        return cls.from_values(())

    @classmethod
    def from_values(cls, values: Iterable[str]) -> "VisualWords":
        """The default vocabulary plus `values` (e.g. a catalogue's colour and pattern attribute values)."""
        return cls._longest_first((*COLOUR_WORDS, *PATTERN_WORDS), values)

    @classmethod
    def colours(cls, values: Iterable[str] = ()) -> "VisualWords":
        """The colour words alone (no pattern words) plus `values`, e.g. a catalogue's colour column: what "the text
        names a colour" means.

        Example: `VisualWords.colours(["Sea Green"]).pattern.search("Striped Sea Green Kurta").group(0)` is
        `'Sea Green'`.
        """
        return cls._longest_first(COLOUR_WORDS, values)

    @classmethod
    def _longest_first(cls, words: Iterable[str], values: Iterable[str]) -> "VisualWords":
        phrases = {word.lower() for word in words}
        phrases |= {" ".join(str(value).lower().split()) for value in values if str(value).strip()}
        # Longest first, so that a multi-word colour is matched and removed whole.
        return cls(tuple(sorted(phrases, key=lambda phrase: (-len(phrase), phrase))))

    @property
    def pattern(self) -> re.Pattern:
        return _compiled(self.phrases)

    def mentions(self, text: str, phrase: str) -> bool:
        """Whether `text` names `phrase` as whole words (words separated as `strip` separates them)."""
        return _compiled((" ".join(phrase.lower().split()),)).search(text) is not None

    def named(self, text: str) -> list[str]:
        """The vocabulary's phrases that `text` names (whole words, case-insensitive), each once, in order of first
        mention; a multi-word phrase is one ("navy blue" is not also "blue").

        Example: `VisualWords.colours(["Navy Blue"]).named("Navy Blue and White Striped Shirt, white collar")` is
        `['navy blue', 'white']`.
        """
        named = [" ".join(match.group(0).lower().replace("-", " ").split()) for match in self.pattern.finditer(text)]
        return list(dict.fromkeys(named))

    def strip(self, text: str) -> str:
        """`text` without any visual phrase (whole words, case-insensitive), whitespace collapsed."""
        marked = self.pattern.sub(_MARK, text)
        return _SEPARATORS.sub(" ", _JOINERS_AT_MARKS.sub("", marked).replace(_MARK, " ")).strip()


_COMPILED: dict[tuple[str, ...], re.Pattern] = {}


def _compiled(phrases: tuple[str, ...]) -> re.Pattern:
    if phrases not in _COMPILED:
        # Words of a phrase may be separated by spaces or hyphens ("off white", "off-white").
        alternatives = "|".join(r"[\s-]+".join(map(re.escape, phrase.replace("-", " ").split())) for phrase in phrases)
        _COMPILED[phrases] = re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.IGNORECASE)
    return _COMPILED[phrases]


def _stripped(product: Mapping, fields: Sequence[str], words: VisualWords) -> dict:
    stripped = dict(product)
    for name in fields:
        if isinstance(product.get(name), str):
            stripped[name] = words.strip(product[name])
    return stripped


class VisualWordDropout:
    """Training augmentation: strips visual words from the text fields of a seeded fraction of products.

    Each call on a product draws from a generator seeded by `(seed, epoch, product id, the row's query)`, so a
    run is reproducible whatever the batch order, a resumed run draws what the uninterrupted one did, and a
    product is degraded in some epochs and not in others. The trainer sets the epoch (`set_epoch`, through the
    collator). Apply it to training products only: evaluation and indexing never see it.

    Example:
    ```python
    >>> dropout = VisualWordDropout(probability=1.0, seed=0)
    >>> dropout.set_epoch(3)
    >>> dropout({"product_id": "7", "title": "Red Checked Shirt"}, "product_id")["title"]
    'Shirt'
    ```
    """

    def __init__(
        self,
        probability: float,
        seed: int,
        words: VisualWords | None = None,
        fields: Sequence[str] = ("title", "description"),
    ):
        if not 0.0 <= probability <= 1.0:
            raise ValueError(f"the visual-word dropout probability must lie in [0, 1], got {probability}")
        self.probability, self.seed = probability, seed
        self.words = words or VisualWords.default()
        self.fields = tuple(fields)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __call__(self, product: Mapping, id_column: str, query_column: str = "query") -> dict:
        key = f"{self.seed}:{self.epoch}:{product.get(id_column)}:{product.get(query_column)}"
        if random.Random(key).random() >= self.probability:
            return dict(product)
        return _stripped(product, self.fields, self.words)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(probability={self.probability}, seed={self.seed})"


class StrippedTextView:
    """Training view of a product for `VisualWordRestorationLoss`: its text fields without visual words, so that
    only the image can still tell its colour or pattern. A product whose text fields would all be left blank is
    returned unchanged (an empty text cannot be embedded).

    Example:
    ```python
    >>> StrippedTextView()({"product_id": "7", "title": "Red Checked Shirt", "description": "Cotton"})["title"]
    'Shirt'
    ```
    """

    def __init__(self, words: VisualWords | None = None, fields: Sequence[str] = ("title", "description")):
        self.words = words or VisualWords.default()
        self.fields = tuple(fields)

    def __call__(self, product: Mapping) -> dict:
        stripped = _stripped(product, self.fields, self.words)
        if not any(isinstance(stripped.get(name), str) and stripped[name].strip() for name in self.fields):
            return dict(product)
        return stripped

    def __repr__(self) -> str:
        return f"{type(self).__name__}(fields={list(self.fields)}, phrases={len(self.words.phrases)})"


def degraded_product_ids(product_ids: Iterable, share: float, seed: int) -> set[str]:
    """A seeded `share` of the products (as `str` ids): the ones the degraded-text variant strips.

    Example:
    ```python
    >>> sorted(degraded_product_ids(["1", "2", "3", "4"], share=0.5, seed=0))
    ['2', '4']
    ```
    """
    ids = sorted({str(product_id) for product_id in product_ids})
    return set(random.Random(seed).sample(ids, round(share * len(ids))))


def degrade_product_texts(
    products: Sequence[Mapping], degraded_ids: set[str], words: VisualWords, id_column: str,
    fields: Sequence[str] = ("title", "description"),
) -> list[dict]:
    """The products with the visual words stripped from the text fields of those in `degraded_ids`."""
    return [
        _stripped(product, fields, words) if str(product.get(id_column)) in degraded_ids else dict(product)
        for product in products
    ]


def text_is_silent_about(product: Mapping, phrases: Iterable[str], words: VisualWords,
                         fields: Sequence[str] = ("title", "description")) -> bool:
    """Whether no text field of `product` names any of `phrases` (e.g. the queried colour and pattern)."""
    text = " ".join(str(product.get(name) or "") for name in fields)
    return not any(words.mentions(text, phrase) for phrase in phrases)


__all__ = [
    "COLOUR_WORDS",
    "PATTERN_WORDS",
    "StrippedTextView",
    "VisualWordDropout",
    "VisualWords",
    "degrade_product_texts",
    "degraded_product_ids",
    "text_is_silent_about",
]
