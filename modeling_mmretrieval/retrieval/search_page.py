"""The search page of the web demo: what a request asks for (`SearchRequest`) and the HTML that answers it.

No HTTP here (that is `retrieval.demo`) and no model: parsing, links and rendering are pure functions, so every
piece is testable on its own. The page works with plain HTML forms (no script runs: the demo's
Content-Security-Policy forbids it):

- one search form (`POST /search`, multipart, so a photo can go with the text) that the server answers with a
  redirect to the equivalent `GET /?...` page: every page is a link, and pagination, filters and the
  side-by-side view keep the query, its uploaded image (by token) and the filters;
- facet checkboxes and a price range belong to that form (`form="search"`), with per-value counts;
- each product card has "relevant" / "not relevant" buttons, a `POST /judge` form of its own.

Request parameters (query string of `GET /` and `/api/search`, fields of `POST /search`):

| name | meaning |
|---|---|
| `q` | the query text (at most `MAX_QUERY_CHARS`) |
| `image` | the token of an uploaded query image (`POST /search` sets it) |
| `image_weight` | text + image: the photo's weight `w` in `(1 - w) * text + w * image`, 0 to 1 (default 0.5) |
| `ranker`, `compare` | the ranker of the results, and an optional second ranker, or a second model (by its label), shown beside it |
| `f.COLUMN` | a facet value to keep (repeatable; values of one column are alternatives) |
| `min_price`, `max_price` | the price range |
| `page` | the page number, from 1 |

Example:
```python
>>> request = SearchRequest.from_params({"q": ["red tshirt"], "f.gender": ["Women"], "page": ["2"]})
>>> request.url(page=3)
'/?q=red+tshirt&f.gender=Women&page=3'
```
"""

from __future__ import annotations

import html
import math
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

DEFAULT_TOP_K = 10
MAX_TOP_K = 100
MAX_QUERY_CHARS = 256
DEFAULT_PAGE_SIZE = 12
DEFAULT_IMAGE_WEIGHT = 0.5
FILTER_PREFIX = "f."
MAX_FILTER_VALUES = 32
IMAGE_TOKEN_CHARS = 32

IMAGE_ROUTE = "/image/"
QUERY_IMAGE_ROUTE = "/query-image/"
SEARCH_ROUTE = "/search"
JUDGE_ROUTE = "/judge"
SEARCH_API_ROUTE = "/api/search"

