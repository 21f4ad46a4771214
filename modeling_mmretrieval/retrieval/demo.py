"""A local product-search page a merchandiser can use: text and photo queries (for every model with an image
tower), filters with counts, pages, two rankers or two models side by side, and relevance marks saved as judgements.

Standard library only (`http.server`), no external assets and no scripts, bound to a loopback address: the demo
has no authentication and is meant for the user's own machine. The page itself (parameters, links, HTML) is
`retrieval.search_page`, the application behind it (`ProductSearchDemo`: rankings, facets, images, marks)
`retrieval.search_app`; this module is the HTTP server and its hardening.

Endpoints:

- `GET /?q=red+shirt&f.gender=Women&page=2`: the search page (see `search_page` for every parameter);
- `POST /search` (multipart form: `q`, `image_file`, `image_weight`, `ranker`, `compare`, `f.COLUMN`, prices):
  stores an uploaded photo under a token and redirects (303) to the equivalent `GET /?...` page;
- `POST /judge` (`query`, `product_id`, `relevance` 0/1, `label`, `back`): appends a judgement to the JSONL file
  given as `judgements_path` (`retrieval.judgements`) and redirects back to the page;
- `GET /api/search?q=...&k=10` (also `ranker`, `f.COLUMN`, prices): the results as JSON;
- `GET /image/<product_id>`, `GET /query-image/<token>`: a product's image, an uploaded query photo, as JPEG.

Hardening: every connection has a socket timeout (`request_timeout`, 10 s) and at most `max_connections`
are served at once (more get 503 at once); at most `MAX_WAITING_SEARCHES` searches wait for the model (more
get 503), and a search whose client has hung up is dropped before it runs. A client that disconnects is logged
at debug level, never as a traceback. Only requests whose `Host` is the loopback name or address with the
bound port are answered (421 otherwise: DNS rebinding), a form posted from another origin is refused (403),
and every answer (error pages and JSON included) carries the security headers. Product images are served only
from the catalogue row's own bytes or from files inside `image_root` (the catalogue's folder); any other path
is refused and the card shows "no image".

Example:
```python
>>> from modeling_mmretrieval.retrieval.demo import serve_demo
>>> server = serve_demo(model, processor, index, catalogue, judgements_path="marks.jsonl")  # port 0: a free port
>>> server.url
'http://127.0.0.1:41827/'
>>> server.close()
```
"""

import ipaddress
import json
import logging
import os
import select
import socket
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import asdict
from email.message import Message
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from ..data.catalogue import CatalogueColumns
from .filters import DEFAULT_PRICE_COLUMN
from .hybrid import Fusion
from .index import ProductIndex
from .search_app import ComparedModel, DemoBusyError, ProductSearchDemo, SearchAbandoned, encode_jpeg
from .search_page import (
    DEFAULT_PAGE_SIZE,
    IMAGE_ROUTE,
    JUDGE_ROUTE,
    MAX_QUERY_CHARS,
    QUERY_IMAGE_ROUTE,
    SEARCH_API_ROUTE,
    SEARCH_ROUTE,
    DemoRequestError,
    SearchRequest,
    SearchResult,
    parse_query,
    parse_top_k,
    render_page,
)

logger = logging.getLogger(__name__)

WAIT_POLL_S = 0.5
SERVER_STOP_TIMEOUT_S = 10.0
REQUEST_TIMEOUT_S = 10.0
MAX_CONNECTIONS = 32
MAX_FORM_BYTES = 10 * 1024 * 1024
MAX_JUDGE_FORM_BYTES = 16 * 1024
MAX_FORM_PARTS = 256

# The page loads nothing but its own images: no scripts, no external styles, fonts or frames.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; img-src 'self'; style-src 'unsafe-inline'; form-action 'self'; base-uri 'none'; "
        "frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    # Not "no-referrer": Chromium then sends `Origin: null` with the page's own forms, which the origin check
    # below could not tell from a cross-site post; "same-origin" still sends nothing to other sites.
    "Referrer-Policy": "same-origin",
}
# A client that hung up or stopped sending: logged at debug level, never a traceback.
CLIENT_GONE_ERRORS = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, TimeoutError)


# ----------------------------------------------------------------------------------------------------------------
# Requests
# ----------------------------------------------------------------------------------------------------------------


