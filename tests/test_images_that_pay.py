"""The pieces of the "do images pay?" evaluation and training signal: the held-out phrasing family, visual-word
stripping (training augmentation and degraded-text variant), the text-silent slice, the held-out evaluator, BM25
and the paired bootstrap."""

import json
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from example_scripts import load_example
from tiny_towers import make_batch, make_config

from modeling_mmretrieval import MultimodalRetrievalModel, MultimodalRetrievalProcessor
from modeling_mmretrieval.data import SAMPLE_DATA_DIR, CatalogueColumns, RetrievalCollator, load_catalogue, make_training_pairs
from modeling_mmretrieval.data.held_out_phrasing import HELD_OUT_MARKERS, derive_held_out_query
from modeling_mmretrieval.data.queries import derive_query, make_evaluation_queries
from modeling_mmretrieval.data.visual_words import (
    VisualWordDropout,
    VisualWords,
    degrade_product_texts,
    degraded_product_ids,
    text_is_silent_about,
)
from modeling_mmretrieval.retrieval.held_out_evaluation import HeldOutEvaluator, model_ranker
from modeling_mmretrieval.retrieval.paired_bootstrap import mean_over_seeds, paired_bootstrap
from modeling_mmretrieval.towers import get_minilm_path

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sample():
    return load_catalogue(SAMPLE_DATA_DIR)


def words_of(text: str) -> set[str]:
    return set(re.findall(r"[\w']+|,", text.lower()))


# ----- held-out phrasing ----------------------------------------------------------------------------------------------
def test_the_held_out_family_never_appears_in_training_queries(sample):
    training = []
    for seed in range(3):
        training += make_training_pairs(sample["train"], seed=seed, queries_per_product=2)["query"]
    held_out = make_evaluation_queries(sample["test"], seed=0, num_queries=300, phrase=derive_held_out_query)
    assert len(held_out) >= 250
    # Every held-out query says at least one word of the family; no training query ever says one...
    assert all(words_of(query.text) & HELD_OUT_MARKERS for query in held_out)
    brand_words = {word for brand in sample["train"]["brand"] if brand for word in words_of(brand)}
    offending = [text for text in training if (words_of(text) & HELD_OUT_MARKERS) - brand_words]
    assert not offending, offending[:5]
    # ... and no held-out text is a training text, nor a text the training phrasing gives the same product.
    training_texts = set(training)
    assert not [query.text for query in held_out if query.text in training_texts]
    assert not {query.template for query in held_out} & set(
        derive_query(row, random.Random(seed)).template for seed in range(3) for row in sample["test"].to_list()
    )


def test_held_out_queries_of_a_catalogue_with_its_own_column_names_find_their_products(sample):
    renamed = {"article_type": "category", "base_colour": "colour_name", "product_id": "sku", "title": "name"}
    shop = sample["test"].select(range(300)).rename_columns(renamed)
    columns = CatalogueColumns(product_id="sku", title="name", article_type="category", base_colour="colour_name")
    for phrase in (derive_query, derive_held_out_query):
        queries = make_evaluation_queries(shop, seed=0, num_queries=40, columns=columns, phrase=phrase)
        assert len(queries) == 40, phrase.__name__  # the held-out family used to find nothing: "article_type" keys
        assert all("category" in query.attributes and "article_type" not in query.attributes for query in queries)
        assert all(query.source_product_id in query.relevant_ids for query in queries)


def test_held_out_queries_constrain_the_attributes_training_queries_would(sample):
    for row in sample["test"].select(range(40)).to_list():
        trained = derive_query(row, random.Random(7))
        held_out = derive_held_out_query(row, random.Random(7))
        assert held_out.attributes == trained.attributes
        assert held_out.text.startswith(trained.text.split()[0]) or "," in held_out.text


# ----- visual words ---------------------------------------------------------------------------------------------------
def test_visual_words_are_stripped_whole_and_the_rest_kept():
    words = VisualWords.from_values(["Sea Green", "Navy Blue"])
    assert words.strip("Puma Men Navy Blue Striped Polo T-shirt") == "Puma Men Polo T-shirt"
    assert words.strip("Sea Green kurta with blue-green piping, black/white print") == "kurta with piping,"
    assert words.strip("Bluestone ring") == "Bluestone ring"  # a brand that contains a colour stays
    assert text_is_silent_about({"title": "Puma polo", "description": "A sporty fit"}, ["Red"], words)
    assert not text_is_silent_about({"title": "Puma polo", "description": "in bright red"}, ["Red"], words)


