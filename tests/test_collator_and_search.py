
import datasets
import numpy as np
import pytest
import torch
from tiny_towers import IMAGE_SIZE, make_config
from transformers import AutoTokenizer, CLIPImageProcessorPil

from modeling_mmretrieval import MultimodalRetrievalModel, MultimodalRetrievalProcessor
from modeling_mmretrieval.data.collator import RetrievalCollator
from modeling_mmretrieval.data import SAMPLE_DATA_DIR, load_catalogue, make_evaluation_queries, make_training_pairs
from modeling_mmretrieval.retrieval.evaluator import RetrievalEvaluator
from modeling_mmretrieval.data.images import ImageDecodeError
from modeling_mmretrieval.retrieval.index import ProductIndex
from modeling_mmretrieval.retrieval.index_files import IndexModelMismatchError
from modeling_mmretrieval.towers import get_minilm_path
from modeling_mmretrieval.retrieval.search import build_product_index, embed_queries, model_fingerprint, search_text
from modeling_mmretrieval.training.image_feature_cache import precompute_image_features


@pytest.fixture(scope="module")
def catalogue():
    return load_catalogue(SAMPLE_DATA_DIR, split="validation").select(range(48))


@pytest.fixture(scope="module")
def tiny_3tower():
    tokenizer = AutoTokenizer.from_pretrained(get_minilm_path())
    config = make_config("3tower-dinov2")
    config.text_config.vocab_size = tokenizer.vocab_size
    config.text_config.max_position_embeddings = 128
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    processor = MultimodalRetrievalProcessor(tokenizer, image_processor, max_product_length=48)
    return MultimodalRetrievalModel(config).eval(), processor


@pytest.fixture(scope="module")
def minilm_text_only():
    path = get_minilm_path()
    model = MultimodalRetrievalModel.from_towers_pretrained(path).eval()
    return model, MultimodalRetrievalProcessor.from_towers_pretrained(path, config=model.config)


