"""A minimal local web demo of product search: a query box, then the top products with image, title and score.

Standard library only (`http.server`), no external assets, and bound to a loopback address: the demo has no
authentication and is meant for a developer's own machine.

Endpoints:

- `GET /?q=red+shirt&k=10`: the search page (the form alone without `q`);
- `GET /api/search?q=red+shirt&k=10`: the same results as JSON;
- `GET /image/<product_id>`: the product's catalogue image, decoded with `load_product_image` and re-encoded as
  JPEG, so a broken, oversized or non-image payload in the catalogue never reaches the browser as is.

Example:
```python
>>> from modeling_mmretrieval.retrieval.demo import serve_demo
>>> server = serve_demo(model, processor, index, catalogue)  # port 0: a free port
>>> server.url
'http://127.0.0.1:41827/'
>>> server.close()
```
"""

import functools
import html
import io
import ipaddress
import json
import logging
import threading
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from ..data.catalogue import CatalogueColumns
from ..data.images import load_product_image
from .index import ProductIndex
from .search import search_text

logger = logging.getLogger(__name__)

DEFAULT_TOP_K = 10
MAX_TOP_K = 100
MAX_QUERY_CHARS = 256
IMAGE_CACHE_SIZE = 1024
JPEG_QUALITY = 90
SERVER_STOP_TIMEOUT_S = 10.0

IMAGE_ROUTE = "/image/"
SEARCH_API_ROUTE = "/api/search"

# The page loads nothing but its own product images: no scripts, no external styles, fonts or frames.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; img-src 'self'; style-src 'unsafe-inline'; form-action 'self'; base-uri 'none'; "
        "frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}

