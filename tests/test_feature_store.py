"""The persistent image-feature store (`retrieval.image_feature_store`): read back equal, never across towers or image
sizes, intact after a writer is killed, shared by concurrent writers, and used by training and indexing."""

import hashlib
import io
import json
import os
import random
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_towers import make_config, save_tiny_pretrained_towers

from modeling_mmretrieval import MultimodalRetrievalModel, MultimodalRetrievalProcessor
from modeling_mmretrieval.data.images import ImageProblem, ImageReport
from modeling_mmretrieval.retrieval.image_feature_store import (
    ImageFeatureNamespace,
    ImageFeatureStore,
    default_image_feature_store_dir,
    image_content_key,
    image_tower_fingerprint,
)
from modeling_mmretrieval.retrieval.search import build_product_index
from modeling_mmretrieval.retrieval.visual_index import build_visual_index
from modeling_mmretrieval.training.image_feature_cache import precompute_image_features, resize_image_processor

IMAGE_SIZE = 28
REPO_ROOT = Path(__file__).resolve().parents[1]
COLOURS = [(200, 30, 40), (30, 50, 190), (40, 160, 60), (230, 210, 40)]


def photo(rgb, seed: int, image_format: str = "PNG") -> bytes:
    """A real encoded photo of the colour with per-pixel noise, so no two are alike."""
    rng = random.Random(seed)
    image = Image.new("RGB", (30, 40))
    image.putdata([tuple(min(255, max(0, c + rng.randint(-25, 25))) for c in rgb) for _ in range(30 * 40)])
    buffer = io.BytesIO()
    image.save(buffer, format=image_format)
    return buffer.getvalue()


def catalogue(tmp_path: Path, num_products: int = 10, seed: int = 0) -> list[dict]:
    """PNG and JPEG bytes, a photo given as a file path, a corrupt image and a missing file."""
    rows = []
    for position in range(num_products):
        encoded = photo(COLOURS[position % 4], seed * 1000 + position, "PNG" if position % 2 else "JPEG")
        rows.append({"product_id": f"sku-{seed}-{position}", "title": f"Roadster Kurta {position}",
                     "image": {"bytes": encoded, "path": None}})
    on_disk = tmp_path / f"photo-{seed}.jpg"
    on_disk.write_bytes(photo((90, 90, 90), seed * 1000 + 999, "JPEG"))
    rows[1]["image"] = str(on_disk)
    rows[2]["image"] = {"bytes": b"\x89PNG\r\n\x1a\n not really a png", "path": None}
    rows[3]["image"] = str(tmp_path / "no-such-photo.jpg")
    return rows


@pytest.fixture(scope="module")
def towers(tmp_path_factory):
    root = tmp_path_factory.mktemp("store_towers")
    save_tiny_pretrained_towers(root, IMAGE_SIZE, text_layers=1)
    return root


def model_and_processor(towers):
    model = MultimodalRetrievalModel.from_towers_pretrained(
        str(towers / "text"), str(towers / "vision"), architecture="3tower", fusion="residual", max_product_length=32
    ).eval()
    processor = MultimodalRetrievalProcessor.from_towers_pretrained(
        str(towers / "text"), str(towers / "vision"), config=model.config
    )
    return model, processor


def features_of(cache, rows):
    return [cache[row["product_id"]] for row in rows]


def assert_same_features(first, second):
    assert [feature is None for feature in first] == [feature is None for feature in second]
    for a, b in zip(first, second):
        if a is not None:
            assert torch.equal(a, b)


