"""Reliability end to end: hostile image files, index corruption, concurrent use, reproducible training.

Each section injects faults into real artefacts (catalogue JPEGs, a saved product index built by a model, a
loaded index shared by threads) and counts them: faults injected, detected or harmlessly absorbed, and data lost
(which must be zero). The counts are printed and, with MMRETRIEVAL_RELIABILITY_REPORT_DIR set, written to
`reliability.json` there; docs/reliability.md quotes them.
"""

import contextlib
import hashlib
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from hostile_images import png_header_only
import torch
from PIL import Image, ImageFile
from tiny_towers import IMAGE_SIZE, make_config, tiny_bert, tiny_dinov2
from transformers import AutoTokenizer, BertModel, BitImageProcessorPil, CLIPImageProcessorPil, Dinov2Model

from modeling_mmretrieval import MultimodalRetrievalModel, MultimodalRetrievalProcessor, atomic_files
from modeling_mmretrieval.data.collator import RetrievalCollator
from modeling_mmretrieval.data import SAMPLE_DATA_DIR
from modeling_mmretrieval.data.images import ImageDecodeError, ImageProblem
from modeling_mmretrieval.retrieval.index import ProductIndex
from modeling_mmretrieval.retrieval.index_files import (
    EMBEDDINGS_FILENAME,
    IDS_FILENAME,
    META_FILENAME,
    METADATA_FILENAME,
    IndexIntegrityError,
    IndexModelMismatchError,
)
from modeling_mmretrieval.towers import get_minilm_path
from modeling_mmretrieval.retrieval.search import (
    build_product_index,
    embed_queries,
    model_fingerprint,
    product_embedder,
    search_text,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
REPORT_DIR_ENV = "MMRETRIEVAL_RELIABILITY_REPORT_DIR"
FIGURES: Counter = Counter()
QUERIES = [
    "black running shoes for men", "women blue kurta", "red casual tshirt", "analog watch", "white sneakers",
    "girls pink dress", "formal leather belt", "sports backpack", "navy blue jeans", "silver bracelet",
]


@pytest.fixture(scope="module", autouse=True)
def report_figures():
    yield
    print(f"\nreliability figures: {json.dumps(dict(sorted(FIGURES.items())))}")
    if os.environ.get(REPORT_DIR_ENV):
        directory = Path(os.environ[REPORT_DIR_ENV])
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "reliability.json").write_text(json.dumps(dict(sorted(FIGURES.items())), indent=2))


@pytest.fixture(scope="module", autouse=True)
def single_thread(single_torch_thread):
    """Tiny examples on shared cores: one intra-op thread (see conftest)."""


@pytest.fixture(scope="module")
def retriever():
    """A tiny 3tower (MiniLM's real tokenizer, a 28-pixel image processor) named like a published checkpoint."""
    tokenizer = AutoTokenizer.from_pretrained(get_minilm_path())
    config = make_config("3tower-dinov2")
    config.text_config.vocab_size = tokenizer.vocab_size
    config.name_or_path = "org/tiny-3tower"
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    processor = MultimodalRetrievalProcessor(tokenizer, image_processor, max_query_length=16, max_product_length=32)
    return MultimodalRetrievalModel(config).eval(), processor


@pytest.fixture(scope="module")
def catalogue() -> list[dict]:
    """Real catalogue rows (JPEG bytes included) from the committed sample."""
    return pq.read_table(SAMPLE_DATA_DIR / "validation.parquet").slice(0, 40).to_pylist()


# ----- hostile image files --------------------------------------------------------------------------------------------
def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG", optimize=True)
    return buffer.getvalue()


def image_less_embeddings(model, processor, rows: list[dict]) -> torch.Tensor:
    with torch.no_grad():
        return model.get_product_embeddings(**processor.encode_products(rows, images=[None] * len(rows)))


@pytest.fixture
def decoded_sizes(monkeypatch) -> list[tuple[int, int]]:
    """The size of every image whose pixels Pillow decodes (`ImageFile.load`) while the test runs."""
    sizes = []
    load = ImageFile.ImageFile.load

    def recording_load(image):
        sizes.append(image.size)
        return load(image)

    monkeypatch.setattr(ImageFile.ImageFile, "load", recording_load)
    return sizes