def test_collator_decodes_real_images_lazily_and_feeds_the_model(catalogue, tiny_3tower):
    model, processor = tiny_3tower
    pairs = make_training_pairs(catalogue, seed=0)
    # Rows keep encoded bytes: nothing is decoded before the collator runs.
    assert isinstance(pairs[0]["image"]["bytes"], bytes)
    collator = RetrievalCollator(processor)
    batch = collator([pairs[i] for i in range(6)])
    assert batch["image_mask"].all()
    assert batch["pixel_values"].shape == (6, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert batch["query_input_ids"].shape[0] == 6 and batch["product_input_ids"].shape[0] == 6
    output = model(**batch)
    assert torch.isfinite(output.loss)


def test_broken_images_become_image_less_or_raise_with_the_product_named(catalogue, tiny_3tower):
    _, processor = tiny_3tower
    rows = make_training_pairs(catalogue, seed=0).select(range(3)).to_list()
    rows[1]["image"] = {"bytes": b"\xff\xd8 definitely not a jpeg", "path": None}
    rows[2]["image"] = None
    collator = RetrievalCollator(processor)
    batch = collator(rows)
    assert batch["image_mask"].tolist() == [True, False, False]
    assert collator.image_problems == 2
    with pytest.raises(ImageDecodeError, match=repr(rows[1]["product_id"])):
        RetrievalCollator(processor, on_image_error="raise")(rows)


def test_collator_appends_hard_negatives_after_the_positives(catalogue, tiny_3tower):
    _, processor = tiny_3tower
    rows = make_training_pairs(catalogue, seed=0).select(range(4)).to_list()
    others = catalogue.select(range(40, 48)).to_list()
    collator = RetrievalCollator(processor, hard_negatives=lambda row: others[:2], num_hard_negatives=2)
    batch = collator(rows)
    assert batch["product_input_ids"].shape[0] == 4 + 4 * 2
    assert batch["image_mask"].shape == (12,)
    first_negative = processor.encode_products([others[0]])["input_ids"][0]
    length = int((first_negative != 0).sum())
    assert torch.equal(batch["product_input_ids"][4, :length], first_negative[:length])


def test_collator_reports_a_missing_query_column(catalogue, tiny_3tower):
    _, processor = tiny_3tower
    with pytest.raises(KeyError, match="Query column 'query' is missing"):
        RetrievalCollator(processor)(catalogue.select(range(2)).to_list())


def test_cached_image_features_give_the_same_batch_loss(catalogue, tiny_3tower):
    model, processor = tiny_3tower
    rows = make_training_pairs(catalogue, seed=0).select(range(5)).to_list()
    plain = RetrievalCollator(processor)(rows)
    features = model.get_image_features(plain["pixel_values"], plain["image_mask"])
    cache = {row["product_id"]: feature for row, feature in zip(rows, features)}
    cached = RetrievalCollator(processor, image_features=cache)(rows)
    assert "pixel_values" not in cached
    with torch.no_grad():
        assert torch.equal(model(**plain).loss, model(**cached).loss)


def test_text_search_finds_the_product_a_title_describes(catalogue, minilm_text_only, tmp_path):
    model, processor = minilm_text_only
    index = build_product_index(model, processor, catalogue, output_dir=tmp_path / "index", show_progress=False)
    assert len(index) == len(catalogue)
    titles = catalogue["title"][:8]
    scores, ids = search_text(model, processor, index, titles, k=5)
    assert [ranked[0] for ranked in ids] == catalogue["product_id"][:8]
    assert torch.all(scores[:, :-1] >= scores[:, 1:])
    reloaded = ProductIndex.load(tmp_path / "index", expected_model_fingerprint=model_fingerprint(model))
    assert reloaded.search(embed_queries(model, processor, titles[:1]), k=1)[1][0][0] == ids[0][0]
    other = MultimodalRetrievalModel(make_config("text_only"))
    with pytest.raises(IndexModelMismatchError):
        ProductIndex.load(tmp_path / "index", expected_model_fingerprint=model_fingerprint(other))


def test_evaluator_reports_perfect_scores_for_title_queries(catalogue, minilm_text_only):
    from modeling_mmretrieval.data import EvaluationQuery

    model, processor = minilm_text_only
    queries = [
        EvaluationQuery(query_id=f"t{i}", text=row["title"], attributes={}, relevant_ids={row["product_id"]},
                        source_product_id=row["product_id"], colour_absent_from_titles=False,
                        template="title")
        for i, row in enumerate(catalogue.select(range(10)))
    ]
    evaluator = RetrievalEvaluator(catalogue, queries, processor, k_values=(1, 10), name="titles")
    results = evaluator(model)
    assert results["titles/recall@1"] == pytest.approx(1.0)
    assert results["titles/mrr@10"] == pytest.approx(1.0)
    assert results["titles/num_queries"] == 10
    assert "titles" in repr(evaluator) and "queries=10" in repr(evaluator)


def test_evaluation_with_cached_image_features_skips_the_image_tower(catalogue, tiny_3tower):
    model, processor = tiny_3tower
    cache = precompute_image_features(model, processor, catalogue, show_progress=False)
    queries = make_evaluation_queries(catalogue, seed=0, num_queries=20)
    live = RetrievalEvaluator(catalogue, queries, processor, k_values=(1, 10), name="eval")
    cached = RetrievalEvaluator(catalogue, queries, processor, k_values=(1, 10), name="eval", image_features=cache)

    vision_runs = []
    hook = model.vision_model.register_forward_hook(lambda *_: vision_runs.append(1))
    try:
        live_rankings = live.rankings(model)
        runs_live = len(vision_runs)
        cached_rankings = cached.rankings(model)
    finally:
        hook.remove()
    assert runs_live > 0 and len(vision_runs) == runs_live  # the cached evaluation never ran the tower
    assert cached_rankings == live_rankings
    assert cached.compute(cached_rankings) == live.compute(live_rankings)
    # A product the cache does not know is an error, not a silently image-less product.
    partial = {product_id: cache[product_id] for product_id in list(cache)[1:]}
    with pytest.raises(KeyError, match="No cached image features"):
        build_product_index(model, processor, catalogue, image_features=partial, show_progress=False)


def test_cached_features_serve_a_catalogue_with_integer_product_ids(catalogue, tiny_3tower):
    model, processor = tiny_3tower
    numbered = catalogue.select(range(12)).cast_column("product_id", datasets.Value("int64"))
    cache = precompute_image_features(model, processor, numbered, show_progress=False)
    live = build_product_index(model, processor, numbered, show_progress=False)
    cached = build_product_index(model, processor, numbered, image_features=cache, show_progress=False)
    assert cached.ids == live.ids and all(isinstance(product_id, int) for product_id in cached.ids)
    np.testing.assert_allclose(cached.embeddings, live.embeddings, atol=1e-5)


def test_false_negatives_are_products_matching_another_query(catalogue, tiny_3tower):
    import json

    from modeling_mmretrieval.data import product_matches

    _, processor = tiny_3tower
    rows = make_training_pairs(catalogue, seed=0).select(range(24)).to_list()
    mask = RetrievalCollator(processor)(rows)["false_negative_mask"]
    assert mask.shape == (24, 24) and not mask.diagonal().any()
    for i, row in enumerate(rows):
        attributes = json.loads(row["query_attributes"])
        for j, product in enumerate(rows):
            if j != i:
                assert bool(mask[i, j]) == product_matches(product, attributes), (row["query"], product["title"])
    assert RetrievalCollator(processor, mask_false_negatives=False)(rows).get("false_negative_mask") is None


def test_held_out_evaluation_counts_each_catalogue_image_once(catalogue, tiny_3tower):
    from modeling_mmretrieval.data.images import ImageReport
    from modeling_mmretrieval.retrieval.held_out_evaluation import HeldOutEvaluator

    model, processor = tiny_3tower
    rows = catalogue.to_list()
    rows[0]["image"] = {"bytes": None, "path": "https://cdn.example/0.jpg"}  # refused without --fetch_images
    rows[1]["image"] = None
    report = ImageReport()
    evaluator = HeldOutEvaluator(rows, num_queries=10, seed=0, processor=processor, image_report=report)
    metrics = evaluator(model)
    evaluator(model)  # the clean and the degraded catalogue, twice: still one count per product
    assert metrics["heldout/num_queries"] > 0
    assert (report.total, report.counts["ok"], report.counts["missing"], report.counts["refused"]) == (48, 46, 1, 1)
    assert evaluator.image_report is report
