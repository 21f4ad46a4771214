"""The search page served in-process and driven by a real headless Chromium (Debian's `chromium` package).

The retriever is the real all-MiniLM-L6-v2 (text-only) over 40 sample products, one of which has a title full of
HTML and one an undecodable image. Chromium is driven over the DevTools protocol (`ChromiumPage`, with aiohttp's
websocket client): it ticks filters, follows the pagination links, picks a second ranker and clicks the
relevance buttons, exactly as a person would (the page runs no script of its own). The browser tests are
skipped when `chromium` is not installed (`apt-get install -y chromium`); the HTTP tests run regardless.
"""

import asyncio
import io
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

from modeling_mmretrieval import MultimodalRetrievalModel, MultimodalRetrievalProcessor
from modeling_mmretrieval.data import SAMPLE_DATA_DIR, load_catalogue
from modeling_mmretrieval.retrieval.demo import MAX_QUERY_CHARS, serve_demo
from modeling_mmretrieval.retrieval.judgements import load_judgements
from modeling_mmretrieval.retrieval.search import build_product_index
from modeling_mmretrieval.towers import MissingOfflineTowerError, get_minilm_path

NUM_PRODUCTS = 40
PAGE_SIZE = 5
INJECTED_TITLE = '<img src=x id=injected> Nike "Quoted" & Co <b>Running Shoes</b>'
INJECTED_POSITION, BROKEN_IMAGE_POSITION = 1, 2
HTTP_TIMEOUT_S = 30
CHROMIUM_TIMEOUT_S = 60
CHROMIUM = shutil.which("chromium")
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--window-size=1280,1800",
)
requires_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="Debian chromium is not installed (apt-get install -y chromium)"
)
# Straight to 127.0.0.1, whatever proxy the environment names.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class ChromiumPage:
    """One headless Chromium tab driven over the DevTools protocol: navigate, tick, pick, upload, click, read.

    Clicks go to the page's own buttons and links (`element.click()`), so forms are submitted by the browser with
    its own encoding, headers and redirects; `dom()` is the document Chromium built.
    """

    def __init__(self, profile_dir: Path):
        import aiohttp  # the websocket client (a dependency of datasets' fsspec[http])

        self._aiohttp = aiohttp
        command = [CHROMIUM, *CHROMIUM_FLAGS, "--remote-debugging-port=0", f"--user-data-dir={profile_dir}",
                   "about:blank"]
        # Its own process group, so a hung browser is ended with all its helper processes.
        self._browser = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        port_file = Path(profile_dir) / "DevToolsActivePort"
        deadline = time.monotonic() + CHROMIUM_TIMEOUT_S
        while not (port_file.is_file() and port_file.read_text().strip()):
            if time.monotonic() > deadline or self._browser.poll() is not None:
                self.close()
                raise RuntimeError("chromium did not open its DevTools port")
            time.sleep(0.05)
        port = int(port_file.read_text().split()[0])
        with _DIRECT.open(f"http://127.0.0.1:{port}/json/list", timeout=HTTP_TIMEOUT_S) as answer:
            page = next(target for target in json.load(answer) if target["type"] == "page")
        self._loop = asyncio.new_event_loop()
        self._next_id = 0
        self._events: list[dict] = []
        self._session, self._socket = self._run(self._connect(page["webSocketDebuggerUrl"]))
        self._call("Page.enable")

    async def _connect(self, address: str):
        session = self._aiohttp.ClientSession()
        return session, await session.ws_connect(address, max_msg_size=0)

    def _run(self, coroutine):
        return self._loop.run_until_complete(asyncio.wait_for(coroutine, CHROMIUM_TIMEOUT_S))

    async def _receive(self) -> dict:
        message = json.loads((await self._socket.receive()).data)
        if "method" in message:
            self._events.append(message)
        return message

    def _call(self, method: str, **params) -> dict:
        self._next_id += 1
        call_id = self._next_id

        async def call():
            await self._socket.send_json({"id": call_id, "method": method, "params": params})
            while True:
                message = await self._receive()
                if message.get("id") == call_id:
                    if "error" in message:
                        raise RuntimeError(f"{method}: {message['error']}")
                    return message.get("result", {})

        return self._run(call())

    def _wait_for_load(self) -> None:
        async def wait():
            while not any(event["method"] == "Page.loadEventFired" for event in self._events):
                await self._receive()

        self._run(wait())

    def evaluate(self, expression: str):
        result = self._call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def navigate(self, url: str) -> str:
        self._events.clear()
        self._call("Page.navigate", url=url)
        self._wait_for_load()
        return self.dom()

    def click(self, selector: str) -> str:
        """Clicks the element (a submit button, a link) and waits for the page it leads to."""
        self._events.clear()
        self.evaluate(f"document.querySelector({json.dumps(selector)}).click()")
        self._wait_for_load()
        return self.dom()

    def set(self, selector: str, **properties) -> None:
        """Sets properties of a form control as typing or ticking would (`value=...`, `checked=True`)."""
        for name, value in properties.items():
            self.evaluate(f"document.querySelector({json.dumps(selector)})[{json.dumps(name)}] = {json.dumps(value)}")

    def upload(self, selector: str, path: Path) -> None:
        """Chooses a file in a file input, as the file picker would."""
        root = self._call("DOM.getDocument")["root"]["nodeId"]
        node = self._call("DOM.querySelector", nodeId=root, selector=selector)["nodeId"]
        self._call("DOM.setFileInputFiles", files=[str(path)], nodeId=node)

    def url(self) -> str:
        return self.evaluate("location.href")

    def dom(self) -> str:
        return self.evaluate("document.documentElement.outerHTML")

    def screenshot(self, path: Path) -> None:
        import base64

        path.write_bytes(base64.b64decode(self._call("Page.captureScreenshot", format="png")["data"]))

    def close(self) -> None:
        if getattr(self, "_socket", None) is not None:
            self._run(self._socket.close())
            self._run(self._session.close())
            self._loop.close()
            self._socket = None
        if self._browser.poll() is None:
            os.killpg(self._browser.pid, signal.SIGKILL)
        self._browser.wait(CHROMIUM_TIMEOUT_S)