def test_decompression_bomb_is_refused_before_decoding_under_a_configurable_limit(retriever, catalogue, decoded_sizes):
    model, processor = retriever
    # 3000 x 3000 white pixels: a valid PNG of a few kilobytes that decodes to 27 MB of RGB.
    bomb = png_bytes(Image.new("L", (3000, 3000), 255))
    assert len(bomb) < 50_000
    rows = [dict(catalogue[0]), dict(catalogue[1], image={"bytes": bomb, "path": None}),
            dict(catalogue[2], image=png_header_only(50_000, 50_000))]
    strict = RetrievalCollator(processor, with_queries=False, max_image_pixels=1_000_000)
    batch = strict(rows)
    assert batch["image_mask"].tolist() == [True, False, False] and strict.image_problems == 2
    assert set(decoded_sizes) == {(60, 80)}, "only the catalogue photo may be decoded"
    with pytest.raises(ImageDecodeError, match=f"product {rows[1]['product_id']!r}.*max_pixels=1000000") as refusal:
        RetrievalCollator(processor, with_queries=False, max_image_pixels=1_000_000, on_image_error="raise")(rows)
    assert refusal.value.reason is ImageProblem.TOO_LARGE
    # The limit is the user's: raised above the PNG's size, the same file decodes; the 2.5-gigapixel header is still
    # refused, and so it is under the default limit.
    relaxed = RetrievalCollator(processor, with_queries=False, max_image_pixels=10_000_000)
    assert relaxed(rows)["image_mask"].tolist() == [True, True, False]
    assert (3000, 3000) in decoded_sizes and (50_000, 50_000) not in decoded_sizes
    assert RetrievalCollator(processor, with_queries=False)(rows[2:])["image_mask"].tolist() == [False]
    # Indexed through a collator with the limit, the bombs' products are embedded image-less.
    index = ProductIndex.build(rows, product_embedder(model, strict), show_progress=False)
    indexed = torch.from_numpy(np.array(index.embeddings[1:]))
    assert torch.allclose(indexed, image_less_embeddings(model, processor, rows[1:]), atol=1e-6)
    FIGURES["hostile images injected"] += 2
    FIGURES["hostile images refused or masked"] += int((~batch["image_mask"]).sum())