def test_the_second_run_reads_every_feature_back_equal(towers, tmp_path):
    model, processor = model_and_processor(towers)
    rows = catalogue(tmp_path)
    plain_report = ImageReport()
    plain = precompute_image_features(model, processor, rows, batch_size=4, show_progress=False, report=plain_report)

    first_store = ImageFeatureStore(tmp_path / "store")
    first_report = ImageReport()
    first = precompute_image_features(model, processor, rows, batch_size=4, show_progress=False,
                                      store=first_store, report=first_report)
    # 8 photos through the tower; the corrupt one is remembered, the missing file is not (nothing to hash).
    assert (first_store.hits, first_store.computed) == (0, 8)
    assert_same_features(features_of(plain, rows), features_of(first, rows))
    assert first_report.summary() == plain_report.summary()

    second_store = ImageFeatureStore(tmp_path / "store")  # a new run: nothing in memory
    second_report = ImageReport()
    second = precompute_image_features(model, processor, rows, batch_size=3, show_progress=False,
                                       store=second_store, report=second_report)
    assert (second_store.hits, second_store.computed) == (9, 0)
    assert_same_features(features_of(plain, rows), features_of(second, rows))
    assert second_report.counts == plain_report.counts
    assert second_report.status_of("sku-0-2").value == "undecodable"
    assert second_report.status_of("sku-0-3").value == "missing"
    assert second.feature_size == plain.feature_size == model.image_feature_size


def test_a_changed_tower_or_image_size_never_reads_another_ones_entries(towers, tmp_path):
    model, processor = model_and_processor(towers)
    rows = catalogue(tmp_path)
    store = ImageFeatureStore(tmp_path / "store")
    original = precompute_image_features(model, processor, rows, show_progress=False, store=store)

    perturbed, _ = model_and_processor(towers)
    with torch.no_grad():
        next(perturbed.vision_model.parameters()).add_(1e-3)
    store = ImageFeatureStore(tmp_path / "store")
    changed = precompute_image_features(perturbed, processor, rows, show_progress=False, store=store)
    assert (store.hits, store.computed) == (0, 8)  # a namespace of its own: nothing of the first tower is read
    assert not torch.equal(changed["sku-0-0"], original["sku-0-0"])

    resized = MultimodalRetrievalProcessor.from_towers_pretrained(
        str(towers / "text"), str(towers / "vision"), config=model.config
    )
    resize_image_processor(resized.image_processor, 2 * IMAGE_SIZE)
    store = ImageFeatureStore(tmp_path / "store")
    precompute_image_features(model, resized, rows, show_progress=False, store=store)
    assert (store.hits, store.computed) == (0, 8)
    assert len([path for path in (tmp_path / "store").iterdir() if path.is_dir()]) == 3


def test_the_4tower_fingerprint_follows_the_visual_projection_not_the_text_half():
    torch.manual_seed(0)
    model = MultimodalRetrievalModel(make_config("4tower-residual")).eval()
    fingerprint = image_tower_fingerprint(model)
    with torch.no_grad():
        model.dual_encoder.text_projection.weight.add_(1.0)
        next(model.dual_encoder.text_model.parameters()).add_(1.0)
        model.text_model.embeddings.word_embeddings.weight.add_(1.0)
    assert image_tower_fingerprint(model) == fingerprint
    with torch.no_grad():
        model.dual_encoder.visual_projection.weight.add_(1e-4)
    assert image_tower_fingerprint(model) != fingerprint


def test_keys_hash_the_encoded_bytes_wherever_they_come_from(tmp_path):
    encoded = photo((10, 20, 30), 0)
    (tmp_path / "a.png").write_bytes(encoded)
    keys = {image_content_key(value)[0] for value in (encoded, {"bytes": encoded, "path": None},
                                                       str(tmp_path / "a.png"), {"bytes": None, "path": str(tmp_path / "a.png")})}
    assert len(keys) == 1
    assert image_content_key(photo((10, 20, 30), 1))[0] not in keys
    pil_key, _ = image_content_key(Image.open(io.BytesIO(encoded)).convert("RGB"))
    assert pil_key not in keys and pil_key == image_content_key(Image.open(io.BytesIO(encoded)).convert("RGB"))[0]
    # Same palette indices, another palette: another picture, another key.
    red, blue = Image.new("P", (4, 4), 0), Image.new("P", (4, 4), 0)
    red.putpalette([255, 0, 0] * 256)
    blue.putpalette([0, 0, 255] * 256)
    assert image_content_key(red)[0] != image_content_key(blue)[0]