def test_visual_word_dropout_is_seeded_and_varies_between_epochs():
    product = {"product_id": "7", "title": "Red Checked Shirt", "description": "A red shirt"}

    def draws(seed: int) -> list[str]:
        dropout = VisualWordDropout(probability=0.5, seed=seed)
        titles = []
        for epoch in range(40):
            dropout.set_epoch(epoch)
            titles.append(dropout(product, "product_id")["title"])
            assert dropout(product, "product_id")["title"] == titles[-1]  # one draw per epoch (and resume)
        return titles

    first = draws(0)
    assert first == draws(0)  # the same seed strips the same epochs
    assert first != draws(1)
    assert set(first) == {"Red Checked Shirt", "Shirt"}  # some epochs keep the words, others strip them
    assert 10 < first.count("Shirt") < 30
    with pytest.raises(ValueError, match="probability"):
        VisualWordDropout(probability=1.5, seed=0)


def test_the_augmentation_changes_training_batches_only(sample):
    tokenizer_dir = get_minilm_path()
    processor = MultimodalRetrievalProcessor.from_towers_pretrained(tokenizer_dir)
    rows = make_training_pairs(sample["train"].select(range(16)), seed=0).to_list()
    plain = RetrievalCollator(processor, uses_images=False)(rows)
    augmented = RetrievalCollator(processor, uses_images=False,
                                  augment_product=VisualWordDropout(probability=1.0, seed=0))(rows)
    assert torch.equal(plain["query_input_ids"], augmented["query_input_ids"])
    texts = processor.tokenizer.batch_decode(augmented["product_input_ids"], skip_special_tokens=True)
    colours = {row["base_colour"].lower() for row in rows if row["base_colour"]}
    assert not any(colour in words_of(text) for text in texts for colour in colours)
    plain_texts = processor.tokenizer.batch_decode(plain["product_input_ids"], skip_special_tokens=True)
    assert any(colour in words_of(text) for text in plain_texts for colour in colours)
    # Indexing and evaluation collators are built without it: the evaluator embeds products as they are.
    assert RetrievalCollator(processor, with_queries=False, uses_images=False).augment_product is None


def test_degraded_variant_strips_a_seeded_share():
    products = [{"product_id": str(i), "title": f"Red shirt {i}"} for i in range(10)]
    chosen = degraded_product_ids([p["product_id"] for p in products], share=0.5, seed=3)
    assert len(chosen) == 5 and chosen == degraded_product_ids([p["product_id"] for p in products], 0.5, 3)
    degraded = degrade_product_texts(products, chosen, VisualWords.default(), "product_id")
    assert [p["title"].startswith("Red") for p in degraded] == [p["product_id"] not in chosen for p in products]


# ----- held-out evaluator ---------------------------------------------------------------------------------------------
def test_held_out_evaluator_slices_and_an_oracle_ranker(sample):
    evaluator = HeldOutEvaluator(sample["test"], num_queries=150, seed=0)
    assert len(evaluator.queries) == 150 and 0 < len(evaluator.silent_qrels) <= len(evaluator.visual_queries)
    products = {product["product_id"]: product for product in evaluator.products}
    for query_id, silent in evaluator.silent_qrels.items():
        query = next(q for q in evaluator.queries if q.query_id == query_id)
        colour = query.attributes.get("base_colour")
        assert silent <= query.relevant_ids
        if colour:
            assert all(not VisualWords.default().mentions(f"{products[pid]['title']} {products[pid]['description']}",
                                                          colour) for pid in silent)
    assert abs(len(evaluator.degraded_ids) - len(products) / 2) <= 1

    def oracle(catalogue, texts, k):
        by_text = {query.text: query for query in evaluator.queries}
        return [sorted(by_text[text].relevant_ids)[:k] for text in texts]

    means = evaluator.evaluate(oracle).means()
    assert means["all/ndcg@10"] == pytest.approx(1.0) and means["text_silent/recall@100"] == pytest.approx(1.0)
    assert means["degraded/num_queries"] == len(evaluator.visual_queries)