class ResultPage(HTMLParser):
    """What a rendered search page shows: the query box, the ranking columns and their cards, facets, links."""

    def __init__(self, page: str):
        super().__init__()
        self.query_value = None
        self.columns: dict[str, list[dict]] = {}
        self.facets: dict[str, dict[str, tuple[int, bool]]] = {}
        self.links: dict[str, str] = {}
        self.examples: list[str] = []
        self.tags: list[tuple[str, dict]] = []
        self.texts: dict[str, str] = {}
        self._column = None
        self._field = None
        self._facet = None
        self._checkbox = None
        self._in_examples = False
        self.feed(page)

    @property
    def results(self) -> list[dict]:
        return next(iter(self.columns.values()), [])

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append((tag, attrs))
        classes = (attrs.get("class") or "").split()
        cards = self.columns.get(self._column)
        if tag == "input" and attrs.get("name") == "q":
            self.query_value = attrs.get("value")
        elif tag == "section" and "ranking" in classes:
            self._column = attrs["data-ranker"]
            self.columns[self._column] = []
        elif tag == "li" and "result" in classes:
            cards.append({"product_id": attrs["data-product-id"], "title": "", "brand": "", "price": "",
                          "image": None, "no_image": False, "marked": ""})
        elif cards and tag == "img":
            cards[-1]["image"] = attrs["src"]
        elif cards and "no-image" in classes:
            cards[-1]["no_image"] = True
        elif tag == "fieldset" and "data-facet" in attrs:
            self._facet = attrs["data-facet"]
            self.facets[self._facet] = {}
        elif tag == "input" and attrs.get("type") == "checkbox" and self._facet:
            self._checkbox = (attrs["value"], "checked" in attrs)
        elif tag == "a" and attrs.get("rel") in ("next", "prev"):
            self.links[attrs["rel"]] = attrs["href"]
        elif tag == "nav" and "examples" in classes:
            self._in_examples = True
        elif tag == "a" and self._in_examples:
            self.examples.append(attrs["href"])
        fields = ("title", "brand", "price", "marked", "count", "summary", "weighting", "error", "note")
        self._field = next((name for name in fields if name in classes), None)

    def handle_endtag(self, tag):
        self._field = None
        if tag == "nav":
            self._in_examples = False
        if tag == "fieldset":
            self._facet = None

    def handle_data(self, data):
        cards = self.columns.get(self._column)
        if self._field in ("title", "brand", "price", "marked") and cards:
            cards[-1][self._field] += data
        elif self._field == "count" and self._checkbox is not None:
            value, checked = self._checkbox
            self.facets[self._facet][value] = (int(data.strip("()")), checked)
            self._checkbox = None
        elif self._field is not None:
            self.texts[self._field] = self.texts.get(self._field, "") + data