def test_the_default_location_follows_the_cache_variable(monkeypatch, tmp_path):
    monkeypatch.setenv("MMRETRIEVAL_CACHE", str(tmp_path))
    assert default_image_feature_store_dir() == tmp_path / "image_features"
    monkeypatch.delenv("MMRETRIEVAL_CACHE")
    assert default_image_feature_store_dir() == Path.home() / ".cache" / "mmretrieval" / "image_features"


def test_indexes_built_through_the_store_equal_the_plain_ones(towers, tmp_path):
    model, processor = model_and_processor(towers)
    rows = catalogue(tmp_path)
    plain = build_product_index(model, processor, rows, batch_size=4, show_progress=False)
    plain_visual = build_visual_index(model, processor, rows, batch_size=4, show_progress=False)
    for run in range(2):
        store = ImageFeatureStore(tmp_path / "store")
        report = ImageReport()
        stored = build_product_index(model, processor, rows, batch_size=4, show_progress=False,
                                     image_feature_store=store, image_report=report)
        assert (store.hits, store.computed) == ((0, 8) if run == 0 else (9, 0))
        assert list(stored.ids) == list(plain.ids)
        np.testing.assert_allclose(stored.embeddings, plain.embeddings, rtol=0, atol=1e-6)
        assert report.counts["ok"] == 8 and report.status_of("sku-0-2").value == "undecodable"
        store = ImageFeatureStore(tmp_path / "store")
        visual = build_visual_index(model, processor, rows, batch_size=4, show_progress=False,
                                    image_feature_store=store)
        assert (store.hits, store.computed) == (9, 0) and list(visual.ids) == list(plain_visual.ids)
        np.testing.assert_allclose(visual.embeddings, plain_visual.embeddings, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# Writes: killed writers, damaged shards, concurrent writers
# ----------------------------------------------------------------------------------------------------------------

WIDTH = 6


def feature_for(key: str) -> torch.Tensor:
    """A deterministic feature per key, so any writer writes the same value for it."""
    return torch.tensor([int(key[i : i + 2], 16) / 255 for i in range(0, 2 * WIDTH, 2)], dtype=torch.float32)


def key_for(number: int) -> str:
    return hashlib.sha256(str(number).encode()).hexdigest()


WRITER = textwrap.dedent("""
    import hashlib, os, signal, sys
    import torch
    from modeling_mmretrieval import atomic_files
    from modeling_mmretrieval.retrieval import image_feature_store as module
    import pathlib, time
    directory, first, last, per_shard, kill_on_shard = sys.argv[1], *map(int, sys.argv[2:6])
    module.MAX_SHARDS = 3  # merge often, while the other writer writes
    go = pathlib.Path(directory) / "go"
    (pathlib.Path(directory) / f"ready-{first}").touch()
    while not go.exists():  # start writing together with the other writer
        time.sleep(0.005)
    store = module.ImageFeatureStore(directory)
    namespace = module.ImageFeatureNamespace(store, "ns", feature_size=%(width)d)
    shards = 0
    for number in range(first, last):
        key = hashlib.sha256(str(number).encode()).hexdigest()
        namespace.add(key, torch.tensor([int(key[i:i + 2], 16) / 255 for i in range(0, %(width)d * 2, 2)]))
        if (number - first + 1) %% per_shard == 0:
            shards += 1
            if shards == kill_on_shard:  # die after the temporary file is written, before it is renamed
                atomic_files.os.replace = lambda *args: os.kill(os.getpid(), signal.SIGKILL)
            namespace.flush()
    namespace.flush()
""") % {"width": WIDTH}


def run_writer(directory, first, last, per_shard, kill_on_shard=0, start=True):
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(directory), str(first), str(last), str(per_shard),
                             str(kill_on_shard)], stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)})
    if start:
        (Path(directory) / "go").touch()
    return writer