def test_a_text_only_model_cannot_find_text_silent_products_by_their_colour(sample):
    """BM25 reads only text: on the text-silent slice it finds the products by other words at best, while on all
    queries it does much better. The slice is what only an image can answer."""
    pytest.importorskip("bm25s")
    from modeling_mmretrieval.retrieval.lexical import bm25_ranker

    evaluator = HeldOutEvaluator(sample["test"], num_queries=200, seed=1)
    means = evaluator.evaluate(bm25_ranker()).means()
    assert means["all/recall@100"] > 0.3
    assert means["text_silent/ndcg@10"] < means["all/ndcg@10"]


def test_held_out_evaluator_is_a_training_evaluator(sample):
    config = make_config("text_only")
    processor = MultimodalRetrievalProcessor.from_towers_pretrained(get_minilm_path())
    config.text_config.vocab_size = processor.tokenizer.vocab_size
    config.text_config.max_position_embeddings = 128
    model = MultimodalRetrievalModel(config).train()
    evaluator = HeldOutEvaluator(sample["validation"], num_queries=60, seed=0,
                                 processor=processor, name="eval")
    metrics = evaluator(model)
    assert model.training  # restored
    assert {"eval/ndcg@10", "eval/recall@100", "eval/text_silent/ndcg@10", "eval/degraded/recall@100"} <= set(metrics)
    ranker = model_ranker(model.eval(), processor)
    assert len(ranker(evaluator.products, ["red shirt"], 5)[0]) == 5
    # Another query encoder over the same products: the model's own gives the same ranking; one that embeds other
    # texts ranks for those texts.
    from modeling_mmretrieval.retrieval.search import embed_queries

    own = model_ranker(model, processor, query_encoder=lambda texts: embed_queries(model, processor, texts))
    assert own(evaluator.products, ["red shirt", "blue jeans"], 5) == ranker(evaluator.products, ["red shirt", "blue jeans"], 5)
    swapped = model_ranker(model, processor, query_encoder=lambda texts: embed_queries(model, processor, texts[::-1]))
    assert swapped(evaluator.products, ["red shirt", "blue jeans"], 5) == ranker(evaluator.products, ["blue jeans", "red shirt"], 5)


# ----- paired bootstrap -----------------------------------------------------------------------------------------------
def test_paired_bootstrap_intervals():
    rng = random.Random(0)
    base = {f"q{i}": rng.random() for i in range(300)}
    better = {query: value + 0.05 + rng.gauss(0, 0.05) for query, value in base.items()}
    interval = paired_bootstrap(better, base, seed=1)
    assert interval.low < 0.05 < interval.high and interval.excludes_zero
    same = paired_bootstrap(base, base)
    assert same.mean_difference == same.low == same.high == 0 and not same.excludes_zero
    assert mean_over_seeds([{"q": 1.0, "r": 0.0}, {"q": 0.0}]) == {"q": 0.5}
    with pytest.raises(ValueError, match="share no query"):
        paired_bootstrap({"a": 1.0}, {"b": 1.0})


# ----- train command --------------------------------------------------------------------------------------------------
def test_train_command_defaults_and_refusals():
    from modeling_mmretrieval.commands.train import parse_args

    assert parse_args([]).visual_word_dropout == 0.0
    assert parse_args(["--visual_word_dropout", "0.3"]).visual_word_dropout == 0.3
    for flags, message in ((["--visual_word_dropout", "1.5"], "--visual_word_dropout must lie in"),
                           (["--architecture", "3tower", "--fusion", "concat"], "is not a 3tower fusion")):
        result = subprocess.run([sys.executable, str(REPO_ROOT / "examples" / "train.py"), *flags],
                                capture_output=True, text=True, timeout=120, check=False)
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


def test_residual_fusion_batch_runs_through_forward():
    config = make_config("3tower-residual")
    model = MultimodalRetrievalModel(config)
    assert torch.isfinite(model(**make_batch(config)).loss)