def fetch(url: str, data: bytes | None = None, headers: dict | None = None) -> tuple[int, dict, bytes]:
    request = urllib.request.Request(url, data=data, headers=headers or {})
    try:
        with _DIRECT.open(request, timeout=HTTP_TIMEOUT_S) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def page_url(server, query: str, **params) -> str:
    return f"{server.url}?{urllib.parse.urlencode({'q': query, **params}, doseq=True)}"


def api_results(server, query: str, k: int, **params) -> list[dict]:
    query_string = urllib.parse.urlencode({"q": query, "k": k, **params}, doseq=True)
    status, _, body = fetch(f"{server.url}api/search?{query_string}")
    assert status == 200, body[:300]
    return json.loads(body)["results"]


def tamper(row: dict, position: int) -> dict:
    if position == INJECTED_POSITION:
        row["title"] = INJECTED_TITLE
    if position == BROKEN_IMAGE_POSITION:
        row["image"] = {"bytes": b"GIF89a but not really an image", "path": None}
    return row


@pytest.fixture(scope="module")
def catalogue():
    products = load_catalogue(SAMPLE_DATA_DIR, split="validation").select(range(NUM_PRODUCTS))
    return products.map(tamper, with_indices=True)


@pytest.fixture(scope="module")
def product(catalogue):
    by_id = {row["product_id"]: row for row in catalogue}
    return by_id.__getitem__


@pytest.fixture(scope="module")
def judgements_file(tmp_path_factory):
    return tmp_path_factory.mktemp("marks") / "judgements.jsonl"


@pytest.fixture(scope="module")
def server(catalogue, judgements_file):
    try:
        minilm = get_minilm_path()
    except MissingOfflineTowerError as error:
        pytest.skip(str(error))
    model = MultimodalRetrievalModel.from_towers_pretrained(minilm, pooling="mean", projection_dim=None).eval()
    processor = MultimodalRetrievalProcessor.from_towers_pretrained(minilm, config=model.config, max_product_length=32)
    index = build_product_index(model, processor, catalogue, show_progress=False)
    with serve_demo(
        model, processor, index, catalogue, judgements_path=judgements_file, page_size=PAGE_SIZE
    ) as running:
        yield running


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if CHROMIUM is None:
        pytest.skip("Debian chromium is not installed (apt-get install -y chromium)")
    pytest.importorskip("aiohttp")
    page = ChromiumPage(tmp_path_factory.mktemp("chromium-profile"))
    yield page
    page.close()


@requires_chromium
def test_browser_shows_cards_with_title_brand_price_and_catalogue_images(server, browser, product, caplog):
    caplog.set_level("INFO", logger="modeling_mmretrieval.retrieval.demo")
    wanted = product("10044")
    page = ResultPage(browser.navigate(page_url(server, wanted["title"])))

    assert page.query_value == wanted["title"]
    assert list(page.columns) == ["dense"] and len(page.results) == PAGE_SIZE
    assert page.results[0]["product_id"] == wanted["product_id"]
    for card in page.results:
        row = product(card["product_id"])
        assert (card["title"], card["brand"]) == (row["title"], row["brand"])
        assert card["price"] == f"{row['price']:,.0f}"
    assert page.results[0]["price"] == "1,899"

    browser_requests = " ".join(record.getMessage() for record in caplog.records)
    for card in page.results:
        assert card["image"] == f"/image/{card['product_id']}"
        assert f"GET {card['image']} " in browser_requests  # the browser itself loaded it
        status, headers, body = fetch(urllib.parse.urljoin(server.url, card["image"]))
        assert status == 200 and headers["Content-Type"] == "image/jpeg"
        served = Image.open(io.BytesIO(body))
        assert served.format == "JPEG"
        assert served.size == Image.open(io.BytesIO(product(card["product_id"])["image"]["bytes"])).size