def start_together(directory, writers, firsts):
    deadline = time.monotonic() + 60
    while not all((Path(directory) / f"ready-{first}").exists() for first in firsts):
        assert time.monotonic() < deadline and all(writer.poll() is None for writer in writers)
        time.sleep(0.01)
    (Path(directory) / "go").touch()


def test_a_writer_killed_mid_write_leaves_the_store_readable_with_its_complete_entries(tmp_path):
    writer = run_writer(tmp_path, 0, 30, per_shard=10, kill_on_shard=2)
    assert writer.wait(timeout=60) == -signal.SIGKILL
    directory = tmp_path / "ns"
    leftovers = [path for path in directory.iterdir() if path.name.endswith(".partial")]
    assert len(leftovers) == 1 and leftovers[0].stat().st_size > 0  # the killed write, complete but never renamed
    namespace = ImageFeatureNamespace(ImageFeatureStore(tmp_path), "ns", feature_size=WIDTH)
    found = namespace.lookup([key_for(number) for number in range(30)])
    assert sorted(found) == sorted(key_for(number) for number in range(10))
    assert all(torch.equal(found[key_for(number)], feature_for(key_for(number))) for number in range(10))

    # A damaged shard (not written by the store: a disk error, a copy cut short) is skipped with a warning.
    (directory / "shard-00000000000000000001-1-deadbeef.npy").write_bytes(b"\x93NUMPY garbage")
    os.utime(leftovers[0], (time.time() - 2 * 3600,) * 2)  # the killed writer's file is stale now
    namespace.add(key_for(50), feature_for(key_for(50)))
    assert namespace.flush() == 1
    assert not leftovers[0].exists()
    found = ImageFeatureNamespace(ImageFeatureStore(tmp_path), "ns", WIDTH).lookup([key_for(n) for n in (0, 9, 50)])
    assert len(found) == 3


def test_two_processes_filling_one_namespace_never_corrupt_each_other(tmp_path):
    # Overlapping keys 60-119; each writes 24 shards and merges (MAX_SHARDS=3) while the other writes and merges.
    writers = [run_writer(tmp_path, 0, 120, per_shard=5, start=False),
               run_writer(tmp_path, 60, 180, per_shard=5, start=False)]
    start_together(tmp_path, writers, (0, 60))
    for writer in writers:
        _, stderr = writer.communicate(timeout=120)
        assert writer.returncode == 0, stderr[-2000:]
    namespace = ImageFeatureNamespace(ImageFeatureStore(tmp_path), "ns", feature_size=WIDTH)
    found = namespace.lookup([key_for(number) for number in range(180)])
    assert len(found) == 180
    assert all(torch.equal(found[key_for(number)], feature_for(key_for(number))) for number in range(180))
    files = list((tmp_path / "ns").iterdir())
    assert not [path for path in files if path.name.startswith(".")]  # no temporary file left behind
    assert len([path for path in files if path.name.startswith("shard-")]) <= 2 * 4  # merged as they went


def test_a_namespace_remembers_undecodable_images_and_refuses_a_wrong_width(tmp_path):
    namespace = ImageFeatureNamespace(ImageFeatureStore(tmp_path), "ns", feature_size=WIDTH)
    namespace.add(key_for(1), problem=ImageProblem.TRUNCATED)
    with pytest.raises(ValueError, match="width 6"):
        namespace.add(key_for(2), torch.zeros(WIDTH + 1))
    namespace.flush()
    assert ImageFeatureNamespace(ImageFeatureStore(tmp_path), "ns", WIDTH).lookup([key_for(1)]) == {
        key_for(1): ImageProblem.TRUNCATED
    }