# ----- the comparison report ------------------------------------------------------------------------------------------
def test_the_comparison_report_pairs_rows_with_text_only_and_checks_the_targets(sample, monkeypatch):
    report = load_example("images_that_pay.py")
    rng = random.Random(0)
    queries = [f"q{i}" for i in range(200)]

    def run(shift: float) -> dict:
        per_query = {slice_name: {metric: {q: min(1.0, rng.random() * 0.5 + shift) for q in queries}
                                  for metric in ("ndcg@10", "recall@100")}
                     for slice_name in ("all", "text_silent", "degraded")}
        return {"per_query": per_query, "runs": {"all": {q: ["p1", "p2"] for q in queries}}}

    results = {report.BASELINE: [run(0.3) for _ in range(3)], report.DEFAULT_ROW: [run(0.45) for _ in range(3)]}
    summary = report.summarise(results)
    entry = summary[report.DEFAULT_ROW]["all/ndcg@10"]
    assert entry["seeds"] == 3 and entry["excludes_zero"] and entry["relative"] > 0.25
    args = report.parse_args(["--seeds", "0", "1", "2"])
    evaluator = HeldOutEvaluator(sample["test"], num_queries=20, seed=0)
    monkeypatch.setattr(sys, "argv", ["images_that_pay.py", "--rows", "text-only", report.DEFAULT_ROW, "--report_only"])
    text = report.markdown(args, summary, {}, evaluator, seconds=60.0)
    assert f"| {report.DEFAULT_ROW} | 3 |" in text and "all/ndcg@10 +0." in text and " met (needs +0.02)" in text
    # the command that produced it, copy-pastable: row names quoted, the re-reading flag left out
    assert f"python examples/images_that_pay.py --rows text-only '{report.DEFAULT_ROW}'\n" in text


def test_the_report_states_the_training_budget_and_the_tagger_accuracy_of_its_own_runs(tmp_path):
    report = load_example("images_that_pay.py")
    args = report.parse_args(["--output_dir", str(tmp_path), "--dataset", "shop/catalogue", "--max_train_steps", "250",
                              "--seeds", "0", "1"])
    assert report.training_catalogue(args) == "the training split of `shop/catalogue`"  # nothing trained yet
    assert report.tagger_accuracy(args) == ""

    def trained(row, seed, accuracy=None):
        run = report.row_dir(tmp_path, row) / f"seed{seed}"
        run.mkdir(parents=True)
        results = {"training": {"train_pairs": 33410, "completed_steps": 250}}
        if accuracy is not None:
            results["visual_tagger"] = {"held_out_accuracy": accuracy}
        (run / "results.json").write_text(json.dumps(results))

    trained(report.BASELINE, 0)
    trained(report.DEFAULT_ROW, 0, 0.612)
    trained(report.DEFAULT_ROW, 1, 0.6149)
    trained(report.DEFAULT_ROW, 2, 0.9)  # a seed this report does not include
    assert report.training_catalogue(args) == ("the training split of `shop/catalogue`: 33,410 (query, product) "
                                               "training pairs, trained for 250 steps of 32 pairs")
    assert " reads 0.61 of its held-out training products' colours right" in report.tagger_accuracy(args)
    args.seeds = [0, 2]
    assert " reads 0.61 to 0.90 of its" in report.tagger_accuracy(args)
    args.rows = [report.BASELINE]  # the default row is not in this report
    assert report.tagger_accuracy(args) == ""