def parse_multipart_form(body: bytes, content_type: str) -> tuple[dict[str, list[str]], dict[str, bytes]]:
    """`(fields, files)` of a `multipart/form-data` body: text fields as `{name: [values]}`, file fields as
    `{name: bytes}` (an empty file input is left out). `DemoRequestError` on a malformed body.

    Example:
    ```python
    >>> body = b'--B\\r\\nContent-Disposition: form-data; name="q"\\r\\n\\r\\nred shirt\\r\\n--B--\\r\\n'
    >>> parse_multipart_form(body, "multipart/form-data; boundary=B")
    ({'q': ['red shirt']}, {})
    ```
    """
    header = Message()
    header["content-type"] = content_type
    boundary = header.get_param("boundary")
    if header.get_content_type() != "multipart/form-data" or not isinstance(boundary, str) or not boundary:
        raise DemoRequestError("the search form must be sent as multipart/form-data with a boundary")
    sections = (b"\r\n" + body).split(b"\r\n--" + boundary.encode("latin-1"))
    if len(sections) < 2 or not sections[-1].startswith(b"--"):
        raise DemoRequestError("the multipart form is cut short (no closing boundary)")
    if len(sections) > MAX_FORM_PARTS + 2:
        raise DemoRequestError(f"the form has over {MAX_FORM_PARTS} fields")
    fields: dict[str, list[str]] = {}
    files: dict[str, bytes] = {}
    for section in sections[1:-1]:
        head, separator, content = section.partition(b"\r\n\r\n")
        if not separator:
            raise DemoRequestError("a part of the multipart form has no headers")
        part = Message()
        for line in head.decode("latin-1").split("\r\n"):
            name, colon, value = line.partition(":")
            if colon:
                part[name.strip()] = value.strip()
        name = part.get_param("name", header="content-disposition")
        if not isinstance(name, str) or not name:
            raise DemoRequestError("a part of the multipart form has no field name")
        if part.get_param("filename", header="content-disposition") is not None:
            if content:
                files[name] = content
        else:
            try:
                fields.setdefault(name, []).append(content.decode("utf-8"))
            except UnicodeDecodeError:
                raise DemoRequestError(f"form field {name[:40]!r} is not UTF-8 text") from None
    return fields, files


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
# HTTP
# ----------------------------------------------------------------------------------------------------------------


def _client_gone(connection: socket.socket) -> bool:
    """Whether the client closed its side (EOF or reset) while its request waited; costs one non-blocking peek."""
    try:
        readable, _, _ = select.select([connection], [], [], 0)
        return bool(readable) and connection.recv(1, socket.MSG_PEEK) == b""
    except (OSError, ValueError):
        return True