@requires_chromium
def test_browser_examples_come_from_the_catalogue_and_search_when_clicked(server, browser, catalogue):
    page = ResultPage(browser.navigate(server.url))
    queries = [urllib.parse.parse_qs(urllib.parse.urlsplit(href).query)["q"][0] for href in page.examples]
    assert len(queries) == 6
    pairs = {f"{row['base_colour']} {row['article_type']}".lower() for row in catalogue}
    # "black formal shoe" is "Black" + "Formal Shoes" in the singular: each example is a real pair
    assert all(any(pair.startswith(query) or query.startswith(pair[:-2]) for pair in pairs) for query in queries)
    assert queries[0] == "black formal shoe"  # the sample's most common pair (3 products)

    clicked = ResultPage(browser.click("nav.examples a"))
    assert clicked.query_value == queries[0] and len(clicked.results) == PAGE_SIZE


@requires_chromium
def test_browser_filters_apply_inside_the_search_and_show_counts(server, browser, product, catalogue):
    browser.navigate(page_url(server, "casual shoes"))
    browser.set('input[name="f.gender"][value="Women"]', checked=True)
    browser.set('input[name="max_price"]', value="3000")
    page = ResultPage(browser.click('form#search button[type="submit"]'))

    assert "f.gender=Women" in browser.url() and "max_price=3000" in browser.url(), browser.dom()[:500]
    women_under_3000 = [row["product_id"] for row in catalogue if row["gender"] == "Women" and row["price"] <= 3000]
    assert len(women_under_3000) >= PAGE_SIZE
    # filtered inside the search: a full page of matching products, in the dense order of those products only
    assert [card["product_id"] for card in page.results] == [
        result["product_id"] for result in api_results(server, "casual shoes", PAGE_SIZE, **{"f.gender": "Women",
                                                                                            "max_price": 3000})
    ]
    assert len(page.results) == PAGE_SIZE
    assert all(product(card["product_id"])["gender"] == "Women" for card in page.results)
    assert all(product(card["product_id"])["price"] <= 3000 for card in page.results)
    # gender counts keep the price filter but not the gender choice, so Men stays a visible alternative
    expected = {gender: sum(row["gender"] == gender and row["price"] <= 3000 for row in catalogue)
                for gender in ("Men", "Women", "Unisex")}
    assert {value: count for value, (count, _) in page.facets["gender"].items()} == expected
    assert page.facets["gender"]["Women"][1] and not page.facets["gender"]["Men"][1]
    assert "gender=Women" in page.texts["note"]


@requires_chromium
def test_browser_pages_through_results_keeping_query_and_filters(server, browser):
    first = ResultPage(browser.navigate(page_url(server, "shirt", **{"f.gender": "Men"})))
    assert "prev" not in first.links
    second = ResultPage(browser.click('a[rel="next"]'))
    assert urllib.parse.parse_qs(urllib.parse.urlsplit(browser.url()).query) == {
        "q": ["shirt"], "f.gender": ["Men"], "page": ["2"]
    }
    ranked = [result["product_id"] for result in api_results(server, "shirt", 2 * PAGE_SIZE, **{"f.gender": "Men"})]
    assert [card["product_id"] for card in first.results] == ranked[:PAGE_SIZE]
    assert [card["product_id"] for card in second.results] == ranked[PAGE_SIZE:]
    assert "Products 6" in second.texts["summary"]
    back = ResultPage(browser.click('a[rel="prev"]'))
    assert [card["product_id"] for card in back.results] == ranked[:PAGE_SIZE]


