"""The web demo served in-process and rendered by a real headless Chromium (Debian's `chromium` package).

The retriever is the real all-MiniLM-L6-v2 (text-only) over a few dozen sample products, one of which has a
title full of HTML and one an undecodable image. The browser tests are skipped when `chromium` is not installed
(`apt-get install -y chromium`); the HTTP tests run regardless.
"""

import io
import json
import logging
import os
import shutil
import signal
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from html.parser import HTMLParser

import pytest
from PIL import Image

from modeling_mmretrieval import MultimodalRetrievalModel, MultimodalRetrievalProcessor
from modeling_mmretrieval.data import SAMPLE_DATA_DIR, load_catalogue
from modeling_mmretrieval.retrieval.demo import MAX_QUERY_CHARS, serve_demo
from modeling_mmretrieval.towers import MissingOfflineTowerError, get_minilm_path
from modeling_mmretrieval.retrieval.search import build_product_index

NUM_PRODUCTS = 30
INJECTED_TITLE = '<img src=x id=injected> Nike "Quoted" & Co <b>Running Shoes</b>'
INJECTED_POSITION, BROKEN_IMAGE_POSITION = 1, 2
HTTP_TIMEOUT_S = 30
CHROMIUM_TIMEOUT_S = 90
CHROMIUM = shutil.which("chromium")
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
)
requires_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="Debian chromium is not installed (apt-get install -y chromium)"
)


class ResultPage(HTMLParser):
    """What a rendered search page shows: the query box value, the result cards and every tag seen."""

    def __init__(self, page: str):
        super().__init__()
        self.query_value = None
        self.results: list[dict] = []
        self.tags: list[tuple[str, dict]] = []
        self._in_title = False
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append((tag, attrs))
        classes = (attrs.get("class") or "").split()
        if tag == "input" and attrs.get("name") == "q":
            self.query_value = attrs.get("value")
        elif tag == "li" and "result" in classes:
            card = {"product_id": attrs["data-product-id"], "title": "", "image": None, "no_image": False}
            self.results.append(card)
        elif self.results and tag == "img":
            self.results[-1]["image"] = attrs["src"]
        elif self.results and "no-image" in classes:
            self.results[-1]["no_image"] = True
        self._in_title = "title" in classes

    def handle_endtag(self, tag):
        self._in_title = False

    def handle_data(self, data):
        if self._in_title and self.results:
            self.results[-1]["title"] += data


def fetch(url: str) -> tuple[int, dict, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def page_url(server, query: str, k: int) -> str:
    return f"{server.url}?{urllib.parse.urlencode({'q': query, 'k': k})}"


def render_in_chromium(url: str, user_data_dir) -> str:
    """The DOM Chromium built for `url` after the page (images included) loaded."""
    command = [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={user_data_dir}", "--dump-dom", url]
    # Its own process group, so a hung browser is ended with all its helper processes.
    browser = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        dom, errors = browser.communicate(timeout=CHROMIUM_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(browser.pid, signal.SIGKILL)
        browser.communicate()
        raise
    assert browser.returncode == 0, errors[-3000:]
    return dom


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
def server(catalogue):
    try:
        minilm = get_minilm_path()
    except MissingOfflineTowerError as error:
        pytest.skip(str(error))
    model = MultimodalRetrievalModel.from_towers_pretrained(minilm, pooling="mean", projection_dim=None).eval()
    processor = MultimodalRetrievalProcessor.from_towers_pretrained(minilm, config=model.config, max_product_length=32)
    index = build_product_index(model, processor, catalogue, show_progress=False)
    with serve_demo(model, processor, index, catalogue) as running:
        yield running


@requires_chromium
def test_browser_shows_titles_and_the_catalogue_images(server, catalogue, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="modeling_mmretrieval.retrieval.demo")
    wanted = catalogue[5]
    dom = render_in_chromium(page_url(server, wanted["title"], k=6), tmp_path / "chromium-profile")

    page = ResultPage(dom)
    assert page.query_value == wanted["title"]
    assert len(page.results) == 6
    assert page.results[0]["product_id"] == wanted["product_id"]
    titles = dict(zip(catalogue["product_id"], catalogue["title"], strict=True))
    assert [result["title"] for result in page.results] == [titles[result["product_id"]] for result in page.results]

    browser_requests = " ".join(record.getMessage() for record in caplog.records)
    for result in page.results:
        assert result["image"] == f"/image/{result['product_id']}"
        assert f"GET {result['image']} " in browser_requests  # the browser itself loaded it
        status, headers, body = fetch(urllib.parse.urljoin(server.url, result["image"]))
        assert status == 200 and headers["Content-Type"] == "image/jpeg"
        served = Image.open(io.BytesIO(body))
        assert served.format == "JPEG"
        original = catalogue[catalogue["product_id"].index(result["product_id"])]["image"]["bytes"]
        assert served.size == Image.open(io.BytesIO(original)).size


@requires_chromium
def test_browser_renders_query_and_catalogue_html_as_text(server, tmp_path):
    dom = render_in_chromium(page_url(server, INJECTED_TITLE, k=10), tmp_path / "chromium-profile")

    page = ResultPage(dom)
    assert page.query_value == INJECTED_TITLE
    assert INJECTED_TITLE in [result["title"] for result in page.results]
    assert not [tag for tag, attrs in page.tags if tag == "b" or attrs.get("src") == "x"]
    assert not [tag for tag, attrs in page.tags if attrs.get("id") == "injected"]


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

    status, _, body = fetch(page_url(server, broken["title"], k=4))
    first = ResultPage(body.decode())
    assert status == 200 and first.results[0]["no_image"] and first.results[0]["image"] is None


@pytest.mark.parametrize(
    "path, status",
    [
        ("api/search?k=3", 400),
        ("api/search?q=shoes&k=0", 400),
        ("api/search?q=shoes&k=many", 400),
        ("api/search?q=" + "a" * (MAX_QUERY_CHARS + 1), 400),
        ("?q=shoes&k=1000", 400),
        ("image/no-such-product", 404),
        ("image/..%2F..%2Fetc%2Fpasswd", 404),
        ("favicon.ico", 404),
        ("", 200),
    ],
)
def test_bad_requests_get_clear_status_codes_and_security_headers(server, path, status):
    got, headers, body = fetch(server.url + path)
    assert got == status, body[:300]
    assert "default-src 'none'" in headers["Content-Security-Policy"]
    assert headers["X-Content-Type-Options"] == "nosniff"
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
        urllib.request.urlopen(second.url, timeout=HTTP_TIMEOUT_S)