# ----------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_second_training_run_computes_no_image_feature(towers, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = tmp_path / "data"
    data.mkdir()
    splits = {}
    for split, seed, size in (("train", 0, 24), ("validation", 1, 8)):
        rows = [{**row, "article_type": "Kurta", "gender": "Women", "base_colour": "Red", "description": "Cotton"}
                for row in catalogue(tmp_path, size, seed=seed)]
        for row in rows:  # parquet wants one image type: bytes dicts
            if not isinstance(row["image"], dict):
                row["image"] = {"bytes": Path(row["image"]).read_bytes() if Path(row["image"]).exists() else None,
                                "path": None}
        pq.write_table(pa.Table.from_pylist(rows), data / f"{split}.parquet")
        splits[split] = rows
    command = [sys.executable, str(REPO_ROOT / "examples" / "train.py"), "--dataset", str(data), "--image_size",
               str(IMAGE_SIZE), "--architecture", "3tower", "--text_model", str(towers / "text"), "--vision_model",
               str(towers / "vision"), "--per_device_train_batch_size", "8", "--max_train_steps", "1",
               "--image_feature_store", str(tmp_path / "store")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO_ROOT)}
    logs = []
    for run in ("first", "second"):
        done = subprocess.run([*command, "--output_dir", str(tmp_path / run)], capture_output=True, text=True,
                              timeout=300, env=env)
        assert done.returncode == 0, done.stderr[-3000:]
        logs.append([tuple(map(int, counts)) for counts in
                     re.findall(r"image-feature store: (\d+) read, (\d+) computed", done.stderr)])
    # Training products (22 photos, a corrupt one, a missing one), then the evaluation products (6 photos, a corrupt
    # one with the training one's bytes, already remembered, and a missing one); the second run computes none.
    assert logs == [[(0, 22), (1, 6)], [(23, 0), (7, 0)]], logs
    first, second = (json.loads((tmp_path / run / "results.json").read_text()) for run in ("first", "second"))
    without_reasons = [{**results["images"], "examples": {status: [example["product_id"] for example in examples]
                                                          for status, examples in results["images"]["examples"].items()}}
                       for results in (first, second)]
    assert without_reasons[0] == without_reasons[1] and without_reasons[0]["ok"] == 22

    # An index of the trained model's products reads the features training stored (same tower, same pixels).
    model = MultimodalRetrievalModel.from_pretrained(tmp_path / "second" / "final").eval()
    processor = MultimodalRetrievalProcessor.from_pretrained(tmp_path / "second" / "final")
    store = ImageFeatureStore(tmp_path / "store")
    build_product_index(model, processor, splits["train"], show_progress=False, image_feature_store=store)
    assert (store.hits, store.computed) == (23, 0)

    # `mmretrieval evaluate` reads the same store: the evaluation products' features come back, none is computed, and
    # the metrics equal those of an evaluation that embeds every photo afresh.
    evaluate = [sys.executable, str(REPO_ROOT / "examples" / "evaluate.py"), "--model_name_or_path",
                str(tmp_path / "second" / "final"), "--dataset", str(data), "--split", "validation", "--num_queries", "4"]
    reports = {}
    for name, flags in (("stored", ["--image_feature_store", str(tmp_path / "store")]),
                        ("fresh", ["--no_image_feature_store"])):
        done = subprocess.run([*evaluate, *flags, "--output_file", str(tmp_path / f"{name}.json")], capture_output=True,
                              text=True, timeout=300, env=env)
        assert done.returncode == 0, done.stderr[-3000:]
        reports[name] = (json.loads((tmp_path / f"{name}.json").read_text()), done.stderr)
    assert re.findall(r"image-feature store: (\d+) read, (\d+) computed", reports["stored"][1]) == [("7", "0")]
    assert "image-feature store" not in reports["fresh"][1]
    assert reports["stored"][0]["metrics"] == reports["fresh"][0]["metrics"]
    assert reports["stored"][0]["images"]["ok"] == reports["fresh"][0]["images"]["ok"] == 6