def test_the_colour_ceilings_tell_every_product_or_only_those_whose_text_lacks_it():
    report = load_example("images_that_pay.py")
    products = [
        {"id": "a", "title": "Roadster Men Navy Blue Shirt", "description": "", "base_colour": "Navy Blue"},
        {"id": "b", "title": "Roadster Men Shirt", "description": "Pair it with white sneakers", "base_colour": "Red"},
        {"id": "c", "title": "Kurta", "description": None, "base_colour": None},
    ]
    seen = []

    def rank(given, texts, k):
        seen.append([product["title"] for product in given])
        return [[product["id"] for product in given][:k] for _ in texts]

    report.with_catalogue_colour(rank)(products, ["red shirt"], 3)
    report.with_catalogue_colour(rank, told="where the text lacks it")(products, ["red shirt"], 3)
    report.with_catalogue_colour(rank, told="where the text names no colour")(products, ["red shirt"], 3)
    assert seen[0] == ["Roadster Men Navy Blue Shirt Navy Blue", "Roadster Men Shirt Red", "Kurta"]
    # The second product names a colour, but not its own: it is told, the first is not ...
    assert seen[1] == ["Roadster Men Navy Blue Shirt", "Roadster Men Shirt Red", "Kurta"]
    # ... unless only the texts that name no colour at all are told, as the visual-word tagger writes.
    assert seen[2] == ["Roadster Men Navy Blue Shirt", "Roadster Men Shirt", "Kurta"]
    with pytest.raises(ValueError, match="told must be one of"):
        report.with_catalogue_colour(rank, told="some products")
    # How often a catalogue's titles name its colour column's value, among titles naming exactly one colour.
    catalogue = [*products, {"id": "d", "title": "Roadster Men Blue Jeans", "base_colour": "Navy Blue"},
                 {"id": "e", "title": "Red and White Striped Top", "base_colour": "Red"}]
    assert report.title_colour_agreement(catalogue) == (1, 2)  # "a" agrees, "d" does not; "e" names two
    # A real reader's colours instead of the catalogue's; a product it did not read is told nothing.
    report.with_catalogue_colour(rank, colour_of={"a": "blue", "b": "red"}, id_column="id")(products, ["red shirt"], 3)
    assert seen[3] == ["Roadster Men Navy Blue Shirt blue", "Roadster Men Shirt red", "Kurta"]
    # Only texts naming more than one colour ("navy blue" is one): the third product's own colour is told.
    several = [*products[:2], {"id": "e", "title": "Red and White Striped Top", "description": "", "base_colour": "Red"}]
    report.with_catalogue_colour(rank, told="where the text names several colours")(several, ["red top"], 3)
    assert seen[4] == ["Roadster Men Navy Blue Shirt", "Roadster Men Shirt", "Red and White Striped Top Red"]


def test_the_pattern_ceilings_tell_the_catalogue_pattern_alone_or_after_the_colour():
    report = load_example("images_that_pay.py")
    products = [
        {"product_id": "a", "title": "Roadster Men Shirt", "base_colour": "Navy Blue",
         "attributes": '{"Pattern": "Striped", "Fit": "Slim Fit"}'},
        {"product_id": "b", "title": "Roadster Men Shirt", "base_colour": "Red", "attributes": "not json"},
        {"product_id": "c", "title": "Kurta", "base_colour": None, "attributes": None},
    ]
    keys = report.ATTRIBUTE_CEILINGS
    assert report.catalogue_visual_values(products, keys[report.PATTERN_CEILING]) == {"a": "Striped"}
    assert report.catalogue_visual_values(products, keys[report.COLOUR_AND_PATTERN_CEILING]) == {
        "a": "Navy Blue Striped", "b": "Red"}
    seen = []

    def rank(given, texts, k):
        seen.append([product["title"] for product in given])
        return [[product["product_id"] for product in given][:k] for _ in texts]

    told = report.catalogue_visual_values(products, keys[report.COLOUR_AND_PATTERN_CEILING])
    report.with_catalogue_colour(rank, colour_of=told)(products, ["striped shirt"], 3)
    assert seen == [["Roadster Men Shirt Navy Blue Striped", "Roadster Men Shirt Red", "Kurta"]]
    assert set(report.ATTRIBUTE_CEILING_FILES) == set(keys) and all(row in report.ROW_NOTES for row in keys)


def test_the_image_pairs_learn_from_the_rows_training_catalogue_not_the_shared_one():
    report = load_example("images_that_pay.py")
    assert report.training_dataset(report.parse_args([])) == str(SAMPLE_DATA_DIR)  # as examples/train.py defaults
    assert report.training_dataset(report.parse_args(["--dataset", "shop"])) == "shop"