class _DemoRequestHandler(BaseHTTPRequestHandler):
    server: "DemoServer"
    server_version = "mmretrieval-demo"
    # http.server answers a malformed request line in HTTP/0.9 style, a body without status line or headers: the
    # security headers would be lost. HTTP/1.0 keeps them on every answer.
    default_request_version = "HTTP/1.0"

    def setup(self) -> None:
        self.timeout = self.server.request_timeout  # every read and write of the connection, half-open ones included
        super().setup()

    def handle(self) -> None:
        try:
            super().handle()
        except CLIENT_GONE_ERRORS as error:
            logger.debug(f"client {self.client_address[0]} went away: {type(error).__name__}")

    def end_headers(self) -> None:
        # Here, so every answer carries them: pages, JSON, images, redirects and http.server's own error pages.
        for name, value in SECURITY_HEADERS.items():
            self.send_header(name, value)
        super().end_headers()

    def do_GET(self) -> None:
        self._answer(self._get)

    def do_POST(self) -> None:
        self._answer(self._post)

    def _answer(self, route: Callable[[urllib.parse.SplitResult], None]) -> None:
        problem = self._host_problem()
        if problem is not None:
            self._send_text(HTTPStatus.MISDIRECTED_REQUEST, problem)
            return
        try:
            route(urllib.parse.urlsplit(self.path))
        except CLIENT_GONE_ERRORS:
            raise  # logged at debug by `handle`
        except SearchAbandoned:
            logger.debug(f"dropped the search of {self.path[:200]!r}: the client hung up")
            self.close_connection = True
        except DemoBusyError as error:
            self._send_text(HTTPStatus.SERVICE_UNAVAILABLE, str(error))
        except Exception:  # a failing request must answer 500, not drop the connection
            logger.exception(f"error while answering {self.path[:200]!r}")
            self._send_text(HTTPStatus.INTERNAL_SERVER_ERROR, "internal error")

    def _host_problem(self) -> str | None:
        host = (self.headers.get("Host") or "").strip().lower()
        if host in self.server.allowed_hosts:
            return None
        return f"this demo only answers requests for {sorted(self.server.allowed_hosts)}, not {host[:100]!r}"

    def _still_wanted(self) -> bool:
        return not _client_gone(self.connection)

    def _get(self, url: urllib.parse.SplitResult) -> None:
        params = urllib.parse.parse_qs(url.query)
        if url.path == "/":
            self._search_page(params)
        elif url.path == SEARCH_API_ROUTE:
            self._search_api(params)
        elif url.path.startswith(IMAGE_ROUTE):
            self._jpeg(self.server.app.image_jpeg(urllib.parse.unquote(url.path[len(IMAGE_ROUTE):])), 3600)
        elif url.path.startswith(QUERY_IMAGE_ROUTE):
            image = self.server.app.query_image(url.path[len(QUERY_IMAGE_ROUTE):])
            self._jpeg(None if image is None else encode_jpeg(image), 0)
        else:
            self._send_text(HTTPStatus.NOT_FOUND, "not found")

    def _post(self, url: urllib.parse.SplitResult) -> None:
        if url.path not in (SEARCH_ROUTE, JUDGE_ROUTE):
            self._send_text(HTTPStatus.NOT_FOUND, "not found")
            return
        # A page of another site may post a form here (CSRF): browsers name its origin, and the demo's own pages.
        origin = self.headers.get("Origin")
        fetch_site = (self.headers.get("Sec-Fetch-Site") or "same-origin").lower()
        if fetch_site not in ("same-origin", "none") or (
            origin is not None and urllib.parse.urlsplit(origin).netloc.lower() not in self.server.allowed_hosts
        ):
            self._send_text(HTTPStatus.FORBIDDEN, f"forms are only accepted from this demo's own page, not from "
                            f"{(origin or fetch_site)[:100]!r}")
            return
        limit = MAX_FORM_BYTES if url.path == SEARCH_ROUTE else MAX_JUDGE_FORM_BYTES
        body = self._read_body(limit)
        if body is None:
            return
        if url.path == SEARCH_ROUTE:
            self._search_form(body)
        else:
            self._judge_form(body)

    def _read_body(self, limit: int) -> bytes | None:
        length = self.headers.get("Content-Length")
        if length is None or not length.strip().isdigit():
            self._send_text(HTTPStatus.LENGTH_REQUIRED, "a form must be sent with a Content-Length")
            return None
        if int(length) > limit:
            self._send_text(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"the form is {int(length)} bytes; at most {limit} are accepted"
            )
            self.close_connection = True
            return None
        body = self.rfile.read(int(length))  # the socket timeout bounds a client that stops sending
        if len(body) < int(length):
            raise ConnectionAbortedError("the client sent less than its Content-Length")
        return body

    def _request(self, params: Mapping[str, list[str]]) -> SearchRequest:
        app = self.server.app
        return SearchRequest.from_params(
            params, rankers=app.rankers, filter_columns=list(app.facet_columns), max_page=app.max_page,
            models=app.compare_models,
        )

    def _search_page(self, params: Mapping[str, list[str]]) -> None:
        app = self.server.app
        try:
            request = self._request(params)
            columns = app.columns_for(request, self._still_wanted) if request.is_search else []
        except DemoRequestError as error:
            fallback = SearchRequest(query=(params.get("q") or [""])[0].strip()[:MAX_QUERY_CHARS])
            page = render_page(fallback, (), app.page_context(fallback), error=str(error))
            self._send(HTTPStatus.BAD_REQUEST, page.encode(), "text/html; charset=utf-8")
            return
        page = render_page(request, columns, app.page_context(request))
        self._send(HTTPStatus.OK, page.encode(), "text/html; charset=utf-8")

    def _search_form(self, body: bytes) -> None:
        app = self.server.app
        fields: dict[str, list[str]] = {}
        try:
            fields, files = parse_multipart_form(body, self.headers.get("Content-Type", ""))
            if fields.get("clear_image"):
                fields.pop("image", None)
            if files.get("image_file"):
                fields["image"] = [app.remember_query_image(files["image_file"])]
            request = self._request({name: values for name, values in fields.items() if name != "page"})
        except DemoRequestError as error:
            fallback = SearchRequest(query=(fields.get("q") or [""])[0].strip()[:MAX_QUERY_CHARS])
            page = render_page(fallback, (), app.page_context(fallback), error=str(error))
            self._send(HTTPStatus.BAD_REQUEST, page.encode(), "text/html; charset=utf-8")
            return
        self._redirect(request.url())

    def _judge_form(self, body: bytes) -> None:
        fields = urllib.parse.parse_qs(body.decode("utf-8", errors="replace"))
        back = (fields.get("back") or ["/"])[0]
        if not (back == "/" or back.startswith("/?")):  # only this page: never an open redirect
            back = "/"
        relevance = (fields.get("relevance") or [""])[0]
        try:
            if relevance not in ("0", "1"):
                raise DemoRequestError(f"relevance must be 0 or 1, got {relevance[:20]!r}")
            self.server.app.mark(
                (fields.get("query") or [""])[0], (fields.get("product_id") or [""])[0], int(relevance),
                (fields.get("label") or [""])[0],
            )
        except DemoRequestError as error:
            self._send_text(HTTPStatus.BAD_REQUEST, str(error))
            return
        self._redirect(back)

    def _search_api(self, params: Mapping[str, list[str]]) -> None:
        app = self.server.app
        try:
            request = self._request(params)
            k = parse_top_k((params.get("k") or [None])[0])
            if not request.is_search:
                raise DemoRequestError("pass a query: /api/search?q=...")
            results = app.search(
                request.query, k, image_token=request.image_token, image_weight=request.image_weight,
                ranker=request.ranker, allowed=app.allowed(request), still_wanted=self._still_wanted,
            )
        except DemoRequestError as error:
            self._send_json(HTTPStatus.BAD_REQUEST, {"error": str(error)})
            return
        payload = {"query": request.query, "k": k, "ranker": request.ranker,
                   "results": [asdict(result) for result in results]}
        self._send_json(HTTPStatus.OK, payload)

    def _jpeg(self, jpeg: bytes | None, cache_seconds: int) -> None:
        if jpeg is None:
            self._send_text(HTTPStatus.NOT_FOUND, "no image")
            return
        self._send(HTTPStatus.OK, jpeg, "image/jpeg", cache_seconds=cache_seconds)

    def _redirect(self, location: str) -> None:
        self.send_response(HTTPStatus.SEE_OTHER)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.send_header("Cache-Control", "no-store")
        self.end_headers()

    def _send_text(self, status: HTTPStatus, text: str) -> None:
        self._send(status, text.encode(), "text/plain; charset=utf-8")

    def _send_json(self, status: HTTPStatus, payload: dict) -> None:
        self._send(status, json.dumps(payload).encode(), "application/json")

    def _send(self, status: HTTPStatus, body: bytes, content_type: str, cache_seconds: int = 0) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", f"max-age={cache_seconds}" if cache_seconds else "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:
        # Through `logging` rather than stderr, so applications and tests decide where request lines go.
        logger.info(f"{self.address_string()} {format % args}")


