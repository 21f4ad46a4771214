import math

import pytest

from modeling_mmretrieval.retrieval.exclusive_matches import ExclusiveMatchReport, exclusive_matches


# Two fashion queries ranked by a multimodal and a text-only model (Myntra-style product ids). The multimodal
# model finds the red dress whose title never says "red"; the text model ranks a red shirt instead.
MULTIMODAL_RUN = {
    "red floral dress": ["d-101", "d-205", "d-333", "d-412", "s-900"],
    "white sneakers men": ["f-10", "f-11", "f-12", "f-13", "f-14"],
}
TEXT_RUN = {
    "red floral dress": ["d-205", "s-777", "d-101", "s-778", "d-333"],
    "white sneakers men": ["f-11", "f-10", "f-13", "f-12", "f-99"],
}
QRELS = {
    "red floral dress": {"d-101": 2, "d-205": 1, "d-412": 1, "s-900": 0, "s-777": 0},
    "white sneakers men": {"f-10", "f-11", "f-99"},
}


def test_exclusive_products_per_query_keep_rank_order():
    report = exclusive_matches(MULTIMODAL_RUN, TEXT_RUN, k=4)

    # dress: multimodal top 4 {d-101, d-205, d-333, d-412} minus text top 4 {d-205, s-777, d-101, s-778}
    # sneakers: both top 4 are {f-10..f-13}
    assert report.multimodal_exclusive.per_query == {
        "red floral dress": ["d-333", "d-412"],
        "white sneakers men": [],
    }
    assert report.text_exclusive.per_query == {"red floral dress": ["s-777", "s-778"], "white sneakers men": []}
    assert report.multimodal_exclusive.total == 2
    assert report.multimodal_exclusive.mean_per_query == pytest.approx(2 / 2)
    assert report.num_queries == 2
    assert report.multimodal_exclusive.relevant_per_query is None
    assert report.multimodal_exclusive.relevant_share is None


def test_relevance_of_exclusive_products_with_graded_and_binary_qrels():
    report = exclusive_matches(MULTIMODAL_RUN, TEXT_RUN, qrels=QRELS, k=5)

    # dress top 5: multimodal adds d-412 (grade 1) and s-900 (grade 0); text adds s-777 (0) and s-778 (unjudged)
    # sneakers top 5: multimodal adds f-14 (unjudged); text adds f-99 (relevant)
    assert report.multimodal_exclusive.per_query == {
        "red floral dress": ["d-412", "s-900"],
        "white sneakers men": ["f-14"],
    }
    assert report.multimodal_exclusive.relevant_per_query == {"red floral dress": ["d-412"], "white sneakers men": []}
    assert report.multimodal_exclusive.num_relevant == 1
    assert report.multimodal_exclusive.relevant_share == pytest.approx(1 / 3)
    assert report.text_exclusive.relevant_per_query == {"red floral dress": [], "white sneakers men": ["f-99"]}
    assert report.text_exclusive.relevant_share == pytest.approx(1 / 3)


def test_cutoff_decides_exclusivity():
    # "d-333" is 3rd for the multimodal model and 5th for the text model
    assert (
        "d-333" in exclusive_matches(MULTIMODAL_RUN, TEXT_RUN, k=3).multimodal_exclusive.per_query["red floral dress"]
    )
    assert (
        "d-333"
        not in exclusive_matches(MULTIMODAL_RUN, TEXT_RUN, k=5).multimodal_exclusive.per_query["red floral dress"]
    )
    # k beyond the ranking length compares the full rankings
    full = exclusive_matches(MULTIMODAL_RUN, TEXT_RUN, k=1000)
    assert full.multimodal_exclusive.per_query["white sneakers men"] == ["f-14"]


def test_directions_are_symmetric():
    forward = exclusive_matches(MULTIMODAL_RUN, TEXT_RUN, qrels=QRELS, k=3)
    backward = exclusive_matches(TEXT_RUN, MULTIMODAL_RUN, qrels=QRELS, k=3)
    assert forward.multimodal_exclusive == backward.text_exclusive
    assert forward.text_exclusive == backward.multimodal_exclusive


def test_identical_runs_have_no_exclusive_matches():
    report = exclusive_matches(MULTIMODAL_RUN, MULTIMODAL_RUN, qrels=QRELS, k=5)
    assert report.multimodal_exclusive.total == report.text_exclusive.total == 0
    assert report.multimodal_exclusive.mean_per_query == 0.0
    # no exclusive product at all: the relevant share is undefined, not 0
    assert math.isnan(report.multimodal_exclusive.relevant_share)


def test_score_runs_are_ranked_with_deterministic_ties():
    multimodal_scores = {"q": {"b": 0.9, "a": 0.9, "c": 0.1}}
    text_scores = {"q": {"c": 0.8, "b": 0.3, "a": 0.2}}
    report = exclusive_matches(multimodal_scores, text_scores, k=1)
    # the 0.9 tie ranks "a" before "b"
    assert report.multimodal_exclusive.per_query == {"q": ["a"]}
    assert report.text_exclusive.per_query == {"q": ["c"]}


def test_queries_absent_from_qrels_have_no_relevant_exclusives():
    report = exclusive_matches({"q": ["a", "b"]}, {"q": ["c", "d"]}, qrels={"other": {"a"}}, k=2)
    assert report.multimodal_exclusive.per_query == {"q": ["a", "b"]}
    assert report.multimodal_exclusive.num_relevant == 0
    assert report.multimodal_exclusive.relevant_share == 0.0


def test_summary_and_str():
    report = exclusive_matches(MULTIMODAL_RUN, TEXT_RUN, qrels=QRELS, k=5)
    assert isinstance(report, ExclusiveMatchReport)
    assert report.summary() == {
        "k": 5,
        "num_queries": 2,
        "multimodal_exclusive/total": 3,
        "multimodal_exclusive/mean_per_query": 1.5,
        "multimodal_exclusive/num_relevant": 1,
        "multimodal_exclusive/relevant_share": pytest.approx(1 / 3),
        "text_exclusive/total": 3,
        "text_exclusive/mean_per_query": 1.5,
        "text_exclusive/num_relevant": 1,
        "text_exclusive/relevant_share": pytest.approx(1 / 3),
    }
    text = str(report)
    assert "top 5 over 2 queries" in text
    assert "multimodal only: 3 products, 1.50 per query, 1 relevant (33.3%)" in text

    without_qrels = exclusive_matches(MULTIMODAL_RUN, TEXT_RUN, k=5)
    assert "relevant" not in str(without_qrels)
    assert "multimodal_exclusive/num_relevant" not in without_qrels.summary()


@pytest.mark.parametrize(
    ("multimodal_run", "text_run", "k", "error", "message"),
    [
        (MULTIMODAL_RUN, TEXT_RUN, 0, ValueError, "positive integer"),
        (MULTIMODAL_RUN, TEXT_RUN, 2.0, ValueError, "positive integer"),
        (MULTIMODAL_RUN, {"red floral dress": ["d-1"]}, 5, ValueError, "same queries"),
        ({}, {}, 5, ValueError, "empty"),
        ({"q": ["a", "a"]}, {"q": ["a"]}, 5, ValueError, "more than once"),
        ({"q": ["a"]}, ["a"], 5, TypeError, "mapping"),
    ],
)
def test_bad_inputs_raise_clear_errors(multimodal_run, text_run, k, error, message):
    with pytest.raises(error, match=message):
        exclusive_matches(multimodal_run, text_run, k=k)