def test_the_colour_vocabulary_has_the_catalogue_values_and_no_pattern_words():
    colours = VisualWords.colours(["Sea Green", "Mushroom  Brown"])
    assert colours.pattern.search("Striped Sea Green Kurta").group(0) == "Sea Green"
    assert colours.pattern.search("Roadster Men Striped Polo") is None  # "striped" is a pattern, not a colour
    assert VisualWords.from_values(()).pattern.search("Roadster Men Striped Polo") is not None
    assert "mushroom brown" in colours.phrases and colours.phrases.index("sea green") < colours.phrases.index("green")


def test_visual_words_keep_unrelated_joiners_and_agree_with_silence():
    words = VisualWords.from_values(["Off White"])
    assert words.strip("Reid & Taylor Black Suit") == "Reid & Taylor Suit"
    assert words.strip("Off-White shirt") == "shirt" and words.mentions("Off-White shirt", "Off White")
    assert not text_is_silent_about({"title": "Off-White shirt"}, ["Off White"], words)


def test_text_silent_recall_ranks_past_the_other_relevant_products(sample):
    """The slice leaves the other relevant products out of the ranking: silent products ranked below them must
    move up into the top k rather than be cut off with them."""
    evaluator = HeldOutEvaluator(sample["test"], num_queries=150, seed=0, k_values=(10,))
    by_text = {query.text: query for query in evaluator.queries}

    def others_first(catalogue, texts, k):
        ranked = []
        for text in texts:
            query = by_text[text]
            silent = evaluator.silent_qrels.get(query.query_id, set())
            ranked.append((sorted(query.relevant_ids - silent) + sorted(silent))[:k])
        return ranked

    means = evaluator.evaluate(others_first).means()
    assert means["text_silent/recall@10"] == pytest.approx(
        sum(min(1.0, 10 / len(s)) for s in evaluator.silent_qrels.values()) / len(evaluator.silent_qrels))


def test_the_reader_paragraph_lines_up_the_told_colours_accuracy_with_the_gain():
    report = load_example("images_that_pay.py")
    tagger_row, corrected_row = report.READER_ROWS
    summary = {
        tagger_row: {"reader_accuracy": 0.64, "all/ndcg@10": {"difference": "-0.023 [-0.031, -0.015]"}},
        corrected_row: {"reader_accuracy": 0.82, "all/ndcg@10": {"difference": "+0.009 [+0.001, +0.016]"}},
        report.COLOUR_CEILING: {"all/ndcg@10": {"difference": "+0.031 [+0.023, +0.040]"}},
    }
    products = [{"title": "Roadster Men Navy Blue Shirt", "base_colour": "Navy Blue"},
                {"title": "Roadster Men Black Jeans", "base_colour": "Grey"}]
    paragraph = report.reader_paragraph(summary, products)
    assert ("right on 0.64: -0.023 [-0.031, -0.015]; right on 0.82: +0.009 [+0.001, +0.016]; right on 1.00: +0.031 "
            "[+0.023, +0.040]") in paragraph
    assert "on 0.50 of the 2 test products whose title names one colour" in paragraph
    assert report.reader_paragraph({report.COLOUR_CEILING: summary[report.COLOUR_CEILING]}, products) == ""


def test_an_evaluator_for_choosing_settings_can_phrase_queries_as_training_does(sample):
    held_out = HeldOutEvaluator(sample["test"], num_queries=40, seed=0)
    choosing = HeldOutEvaluator(sample["test"], num_queries=40, seed=0, phrase=derive_query)
    training_phrased = make_evaluation_queries(sample["test"], seed=0, num_queries=40)
    assert [query.text for query in choosing.queries] == [query.text for query in training_phrased]
    assert {query.text for query in choosing.queries}.isdisjoint(query.text for query in held_out.queries)
    assert repr(choosing).endswith(", phrase=derive_query)") and "phrase" not in repr(held_out)


def test_a_cached_branch_weight_choice_chooses_among_todays_candidates():
    report = load_example("images_that_pay.py")
    figures = {"0.25": 0.80, "0.5": 0.82, "0.75": 0.83, "1.0": 0.81, "1.5": 0.85, "2.0": 0.84}
    assert report.chosen_among_candidates({"validation": figures}) == 0.75  # 1.5 is no candidate today
    assert report.chosen_among_candidates({"validation": {"0.5": 0.9, "1.0": 0.8}}) is None  # chosen again