class DemoServer(ThreadingHTTPServer):
    """The demo's HTTP server, answering from a background thread once `start`ed; `close` stops it.

    Usable as a context manager. `url` is the page's address (with the port the OS picked for `port=0`).
    `request_timeout` bounds every socket read and write; `max_connections` connections are served at once,
    any more are answered 503 and closed.
    """

    daemon_threads = True

    def __init__(
        self, app: ProductSearchDemo, host: str = "127.0.0.1", port: int = 0, *,
        request_timeout: float = REQUEST_TIMEOUT_S, max_connections: int = MAX_CONNECTIONS,
    ):
        _require_loopback(host)
        super().__init__((host, port), _DemoRequestHandler)
        self.app = app
        self.request_timeout = request_timeout
        self._connection_slots = threading.BoundedSemaphore(max_connections)
        bound_port = self.server_address[1]
        self.allowed_hosts = frozenset(f"{name}:{bound_port}" for name in ("127.0.0.1", "localhost", host.lower()))
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/"

    def process_request(self, request, client_address) -> None:
        if not self._connection_slots.acquire(blocking=False):
            self._refuse_busy(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._connection_slots.release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._connection_slots.release()

    def _refuse_busy(self, request: socket.socket) -> None:
        body = b"the demo is serving as many connections as it takes: try again in a moment"
        headers = "".join(f"{name}: {value}\r\n" for name, value in SECURITY_HEADERS.items())
        answer = (f"HTTP/1.0 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: "
                  f"{len(body)}\r\n{headers}\r\n").encode() + body
        try:
            request.settimeout(1.0)
            request.sendall(answer)
        except OSError:
            pass
        self.shutdown_request(request)

    def handle_error(self, request, client_address) -> None:
        # socketserver's default prints a traceback to stderr; a client that left is routine, anything else a bug.
        error = sys.exc_info()[1]
        if isinstance(error, CLIENT_GONE_ERRORS):
            logger.debug(f"client {client_address[0] if client_address else '?'} went away: {type(error).__name__}")
        else:
            logger.exception(f"error while serving {client_address}")

    def start(self) -> "DemoServer":
        if self._thread is None:
            self._thread = threading.Thread(target=self.serve_forever, name="mmretrieval-demo", daemon=True)
            self._thread.start()
        return self

    def wait(self, timeout: float | None = None) -> None:
        """Block until the server stops (or `timeout` seconds pass); Ctrl-C interrupts the wait."""
        if self._thread is None:
            return
        deadline = None if timeout is None else time.monotonic() + timeout
        # Short joins, not one long one: the kernel may deliver Ctrl-C to another thread (torch's, the server's), and
        # the main thread only runs Python's handler once its blocking wait returns.
        while self._thread.is_alive():
            left = WAIT_POLL_S if deadline is None else min(WAIT_POLL_S, deadline - time.monotonic())
            if left <= 0:
                return
            self._thread.join(left)

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
    image_root: str | os.PathLike | None = None,
    judgements_path: str | os.PathLike | None = None,
    fusion: Fusion | None = None,
    price_column: str = DEFAULT_PRICE_COLUMN,
    page_size: int = DEFAULT_PAGE_SIZE,
    request_timeout: float = REQUEST_TIMEOUT_S,
    max_connections: int = MAX_CONNECTIONS,
    compared_model: ComparedModel | None = None,
    visual_index: ProductIndex | None = None,
) -> DemoServer:
    """Start the search page on `http://host:port/` in a background thread and return its server.

    `port=0` takes a free port (read it from `server.url`). Only loopback hosts are accepted. See
    `ProductSearchDemo` for `image_root`, `judgements_path`, `fusion`, `price_column`, `page_size`,
    `compared_model` (a second model shown beside the first, with its own visual index) and `visual_index` (the
    product photos' features, through which every model with an image tower but 4tower concat/alpha_concat ranks
    the page's photos), and `DemoServer` for `request_timeout` and `max_connections`. Call `server.close()` (or use
    the server as a context manager) to stop it.

    Example:
    ```python
    >>> visual_index = build_visual_index(model, processor, catalogue)  # a 3tower or 4tower residual model
    >>> with serve_demo(model, processor, index, catalogue, port=8000, judgements_path="marks.jsonl",
    ...                 visual_index=visual_index) as server:
    ...     server.wait()  # until Ctrl-C
    ```
    """
    app = ProductSearchDemo(
        model, processor, index, catalogue, columns, image_root=image_root, judgements_path=judgements_path,
        fusion=fusion, price_column=price_column, page_size=page_size, compared_model=compared_model,
        visual_index=visual_index,
    )
    server = DemoServer(app, host, port, request_timeout=request_timeout, max_connections=max_connections)
    return server.start()


__all__ = [
    "ComparedModel",
    "DemoBusyError",
    "DemoRequestError",
    "DemoServer",
    "MAX_QUERY_CHARS",
    "ProductSearchDemo",
    "SearchAbandoned",
    "SearchRequest",
    "SearchResult",
    "parse_multipart_form",
    "parse_query",
    "parse_top_k",
    "render_page",
    "serve_demo",
]