PAGE_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5rem auto; max-width: 80rem; padding: 0 1rem; color: #222; }
form.search { display: flex; flex-wrap: wrap; gap: .5rem; align-items: center; margin-bottom: .5rem; }
input[type=search] { flex: 1 1 20rem; font-size: 1.1rem; padding: .4rem; }
input[type=number] { width: 5rem; }
.error { color: #a00; } .note { color: #555; font-size: .9rem; }
nav.examples a { margin-right: .6rem; }
.layout { display: grid; grid-template-columns: 14rem 1fr; gap: 1.5rem; margin-top: 1rem; }
.layout.single { grid-template-columns: 1fr; }
aside fieldset { border: 1px solid #ddd; border-radius: 6px; margin: 0 0 .8rem; }
aside label { display: block; font-size: .9rem; }
.count { color: #888; }
.columns { display: grid; grid-template-columns: repeat(auto-fit, minmax(18rem, 1fr)); gap: 1.5rem; }
ol.results { list-style: none; padding: 0; display: grid; gap: 1rem;
             grid-template-columns: repeat(auto-fill, minmax(10rem, 1fr)); }
li.result { border: 1px solid #ddd; border-radius: 6px; padding: .5rem; }
li.result img, li.result .no-image { display: block; width: 120px; height: 160px; object-fit: contain;
                                      margin: 0 auto; background: #f4f4f4; }
li.result .no-image { line-height: 160px; text-align: center; color: #888; }
.title { font-weight: 600; margin: .4rem 0 .2rem; }
.brand, .meta, .marked { color: #666; font-size: .85rem; } .price { font-weight: 600; }
form.mark { display: flex; gap: .3rem; margin-top: .3rem; } form.mark button { font-size: .75rem; }
nav.pages { margin: 1rem 0; display: flex; gap: 1rem; }
img.query-image { max-height: 80px; vertical-align: middle; }
"""


class DemoRequestError(ValueError):
    """A request parameter is missing or invalid (answered with HTTP 400 and this one-line message)."""


def parse_query(raw: str | None) -> str:
    """The query text with surrounding whitespace removed ("" when absent); refuses over-long queries.

    Example:
    ```python
    >>> parse_query("  red shirt ")
    'red shirt'
    ```
    """
    query = (raw or "").strip()
    if len(query) > MAX_QUERY_CHARS:
        raise DemoRequestError(f"the query is {len(query)} characters long; at most {MAX_QUERY_CHARS} are accepted")
    return query


def parse_top_k(raw: str | None, default: int = DEFAULT_TOP_K, maximum: int = MAX_TOP_K) -> int:
    """`k` from a query-string value: an integer from 1 to `maximum`, `default` when absent or empty.

    Example:
    ```python
    >>> parse_top_k("5"), parse_top_k(None)
    (5, 10)
    ```
    """
    return _bounded_int(raw, "k", default, 1, maximum)


def _bounded_int(raw: str | None, name: str, default: int, minimum: int, maximum: int) -> int:
    if raw is None or not raw.strip():
        return default
    try:
        value = int(raw)
    except ValueError:
        raise DemoRequestError(f"{name} must be an integer, got {raw[:40]!r}") from None
    if not minimum <= value <= maximum:
        raise DemoRequestError(f"{name} must be between {minimum} and {maximum}, got {value}")
    return value


def _optional_number(raw: str | None, name: str, minimum: float | None = None, maximum: float | None = None):
    if raw is None or not raw.strip():
        return None
    try:
        value = float(raw)
    except ValueError:
        raise DemoRequestError(f"{name} must be a number, got {raw[:40]!r}") from None
    too_low, too_high = minimum is not None and value < minimum, maximum is not None and value > maximum
    if not math.isfinite(value) or too_low or too_high:
        bounds = f" between {minimum:g} and {maximum:g}" if minimum is not None and maximum is not None else ""
        raise DemoRequestError(f"{name} must be a finite number{bounds}, got {raw[:40]!r}")
    return value


def _first(params: Mapping[str, Sequence[str]], name: str) -> str | None:
    values = params.get(name)
    return values[0] if values else None


@dataclass(frozen=True)
class SearchRequest:
    """What one search page shows: query text and/or image, ranker(s), filters and page (see the module docstring).

    `filters` maps a catalogue column to the values kept (any of them). `url(**changes)` is the page's link with
    some fields changed, keeping all the others.

    Example:
    ```python
    >>> SearchRequest(query="black watch", compare="lexical").url(page=2)
    '/?q=black+watch&compare=lexical&page=2'
    ```
    """

    query: str = ""
    image_token: str | None = None
    image_weight: float = DEFAULT_IMAGE_WEIGHT
    ranker: str = "dense"
    compare: str | None = None
    filters: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    min_price: float | None = None
    max_price: float | None = None
    page: int = 1

    @classmethod
    def from_params(
        cls, params: Mapping[str, Sequence[str]], *, rankers: Sequence[str] = ("dense",),
        filter_columns: Sequence[str] | None = None, max_page: int = MAX_TOP_K, models: Sequence[str] = (),
    ) -> SearchRequest:
        """The request of query-string or form fields (`{name: [values]}`); `DemoRequestError` names a bad one.

        `rankers` are the ranker names this demo offers; `filter_columns`, when given, the columns `f.COLUMN` may
        name; `models` the labels of the other models `compare` may also name (shown beside the results, ranked by
        `ranker`).
        """
        ranker = _first(params, "ranker") or "dense"
        compare = _first(params, "compare") or None
        for name, value, choices in (("ranker", ranker, rankers), ("compare", compare, [*rankers, *models])):
            if value is not None and value not in choices:
                raise DemoRequestError(f"{name} must be one of {list(choices)}, got {value[:40]!r}")
        image_token = (_first(params, "image") or "").strip() or None
        if image_token is not None and not (
            len(image_token) <= IMAGE_TOKEN_CHARS and all(c in "0123456789abcdef" for c in image_token)
        ):
            raise DemoRequestError("image must be the token of an uploaded image (hexadecimal)")
        filters: dict[str, tuple[str, ...]] = {}
        for name, values in params.items():
            if not name.startswith(FILTER_PREFIX):
                continue
            column = name[len(FILTER_PREFIX):]
            if filter_columns is not None and column not in filter_columns:
                raise DemoRequestError(f"cannot filter on {column[:40]!r}: the filters are {list(filter_columns)}")
            kept = tuple(dict.fromkeys(value.strip() for value in values if value.strip()))
            if len(kept) > MAX_FILTER_VALUES:
                raise DemoRequestError(f"{name} lists {len(kept)} values; at most {MAX_FILTER_VALUES} are accepted")
            if kept:
                filters[column] = kept
        min_price = _optional_number(_first(params, "min_price"), "min_price")
        max_price = _optional_number(_first(params, "max_price"), "max_price")
        if min_price is not None and max_price is not None and min_price > max_price:
            raise DemoRequestError(f"min_price {min_price:g} is above max_price {max_price:g}")
        weight = _optional_number(_first(params, "image_weight"), "image_weight", 0.0, 1.0)
        return cls(
            query=parse_query(_first(params, "q")),
            image_token=image_token,
            image_weight=DEFAULT_IMAGE_WEIGHT if weight is None else weight,
            ranker=ranker,
            compare=compare if compare != ranker else None,
            filters=filters,
            min_price=min_price,
            max_price=max_price,
            page=_bounded_int(_first(params, "page"), "page", 1, 1, max_page),
        )

    @property
    def is_search(self) -> bool:
        """Whether there is anything to search for (text or an image)."""
        return bool(self.query or self.image_token)

    @property
    def rankers(self) -> tuple[str, ...]:
        """The rankers (or, second, a compared model's label) whose results the page shows, side by side when there
        are two."""
        return (self.ranker,) if self.compare is None else (self.ranker, self.compare)

    def params(self) -> list[tuple[str, str]]:
        """The request as query-string pairs, defaults left out."""
        pairs = [("q", self.query)] if self.query else []
        if self.image_token:
            pairs.append(("image", self.image_token))
            if self.image_weight != DEFAULT_IMAGE_WEIGHT:
                pairs.append(("image_weight", f"{self.image_weight:g}"))
        if self.ranker != "dense":
            pairs.append(("ranker", self.ranker))
        if self.compare:
            pairs.append(("compare", self.compare))
        pairs += [(FILTER_PREFIX + column, value) for column, values in self.filters.items() for value in values]
        for name, value in (("min_price", self.min_price), ("max_price", self.max_price)):
            if value is not None:
                pairs.append((name, f"{value:g}"))
        if self.page != 1:
            pairs.append(("page", str(self.page)))
        return pairs

    def url(self, **changes) -> str:
        """The link of this page with `changes` (field names of `SearchRequest`) applied.

        Example:
        ```python
        >>> SearchRequest(query="jeans", page=4).url(page=1)
        '/?q=jeans'
        ```
        """
        request = replace(self, **changes) if changes else self
        query_string = urllib.parse.urlencode(request.params())
        return "/?" + query_string if query_string else "/"


@dataclass(frozen=True)
class SearchResult:
    """One ranked product as the demo shows it (`brand` and `price` are None when the catalogue lacks them)."""

    rank: int
    product_id: str
    score: float
    title: str
    image_url: str | None
    brand: str | None = None
    price: float | None = None


@dataclass(frozen=True)
class RankingColumn:
    """One ranker's results on the page: its `label`, the page's `results`, whether a next page exists, and a
    `note` shown instead of results when it cannot rank this query (e.g. lexical ranking of an image)."""

    label: str
    results: Sequence[SearchResult] = ()
    has_next: bool = False
    note: str | None = None


@dataclass(frozen=True)
class PageContext:
    """What the page shows besides the results (all optional).

    Args:
        rankers: the rankers offered in the form.
        compare_models: the labels of other models the form offers beside the results (see `SearchRequest`).
        facets: `{column: {value: count}}` of each facet; `facet_titles` their headings.
        price_column: the column of the price range inputs (None: no price filter).
        examples: example queries, each a link.
        image_queries: None when the page takes a photo, else the one-line reason it cannot.
        image_weighting: how a photo is combined with text: "embeddings" (the two query embeddings blended) or
            "scores" (the text score and the photo's similarity to the product photos blended, visual index).
        marks: `{product_id: relevance}` already recorded for this query; `can_mark` whether marks are recorded.
        page_size: results per page.
    """

    rankers: Sequence[str] = ("dense",)
    compare_models: Sequence[str] = ()
    facets: Mapping[str, Mapping[str, int]] = field(default_factory=dict)
    facet_titles: Mapping[str, str] = field(default_factory=dict)
    price_column: str | None = None
    examples: Sequence[str] = ()
    image_queries: str | None = None
    image_weighting: str = "embeddings"
    marks: Mapping[str, int] = field(default_factory=dict)
    can_mark: bool = False
    page_size: int = DEFAULT_PAGE_SIZE


def image_url(product_id: str) -> str:
    """The demo URL of a product's image (the id percent-encoded, so any id is a single path segment).

    Example:
    ```python
    >>> image_url("a/b")
    '/image/a%2Fb'
    ```
    """
    return IMAGE_ROUTE + urllib.parse.quote(product_id, safe="")


def format_price(price: float | None) -> str:
    """A price as the cards show it: thousands separated, cents only when there are any ("" when unknown).

    Example:
    ```python
    >>> format_price(1899.0), format_price(12.5), format_price(None)
    ('1,899', '12.50', '')
    ```
    """
    if price is None:
        return ""
    return f"{price:,.0f}" if float(price).is_integer() else f"{price:,.2f}"


def _escape(text) -> str:
    return html.escape(str(text), quote=True)


def _hidden(name: str, value: str) -> str:
    return f'<input type="hidden" name="{_escape(name)}" value="{_escape(value)}">'


def _render_marks(request: SearchRequest, result: SearchResult, label: str, context: PageContext) -> str:
    if not (context.can_mark and request.query and not request.image_token):
        return ""  # a judgement is a text query's: evaluate replays text queries
    current = context.marks.get(result.product_id)
    marked = "" if current is None else (
        f'<div class="marked">marked {"relevant" if current else "not relevant"}</div>'
    )
    return (
        f'<form class="mark" method="post" action="{JUDGE_ROUTE}">'
        + _hidden("query", request.query) + _hidden("product_id", result.product_id) + _hidden("label", label)
        + _hidden("back", request.url())
        + '<button type="submit" name="relevance" value="1">relevant</button>'
        '<button type="submit" name="relevance" value="0">not relevant</button></form>' + marked
    )


def render_result(result: SearchResult, request: SearchRequest, label: str, context: PageContext) -> str:
    """One product card: image (or "no image"), title, brand, price, rank and score, and the mark buttons."""
    title = _escape(result.title)
    if result.image_url is None:
        picture = '<div class="no-image">no image</div>'
    else:
        picture = f'<img src="{_escape(result.image_url)}" alt="{title}" width="120" height="160">'
    brand = f'<div class="brand">{_escape(result.brand)}</div>' if result.brand else ""
    price = f'<div class="price">{format_price(result.price)}</div>' if result.price is not None else ""
    return (
        f'<li class="result" data-product-id="{_escape(result.product_id)}">{picture}'
        f'<div class="title">{title}</div>{brand}{price}'
        f'<div class="meta">#{result.rank} &middot; score {result.score:.4f} &middot; '
        f"id {_escape(result.product_id)}</div>" + _render_marks(request, result, label, context) + "</li>"
    )


def _render_column(column: RankingColumn, request: SearchRequest, context: PageContext) -> str:
    if column.note is not None:
        body = f'<p class="note">{_escape(column.note)}</p>'
    elif not column.results:
        body = '<p class="note">No product matches this query and these filters.</p>'
    else:
        body = '<ol class="results">' + "".join(
            render_result(result, request, column.label, context) for result in column.results
        ) + "</ol>"
    label = _escape(column.label)
    return f'<section class="ranking" data-ranker="{label}"><h2>{label}</h2>{body}</section>'


def _describe_search(request: SearchRequest, first: int, last: int, image_weighting: str) -> str:
    parts = []
    if request.query:
        parts.append(f"&ldquo;{_escape(request.query)}&rdquo;")
    if request.image_token:
        parts.append('the uploaded image <img class="query-image" alt="query image" '
                     f'src="{QUERY_IMAGE_ROUTE}{_escape(request.image_token)}">')
    text = " + ".join(parts)
    if request.query and request.image_token:
        w = request.image_weight
        if image_weighting == "scores":
            combined = f"score = {1 - w:g} &times; text score + {w:g} &times; similarity to the product photo"
        else:
            combined = f"query = {1 - w:g} &times; text + {w:g} &times; image, both unit length, renormalised"
        text += f' <span class="weighting">(text and image combined: {combined})</span>'
    span = f"Products {first}&ndash;{last}" if last >= first else "No products"
    return f'<p class="summary">{span} for {text}</p>'


def _render_pagination(request: SearchRequest, columns: Sequence[RankingColumn]) -> str:
    links = []
    if request.page > 1:
        links.append(f'<a rel="prev" href="{_escape(request.url(page=request.page - 1))}">&larr; previous</a>')
    links.append(f'<span class="page-number">page {request.page}</span>')
    if any(column.has_next for column in columns):
        links.append(f'<a rel="next" href="{_escape(request.url(page=request.page + 1))}">next &rarr;</a>')
    return '<nav class="pages">' + "".join(links) + "</nav>"


def _render_filters(request: SearchRequest, context: PageContext) -> str:
    groups = []
    for column, counts in context.facets.items():
        chosen = {value.casefold() for value in request.filters.get(column, ())}
        shown = dict(counts)
        for value in request.filters.get(column, ()):  # a chosen value stays visible even at count 0
            if value.casefold() not in {name.casefold() for name in shown}:
                shown[value] = 0
        boxes = "".join(
            f'<label><input type="checkbox" form="search" name="{_escape(FILTER_PREFIX + column)}" '
            f'value="{_escape(value)}"{" checked" if value.casefold() in chosen else ""}> {_escape(value)} '
            f'<span class="count">({count})</span></label>'
            for value, count in shown.items()
        )
        title = context.facet_titles.get(column, column)
        groups.append(f'<fieldset data-facet="{_escape(column)}"><legend>{_escape(title)}</legend>{boxes}</fieldset>')
    if context.price_column is not None:
        low = "" if request.min_price is None else f"{request.min_price:g}"
        high = "" if request.max_price is None else f"{request.max_price:g}"
        groups.append(
            '<fieldset data-facet="price"><legend>price</legend>'
            f'<label>from <input type="number" form="search" name="min_price" min="0" step="any" value="{low}"></label>'
            f'<label>to <input type="number" form="search" name="max_price" min="0" step="any" value="{high}"></label>'
            "</fieldset>"
        )
    if not groups:
        return ""
    return ('<aside class="filters"><h2>Filters</h2>' + "".join(groups)
            + '<button type="submit" form="search">Apply filters</button></aside>')


def _options(names: Sequence[str], selected: str | None, *, blank: str | None = None, suffix: str = "") -> str:
    options = [f'<option value=""{"" if selected else " selected"}>{_escape(blank)}</option>'] if blank else []
    options += [f'<option value="{_escape(name)}"{" selected" if name == selected else ""}>{_escape(name + suffix)}'
                "</option>" for name in names]
    return "".join(options)


def _render_form(request: SearchRequest, context: PageContext) -> str:
    image_field = (
        '<label>photo <input type="file" name="image_file" accept="image/*"></label>'
        f'<label>image weight <input type="number" name="image_weight" min="0" max="1" step="0.1" '
        f'value="{request.image_weight:g}"></label>'
        if context.image_queries is None else ""
    )
    kept_image = ""
    if request.image_token:
        kept_image = _hidden("image", request.image_token) + (
            '<label><input type="checkbox" name="clear_image" value="1"> drop the image</label>'
        )
    return (
        f'<form id="search" class="search" method="post" action="{SEARCH_ROUTE}" enctype="multipart/form-data">'
        f'<input type="search" name="q" value="{_escape(request.query)}" placeholder="red running shoes for men" '
        f'maxlength="{MAX_QUERY_CHARS}" autofocus>{image_field}{kept_image}'
        f'<label>ranker <select name="ranker">{_options(context.rankers, request.ranker)}</select></label>'
        f'<label>beside it <select name="compare">{_options(context.rankers, request.compare, blank="none")}'
        + _options(context.compare_models, request.compare, suffix=" (model)") + "</select></label>"
        '<button type="submit">Search</button></form>'
    )


def render_page(
    request: SearchRequest,
    columns: Sequence[RankingColumn] = (),
    context: PageContext | None = None,
    *,
    error: str | None = None,
) -> str:
    """The whole search page; every piece of query and catalogue text is HTML-escaped.

    Example:
    ```python
    >>> page = render_page(SearchRequest(query="red shirt"), [RankingColumn("dense", results)], PageContext())
    ```
    """
    context = context or PageContext()
    filters = _render_filters(request, context)
    notes = []
    if context.image_queries is not None:
        notes.append(f'<p class="note image-queries">Photo search is off: {_escape(context.image_queries)}</p>')
    if context.examples:
        notes.append('<nav class="examples">Try: ' + "".join(
            f'<a href="{_escape(SearchRequest(query=example).url())}">{_escape(example)}</a>'
            for example in context.examples
        ) + "</nav>")
    body = []
    if error is not None:
        body.append(f'<p class="error">{_escape(error)}</p>')
    elif request.is_search and columns:
        first = (request.page - 1) * context.page_size + 1
        shown = max((len(column.results) for column in columns), default=0)
        body.append(_describe_search(request, first, first + shown - 1, context.image_weighting))
        if request.filters or request.min_price is not None or request.max_price is not None:
            described = [f"{column}={'|'.join(values)}" for column, values in request.filters.items()]
            if request.min_price is not None or request.max_price is not None:
                low = "" if request.min_price is None else f"{request.min_price:g} <= "
                high = "" if request.max_price is None else f" <= {request.max_price:g}"
                described.append(f"{low}price{high}")
            body.append(f'<p class="note active-filters">Filters: {_escape(", ".join(described))}</p>')
        body.append('<div class="columns">' + "".join(_render_column(c, request, context) for c in columns) + "</div>")
        body.append(_render_pagination(request, columns))
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>Product search</title><style>{PAGE_STYLE}</style></head><body>"
        "<h1>Product search</h1>" + _render_form(request, context) + "".join(notes)
        + f'<div class="layout{"" if filters else " single"}">' + filters + "<main>" + "".join(body) + "</main></div>"
        + "</body></html>"
    )


__all__ = [
    "DemoRequestError",
    "PageContext",
    "RankingColumn",
    "SearchRequest",
    "SearchResult",
    "format_price",
    "image_url",
    "parse_query",
    "parse_top_k",
    "render_page",
    "render_result",
]