def test_truncated_and_corrupted_jpegs_index_as_image_less_products(retriever, catalogue):
    model, processor = retriever
    rows = [dict(row) for row in catalogue[:24]]
    rng = random.Random(0)
    truncated, scrambled = set(range(2, 24, 4)), set(range(0, 24, 4))
    for position in truncated | scrambled:
        jpeg = rows[position]["image"]["bytes"]
        if position in truncated:
            broken = jpeg[: rng.randrange(1, len(jpeg) - 2)]  # cut anywhere, down to the bare start-of-image marker
        else:
            start = rng.randrange(len(jpeg) // 2, len(jpeg) - 64)  # bit rot in the entropy-coded data
            broken = jpeg[:start] + bytes(rng.randrange(256) for _ in range(64)) + jpeg[start + 64 :]
        rows[position] = dict(rows[position], image={"bytes": broken, "path": None})
    collator = RetrievalCollator(processor, with_queries=False)
    mask = collator(rows)["image_mask"]
    masked = {position for position, has_image in enumerate(mask.tolist()) if not has_image}
    # Every truncated JPEG is refused; scrambled scan data is refused when libjpeg reports it, and otherwise decodes
    # to a complete (if blotchy) picture, as in any image viewer. Intact images are never masked.
    damaged = truncated | scrambled
    assert truncated <= masked <= damaged
    index = build_product_index(model, processor, rows, show_progress=False)
    embeddings = torch.from_numpy(np.array(index.embeddings))
    image_less = image_less_embeddings(model, processor, rows)
    for position in range(len(rows)):
        assert torch.allclose(embeddings[position], image_less[position], atol=1e-6) == (position in masked)
    first_masked = min(masked)
    with pytest.raises(ImageDecodeError, match=repr(rows[first_masked]["product_id"])) as refusal:
        RetrievalCollator(processor, with_queries=False, on_image_error="raise")(rows)
    assert refusal.value.reason in (ImageProblem.TRUNCATED, ImageProblem.UNDECODABLE)
    FIGURES["hostile images injected"] += len(damaged)
    FIGURES["hostile images refused or masked"] += len(masked)
    FIGURES["scrambled JPEGs that libjpeg still decoded completely"] += len(damaged - masked)


# ----- index integrity ------------------------------------------------------------------------------------------------
INDEX_FILES = (EMBEDDINGS_FILENAME, IDS_FILENAME, METADATA_FILENAME, META_FILENAME)


@pytest.fixture(scope="module")
def saved_index(retriever, catalogue, tmp_path_factory):
    """An index of the catalogue built by the model (titles kept as metadata), saved, with its expected contents."""
    model, processor = retriever
    directory = tmp_path_factory.mktemp("index") / "catalogue"
    build_product_index(model, processor, catalogue, output_dir=directory, show_progress=False)
    expected = {"model_fingerprint": model_fingerprint(model)}
    return directory, expected, index_contents(ProductIndex.load(directory, **expected_kwargs(expected)))


def expected_kwargs(expected: dict) -> dict:
    return {"expected_model_fingerprint": expected["model_fingerprint"]}


def index_contents(index: ProductIndex) -> tuple:
    """Everything a loaded index serves: ids, vectors, metadata, provenance."""
    return (
        list(index.ids), np.array(index.embeddings).tobytes(), [index.metadata_for(i) for i in index.ids],
        index.model_id, index.config_hash, index.model_fingerprint, index.shard_info,
    )


def load_after_fault(directory: Path, expected: dict, reference: tuple) -> str:
    """"detected" (a typed refusal), "harmless" (loads with every byte of content intact) or "lost" (loads with
    different content, the failure this suite exists to rule out)."""
    try:
        loaded = ProductIndex.load(directory, **expected_kwargs(expected))
    except (IndexIntegrityError, IndexModelMismatchError):
        return "detected"
    return "harmless" if index_contents(loaded) == reference else "lost"


def corruptions(payload: bytes, rng: random.Random, flips: int, cuts: int):
    """(description, corrupted bytes): single-byte flips, truncations, trailing garbage and deletion (None)."""
    for _ in range(flips):
        position = rng.randrange(len(payload))
        corrupted = bytearray(payload)
        corrupted[position] ^= rng.randrange(1, 256)
        yield "flip", bytes(corrupted)
    for _ in range(cuts):
        yield "truncate", payload[: rng.randrange(len(payload))]
    yield "append", payload + b"\x00garbage"
    yield "delete", None


@contextlib.contextmanager
def faulty_file(directory: Path, name: str, corrupted: bytes | None) -> Iterator[Path]:
    """`directory` with file `name` replaced by `corrupted` (deleted for None), restored afterwards."""
    path = directory / name
    original = path.read_bytes()
    if corrupted is None:
        path.unlink()
    else:
        path.write_bytes(corrupted)
    try:
        yield directory
    finally:
        path.write_bytes(original)


def test_every_corrupted_or_truncated_index_file_is_detected(saved_index, tmp_path):
    source, expected, reference = saved_index
    directory = shutil.copytree(source, tmp_path / "index")
    rng = random.Random(1)
    outcomes = Counter()
    for name in INDEX_FILES:
        # The bytes of index_meta.json are corrupted exhaustively in the next test; here it is cut and removed.
        flips = 0 if name == META_FILENAME else 60
        for kind, corrupted in corruptions((directory / name).read_bytes(), rng, flips=flips, cuts=15):
            with faulty_file(directory, name, corrupted):
                outcomes[name, kind, load_after_fault(directory, expected, reference)] += 1
    # The restored copy loads intact, and an index of another model is refused.
    assert load_after_fault(directory, expected, reference) == "harmless"
    other_model = MultimodalRetrievalModel(make_config("text_only"))
    with pytest.raises(IndexModelMismatchError, match="model_fingerprint"):
        ProductIndex.load(source, expected_model_fingerprint=model_fingerprint(other_model))
    injected = sum(outcomes.values())
    detected = sum(count for (_, _, outcome), count in outcomes.items() if outcome == "detected")
    FIGURES["index faults injected (data files: flips, cuts, garbage, deletion)"] += injected
    FIGURES["index faults detected (data files)"] += detected
    FIGURES["index data lost (data files)"] += injected - detected
    assert detected == injected, {key: count for key, count in outcomes.items() if key[2] != "detected"}


def test_every_single_byte_corruption_of_the_index_meta_is_detected_or_harmless(saved_index, tmp_path):
    source, expected, reference = saved_index
    directory = shutil.copytree(source, tmp_path / "index")
    payload = (directory / META_FILENAME).read_bytes()
    outcomes = Counter()
    for position in range(len(payload)):
        for bit in (0x01, 0x20):  # letter case, digits, quotes and structure all change
            corrupted = bytearray(payload)
            corrupted[position] ^= bit
            with faulty_file(directory, META_FILENAME, bytes(corrupted)):
                outcomes[load_after_fault(directory, expected, reference)] += 1
    FIGURES["index faults injected (index_meta.json, every byte)"] += sum(outcomes.values())
    FIGURES["index faults detected (index_meta.json)"] += outcomes["detected"]
    FIGURES["index faults harmless (index_meta.json whitespace)"] += outcomes["harmless"]
    FIGURES["index data lost (index_meta.json)"] += outcomes["lost"]
    assert outcomes["lost"] == 0, outcomes


# ----- concurrency ----------------------------------------------------------------------------------------------------
def test_concurrent_text_searches_equal_sequential_ones(retriever, saved_index):
    model, processor = retriever
    directory, expected, _ = saved_index
    index = ProductIndex.load(directory, **expected_kwargs(expected))  # memory-mapped, as a server would open it
    requests = [QUERIES[i % len(QUERIES) : i % len(QUERIES) + 1 + i % 3] for i in range(64)]
    sequential = [search_text(model, processor, index, queries, k=7) for queries in requests]
    with ThreadPoolExecutor(max_workers=8) as pool:
        concurrent = list(pool.map(lambda queries: search_text(model, processor, index, queries, k=7), requests))
    for (expected_scores, expected_ids), (scores, ids) in zip(sequential, concurrent):
        assert ids == expected_ids and torch.equal(scores, expected_scores)
    FIGURES["concurrent text searches compared with sequential ones"] += len(requests)


def test_products_added_while_searching_are_all_kept_and_saves_stay_consistent(
    retriever, catalogue, saved_index, tmp_path
):
    model, processor = retriever
    directory, expected, _ = saved_index
    index = ProductIndex.load(directory, **expected_kwargs(expected))
    queries = embed_queries(model, processor, QUERIES)
    before = index.search(queries, k=5)
    # New products: the catalogue again under new ids, embedded before the threads start (see the processor test).
    new_rows = [dict(row, product_id=f"new-{adder}-{row['product_id']}") for adder in range(2) for row in catalogue]
    new_vectors = product_embedder(model, RetrievalCollator(processor, with_queries=False))(new_rows)
    searches, snapshots = [], []
    readers_running, adds_done = threading.Barrier(5), threading.Event()

    def add(adder: int) -> None:
        for start in range(adder * len(catalogue), (adder + 1) * len(catalogue), 2):
            rows = new_rows[start : start + 2]
            index.add(new_vectors[start : start + 2], [row["product_id"] for row in rows],
                      metadata=[{"title": row["title"]} for row in rows])

    def repeat_until_adds_done(work) -> None:
        readers_running.wait()
        while True:  # at least once after the adds, so every reader also sees the final catalogue
            finished = adds_done.is_set()
            work()
            if finished:
                return

    def search() -> None:
        scores, ids = index.search(queries, k=5)
        searches.append(all(len(row) == 5 for row in ids) and bool(torch.isfinite(scores).all()))

    def save() -> None:
        snapshots.append(index.save(tmp_path / f"snapshot-{len(snapshots)}"))

    readers = [threading.Thread(target=repeat_until_adds_done, args=(work,)) for work in (search, search, search, save)]
    for reader in readers:
        reader.start()
    readers_running.wait()
    with ThreadPoolExecutor(max_workers=2) as adders:
        list(adders.map(add, range(2)))
    adds_done.set()
    for reader in readers:
        reader.join()

    assert len(index) == len(catalogue) + len(new_rows)
    lost = [row["product_id"] for row in new_rows if row["product_id"] not in index]
    assert lost == []
    positions = [index.position_of(row["product_id"]) for row in new_rows]
    assert np.array_equal(np.array(index.embeddings)[positions], new_vectors.numpy())
    assert all(searches) and len(searches) >= 3 and len(snapshots) >= 1
    # Every save taken mid-add is a consistent snapshot: a prefix of the final catalogue, rows and ids aligned.
    final_ids, final_vectors = list(index.ids), np.array(index.embeddings)
    for snapshot in snapshots:
        saved = ProductIndex.load(snapshot, **expected_kwargs(expected))
        assert list(saved.ids) == final_ids[: len(saved)]
        assert np.array_equal(np.array(saved.embeddings), final_vectors[: len(saved)])
    # Same-id adds are refused whole, even under contention.
    with pytest.raises(ValueError, match="more than once"):
        index.add(new_vectors[:2], ["brand-new", new_rows[1]["product_id"]])
    assert "brand-new" not in index
    # The catalogue's own products still rank as before: each new row copies one, and ties keep the older row first.
    _, after = index.search(queries, k=15)
    assert [[product for product in row if not product.startswith("new-")][:5] for row in after] == before[1]
    FIGURES["products added concurrently with searches and saves"] += len(new_rows)
    FIGURES["products lost by concurrent adds"] += len(lost)
    FIGURES["searches during adds"] += len(searches)
    FIGURES["snapshots saved during adds, all consistent"] += len(snapshots)


def test_queries_and_products_encoded_concurrently_equal_sequential(retriever, catalogue):
    _, processor = retriever
    products = [{"title": row["title"], "description": row["description"]} for row in catalogue[:8]]

    def encode(job: int) -> torch.Tensor:
        if job % 2:
            return processor.encode_queries([products[job % 8]["description"]])["input_ids"]
        return processor.encode_products([products[job % 8]])["input_ids"]

    expected = [encode(job) for job in range(16)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(encode, range(3000)))
    mismatches = sum(not torch.equal(result, expected[job % 16]) for job, result in enumerate(results))
    FIGURES["tokenizations corrupted by a concurrent call (processor race)"] += mismatches
    assert mismatches == 0


# ----- reproducible training ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def training_assets(tmp_path_factory) -> dict[str, Path]:
    """Tiny pretrained towers (MiniLM's tokenizer, a 28-pixel DINOv2) and 64 catalogue rows, as examples/train.py
    reads them."""
    root = tmp_path_factory.mktemp("training_assets")
    tokenizer = AutoTokenizer.from_pretrained(get_minilm_path())
    text_config = tiny_bert()
    text_config.vocab_size, text_config.max_position_embeddings = tokenizer.vocab_size, 128
    torch.manual_seed(0)
    BertModel(text_config).save_pretrained(root / "text")
    tokenizer.save_pretrained(root / "text")
    Dinov2Model(tiny_dinov2()).save_pretrained(root / "vision")
    BitImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    ).save_pretrained(root / "vision")
    (root / "data").mkdir()
    pq.write_table(pq.read_table(SAMPLE_DATA_DIR / "train.parquet").slice(0, 64), root / "data" / "train.parquet")
    return {"text": root / "text", "vision": root / "vision", "data": root / "data"}