@requires_chromium
def test_browser_shows_two_rankers_side_by_side(server, browser, tmp_path):
    browser.navigate(page_url(server, "black watch"))
    browser.set('select[name="compare"]', value="lexical")
    page = ResultPage(browser.click('form#search button[type="submit"]'))
    browser.screenshot(tmp_path / "side-by-side.png")

    assert list(page.columns) == ["dense", "lexical"]
    for ranker, cards in page.columns.items():
        assert [card["product_id"] for card in cards] == [
            result["product_id"] for result in api_results(server, "black watch", PAGE_SIZE, ranker=ranker)
        ]
    assert page.columns["dense"] != page.columns["lexical"]
    assert Image.open(tmp_path / "side-by-side.png").size[0] >= 1000


@requires_chromium
def test_browser_relevance_marks_are_saved_and_read_back(server, browser, judgements_file):
    query = "white scarf"
    browser.navigate(page_url(server, query, compare="lexical"))
    first_dense = ResultPage(browser.dom()).columns["dense"][0]["product_id"]
    page = ResultPage(browser.click('section[data-ranker="dense"] li.result button[value="1"]'))
    assert page.query_value == query and list(page.columns) == ["dense", "lexical"]  # back on the same page
    assert page.columns["dense"][0]["marked"] == "marked relevant"

    second_lexical = page.columns["lexical"][1]["product_id"]
    browser.click('section[data-ranker="lexical"] li.result:nth-child(2) button[value="0"]')
    lines = [json.loads(line) for line in judgements_file.read_text().splitlines()]
    assert [(line["query"], line["product_id"], line["relevance"], line["label"]) for line in lines[-2:]] == [
        (query, first_dense, 1, "dense"), (query, second_lexical, 0, "lexical")
    ]
    assert load_judgements(judgements_file)[query] == {first_dense: 1, second_lexical: 0}  # the latest mark wins


@requires_chromium
def test_browser_renders_query_and_catalogue_html_as_text(server, browser):
    page = ResultPage(browser.navigate(page_url(server, INJECTED_TITLE)))
    assert page.query_value == INJECTED_TITLE
    assert INJECTED_TITLE in [card["title"] for card in page.results]
    assert not [tag for tag, attrs in page.tags if tag == "b" or attrs.get("src") == "x"]
    assert not [tag for tag, attrs in page.tags if attrs.get("id") == "injected"]


@requires_chromium
def test_browser_says_in_one_line_that_a_text_only_model_takes_no_photo(server, browser):
    page = ResultPage(browser.navigate(server.url))
    assert ("Photo search is off: Image queries need a 4tower or 3tower model (one with an image tower); this model "
            "is architecture='text_only', which has none") in page.texts["note"]
    assert not [attrs for tag, attrs in page.tags if tag == "input" and attrs.get("type") == "file"]


def test_search_api_ranks_products_and_marks_missing_images(server, catalogue):
    broken = catalogue[BROKEN_IMAGE_POSITION]
    status, headers, body = fetch(f"{server.url}api/search?{urllib.parse.urlencode({'q': broken['title'], 'k': 4})}")
    assert status == 200 and headers["Content-Type"] == "application/json"
    payload = json.loads(body)
    results = payload["results"]
    assert (payload["query"], payload["k"], len(results)) == (broken["title"], 4, 4)
    assert [result["rank"] for result in results] == [1, 2, 3, 4]
    scores = [result["score"] for result in results]
    assert scores == sorted(scores, reverse=True)
    assert results[0]["product_id"] == broken["product_id"] and results[0]["image_url"] is None
    assert all(result["image_url"] == f"/image/{result['product_id']}" for result in results[1:])
    assert fetch(f"{server.url}image/{broken['product_id']}")[0] == 404

    status, _, body = fetch(page_url(server, broken["title"]))
    first = ResultPage(body.decode())
    assert status == 200 and first.results[0]["no_image"] and first.results[0]["image"] is None


