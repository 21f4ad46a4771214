import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from modeling_mmretrieval.retrieval.metrics import (
    METRIC_NAMES,
    compute_retrieval_metrics,
    evaluate_run,
    normalize_qrels,
    normalize_run,
    rank_by_score,
)


LOG2_3 = math.log2(3)
LOG2_5 = math.log2(5)

# Myntra-style product ids; "15970" is a shirt the query wants, the others are distractors
SHIRT_QUERY_QRELS = {"navy blue casual shirt men": {"15970", "39386", "21379"}}
SHIRT_QUERY_RUN = {"navy blue casual shirt men": ["59263", "15970", "53759", "39386", "1855"]}


# ---------------------------------------------------------------------------------------------------------------
# Hand-computed cases
# ---------------------------------------------------------------------------------------------------------------


def test_binary_metrics_match_hand_computation():
    # ranks 1..5 are [miss, hit, miss, hit, miss]; 3 relevant products, "21379" is never retrieved
    metrics = compute_retrieval_metrics(SHIRT_QUERY_RUN, SHIRT_QUERY_QRELS, k_values=[1, 2, 5, 10])

    assert metrics["recall@1"] == 0.0
    assert metrics["recall@2"] == pytest.approx(1 / 3)
    assert metrics["recall@5"] == pytest.approx(2 / 3)
    assert metrics["precision@2"] == pytest.approx(1 / 2)
    assert metrics["precision@5"] == pytest.approx(2 / 5)
    # 2 hits but the cutoff is 10: precision divides by k, not by the 5 retrieved products
    assert metrics["precision@10"] == pytest.approx(2 / 10)
    assert metrics["mrr@1"] == 0.0
    assert metrics["mrr@5"] == pytest.approx(1 / 2)  # first hit at rank 2
    assert metrics["hit_rate@1"] == 0.0
    assert metrics["hit_rate@2"] == 1.0
    # AP = (P@2 + P@4) / 3 relevant = (1/2 + 2/4) / 3
    assert metrics["map"] == pytest.approx((1 / 2 + 2 / 4) / 3)
    # only the hit at rank 2 lies within the cutoff, still divided by all 3 relevant products
    assert metrics["map@2"] == pytest.approx((1 / 2) / 3)
    # DCG@5 = 1/log2(3) + 1/log2(5); ideal DCG@5 has the 3 relevant at ranks 1..3 = 1 + 1/log2(3) + 1/log2(4)
    assert metrics["ndcg@5"] == pytest.approx((1 / LOG2_3 + 1 / LOG2_5) / (1 + 1 / LOG2_3 + 1 / 2))


def test_graded_ndcg_uses_grades_and_full_judgements():
    qrels = {"q": {"a": 3, "b": 2, "c": 0, "d": 1}}
    run = {"q": ["c", "b", "a", "x"]}

    linear = compute_retrieval_metrics(run, qrels, k_values=[3], gain="linear")
    # DCG@3 = 0/1 + 2/log2(3) + 3/log2(4); ideal ranks a(3), b(2), d(1) although d was never retrieved
    ideal_linear = 3 + 2 / LOG2_3 + 1 / 2
    assert linear["ndcg@3"] == pytest.approx((2 / LOG2_3 + 3 / 2) / ideal_linear)

    exponential = compute_retrieval_metrics(run, qrels, k_values=[3], gain="exponential")
    # gains 2**grade - 1: a=7, b=3, d=1, c=0
    ideal_exponential = 7 + 3 / LOG2_3 + 1 / 2
    assert exponential["ndcg@3"] == pytest.approx((3 / LOG2_3 + 7 / 2) / ideal_exponential)

    # grade 0 is judged non-relevant: relevant are a, b, d and the first hit is b at rank 2
    assert linear["recall@3"] == pytest.approx(2 / 3)
    assert linear["mrr@3"] == pytest.approx(1 / 2)
    assert linear["precision@3"] == exponential["precision@3"] == pytest.approx(2 / 3)


def test_perfect_graded_ranking_has_ndcg_one_and_swapped_grades_less():
    qrels = {"q": {"a": 3, "b": 2, "c": 1}}
    perfect = compute_retrieval_metrics({"q": ["a", "b", "c"]}, qrels, k_values=[3])
    swapped = compute_retrieval_metrics({"q": ["b", "a", "c"]}, qrels, k_values=[3])
    assert perfect["ndcg@3"] == pytest.approx(1.0)
    # same relevant set, so every binary metric is equal; only nDCG sees the grade order
    assert swapped["ndcg@3"] < 1.0
    assert swapped["recall@3"] == perfect["recall@3"] == 1.0
    assert swapped["map"] == perfect["map"] == 1.0


