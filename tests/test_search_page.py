"""The search page's pieces and its server's hardening, with a tiny random 4tower concat model (image queries in its
product index) and a tiny random 3tower residual model (image queries in its visual index).

A generated shop of 24 products with real PNG/JPEG photos (coloured shapes on white), some embedded in the
catalogue rows, some as files in the catalogue's folder, and two whose files lie outside it. The page is driven
in headless Chromium for the photo upload (see `test_demo_browser.ChromiumPage`), and over raw sockets and
urllib for the hardening cases: half-open connections, connection limits, clients that hang up, `Host`
headers, cross-site forms, security headers on every answer and image paths outside the catalogue's folder.
A tiny random text-only model is the second model shown beside the 4tower one (`--compare_model`). The 3tower
residual model's page takes photos through the visual index of the product photos (`build_visual_index`): a photo
alone by image similarity, a photo with text by the blended score of `search_text_and_image`, with filters and
pages, and the 4tower concat model beside it.
"""

import csv
import io
import json
import logging
import socket
import struct
import threading
import time
import urllib.parse

import pytest
import torch
from PIL import Image, ImageDraw
from test_demo_browser import CHROMIUM, ChromiumPage, ResultPage, fetch
from tiny_towers import IMAGE_SIZE, make_config
from transformers import AutoTokenizer, CLIPImageProcessorPil

from modeling_mmretrieval import MultimodalRetrievalModel, MultimodalRetrievalProcessor
from modeling_mmretrieval.retrieval import search_app
from modeling_mmretrieval.retrieval.demo import parse_multipart_form, serve_demo
from modeling_mmretrieval.retrieval.filters import ProductTable
from modeling_mmretrieval.retrieval.index import ProductIndex
from modeling_mmretrieval.retrieval.judgements import JudgementError, append_judgement, load_judgements
from modeling_mmretrieval.retrieval.metrics import compute_retrieval_metrics
from modeling_mmretrieval.retrieval.search import (
    build_product_index,
    embed_image_features,
    embed_images,
    embed_queries,
    model_fingerprint,
    search_images,
    search_text_and_image,
)
from modeling_mmretrieval.retrieval.search_app import (
    ComparedModel,
    ProductSearchDemo,
    combine_query_embeddings,
    example_queries,
    image_inside,
    model_labels,
)
from modeling_mmretrieval.retrieval.visual_index import build_visual_index
from modeling_mmretrieval.retrieval.search_page import (
    DemoRequestError,
    PageContext,
    RankingColumn,
    SearchRequest,
    SearchResult,
    render_page,
)
from modeling_mmretrieval.towers import build_clip_tokenizer, get_minilm_path

COLOURS = {"Red": (200, 30, 40), "Blue": (30, 60, 190), "Green": (30, 150, 60), "Black": (15, 15, 15),
           "Yellow": (230, 200, 20), "Purple": (120, 40, 150)}
TYPES = ("Tshirts", "Casual Shoes", "Watches", "Handbags")
SHAPES = ("ellipse", "rectangle", "pieslice", "chord")
NUM_PRODUCTS = 24
FILE_POSITIONS, ESCAPING_POSITION, OUTSIDE_POSITION = (3, 4), 5, 6
REQUEST_TIMEOUT_S = 0.5


def _bomb() -> bytes:
    """A 6000x5000 one-bit PNG: a few kilobytes that decode to 30 million pixels."""
    buffer = io.BytesIO()
    Image.new("1", (6000, 5000)).save(buffer, format="PNG")
    return buffer.getvalue()


BOMB = _bomb()


@pytest.fixture(scope="module", autouse=True)
def single_thread(single_torch_thread):
    """Tiny models on shared cores: one intra-op thread (see conftest)."""