def test_a_photo_sent_to_a_text_only_model_gets_one_line_not_a_traceback(server, catalogue, capfd):
    boundary = "photo-boundary"
    photo = catalogue[0]["image"]["bytes"]
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="q"\r\n\r\nblack tshirt\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="image_file"; filename="p.jpg"\r\n'
            "Content-Type: image/jpeg\r\n\r\n").encode() + photo + f"\r\n--{boundary}--\r\n".encode()
    status, headers, page = fetch(server.url + "search", body, {
        "Content-Type": f"multipart/form-data; boundary={boundary}", "Origin": server.url.rstrip("/")})
    assert status == 400 and headers["X-Content-Type-Options"] == "nosniff"
    assert "this model cannot search by image: Image queries need a 4tower or 3tower model" in ResultPage(
        page.decode()).texts["error"]
    assert "Traceback" not in capfd.readouterr().err


@pytest.mark.parametrize(
    "path, status",
    [
        ("api/search?k=3", 400),
        ("api/search?q=shoes&k=0", 400),
        ("api/search?q=shoes&k=many", 400),
        ("api/search?q=" + "a" * (MAX_QUERY_CHARS + 1), 400),
        ("api/search?q=shoes&ranker=magic", 400),
        ("api/search?q=shoes&f.colour_of_the_sky=blue", 400),
        ("?q=shoes&page=1000", 400),
        ("?q=shoes&min_price=900&max_price=100", 400),
        ("image/no-such-product", 404),
        ("image/..%2F..%2Fetc%2Fpasswd", 404),
        ("query-image/0123456789abcdef", 404),
        ("favicon.ico", 404),
        ("", 200),
    ],
)
def test_bad_requests_get_clear_status_codes_and_security_headers(server, path, status):
    got, headers, body = fetch(server.url + path)
    assert got == status, body[:300]
    assert "default-src 'none'" in headers["Content-Security-Policy"]
    assert headers["X-Content-Type-Options"] == "nosniff" and headers["Referrer-Policy"] == "same-origin"
    if path.startswith("api/") and status == 400:
        assert json.loads(body)["error"]


def test_demo_binds_only_to_loopback_and_frees_its_port_on_close(server):
    app = server.app
    with pytest.raises(ValueError, match="loopback"):
        serve_demo(app.model, app.processor, app.index, app.catalogue, host="0.0.0.0")
    second = serve_demo(app.model, app.processor, app.index, app.catalogue)
    assert fetch(second.url)[0] == 200
    second.close()
    with pytest.raises(urllib.error.URLError):
        _DIRECT.open(second.url, timeout=HTTP_TIMEOUT_S)


@requires_chromium
def test_a_mark_made_in_the_browser_is_scored_by_evaluate(server, browser, catalogue, tmp_path, capsys):
    from modeling_mmretrieval import cli

    marks = tmp_path / "marks.jsonl"
    # This test's own file (the page appends to whatever file it is given); the module's is put back after.
    previous, server.app.judgements_path = server.app.judgements_path, marks
    query = "black watch"
    try:
        browser.navigate(page_url(server, query))
        top = ResultPage(browser.dom()).columns["dense"][0]["product_id"]
        browser.click('section[data-ranker="dense"] li.result button[value="1"]')
    finally:
        server.app.judgements_path = previous
    assert load_judgements(marks) == {query: {top: 1}}
    checkpoint, shop = tmp_path / "model", tmp_path / "shop"
    server.app.model.save_pretrained(checkpoint)
    server.app.processor.save_pretrained(checkpoint)
    shop.mkdir()
    catalogue.to_parquet(str(shop / "validation.parquet"))
    report_file = tmp_path / "report.json"
    status = cli.main(["evaluate", "--model_name_or_path", str(checkpoint), "--dataset", str(shop), "--split",
                       "validation", "--device", "cpu", "--judgements", str(marks), "--output_file", str(report_file)])
    assert status == 0, capsys.readouterr().err[-2000:]
    report = json.loads(report_file.read_text())
    # The page ranked the marked product first with this very model, so evaluate finds it at rank 1.
    assert report["queries"]["num_judged"] == 1
    assert report["metrics"]["mrr@10"] == pytest.approx(1.0) and report["metrics"]["recall@10"] == pytest.approx(1.0)