PAGE_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 70rem; padding: 0 1rem; color: #222; }
form { display: flex; gap: .5rem; margin-bottom: 1rem; }
input[type=search] { flex: 1; font-size: 1.1rem; padding: .4rem; }
input[type=number] { width: 4.5rem; }
.error { color: #a00; }
ol.results { list-style: none; padding: 0; display: grid; gap: 1rem;
             grid-template-columns: repeat(auto-fill, minmax(10rem, 1fr)); }
li.result { border: 1px solid #ddd; border-radius: 6px; padding: .5rem; }
li.result img, li.result .no-image { display: block; width: 120px; height: 160px; object-fit: contain;
                                      margin: 0 auto; background: #f4f4f4; }
li.result .no-image { line-height: 160px; text-align: center; color: #888; }
.title { font-weight: 600; margin: .4rem 0 .2rem; }
.meta { color: #666; font-size: .85rem; }
"""


class DemoRequestError(ValueError):
    """A request parameter is missing or invalid (answered with HTTP 400)."""


@dataclass(frozen=True)
class SearchResult:
    """One ranked product as the demo shows it."""

    rank: int
    product_id: str
    score: float
    title: str
    image_url: str | None


# ----------------------------------------------------------------------------------------------------------------
# Pure helpers: request parameters, image encoding, HTML
# ----------------------------------------------------------------------------------------------------------------


def parse_query(raw: str | None) -> str:
    """The query text with surrounding whitespace removed ("" when absent); refuses over-long queries."""
    query = (raw or "").strip()
    if len(query) > MAX_QUERY_CHARS:
        raise DemoRequestError(f"the query is {len(query)} characters long; at most {MAX_QUERY_CHARS} are accepted")
    return query


def parse_top_k(raw: str | None, default: int = DEFAULT_TOP_K, maximum: int = MAX_TOP_K) -> int:
    """`k` from a query-string value: an integer from 1 to `maximum`, `default` when absent or empty."""
    if raw is None or not raw.strip():
        return default
    try:
        k = int(raw)
    except ValueError:
        raise DemoRequestError(f"k must be an integer, got {raw!r}") from None
    if not 1 <= k <= maximum:
        raise DemoRequestError(f"k must be between 1 and {maximum}, got {k}")
    return k


def image_url(product_id: str) -> str:
    """The demo URL of a product's image (the id percent-encoded, so any id is a single path segment)."""
    return IMAGE_ROUTE + urllib.parse.quote(product_id, safe="")


def encode_jpeg(image) -> bytes:
    """An RGB PIL image as JPEG bytes."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def _render_result(result: SearchResult) -> str:
    title = html.escape(result.title)
    if result.image_url is None:
        picture = '<div class="no-image">no image</div>'
    else:
        picture = f'<img src="{html.escape(result.image_url)}" alt="{title}" width="120" height="160">'
    return (
        f'<li class="result" data-product-id="{html.escape(result.product_id)}">{picture}'
        f'<div class="title">{title}</div>'
        f'<div class="meta">#{result.rank} &middot; score {result.score:.4f} &middot; '
        f"id {html.escape(result.product_id)}</div></li>"
    )


def render_page(query: str, k: int, results: Sequence[SearchResult], error: str | None = None) -> str:
    """The whole search page; every piece of query and catalogue text is HTML-escaped."""
    body = []
    if error is not None:
        body.append(f'<p class="error">{html.escape(error)}</p>')
    elif query:
        body.append(f'<p class="summary">Top {len(results)} products for &ldquo;{html.escape(query)}&rdquo;</p>')
        body.append('<ol class="results">' + "".join(_render_result(result) for result in results) + "</ol>")
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>Product search</title><style>{PAGE_STYLE}</style></head><body>"
        "<h1>Product search</h1>"
        '<form method="get" action="/">'
        f'<input type="search" name="q" value="{html.escape(query)}" placeholder="red running shoes for men" '
        f'maxlength="{MAX_QUERY_CHARS}" autofocus>'
        f'<input type="number" name="k" value="{k}" min="1" max="{MAX_TOP_K}" aria-label="results">'
        "<button type=\"submit\">Search</button></form>"
        + "".join(body)
        + "</body></html>"
    )


def _column_values(catalogue, name: str) -> list:
    """One column of a `datasets.Dataset` or of a sequence of row dicts."""
    if hasattr(catalogue, "column_names"):
        return list(catalogue[name])
    return [row.get(name) for row in catalogue]


def _require_loopback(host: str) -> None:
    try:
        loopback = host == "localhost" or ipaddress.IPv4Address(host).is_loopback
    except ipaddress.AddressValueError:
        loopback = False
    if not loopback:
        raise ValueError(
            f"the demo has no authentication and only binds to a loopback IPv4 address such as 127.0.0.1; "
            f"got host={host!r}"
        )


# ----------------------------------------------------------------------------------------------------------------
# The application (no HTTP) and its server
# ----------------------------------------------------------------------------------------------------------------


class ProductSearchDemo:
    r"""
    What the demo pages need, without HTTP: ranked results for a text query and JPEG bytes per product.

    Args:
        model ([`MultimodalRetrievalModel`]): the retriever that built `index`.
        processor ([`MultimodalRetrievalProcessor`]): its processor.
        index ([`ProductIndex`]): the catalogue's product embeddings.
        catalogue (`datasets.Dataset` or sequence of row dicts): the products of `index`, for titles and images.
        columns ([`CatalogueColumns`]): catalogue column names.

    Searches are serialised (a fast tokenizer must not be used by two threads at once); images are decoded
    once and cached.

    Example:
    ```python
    >>> demo = ProductSearchDemo(model, processor, index, catalogue)
    >>> [result.title for result in demo.search("black watch", k=3)]
    ```
    """

    def __init__(self, model, processor, index: ProductIndex, catalogue, columns: CatalogueColumns | None = None):
        self.model = model.eval()
        self.processor = processor
        self.index = index
        self.catalogue = catalogue
        self.columns = columns or CatalogueColumns()
        product_ids = [str(product_id) for product_id in _column_values(catalogue, self.columns.product_id)]
        self._position_by_id = {product_id: position for position, product_id in enumerate(product_ids)}
        self._titles = [str(title or "") for title in _column_values(catalogue, self.columns.title)]
        unknown = [product_id for product_id in index.ids if str(product_id) not in self._position_by_id]
        if unknown:
            raise ValueError(
                f"{len(unknown)} indexed products are not in the catalogue (e.g. {unknown[:3]!r}); pass the "
                "catalogue the index was built from"
            )
        self._search_lock = threading.Lock()
        self._cached_jpeg = functools.lru_cache(maxsize=IMAGE_CACHE_SIZE)(self._encode_product_image)

    def image_jpeg(self, product_id: str) -> bytes | None:
        """The product's image re-encoded as JPEG, or None for an unknown product or a missing/broken image."""
        return self._cached_jpeg(product_id)

    def _encode_product_image(self, product_id: str) -> bytes | None:
        position = self._position_by_id.get(product_id)
        if position is None or self.columns.image is None:  # a catalogue without an image column
            return None
        loaded = load_product_image(self.catalogue[position][self.columns.image])
        if not loaded.has_image:
            logger.info(f"product {product_id!r} has no usable image: {loaded.error}")
            return None
        return encode_jpeg(loaded.image)

    def search(self, query: str, k: int = DEFAULT_TOP_K) -> list[SearchResult]:
        """The top-`k` products for a text query, best first."""
        with self._search_lock:
            scores, ids = search_text(self.model, self.processor, self.index, [query], k=k)
        results = []
        for rank, (score, product_id) in enumerate(zip(scores[0].tolist(), ids[0], strict=True), start=1):
            product_id = str(product_id)
            has_image = self.image_jpeg(product_id) is not None
            results.append(
                SearchResult(
                    rank=rank,
                    product_id=product_id,
                    score=score,
                    title=self._titles[self._position_by_id[product_id]],
                    image_url=image_url(product_id) if has_image else None,
                )
            )
        return results


class _DemoRequestHandler(BaseHTTPRequestHandler):
    server: "DemoServer"
    server_version = "mmretrieval-demo"

    def do_GET(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        params = urllib.parse.parse_qs(url.query)
        try:
            if url.path == "/":
                self._search_page(params)
            elif url.path == SEARCH_API_ROUTE:
                self._search_api(params)
            elif url.path.startswith(IMAGE_ROUTE):
                self._image(urllib.parse.unquote(url.path[len(IMAGE_ROUTE) :]))
            else:
                self._send(HTTPStatus.NOT_FOUND, b"not found", "text/plain; charset=utf-8")
        except Exception:  # a failing request must answer 500, not drop the connection
            logger.exception(f"error while answering {self.path!r}")
            self._send(HTTPStatus.INTERNAL_SERVER_ERROR, b"internal error", "text/plain; charset=utf-8")

    def _search_page(self, params: Mapping[str, list[str]]) -> None:
        raw_query = params.get("q", [""])[0]
        try:
            query, k = parse_query(raw_query), parse_top_k(params.get("k", [None])[0])
        except DemoRequestError as error:
            page = render_page(raw_query[:MAX_QUERY_CHARS], DEFAULT_TOP_K, [], error=str(error))
            self._send(HTTPStatus.BAD_REQUEST, page.encode(), "text/html; charset=utf-8")
            return
        results = self.server.app.search(query, k) if query else []
        self._send(HTTPStatus.OK, render_page(query, k, results).encode(), "text/html; charset=utf-8")

    def _search_api(self, params: Mapping[str, list[str]]) -> None:
        try:
            query, k = parse_query(params.get("q", [""])[0]), parse_top_k(params.get("k", [None])[0])
            if not query:
                raise DemoRequestError("pass a query: /api/search?q=...")
        except DemoRequestError as error:
            self._send_json(HTTPStatus.BAD_REQUEST, {"error": str(error)})
            return
        results = self.server.app.search(query, k)
        self._send_json(HTTPStatus.OK, {"query": query, "k": k, "results": [asdict(result) for result in results]})

    def _image(self, product_id: str) -> None:
        jpeg = self.server.app.image_jpeg(product_id)
        if jpeg is None:
            self._send(HTTPStatus.NOT_FOUND, b"no image for this product", "text/plain; charset=utf-8")
            return
        self._send(HTTPStatus.OK, jpeg, "image/jpeg", cache_seconds=3600)

    def _send_json(self, status: HTTPStatus, payload: dict) -> None:
        self._send(status, json.dumps(payload).encode(), "application/json")

    def _send(self, status: HTTPStatus, body: bytes, content_type: str, cache_seconds: int = 0) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", f"max-age={cache_seconds}" if cache_seconds else "no-store")
        for name, value in SECURITY_HEADERS.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:
        # Through `logging` rather than stderr, so applications and tests decide where request lines go.
        logger.info(f"{self.address_string()} {format % args}")


class DemoServer(ThreadingHTTPServer):
    """The demo's HTTP server, answering from a background thread once `start`ed; `close` stops it.

    Usable as a context manager. `url` is the page's address (with the port the OS picked for `port=0`).
    """

    daemon_threads = True

    def __init__(self, app: ProductSearchDemo, host: str = "127.0.0.1", port: int = 0):
        _require_loopback(host)
        super().__init__((host, port), _DemoRequestHandler)
        self.app = app
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/"

    def start(self) -> "DemoServer":
        if self._thread is None:
            self._thread = threading.Thread(target=self.serve_forever, name="mmretrieval-demo", daemon=True)
            self._thread.start()
        return self

    def wait(self, timeout: float | None = None) -> None:
        """Block until the server stops (or `timeout` seconds pass); Ctrl-C interrupts the wait."""
        if self._thread is not None:
            self._thread.join(timeout)

    def close(self) -> None:
        """Stop answering, release the port and end the server thread."""
        if self._thread is not None:
            self.shutdown()
            self._thread.join(SERVER_STOP_TIMEOUT_S)
            self._thread = None
        self.server_close()

    def __enter__(self) -> "DemoServer":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def serve_demo(
    model,
    processor,
    index: ProductIndex,
    catalogue,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    columns: CatalogueColumns | None = None,
) -> DemoServer:
    """Start the search demo on `http://host:port/` in a background thread and return its server.

    `port=0` takes a free port (read it from `server.url`). Only loopback hosts are accepted. Call
    `server.close()` (or use the server as a context manager) to stop it.

    Example:
    ```python
    >>> with serve_demo(model, processor, index, catalogue, port=8000) as server:
    ...     server.wait()  # until Ctrl-C
    ```
    """
    return DemoServer(ProductSearchDemo(model, processor, index, catalogue, columns), host, port).start()


__all__ = [
    "DemoRequestError",
    "DemoServer",
    "ProductSearchDemo",
    "SearchResult",
    "parse_query",
    "parse_top_k",
    "render_page",
    "serve_demo",
]