def test_means_are_over_evaluated_queries_and_bookkeeping_is_reported():
    qrels = {
        "q_hit": {"p1": 1},
        "q_no_relevant": {"p2": 0},
        "q_not_in_run": {"p3": 1},
    }
    run = {"q_hit": ["p1", "p9"], "q_no_relevant": ["p2"], "q_unjudged": ["p4"]}

    evaluation = evaluate_run(run, qrels, k_values=[1])

    assert evaluation.evaluated_query_ids == ["q_hit", "q_not_in_run"]
    assert evaluation.skipped_query_ids == ["q_no_relevant"]
    assert evaluation.missing_query_ids == ["q_not_in_run"]
    assert evaluation.unjudged_query_ids == ["q_unjudged"]
    assert evaluation.num_queries == 2
    # q_hit scores 1 everywhere, the missing query scores 0 everywhere: every mean is 1/2
    assert evaluation.per_query["recall@1"] == {"q_hit": 1.0, "q_not_in_run": 0.0}
    assert set(evaluation.means) == {f"{name}@1" for name in METRIC_NAMES} | {"map"}
    assert all(value == pytest.approx(0.5) for value in evaluation.means.values())
    assert compute_retrieval_metrics(run, qrels, k_values=[1]) == evaluation.means


def test_metric_subset_and_output_names():
    metrics = compute_retrieval_metrics(
        SHIRT_QUERY_RUN, SHIRT_QUERY_QRELS, k_values=[100, 10, 10], metrics=["ndcg", "map"]
    )
    assert list(metrics) == ["ndcg@10", "ndcg@100", "map@10", "map@100", "map"]
    assert compute_retrieval_metrics(SHIRT_QUERY_RUN, SHIRT_QUERY_QRELS, metrics=["mrr"]).keys() == {
        "mrr@10",
        "mrr@100",
    }


# ---------------------------------------------------------------------------------------------------------------
# Input formats and conventions
# ---------------------------------------------------------------------------------------------------------------


def test_score_ties_are_broken_by_ascending_product_id():
    assert rank_by_score({"b": 0.5, "a": 0.5, "c": 0.9}) == ["c", "a", "b"]
    # integer ids compare numerically, not as strings
    assert rank_by_score({10: 1.0, 2: 1.0, 7: 0.0}) == [2, 10, 7]
    assert rank_by_score({"b": np.float32(0.5), "a": np.float32(0.5)}) == ["a", "b"]


def test_score_mapping_run_equals_its_ranked_list():
    scores = {"59263": 0.91, "15970": 0.87, "53759": 0.80, "39386": 0.80, "1855": 0.12}
    from_scores = compute_retrieval_metrics({"navy blue casual shirt men": scores}, SHIRT_QUERY_QRELS, k_values=[3])
    # the 0.80 tie puts "39386" before "53759"
    ranked = {"navy blue casual shirt men": ["59263", "15970", "39386", "53759", "1855"]}
    assert from_scores == compute_retrieval_metrics(ranked, SHIRT_QUERY_QRELS, k_values=[3])
    assert from_scores["precision@3"] == pytest.approx(2 / 3)


def test_binary_qrels_formats_are_equivalent_to_grade_one():
    run = {"q1": ["a", "b", "c"], "q2": np.array(["d", "e"])}
    as_sets = compute_retrieval_metrics(run, {"q1": {"b", "c"}, "q2": ["e"]}, k_values=[2])
    as_grades = compute_retrieval_metrics(run, {"q1": {"b": 1, "c": 1, "a": 0}, "q2": {"e": 1}}, k_values=[2])
    assert as_sets == as_grades
    assert normalize_qrels({"q": np.array(["x", "y"])}) == {"q": {"x": 1.0, "y": 1.0}}


def test_empty_and_short_rankings_score_zero_or_partial():
    qrels = {"q1": {"a": 1}, "q2": {"b": 1}}
    metrics = compute_retrieval_metrics({"q1": [], "q2": ["b"]}, qrels, k_values=[5])
    assert metrics["recall@5"] == pytest.approx(0.5)
    assert metrics["precision@5"] == pytest.approx((0 + 1 / 5) / 2)
    assert metrics["ndcg@5"] == pytest.approx(0.5)


def test_normalize_run_accepts_both_formats():
    assert normalize_run({"q": {"a": 0.1, "b": 0.2}, "r": ("c", "d")}) == {"q": ["b", "a"], "r": ["c", "d"]}