def start_training_run(assets: dict[str, Path], output_dir: Path, seed: int, hash_seed: str) -> subprocess.Popen:
    command = [
        sys.executable, str(REPO_ROOT / "examples" / "train.py"), "--dataset", str(assets["data"]),
        "--text_model", str(assets["text"]), "--architecture", "3tower", "--vision_model", str(assets["vision"]), "--image_size", str(IMAGE_SIZE),
        "--output_dir", str(output_dir), "--per_device_train_batch_size", "16", "--max_train_steps", "4",
        "--warmup_steps", "1", "--eval_split", "none", "--seed", str(seed),
    ]
    # Different hash seeds: set and dict orderings that depend on them must not leak into the weights.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": hash_seed}
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_training_twice_with_one_seed_gives_bit_identical_weights(training_assets, tmp_path):
    runs = {
        name: start_training_run(training_assets, tmp_path / name, seed, hash_seed)
        for name, seed, hash_seed in (("first", 7, "1"), ("second", 7, "2"), ("other-seed", 8, "1"))
    }
    digests = {}
    for name, process in runs.items():
        _, stderr = process.communicate(timeout=600)
        assert process.returncode == 0, stderr[-3000:]
        digests[name] = hashlib.sha256((tmp_path / name / "final" / "model.safetensors").read_bytes()).hexdigest()
    assert digests["first"] == digests["second"]
    assert digests["other-seed"] != digests["first"]  # the seed matters: the comparison can fail
    FIGURES["training runs compared bit for bit"] += 2