def photo(colour: str, shape: str, file_format: str, size=(64, 80)) -> bytes:
    """A product photo as a shop uploads it: a coloured shape on white."""
    image = Image.new("RGB", size, (255, 255, 255))
    angles = {"start": 20, "end": 300} if shape in ("pieslice", "chord") else {}
    getattr(ImageDraw.Draw(image), shape)((6, 8, size[0] - 6, size[1] - 8), fill=COLOURS[colour], **angles)
    buffer = io.BytesIO()
    image.save(buffer, format=file_format)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def shop(tmp_path_factory):
    """`(catalogue rows, image_root)`: products 3 and 4 are files in the root, 5 escapes it with `..`, 6 is an
    absolute path elsewhere; the others embed their bytes."""
    base = tmp_path_factory.mktemp("shop")
    root = base / "catalogue"
    (root / "photos").mkdir(parents=True)
    colours = list(COLOURS)
    rows = []
    for position in range(NUM_PRODUCTS):
        colour, article_type = colours[position % len(colours)], TYPES[position % len(TYPES)]
        encoded = photo(colour, SHAPES[(position // len(colours)) % len(SHAPES)], "PNG" if position % 2 else "JPEG")
        image = {"bytes": encoded, "path": None}
        if position in FILE_POSITIONS:
            (root / "photos" / f"{position}.png").write_bytes(encoded)
            image = {"bytes": None, "path": str(root / "photos" / f"{position}.png")}
        elif position == ESCAPING_POSITION:
            (base / "secret.png").write_bytes(encoded)
            image = {"bytes": None, "path": str(root / "photos" / ".." / ".." / "secret.png")}
        elif position == OUTSIDE_POSITION:
            (base / "elsewhere.png").write_bytes(encoded)
            image = {"bytes": None, "path": str(base / "elsewhere.png")}
        rows.append({
            "product_id": f"sku-{position}", "title": f"{colour} {article_type[:-1].lower()} number {position}",
            "brand": ("Acme", "Zenith", None)[position % 3], "gender": ("Men", "Women")[position % 2],
            "article_type": article_type, "base_colour": colour, "price": 500.0 + 100 * position, "image": image,
        })
    return rows, root


def tiny_image_processor() -> CLIPImageProcessorPil:
    return CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )


@pytest.fixture(scope="module")
def model_and_processor(tmp_path_factory):
    tokenizer = AutoTokenizer.from_pretrained(get_minilm_path())
    clip_tokenizer = AutoTokenizer.from_pretrained(build_clip_tokenizer(tmp_path_factory.mktemp("clip_tokenizer")))
    config = make_config("4tower-concat")
    config.text_config.vocab_size = tokenizer.vocab_size
    dual_text = config.dual_encoder_config.text_config
    dual_text.vocab_size = len(clip_tokenizer)
    dual_text.bos_token_id, dual_text.eos_token_id = clip_tokenizer.bos_token_id, clip_tokenizer.eos_token_id
    dual_text.pad_token_id = clip_tokenizer.pad_token_id
    processor = MultimodalRetrievalProcessor(tokenizer, tiny_image_processor(), clip_tokenizer, max_dual_length=24)
    torch.manual_seed(0)
    return MultimodalRetrievalModel(config).eval(), processor


@pytest.fixture(scope="module")
def residual_model_and_processor():
    """A tiny random 3tower retriever with residual fusion (a tiny DINOv2 image tower, MiniLM's real tokenizer):
    its product index takes no image query, so its photos go to the visual index."""
    tokenizer = AutoTokenizer.from_pretrained(get_minilm_path())
    config = make_config("3tower-residual")
    config.text_config.vocab_size = tokenizer.vocab_size
    torch.manual_seed(2)
    return MultimodalRetrievalModel(config).eval(), MultimodalRetrievalProcessor(tokenizer, tiny_image_processor())


@pytest.fixture(scope="module")
def text_model_and_processor():
    """A tiny random text-only retriever (MiniLM's real tokenizer): the model compared with the 4tower one."""
    tokenizer = AutoTokenizer.from_pretrained(get_minilm_path())
    config = make_config("text_only")
    config.text_config.vocab_size = tokenizer.vocab_size
    torch.manual_seed(1)
    return MultimodalRetrievalModel(config).eval(), MultimodalRetrievalProcessor(tokenizer)


@pytest.fixture(scope="module")
def served(shop, model_and_processor, tmp_path_factory):
    rows, root = shop
    model, processor = model_and_processor
    index = build_product_index(model, processor, rows, show_progress=False)
    marks = tmp_path_factory.mktemp("marks") / "judgements.jsonl"
    with serve_demo(model, processor, index, rows, image_root=root, judgements_path=marks, page_size=4,
                    request_timeout=REQUEST_TIMEOUT_S, max_connections=4) as server:
        yield server


def multipart(fields: dict, files: dict) -> tuple[bytes, str]:
    boundary = "----mmretrieval-test-boundary"
    body = b""
    for name, value in fields.items():
        body += f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
    for name, (filename, payload) in files.items():
        body += (f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                 "Content-Type: application/octet-stream\r\n\r\n").encode() + payload + b"\r\n"
    return body + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def post_search(server, fields: dict, files: dict | None = None, origin: str | None = None):
    body, content_type = multipart(fields, files or {})
    headers = {"Content-Type": content_type, "Origin": origin or server.url.rstrip("/")}
    return fetch(server.url + "search", body, headers)


def raw_request(server, request: bytes, *, read: bool = True) -> bytes:
    with socket.create_connection(server.server_address, timeout=10) as connection:
        connection.sendall(request)
        return b"".join(iter(lambda: connection.recv(65536), b"")) if read else b""


# ----- the page's pieces, without a server --------------------------------------------------------------------------
def test_search_request_keeps_everything_in_its_links_and_names_bad_fields():
    params = {"q": ["red tshirt"], "image": ["0a1b"], "image_weight": ["0.7"], "ranker": ["hybrid"],
              "compare": ["dense"], "f.gender": ["Women", "Men"], "f.brand": ["Acme"], "min_price": ["100"],
              "max_price": ["900.5"], "page": ["3"]}
    request = SearchRequest.from_params(params, rankers=("dense", "hybrid"), filter_columns=("gender", "brand"))
    assert request.filters == {"gender": ("Women", "Men"), "brand": ("Acme",)}
    assert request.rankers == ("hybrid", "dense") and (request.min_price, request.max_price) == (100, 900.5)
    next_page = urllib.parse.parse_qs(urllib.parse.urlsplit(request.url(page=4)).query)
    assert next_page == {**params, "page": ["4"]}
    assert SearchRequest.from_params(next_page, rankers=("dense", "hybrid")) == SearchRequest(
        **{**request.__dict__, "page": 4})
    assert SearchRequest(query="jeans", page=2).url(page=1) == "/?q=jeans"

    for bad, message in [
        ({"ranker": ["magic"]}, "ranker must be one of ['dense', 'hybrid'], got 'magic'"),
        ({"f.season": ["Fall"]}, "cannot filter on 'season'"),
        ({"page": ["0"]}, "page must be between 1 and"),
        ({"image_weight": ["1.5"]}, "image_weight must be a finite number between 0 and 1"),
        ({"min_price": ["5"], "max_price": ["1"]}, "min_price 5 is above max_price 1"),
        ({"image": ["../../etc"]}, "image must be the token of an uploaded image"),
        ({"q": ["x" * 300]}, "the query is 300 characters long"),
    ]:
        with pytest.raises(DemoRequestError, match=message.replace("[", r"\[").replace("]", r"\]")) as error:
            SearchRequest.from_params(bad, rankers=("dense", "hybrid"), filter_columns=("gender",))
        assert "\n" not in str(error.value)


def test_cards_show_only_the_columns_a_catalogue_has_and_escape_everything():
    request = SearchRequest(query='<script>alert("q")</script>')
    results = [SearchResult(1, "a<1>", 0.5, "<b>Bold</b> shirt", None, brand="A&B", price=1999.5),
               SearchResult(2, "b", 0.4, "Plain", "/image/b")]
    page = render_page(request, [RankingColumn("dense", results)], PageContext(can_mark=True))
    parsed = ResultPage(page)
    assert [(card["title"], card["brand"], card["price"]) for card in parsed.results] == [
        ("<b>Bold</b> shirt", "A&B", "1,999.50"), ("Plain", "", "")]
    assert page.count('class="brand"') == 1 and page.count('class="price"') == 1
    assert "<script>" not in page and not [tag for tag, _ in parsed.tags if tag in ("b", "script")]
    assert page.count('action="/judge"') == 2  # a text query: every card can be marked
    image_query = render_page(SearchRequest(image_token="ab12"), [RankingColumn("dense", results)],
                              PageContext(can_mark=True))
    assert 'action="/judge"' not in image_query  # marks are judgements of text queries only


def test_examples_are_the_most_common_colour_and_type_pairs_of_the_catalogue(shop):
    rows, _ = shop
    ids = [row["product_id"] for row in rows]
    table = ProductTable.from_catalogue(rows, ids, names=["base_colour", "article_type"])
    # 24 products cycle 6 colours against 4 types: each (colour, type) pair that occurs, occurs twice, so the
    # order among them is alphabetical
    examples = example_queries(table, "base_colour", "article_type", 3)
    assert examples == ["black casual shoe", "black handbag", "blue casual shoe"]
    assert example_queries(table, None, "article_type", 2) == ["casual shoe", "handbag"]
    assert example_queries(table, "base_colour", None, 2) == []


def test_text_and_image_query_embeddings_are_combined_with_the_image_weight():
    text, image = torch.tensor([[3.0, 0.0, 0.0]]), torch.tensor([[0.0, 0.0, 0.5]])
    assert torch.allclose(combine_query_embeddings(text, image, 0.0), torch.tensor([[1.0, 0.0, 0.0]]))
    assert torch.allclose(combine_query_embeddings(text, image, 1.0), torch.tensor([[0.0, 0.0, 1.0]]))
    mixed = combine_query_embeddings(text, image, 0.25)
    assert torch.allclose(mixed, torch.nn.functional.normalize(torch.tensor([[0.75, 0.0, 0.25]]), dim=-1))
    with pytest.raises(ValueError, match="image_weight"):
        combine_query_embeddings(text, image, 1.5)


def test_multipart_forms_keep_file_bytes_exactly_and_refuse_malformed_bodies():
    payload = bytes(range(256)) * 3 + b"\r\n--not-the-boundary\r\n\r\n" + photo("Red", "ellipse", "PNG")
    body, content_type = multipart({"q": "rød skjorte", "f.gender": "Women"}, {"image_file": ("x.png", payload)})
    fields, files = parse_multipart_form(body, content_type)
    assert fields == {"q": ["rød skjorte"], "f.gender": ["Women"]} and files == {"image_file": payload}
    empty_file, content_type = multipart({}, {"image_file": ("", b"")})
    assert parse_multipart_form(empty_file, content_type) == ({}, {})
    for bad_body, bad_type, message in [
        (body, "application/x-www-form-urlencoded", "multipart/form-data"),
        (body[:-10], content_type, "cut short"),
        (b'--B\r\nContent-Disposition: form-data\r\n\r\nx\r\n--B--\r\n', "multipart/form-data; boundary=B",
         "no field name"),
        (b'--B\r\nContent-Disposition: form-data; name="q"\r\n\r\n\xff\r\n--B--\r\n', "multipart/form-data; boundary=B",
         "not UTF-8"),
    ]:
        with pytest.raises(DemoRequestError, match=message):
            parse_multipart_form(bad_body, bad_type)


def test_catalogue_images_may_only_come_from_the_row_or_the_catalogue_folder(tmp_path):
    root = tmp_path / "shop"
    (root / "img").mkdir(parents=True)
    (tmp_path / "secret.png").write_bytes(b"png")
    (root / "img" / "link.png").symlink_to(tmp_path / "secret.png")
    assert image_inside({"bytes": b"\x89PNG", "path": "/etc/passwd"}, None)  # the row's own bytes win
    assert image_inside({"bytes": None, "path": str(root / "img" / "7.jpg")}, root)
    assert image_inside("img/7.jpg", root)
    assert not image_inside("img/../../secret.png", root)
    assert not image_inside(str(root / "img" / ".." / ".." / "secret.png"), root)
    assert not image_inside("/etc/passwd", root)
    assert not image_inside(str(root / "img" / "link.png"), root)  # a symlink out of the folder
    assert not image_inside("img/7.jpg", None)
    assert not image_inside("https://cdn.example/7.jpg", root)


# ----- judgements ---------------------------------------------------------------------------------------------------
def test_judgements_round_trip_keep_the_latest_mark_and_score_as_qrels(tmp_path):
    path = tmp_path / "marks" / "judgements.jsonl"
    append_judgement(path, "red tshirt", "sku-0", 1, label="dense")
    append_judgement(path, "red tshirt", "sku-6", 1, label="hybrid")
    append_judgement(path, "  red tshirt ", "sku-12", 0, label="lexical")
    append_judgement(path, "red tshirt", "sku-6", 0, label="dense")  # a corrected mis-click
    append_judgement(path, "black watch", "sku-3", 0)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert list(lines[0]) == ["query", "product_id", "relevance", "label", "timestamp"]
    assert lines[0]["timestamp"].endswith("+00:00")
    qrels = load_judgements(path)
    assert qrels == {"red tshirt": {"sku-0": 1, "sku-6": 0, "sku-12": 0}, "black watch": {"sku-3": 0}}
    # the shape evaluate scores: graded qrels keyed by query text (all-0 queries are skipped by the metrics)
    run = {"red tshirt": ["sku-6", "sku-0", "sku-12"], "black watch": ["sku-3"]}
    metrics = compute_retrieval_metrics(run, qrels, k_values=(1, 2))
    assert metrics["recall@1"] == 0.0 and metrics["recall@2"] == 1.0


@pytest.mark.parametrize(
    "line, message",
    [
        (b"{not json", "line 2 is not valid JSON"),
        (b"[1, 2]", "line 2 is a JSON list, not an object"),
        (b'{"query": "q", "relevance": 1}', "line 2 has no 'product_id' field"),
        (b'{"query": "q", "product_id": "p", "relevance": 2}', "line 2: relevance must be 0 or 1, got 2"),
        (b'{"query": "q", "product_id": "p", "relevance": true}', "line 2: relevance must be 0 or 1, got True"),
        (b'{"query": "", "product_id": "p", "relevance": 1}', "line 2: query is empty"),
        (b'{"query": "q", "product_id": "p", "relevance": 1, "label": "\xff"}', "line 2 is not UTF-8 text"),
    ],
)
def test_malformed_judgement_lines_are_named_by_number(tmp_path, line, message):
    path = tmp_path / "judgements.jsonl"
    path.write_bytes(b'{"query": "q", "product_id": 7, "relevance": 1}\n' + line + b"\n\n")
    with pytest.raises(JudgementError, match=message) as error:
        load_judgements(path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_concurrent_marks_are_whole_lines(tmp_path):
    path = tmp_path / "judgements.jsonl"
    threads = [threading.Thread(target=lambda n=n: [append_judgement(path, f"query {n} " + "x" * 500, f"p{i}", i % 2)
                                                     for i in range(20)]) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(len(marks) for marks in load_judgements(path).values()) == 80


# ----- image queries through the server -----------------------------------------------------------------------------
def test_an_uploaded_photo_finds_its_product_first(served, shop):
    rows, _ = shop
    wanted = rows[9]
    status, headers, _ = post_search(served, {"q": ""}, {"image_file": ("mine.jpg", wanted["image"]["bytes"])})
    assert status == 200  # urllib followed the 303 to the GET page
    status, _, body = post_search(served, {"ranker": "dense"}, {"image_file": ("mine.jpg", wanted["image"]["bytes"])})
    page = ResultPage(body.decode())
    assert page.results[0]["product_id"] == wanted["product_id"]
    assert "the uploaded image" in page.texts["summary"]
    token = next(attrs["src"] for tag, attrs in page.tags if attrs.get("class") == "query-image").rsplit("/", 1)[1]
    status, headers, jpeg = fetch(f"{served.url}query-image/{token}")
    assert status == 200 and Image.open(io.BytesIO(jpeg)).size == (64, 80)
    # every page link keeps the photo (by token): the next page too
    assert f"image={token}" in page.links["next"]


def test_text_and_photo_together_rank_by_the_documented_weighting(served, shop, model_and_processor):
    rows, _ = shop
    model, processor = model_and_processor
    wanted = rows[14]
    status, _, body = post_search(served, {"q": "red watch", "image_weight": "0.7", "compare": "lexical"},
                                  {"image_file": ("mine.png", wanted["image"]["bytes"])})
    page = ResultPage(body.decode())
    assert status == 200 and "query = 0.3 × text + 0.7 × image" in page.texts["weighting"]
    query = combine_query_embeddings(
        embed_queries(model, processor, ["red watch"]),
        embed_images(model, processor, [Image.open(io.BytesIO(wanted["image"]["bytes"])).convert("RGB")]), 0.7,
    )
    _, expected = served.app.index.search(query, k=4)
    assert [card["product_id"] for card in page.columns["dense"]] == expected[0]
    assert len(page.columns["lexical"]) == 4  # the lexical column ranks the words


def test_a_photo_alone_has_no_lexical_ranking_and_says_so(served, shop):
    rows, _ = shop
    _, _, body = post_search(served, {"compare": "lexical"}, {"image_file": ("p.png", rows[1]["image"]["bytes"])})
    page = ResultPage(body.decode())
    assert list(page.columns) == ["dense", "lexical"] and page.columns["lexical"] == []
    assert "the lexical ranker matches words: it cannot rank an image alone" in page.texts["note"]


@pytest.mark.parametrize(
    "payload, message",
    [
        (b"GIF89a not really", "the uploaded image cannot be used: undecodable image"),
        (BOMB, "exceeds max_pixels=25000000"),
    ],
)
def test_an_unusable_upload_gets_one_line(served, payload, message, capfd):
    status, headers, body = post_search(served, {"q": "shoes"}, {"image_file": ("x.png", payload)})
    assert status == 400 and "default-src 'none'" in headers["Content-Security-Policy"]
    error = ResultPage(body.decode()).texts["error"]
    assert message in error and "\n" not in error
    assert "Traceback" not in capfd.readouterr().err


def test_browser_uploads_a_photo_and_sees_its_product_first(served, shop, tmp_path):
    if CHROMIUM is None:
        pytest.skip("Debian chromium is not installed (apt-get install -y chromium)")
    pytest.importorskip("aiohttp")
    rows, _ = shop
    wanted = rows[15]
    upload = tmp_path / "photo.png"
    upload.write_bytes(wanted["image"]["bytes"])
    browser = ChromiumPage(tmp_path / "profile")
    try:
        browser.navigate(served.url)
        browser.upload('input[name="image_file"]', upload)
        browser.set('input[name="f.gender"][value="Women"]', checked=True)
        page = ResultPage(browser.click('form#search button[type="submit"]'))
        assert browser.url().startswith(served.url + "?image=")
        assert page.results[0]["product_id"] == wanted["product_id"] and wanted["gender"] == "Women"
        assert all(int(card["product_id"].split("-")[1]) % 2 for card in page.results)  # odd positions are Women
        assert browser.evaluate("document.querySelector('img.query-image').naturalWidth") == 64
    finally:
        browser.close()


# ----- photos through the visual index (every model with an image tower) --------------------------------------------
@pytest.fixture(scope="module")
def residual_page(shop, residual_model_and_processor, model_and_processor):
    """The 3tower residual model's page with the visual index of the shop's photos, and the 4tower concat model
    beside it (as "concat": it ranks photos in its product index)."""
    rows, root = shop
    model, processor = residual_model_and_processor
    index = build_product_index(model, processor, rows, show_progress=False)
    visual_index = build_visual_index(model, processor, rows, show_progress=False)
    concat_model, concat_processor = model_and_processor
    concat_index = build_product_index(concat_model, concat_processor, rows, show_progress=False)
    compared = ComparedModel(concat_model, concat_processor, concat_index, label="concat")
    with serve_demo(model, processor, index, rows, image_root=root, page_size=4, visual_index=visual_index,
                    compared_model=compared) as server:
        yield server


def decoded(encoded: bytes) -> Image.Image:
    return Image.open(io.BytesIO(encoded)).convert("RGB")


def uploaded_token(page: ResultPage) -> str:
    return next(attrs["src"] for tag, attrs in page.tags if attrs.get("class") == "query-image").rsplit("/", 1)[1]


def test_a_residual_model_ranks_an_uploaded_photo_by_similarity_to_the_product_photos(residual_page, shop,
                                                                                       residual_model_and_processor):
    rows, _ = shop
    app = residual_page.app
    model, processor = residual_model_and_processor
    wanted = rows[9]
    status, _, body = post_search(residual_page, {"compare": "concat"},
                                  {"image_file": ("mine.jpg", wanted["image"]["bytes"])})
    page = ResultPage(body.decode())
    assert status == 200 and list(page.columns) == [app.label, "concat"]
    assert "Photo search is off" not in body.decode()
    _, expected = search_images(model, processor, app.index, [decoded(wanted["image"]["bytes"])], k=4,
                                visual_index=app.visual_index)
    assert [card["product_id"] for card in page.columns[app.label]] == expected[0]
    assert expected[0][0] == wanted["product_id"]
    assert page.columns["concat"][0]["product_id"] == wanted["product_id"]  # beside it: the fused 4tower path
    # each score is the photo's cosine with a product's photo (the product's own photo scores 1)
    token = uploaded_token(page)
    results = json.loads(fetch(f"{residual_page.url}api/search?image={token}&k={NUM_PRODUCTS}")[2])["results"]
    assert len(results) == NUM_PRODUCTS and results[0]["score"] == pytest.approx(1.0, abs=1e-4)
    embedded = [row for row in rows if row["image"]["bytes"] is not None]
    features = embed_image_features(model, processor, [decoded(row["image"]["bytes"]) for row in embedded])
    query = embed_image_features(model, processor, [decoded(wanted["image"]["bytes"])])[0]
    score_of = {result["product_id"]: result["score"] for result in results}
    for row, feature in zip(embedded, features, strict=True):
        assert score_of[row["product_id"]] == pytest.approx(float(query @ feature), abs=1e-4), row["product_id"]


def test_a_residual_model_blends_text_and_photo_scores_with_filters_and_pages(residual_page, shop,
                                                                              residual_model_and_processor):
    rows, _ = shop
    app = residual_page.app
    model, processor = residual_model_and_processor
    wanted = rows[14]
    status, _, body = post_search(residual_page, {"q": "red watch", "image_weight": "0.7", "f.gender": "Men"},
                                  {"image_file": ("mine.png", wanted["image"]["bytes"])})
    first = ResultPage(body.decode())
    assert status == 200 and wanted["gender"] == "Men"
    assert "score = 0.3 × text score + 0.7 × similarity to the product photo" in first.texts["weighting"]
    second = ResultPage(fetch(urllib.parse.urljoin(residual_page.url, first.links["next"]))[2].decode())
    assert "Products 5" in second.texts["summary"]

    men = torch.tensor([row["gender"] == "Men" for row in rows]).numpy()  # the index keeps the catalogue's order
    scores, expected = search_text_and_image(model, processor, app.index, app.visual_index, ["red watch"],
                                             [decoded(wanted["image"]["bytes"])], k=8, image_weight=0.7, allowed=men)
    assert list(first.columns) == ["dense"] and [card["product_id"] for card in first.results] == expected[0][:4]
    assert [card["product_id"] for card in second.results] == expected[0][4:8]
    assert all(int(product_id.split("-")[1]) % 2 == 0 for product_id in expected[0])  # even positions are Men
    # the documented weighting, by hand: 0.3 * cos(text, product) + 0.7 * cos(photo, product photo)
    token = uploaded_token(first)
    top = json.loads(fetch(f"{residual_page.url}api/search?q=red+watch&image={token}&image_weight=0.7&k=1"
                           "&f.gender=Men")[2])["results"][0]
    position = app.index.position_of(top["product_id"])
    photo_row = app.visual_index.position_of(top["product_id"])
    text_score = float(embed_queries(model, processor, ["red watch"])[0].numpy() @ app.index.embeddings[position])
    photo_score = float(embed_image_features(model, processor, [decoded(wanted["image"]["bytes"])])[0].numpy()
                        @ app.visual_index.embeddings[photo_row])
    assert top["product_id"] == expected[0][0]
    assert top["score"] == pytest.approx(0.3 * text_score + 0.7 * photo_score, abs=1e-4)
    assert top["score"] == pytest.approx(float(scores[0][0]), abs=1e-5)


def test_a_residual_model_says_what_it_cannot_rank_with_a_photo(residual_page, shop, residual_model_and_processor):
    rows, _ = shop
    photo_bytes = rows[1]["image"]["bytes"]
    status, _, body = post_search(residual_page, {"q": "red watch", "ranker": "hybrid"},
                                  {"image_file": ("p.png", photo_bytes)})
    assert status == 400 and "choose the dense ranker" in ResultPage(body.decode()).texts["error"]
    status, _, body = post_search(residual_page, {"compare": "lexical"}, {"image_file": ("p.png", photo_bytes)})
    page = ResultPage(body.decode())
    assert status == 200 and page.columns["lexical"] == [] and "cannot rank an image alone" in page.texts["note"]
    assert page.columns["dense"][0]["product_id"] == "sku-1"

    # without a visual index the page says in one line that photo search is off, and offers no upload
    model, processor = residual_model_and_processor
    app = ProductSearchDemo(model, processor, residual_page.app.index, rows)
    page_html = render_page(SearchRequest(), (), app.page_context(SearchRequest()))
    note = ResultPage(page_html).texts["note"]
    assert note.startswith("Photo search is off: a 3tower model with 'residual' fusion ranks a photo by its "
                           "similarity to the product photos, and no visual index of them was given")
    assert 'type="file"' not in page_html
    with pytest.raises(DemoRequestError, match="this model cannot search by image: a 3tower model"):
        app.remember_query_image(photo_bytes)


def test_a_visual_index_of_another_model_or_other_products_is_refused_at_start(residual_page, shop,
                                                                               residual_model_and_processor):
    rows, _ = shop
    model, processor = residual_model_and_processor
    index = residual_page.app.index
    def unit_rows(ids, width=model.image_feature_size):
        return ProductIndex.from_embeddings(torch.nn.functional.normalize(torch.ones(len(ids), width), dim=-1), ids)

    for wrong, message in [
        (unit_rows(["sku-0"], model.image_feature_size + 8),
         rf"the visual index holds {model.image_feature_size + 8}-wide vectors but this model's image tower gives "
         rf"{model.image_feature_size}"),
        (unit_rows(["sku-0", "sku-404"]), "the visual index holds product id 'sku-404', which the product index lacks"),
    ]:
        with pytest.raises(ValueError, match=message):
            ProductSearchDemo(model, processor, index, rows, visual_index=wrong)
    with pytest.raises(ValueError, match="the compared model .*holds product id 'sku-404'"):
        ProductSearchDemo(model, processor, index, rows, compared_model=ComparedModel(
            model, processor, index, visual_index=unit_rows(["sku-404"])))


def test_browser_sends_text_and_photo_to_a_residual_model_and_sees_the_blended_ranking(
        residual_page, shop, residual_model_and_processor, tmp_path):
    if CHROMIUM is None:
        pytest.skip("Debian chromium is not installed (apt-get install -y chromium)")
    pytest.importorskip("aiohttp")
    rows, _ = shop
    app = residual_page.app
    model, processor = residual_model_and_processor
    wanted = rows[15]
    upload = tmp_path / "photo.png"
    upload.write_bytes(wanted["image"]["bytes"])
    browser = ChromiumPage(tmp_path / "profile")
    try:
        browser.navigate(residual_page.url)
        browser.upload('input[name="image_file"]', upload)
        browser.set('input[name="q"]', value="purple tshirt")
        browser.set('input[name="image_weight"]', value="0.6")
        page = ResultPage(browser.click('form#search button[type="submit"]'))
    finally:
        browser.close()
    _, expected = search_text_and_image(model, processor, app.index, app.visual_index, ["purple tshirt"],
                                        [decoded(wanted["image"]["bytes"])], k=4, image_weight=0.6)
    assert [card["product_id"] for card in page.results] == expected[0]
    assert "score = 0.4 × text score + 0.6 × similarity to the product photo" in page.texts["weighting"]


# ----- two models side by side ---------------------------------------------------------------------------------------
def test_models_are_labelled_by_their_checkpoint_folder():
    assert model_labels("/runs/outputs/images_that_pay/text-only/seed0/final",
                        "outputs/images_that_pay/4tMM_residual_plus_visual-word_restoration/seed0/final") == (
        "text-only", "4tMM_residual_plus_visual-word_restoration")
    assert model_labels("outputs/text-only/seed0/final", "outputs/text-only/seed1/final") == (
        "text-only (seed0)", "text-only (seed1)")
    assert model_labels("outputs/text-only/final", "outputs/text-only/checkpoint-500") == (
        "text-only (final)", "text-only (checkpoint-500)")
    assert model_labels("org/retriever", "org/retriever") == ("retriever", "retriever (compared)")
    assert model_labels("outputs/dense/final", "C:\\models\\hybrid") == ("dense model", "hybrid model")


@pytest.fixture(scope="module")
def two_models(shop, model_and_processor, text_model_and_processor, tmp_path_factory):
    """The 4tower page with the text-only model offered beside it, as "text-only"."""
    rows, root = shop
    model, processor = model_and_processor
    text_model, text_processor = text_model_and_processor
    index = build_product_index(model, processor, rows, show_progress=False)
    text_index = build_product_index(text_model, text_processor, rows, show_progress=False)
    marks = tmp_path_factory.mktemp("two_models") / "judgements.jsonl"
    compared = ComparedModel(text_model, text_processor, text_index, label="text-only")
    with serve_demo(model, processor, index, rows, image_root=root, judgements_path=marks, page_size=4,
                    compared_model=compared) as server:
        yield server


def test_a_second_model_ranks_the_same_query_and_filters_in_the_compare_column(two_models, shop,
                                                                                text_model_and_processor):
    rows, _ = shop
    app = two_models.app
    text_model, text_processor = text_model_and_processor
    params = {"q": "red watch", "compare": "text-only", "f.gender": "Women", "page": "2"}
    status, _, body = fetch(f"{two_models.url}?{urllib.parse.urlencode(params)}")
    page = ResultPage(body.decode())
    assert status == 200 and list(page.columns) == [app.label, "text-only"] and app.label != "dense"
    women = ProductTable.from_catalogue(rows, app.index.ids, names=["gender"]).column("gender")
    mask = torch.tensor([gender == "Women" for gender in women]).numpy()
    for model, processor, index, label in [(*text_model_and_processor, app.compared.index, "text-only"),
                                           (app.model, app.processor, app.index, app.label)]:
        _, expected = index.search(embed_queries(model, processor, ["red watch"]), k=8, allowed=mask)
        assert [card["product_id"] for card in page.columns[label]] == expected[0][4:8]  # page 2 of each model
    assert page.columns["text-only"] != page.columns[app.label]  # two models, two rankings
    assert "compare=text-only" in page.links["prev"] and "f.gender=Women" in page.links["prev"]
    option = [attrs for tag, attrs in page.tags if tag == "option" and attrs.get("value") == "text-only"]
    assert option and "selected" in option[0]
    # a mark on the compared model's card records which model ranked it
    label = next(attrs["value"] for tag, attrs in page.tags
                 if tag == "input" and attrs.get("name") == "label" and attrs.get("value") == "text-only")
    product_id = page.columns["text-only"][0]["product_id"]
    form = urllib.parse.urlencode({"query": "red watch", "product_id": product_id, "relevance": "1", "label": label})
    assert fetch(two_models.url + "judge", form.encode(), {"Origin": two_models.url.rstrip("/")})[0] == 200
    assert json.loads(app.judgements_path.read_text().splitlines()[-1])["label"] == "text-only"


def test_the_compared_model_says_what_it_cannot_rank(two_models, shop):
    rows, _ = shop
    wanted = rows[9]
    status, _, body = post_search(two_models, {"compare": "text-only"},
                                  {"image_file": ("mine.jpg", wanted["image"]["bytes"])})
    page = ResultPage(body.decode())
    assert status == 200 and page.columns[two_models.app.label][0]["product_id"] == wanted["product_id"]
    assert page.columns["text-only"] == [] and "this model cannot search by image" in page.texts["note"]

    _, _, body = fetch(f"{two_models.url}?q=red+watch&ranker=lexical&compare=text-only")
    page = ResultPage(body.decode())
    assert len(page.columns[two_models.app.label]) == 4 and page.columns["text-only"] == []
    assert "BM25 reads no model" in page.texts["note"]

    status, _, body = fetch(f"{two_models.url}?q=red+watch&compare=image-only")
    assert status == 400 and "compare must be one of ['dense', 'lexical', 'hybrid', 'text-only'], got 'image-only'" in (
        ResultPage(body.decode()).texts["error"])


def test_a_compared_index_of_other_products_is_refused(shop, model_and_processor, text_model_and_processor):
    rows, _ = shop
    model, processor = model_and_processor
    text_model, text_processor = text_model_and_processor
    index = build_product_index(model, processor, rows, show_progress=False)
    stray = ProductIndex.from_embeddings(torch.eye(3), ["sku-0", "sku-1", "sku-404"])
    with pytest.raises(ValueError, match=r"the compared model MultimodalRetrievalModel: 1 indexed products are not in "
                                         r"the catalogue \(e\.g\. \['sku-404'\]\)"):
        ProductSearchDemo(model, processor, index, rows, compared_model=ComparedModel(text_model, text_processor, stray))
    with pytest.raises(ValueError, match="label 'dense' must be new"):
        ProductSearchDemo(model, processor, index, rows,
                          compared_model=ComparedModel(text_model, text_processor, index, label="dense"))


# ----- hardening ----------------------------------------------------------------------------------------------------
def test_images_are_served_only_from_the_rows_or_the_catalogue_folder(served, shop):
    rows, _ = shop
    for position in FILE_POSITIONS:
        assert fetch(f"{served.url}image/sku-{position}")[0] == 200
    for position in (ESCAPING_POSITION, OUTSIDE_POSITION):
        assert fetch(f"{served.url}image/sku-{position}")[0] == 404
    results = json.loads(fetch(f"{served.url}api/search?q=number&k=24")[2])["results"]
    refused = {result["product_id"] for result in results if result["image_url"] is None}
    assert refused == {f"sku-{ESCAPING_POSITION}", f"sku-{OUTSIDE_POSITION}"}


@pytest.mark.parametrize("host", [b"Host: evil.example:80\r\n", b"Host: 127.0.0.1\r\n", b""])
def test_requests_for_another_host_are_refused(served, host):
    answer = raw_request(served, b"GET /?q=shoes HTTP/1.1\r\n" + host + b"Connection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.0 421 ") and b"X-Content-Type-Options: nosniff" in answer
    assert b"only answers requests for ['127.0.0.1:" in answer


@pytest.mark.parametrize(
    "request_bytes, status",
    [
        (b"PUT / HTTP/1.1\r\nHost: {host}\r\n\r\n", b"501"),
        (b"GET / HTTP/9.9\r\nHost: {host}\r\n\r\n", b"505"),
        (b"BROKEN\r\n\r\n", b"400"),
        (b"GET /api/search?k=0 HTTP/1.1\r\nHost: {host}\r\n\r\n", b"400"),
        (b"POST /search HTTP/1.1\r\nHost: {host}\r\n\r\n", b"411"),
        (b"POST /search HTTP/1.1\r\nHost: {host}\r\nContent-Length: 999999999\r\n\r\n", b"413"),
        (b"GET /nowhere HTTP/1.1\r\nHost: {host}\r\n\r\n", b"404"),
    ],
)
def test_every_answer_carries_the_security_headers(served, request_bytes, status):
    host = f"localhost:{served.server_address[1]}".encode()
    answer = raw_request(served, request_bytes.replace(b"{host}", host))
    head = answer.split(b"\r\n\r\n", 1)[0]
    assert head.split(b" ", 2)[1] == status, head
    for header in (b"Content-Security-Policy: default-src 'none'", b"X-Content-Type-Options: nosniff",
                   b"Referrer-Policy: same-origin"):
        assert header in head


def test_forms_posted_from_another_site_are_refused(served, shop):
    rows, _ = shop
    before = served.app.judgements_path.read_bytes() if served.app.judgements_path.exists() else b""
    form = urllib.parse.urlencode({"query": "x", "product_id": "sku-1", "relevance": "1"}).encode()
    for headers in ({"Origin": "https://evil.example"}, {"Sec-Fetch-Site": "cross-site"}, {"Origin": "null"}):
        status, answer_headers, body = fetch(served.url + "judge", form, headers)
        assert status == 403 and answer_headers["X-Content-Type-Options"] == "nosniff", body
    after = served.app.judgements_path.read_bytes() if served.app.judgements_path.exists() else b""
    assert after == before
    status, _, _ = fetch(served.url + "judge", form, {"Origin": served.url.rstrip("/")})
    assert status == 200 and load_judgements(served.app.judgements_path)["x"] == {"sku-1": 1}
    unknown = urllib.parse.urlencode({"query": "x", "product_id": "sku-999", "relevance": "1"}).encode()
    status, _, body = fetch(served.url + "judge", unknown)
    assert status == 400 and body == b"product_id 'sku-999' is not in the catalogue"


def test_half_open_connections_time_out_and_excess_connections_get_503(served):
    threads_before = threading.active_count()
    half_open = [socket.create_connection(served.server_address, timeout=10) for _ in range(4)]
    for connection in half_open:
        connection.sendall(b"GET /?q=shoes HTTP/1.1\r\nHost: loc")  # never finished
    time.sleep(0.2)
    excess = raw_request(served, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert excess.startswith(b"HTTP/1.0 503 ") and b"X-Content-Type-Options: nosniff" in excess
    for connection in half_open:  # the server hangs up after its request timeout
        started = time.monotonic()
        assert connection.recv(65536) == b""  # closed without an answer
        assert time.monotonic() - started < 5
        connection.close()
    time.sleep(0.2)
    assert fetch(served.url)[0] == 200
    assert threading.active_count() <= threads_before + 1


def test_a_client_that_hangs_up_is_logged_at_debug_without_a_traceback(served, caplog, capfd, monkeypatch):
    caplog.set_level(logging.DEBUG, logger="modeling_mmretrieval.retrieval.demo")
    release = threading.Event()
    original = served.app.image_jpeg
    monkeypatch.setattr(served.app, "image_jpeg", lambda product_id: release.wait(10) and original(product_id))
    connection = socket.create_connection(served.server_address, timeout=10)
    connection.sendall(f"GET /image/sku-0 HTTP/1.1\r\nHost: localhost:{served.server_address[1]}\r\n\r\n".encode())
    time.sleep(0.1)
    connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close with a reset
    connection.close()
    release.set()
    deadline = time.monotonic() + 5
    while not any("went away" in record.getMessage() for record in caplog.records) and time.monotonic() < deadline:
        time.sleep(0.05)
    gone = [record for record in caplog.records if "went away" in record.getMessage()]
    assert gone and all(record.levelno == logging.DEBUG for record in gone)
    assert "Traceback" not in capfd.readouterr().err


def test_a_search_whose_client_left_is_never_run(served, caplog, monkeypatch):
    caplog.set_level(logging.DEBUG, logger="modeling_mmretrieval.retrieval.demo")
    embedded = []
    monkeypatch.setattr(
        "modeling_mmretrieval.retrieval.search_app.embed_queries",
        lambda *args: embedded.append(args) or embed_queries(*args),
    )
    app = served.app
    app._search_lock.acquire()  # the model is busy with someone else's search
    try:
        connection = socket.create_connection(served.server_address, timeout=10)
        connection.sendall(f"GET /?q=abandoned HTTP/1.1\r\nHost: 127.0.0.1:{served.server_address[1]}\r\n\r\n".encode())
        deadline = time.monotonic() + 5
        while app._waiting._value == search_app.MAX_WAITING_SEARCHES and time.monotonic() < deadline:
            time.sleep(0.02)  # until the request waits for the model
        connection.close()
        time.sleep(0.1)
    finally:
        app._search_lock.release()
    deadline = time.monotonic() + 5
    while not any("client hung up" in record.getMessage() for record in caplog.records) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert any("dropped the search of '/?q=abandoned'" in record.getMessage() for record in caplog.records)
    assert embedded == []
    assert fetch(f"{served.url}api/search?q=still+works&k=2")[0] == 200 and len(embedded) == 1


# ----- the command line ---------------------------------------------------------------------------------------------
def test_search_command_serves_with_filters_and_rankers_and_checks_the_judgements_flag(tmp_path, capsys):
    from modeling_mmretrieval.commands import search as search_command

    args = search_command.parse_args(["--model_name_or_path", "m", "--serve", "--ranker", "hybrid", "--filter",
                                      "gender=Women", "--judgements", str(tmp_path / "marks.jsonl")])
    assert (args.serve, args.ranker, args.judgements) == (True, "hybrid", tmp_path / "marks.jsonl")
    for argv, message in [
        (["--query", "shoes", "--judgements", "marks.jsonl"], "--judgements is where the search page (--serve)"),
        (["--serve", "--judgements", str(tmp_path)], "is a folder; give the JSONL file"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            search_command.parse_args(["--model_name_or_path", "m", *argv])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err

    data_file = tmp_path / "shop" / "train.parquet"
    data_file.parent.mkdir()
    data_file.write_bytes(b"")
    assert search_command.catalogue_folder(str(data_file)) == data_file.parent
    assert search_command.catalogue_folder(str(data_file.parent)) == data_file.parent
    assert search_command.catalogue_folder("someone/hub-dataset") is None


def test_search_command_serves_two_models_with_the_second_index_beside_the_first(
        shop, model_and_processor, text_model_and_processor, tmp_path, monkeypatch, capsys):
    from modeling_mmretrieval.commands import search as search_command
    from modeling_mmretrieval.retrieval.demo import DemoServer

    rows, _ = shop
    folder = tmp_path / "shop"
    (folder / "photos").mkdir(parents=True)
    with (folder / "products.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["product_id", "title", "gender", "article_type", "image"])
        writer.writeheader()
        for position, row in enumerate(rows[:12]):
            (folder / "photos" / f"{position}.png").write_bytes(photo(row["base_colour"], "ellipse", "PNG"))
            writer.writerow({**{name: row[name] for name in ("product_id", "title", "gender", "article_type")},
                             "image": f"photos/{position}.png"})
    checkpoints = {}
    for name, (model, processor) in [("4tMM_concat", model_and_processor), ("text-only", text_model_and_processor)]:
        checkpoints[name] = tmp_path / "outputs" / name / "seed0" / "final"
        model.save_pretrained(checkpoints[name])
        processor.save_pretrained(checkpoints[name])
    pages = []

    def interrupted_wait(server, timeout=None):
        pages.append(ResultPage(fetch(f"{server.url}?q=red+watch&compare=text-only")[2].decode()))
        raise KeyboardInterrupt

    monkeypatch.setattr(DemoServer, "wait", interrupted_wait)
    index_dir = tmp_path / "indexes" / "shop"
    argv = ["--model_name_or_path", str(checkpoints["4tMM_concat"]), "--dataset", str(folder / "products.csv"),
            "--split", "train", "--device", "cpu", "--index_dir", str(index_dir), "--serve", "--port", "0",
            "--compare_model", str(checkpoints["text-only"])]
    for run in range(2):  # the first run builds both indexes, the second loads them
        assert search_command.main(argv, prog="mmretrieval search") == 0
        assert "'text-only' can be shown beside '4tMM_concat'" in capsys.readouterr().out
        assert list(pages[-1].columns) == ["4tMM_concat", "text-only"]
        assert len(pages[-1].columns["text-only"]) == 12  # a page holds 12: the whole 12-product catalogue
    text_model, _ = text_model_and_processor
    compared = ProductIndex.load(index_dir / "compare")
    assert compared.model_fingerprint == model_fingerprint(text_model) and len(compared) == 12
    assert pages[0].columns == pages[1].columns

    # another model beside it: the saved compare index is refused in one line, not rebuilt behind the user's back
    argv[argv.index("--compare_model") + 1] = str(checkpoints["4tMM_concat"])
    assert search_command.main(argv, prog="mmretrieval search") == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("mmretrieval search: error: the index at ") and "compare was built by another model" in error
    with pytest.raises(SystemExit) as exit_info:
        search_command.parse_args(["--model_name_or_path", "m", "--query", "x", "--compare_model", "n"])
    assert exit_info.value.code == 2 and "--compare_model is shown beside" in capsys.readouterr().err


def test_search_command_serves_photo_search_through_the_visual_indexes_of_both_models(
        shop, residual_model_and_processor, tmp_path, monkeypatch, capsys):
    from modeling_mmretrieval.commands import search as search_command
    from modeling_mmretrieval.retrieval.demo import DemoServer
    from modeling_mmretrieval.retrieval.visual_index import load_visual_index

    rows, _ = shop
    folder = tmp_path / "shop"
    (folder / "photos").mkdir(parents=True)
    photos = {}
    with (folder / "products.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["product_id", "title", "gender", "article_type", "image"])
        writer.writeheader()
        for position, row in enumerate(rows[:12]):
            photos[row["product_id"]] = photo(row["base_colour"], SHAPES[position // len(COLOURS)], "PNG")
            (folder / "photos" / f"{position}.png").write_bytes(photos[row["product_id"]])
            writer.writerow({**{name: row[name] for name in ("product_id", "title", "gender", "article_type")},
                             "image": f"photos/{position}.png"})
    model, processor = residual_model_and_processor
    torch.manual_seed(3)
    other = MultimodalRetrievalModel(model.config).eval()  # the same architecture, other weights
    checkpoints = {}
    for name, retriever in [("3tMM_residual_a", model), ("3tMM_residual_b", other)]:
        checkpoints[name] = tmp_path / "outputs" / name / "seed0" / "final"
        retriever.save_pretrained(checkpoints[name])
        processor.save_pretrained(checkpoints[name])
    wanted = rows[7]["product_id"]
    pages = []

    def interrupted_wait(server, timeout=None):
        status, _, body = post_search(server, {"q": "", "compare": "3tMM_residual_b"},
                                      {"image_file": ("mine.png", photos[wanted])})
        pages.append((status, ResultPage(body.decode())))
        raise KeyboardInterrupt

    monkeypatch.setattr(DemoServer, "wait", interrupted_wait)
    index_dir = tmp_path / "indexes" / "shop"
    argv = ["--model_name_or_path", str(checkpoints["3tMM_residual_a"]), "--dataset", str(folder / "products.csv"),
            "--split", "train", "--device", "cpu", "--index_dir", str(index_dir), "--serve", "--port", "0",
            "--compare_model", str(checkpoints["3tMM_residual_b"])]
    for run in range(2):  # the first run builds the four indexes, the second loads them
        assert search_command.main(argv, prog="mmretrieval search") == 0
        captured = capsys.readouterr()
        assert "photo search is off" not in captured.out
        status, page = pages[-1]
        assert status == 200 and list(page.columns) == ["3tMM_residual_a", "3tMM_residual_b"]
        for cards in page.columns.values():  # each model ranks the photo in its own visual index
            assert cards[0]["product_id"] == wanted and len(cards) == 12
    assert pages[0][1].columns == pages[1][1].columns
    for saved, retriever in [(index_dir, model), (index_dir / "compare", other)]:
        visual_index = load_visual_index(saved, expected_model_fingerprint=model_fingerprint(retriever))
        assert len(visual_index) == 12
    assert pages[0][1].columns["3tMM_residual_a"] != pages[0][1].columns["3tMM_residual_b"]  # two models' rankings


def test_search_command_refuses_a_malformed_judgements_file_in_one_line(served, tmp_path):
    from modeling_mmretrieval.commands.common import CliError
    from modeling_mmretrieval.commands.search import serve

    marks = tmp_path / "marks.jsonl"
    marks.write_text('{"query": "q", "product_id": "sku-1", "relevance": 1}\n{"query": "q"\n')
    app = served.app
    with pytest.raises(CliError, match=r"marks.jsonl line 2 is not valid JSON .*\(--judgements\)$") as error:
        serve(app.model, app.processor, app.index, app.catalogue, app.columns, 0, judgements=marks)
    assert "\n" not in str(error.value)


def test_search_command_serves_the_page_until_ctrl_c(served, shop, tmp_path, monkeypatch, capsys):
    from modeling_mmretrieval.commands.search import serve
    from modeling_mmretrieval.retrieval.demo import DemoServer

    rows, root = shop
    seen = {}

    def interrupted_wait(server, timeout=None):
        seen["page"] = fetch(server.url)[2].decode()
        seen["image"] = fetch(f"{server.url}image/sku-{FILE_POSITIONS[0]}")[0]
        raise KeyboardInterrupt

    monkeypatch.setattr(DemoServer, "wait", interrupted_wait)
    app = served.app
    serve(app.model, app.processor, app.index, rows, app.columns, 0, image_root=root, judgements=tmp_path / "m.jsonl")
    assert "Serving the search page on http://127.0.0.1:" in capsys.readouterr().out
    assert 'action="/search"' in seen["page"] and seen["image"] == 200