@pytest.mark.parametrize(
    ("run", "qrels", "kwargs", "error", "message"),
    [
        ({"q": ["a"]}, {"q": {"a"}}, {"k_values": [0]}, ValueError, "positive integer"),
        ({"q": ["a"]}, {"q": {"a"}}, {"k_values": [-3, 10]}, ValueError, "positive integer"),
        ({"q": ["a"]}, {"q": {"a"}}, {"k_values": [True]}, ValueError, "positive integer"),
        ({"q": ["a"]}, {"q": {"a"}}, {"k_values": [2.5]}, ValueError, "positive integer"),
        ({"q": ["a"]}, {"q": {"a"}}, {"k_values": []}, ValueError, "at least one cutoff"),
        ({"q": ["a"]}, {}, {}, ValueError, "qrels is empty"),
        ({"q": ["a", "b", "a"]}, {"q": {"a"}}, {}, ValueError, "more than once: \\['a'\\]"),
        ({"q": ["a"]}, {"q": {"a": -1}}, {}, ValueError, "non-negative"),
        ({"q": ["a"]}, {"q": {"a": float("nan")}}, {}, ValueError, "non-negative"),
        ({"q": {"a": float("nan")}}, {"q": {"a"}}, {}, ValueError, "real number"),
        ({"q": {"a": "high"}}, {"q": {"a"}}, {}, ValueError, "real number"),
        ({"q": {"a": 1.0, 2: 1.0}}, {"q": {"a"}}, {}, TypeError, "single type"),
        ({"q": "abc"}, {"q": {"a"}}, {}, TypeError, "sequence of product ids"),
        ({"q": ["a"]}, {"q": "a"}, {}, TypeError, "collection of relevant"),
        (["a"], {"q": {"a"}}, {}, TypeError, "run must be a mapping"),
        ({"q": ["a"]}, {"q": {"a": 0}}, {}, ValueError, "has a relevant product"),
        ({"q": ["a"]}, {"q": {"a"}}, {"metrics": ["f1"]}, ValueError, "Unknown"),
        ({"q": ["a"]}, {"q": {"a"}}, {"gain": "quadratic"}, ValueError, "gain"),
    ],
)
def test_bad_inputs_raise_clear_errors(run, qrels, kwargs, error, message):
    with pytest.raises(error, match=message):
        compute_retrieval_metrics(run, qrels, **kwargs)


@settings(max_examples=50, deadline=None)
@given(
    grades=st.lists(st.integers(min_value=1, max_value=4), min_size=1, max_size=12),
    num_distractors=st.integers(min_value=0, max_value=5),
    k=st.integers(min_value=1, max_value=20),
)
def test_ideal_ranking_scores_perfectly(grades, num_distractors, k):
    relevant = {f"p{index}": grade for index, grade in enumerate(grades)}
    ideal = sorted(relevant, key=lambda product_id: -relevant[product_id])
    run = {"q": ideal + [f"distractor{index}" for index in range(num_distractors)]}

    metrics = compute_retrieval_metrics(run, {"q": relevant}, k_values=[k])

    assert metrics[f"ndcg@{k}"] == pytest.approx(1.0)
    assert metrics["map"] == pytest.approx(1.0)
    assert metrics[f"mrr@{k}"] == metrics[f"hit_rate@{k}"] == 1.0
    assert metrics[f"recall@{k}"] == pytest.approx(min(k, len(grades)) / len(grades))
    assert metrics[f"precision@{k}"] == pytest.approx(min(k, len(grades)) / k)


# ---------------------------------------------------------------------------------------------------------------
# Agreement with trec_eval (pytrec_eval-terrier)
# ---------------------------------------------------------------------------------------------------------------


def _random_run_and_qrels(seed: int, num_queries: int = 40, num_products: int = 60):
    rng = np.random.default_rng(seed)
    run, qrels = {}, {}
    for query_index in range(num_queries):
        query_id = f"q{query_index}"
        judged = rng.choice(num_products, size=rng.integers(1, 15), replace=False)
        grades = rng.integers(0, 4, size=len(judged))
        grades[0] = max(grades[0], 1)  # trec_eval and this module disagree on queries without relevant products
        qrels[query_id] = {f"p{product}": int(grade) for product, grade in zip(judged, grades, strict=True)}
        retrieved = rng.choice(num_products, size=rng.integers(0, 30), replace=False)
        # continuous scores: no ties, whose order trec_eval breaks differently
        run[query_id] = {
            f"p{product}": float(score) for product, score in zip(retrieved, rng.random(len(retrieved)), strict=True)
        }
    return run, qrels


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_agrees_with_trec_eval_on_random_graded_runs(seed):
    pytrec_eval = pytest.importorskip(
        "pytrec_eval", reason="independent reference implementation: pip install pytrec_eval-terrier"
    )
    run, qrels = _random_run_and_qrels(seed)
    k_values = [1, 5, 10, 30]
    trec_names = {
        "recall": "recall",
        "precision": "P",
        "ndcg": "ndcg_cut",
        "map": "map_cut",
        "hit_rate": "success",
    }
    cutoffs = ",".join(str(k) for k in k_values)
    evaluator = pytrec_eval.RelevanceEvaluator(
        qrels, {f"{trec_name}.{cutoffs}" for trec_name in trec_names.values()} | {"map", "recip_rank"}
    )
    reference = evaluator.evaluate(run)

    evaluation = evaluate_run(run, qrels, k_values=k_values)

    assert evaluation.evaluated_query_ids == list(reference)
    for query_id, trec_values in reference.items():
        for name, trec_name in trec_names.items():
            for k in k_values:
                assert evaluation.per_query[f"{name}@{k}"][query_id] == pytest.approx(trec_values[f"{trec_name}_{k}"])
        assert evaluation.per_query["map"][query_id] == pytest.approx(trec_values["map"])
        # no run is longer than 30 products, so MRR@30 is trec_eval's uncut reciprocal rank
        assert evaluation.per_query["mrr@30"][query_id] == pytest.approx(trec_values["recip_rank"])