# ----- publishing final/ under SIGKILL ----------------------------------------------------------------------------
def publish_killed_before_operation(staging: Path, target: Path, operation: int, exchange: bool) -> bool:
    """Publishes `staging` onto `target` in a forked child that SIGKILLs itself just before its `operation`-th
    filesystem change (rename, exchange, unlink, rmdir); True when it was killed, False when it finished first."""
    child = os.fork()
    if child == 0:  # the child: count the changes, die at the chosen one
        try:
            count = 0

            def killing(change):
                def wrapped(*args, **kwargs):
                    nonlocal count
                    if count == operation:
                        os.kill(os.getpid(), signal.SIGKILL)
                    count += 1
                    return change(*args, **kwargs)
                return wrapped

            for name in ("rename", "replace", "unlink", "rmdir"):
                setattr(os, name, killing(getattr(os, name)))
            atomic_files.exchange_paths = killing(atomic_files.exchange_paths if exchange else lambda *paths: False)
            atomic_files.publish_directory(staging, target)
        finally:
            os._exit(0)
    _, status = os.waitpid(child, 0)
    return os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2-exchange", "rename-aside"])
def test_a_kill_anywhere_in_publishing_final_leaves_a_loadable_or_recoverable_model(tmp_path, exchange):
    if exchange:
        (tmp_path / "probe-a").mkdir()
        (tmp_path / "probe-b").mkdir()
        if not atomic_files.exchange_paths(tmp_path / "probe-a", tmp_path / "probe-b"):
            pytest.skip("this filesystem cannot swap two directories in one rename")
    versions = {}
    for version in range(3):
        torch.manual_seed(version)
        model = MultimodalRetrievalModel(make_config("text_only"))
        model.save_pretrained(tmp_path / f"version{version}")
        versions[version] = (tmp_path / f"version{version}" / "model.safetensors").read_bytes()
    final = tmp_path / "run" / "final"
    operation, outcomes = 0, Counter()
    while True:
        shutil.rmtree(tmp_path / "run", ignore_errors=True)
        shutil.copytree(tmp_path / "version0", final)
        shutil.copytree(tmp_path / "version1", tmp_path / "run" / ".tmp-final")
        if not publish_killed_before_operation(tmp_path / "run" / ".tmp-final", final, operation, exchange):
            break
        operation += 1
        if not final.is_dir():  # only between the two renames of the rename-aside path: the old model is aside
            assert not exchange
            assert atomic_files.recover_directory(final) == final
            outcomes["recovered"] += 1
        weights = (final / "model.safetensors").read_bytes()
        assert weights in (versions[0], versions[1]), f"killed before operation {operation - 1}"
        outcomes["old" if weights == versions[0] else "new"] += 1
        MultimodalRetrievalModel.from_pretrained(final)  # never "half-deleted"
        # The next publish cleans up whatever the kill left aside.
        shutil.rmtree(tmp_path / "run" / ".tmp-final", ignore_errors=True)
        shutil.copytree(tmp_path / "version2", tmp_path / "run" / ".tmp-v2")
        atomic_files.publish_directory(tmp_path / "run" / ".tmp-v2", final)
        assert sorted(path.name for path in final.parent.iterdir()) == ["final"]
        assert (final / "model.safetensors").read_bytes() == versions[2]
    assert (final / "model.safetensors").read_bytes() == versions[1] and operation > 3
    assert outcomes["old"] >= 1 and outcomes["new"] >= 1
    assert outcomes["recovered"] == (0 if exchange else 1)


def test_a_killed_writers_staging_directory_is_removed_at_the_next_write(tmp_path):
    from modeling_mmretrieval.atomic_files import atomic_directory, remove_abandoned_staging, write_json_atomically

    target = tmp_path / "index"
    writer = subprocess.run(  # a writer killed inside the block: its staging directory stays behind
        [sys.executable, "-c", textwrap.dedent(f"""
            import os, signal
            from modeling_mmretrieval.atomic_files import atomic_directory, write_json_atomically
            with atomic_directory({str(target)!r}) as staging:
                write_json_atomically(staging / "half.json", {{"rows": 1}})
                os.kill(os.getpid(), signal.SIGKILL)
        """)], env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert writer.returncode == -signal.SIGKILL
    leftovers = list(tmp_path.glob(".index.*.partial"))
    assert len(leftovers) == 1 and (leftovers[0] / "half.json").is_file()
    with atomic_directory(tmp_path / "index") as live:  # the killed writer's leftovers went before this one began
        assert remove_abandoned_staging(target) == [] and live.is_dir()  # a live writer's staging is left alone
        write_json_atomically(live / "index_meta.json", {"count": 0})
    assert not list(tmp_path.glob(".index.*.partial")) and (target / "index_meta.json").is_file()
