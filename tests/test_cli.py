"""End-to-end tests of examples/evaluate.py and examples/search.py, run as subprocesses on the committed sample,
and of the `mmretrieval` console entry that dispatches to the same commands.

Two checkpoints: the real all-MiniLM-L6-v2 as a text-only retriever (so rankings mean something) and a tiny random
4tower concat model (MiniLM and CLIP tokenizers, 28 px CLIP image processor) for image queries and comparisons.
Each subprocess pays the torch/transformers import, so the slower cases are marked `slow`.
"""

import json
import re
import select
import signal
import subprocess
import sys
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from tiny_towers import make_config
from transformers import AutoTokenizer, CLIPImageProcessorPil

from modeling_mmretrieval import MultimodalRetrievalModel, MultimodalRetrievalProcessor
from modeling_mmretrieval.data import SAMPLE_DATA_DIR, load_catalogue, make_evaluation_queries
from modeling_mmretrieval.retrieval.metrics import compute_retrieval_metrics
from modeling_mmretrieval.towers import MissingOfflineTowerError, build_clip_tokenizer, get_minilm_path
from modeling_mmretrieval.retrieval.search import config_fingerprint

REPO_ROOT = Path(__file__).resolve().parents[1]
EXAMPLES_DIR = REPO_ROOT / "examples"
SPLIT = "test"
NUM_PRODUCTS = 40
SUBPROCESS_TIMEOUT_S = 300
HTTP_TIMEOUT_S = 30
# Product titles are short; a shorter product text keeps MiniLM indexing fast on small CPUs.
MAX_PRODUCT_LENGTH = 32
IMAGE_SIZE = 28
CATALOGUE_ARGS = ("--dataset", SAMPLE_DATA_DIR, "--split", SPLIT, "--max_products", NUM_PRODUCTS)


def example_command(script: str, *args) -> list[str]:
    return [sys.executable, str(EXAMPLES_DIR / script), *(str(arg) for arg in args)]


def run_example(script: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run(
        example_command(script, *args), cwd=REPO_ROOT, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S,
        check=False,
    )


def succeeded(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    output = f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert result.returncode == 0, f"exit status {result.returncode}\n{output}"
    return result


def refused(result: subprocess.CompletedProcess) -> str:
    """The one-line error of a command that must fail cleanly (status 2, no traceback)."""
    assert result.returncode == 2, f"exit status {result.returncode}\nstderr:\n{result.stderr}"
    assert "Traceback" not in result.stderr
    return result.stderr


def index_file_stamps(index_dir) -> dict:
    return {path.name: (path.stat().st_ino, path.stat().st_mtime_ns) for path in index_dir.iterdir()}


@pytest.fixture(scope="module")
def catalogue():
    full = load_catalogue(SAMPLE_DATA_DIR, split=SPLIT)
    return full.select(range(NUM_PRODUCTS))


@pytest.fixture(scope="module")
def titles(catalogue):
    return dict(zip(catalogue["product_id"], catalogue["title"], strict=True))


@pytest.fixture(scope="module")
def minilm_path():
    try:
        return get_minilm_path()
    except MissingOfflineTowerError as error:
        pytest.skip(str(error))


@pytest.fixture(scope="module")
def text_checkpoint(tmp_path_factory, minilm_path):
    """all-MiniLM-L6-v2 as a text-only retriever (mean pooling, no projection), saved as a checkpoint."""
    folder = tmp_path_factory.mktemp("minilm-text-only")
    model = MultimodalRetrievalModel.from_towers_pretrained(minilm_path, pooling="mean", projection_dim=None)
    processor = MultimodalRetrievalProcessor.from_towers_pretrained(
        minilm_path, config=model.config, max_product_length=MAX_PRODUCT_LENGTH
    )
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def image_checkpoint(tmp_path_factory, minilm_path):
    """A tiny random 4tower concat retriever with real tokenizers, able to answer image queries."""
    folder = tmp_path_factory.mktemp("tiny-4tower")
    try:
        clip_tokenizer = AutoTokenizer.from_pretrained(build_clip_tokenizer(folder / "clip-tokenizer"))
    except MissingOfflineTowerError as error:
        pytest.skip(str(error))
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    config = make_config("4tower-concat")
    config.text_config.vocab_size = len(tokenizer)
    config.dual_encoder_config.text_config.vocab_size = len(clip_tokenizer)
    # The tiny towers hold 64 positions.
    processor = MultimodalRetrievalProcessor(
        tokenizer,
        image_processor=CLIPImageProcessorPil(
            size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
        ),
        dual_tokenizer=clip_tokenizer,
        max_query_length=32,
        max_product_length=64,
        max_dual_length=64,
    )
    MultimodalRetrievalModel(config).save_pretrained(folder / "checkpoint")
    processor.save_pretrained(folder / "checkpoint")
    return folder / "checkpoint"


@pytest.fixture(scope="module")
def built_index(tmp_path_factory, text_checkpoint, titles):
    """A MiniLM index built by search.py, with the outcome of that first run."""
    index_dir = tmp_path_factory.mktemp("indexes") / "minilm"
    query = titles["10275"]  # "Clarks Men Black Leather Derbys"
    result = succeeded(
        run_example(
            "search.py", "--model_name_or_path", text_checkpoint, *CATALOGUE_ARGS, "--index_dir", index_dir,
            "--query", query, "--top_k", 5, "--output_format", "json",
        )
    )
    return index_dir, query, result


# --- evaluate.py -----------------------------------------------------------------------------------------------


def test_evaluate_report_matches_its_run_and_compares_to_text_only(
    tmp_path, catalogue, image_checkpoint, text_checkpoint
):
    report_path, run_path, queries_path = tmp_path / "report.json", tmp_path / "run.json", tmp_path / "queries.json"
    result = succeeded(
        run_example(
            "evaluate.py", "--model_name_or_path", image_checkpoint, *CATALOGUE_ARGS, "--num_queries", 15,
            "--seed", 3, "--k_values", 5, 10, "--compare_to", text_checkpoint, "--exclusive_k", 5,
            "--output_file", report_path, "--save_run", run_path, "--save_queries", queries_path,
        )
    )
    report = json.loads(report_path.read_text())
    run = json.loads(run_path.read_text())
    saved_queries = json.loads(queries_path.read_text())

    assert report["model_id"] == str(image_checkpoint.resolve())
    assert (report["architecture"], report["fusion"]) == ("4tower", "concat")
    loaded_config = MultimodalRetrievalModel.from_pretrained(image_checkpoint).config
    assert report["config_hash"] == config_fingerprint(loaded_config)
    assert report["config"]["architecture"] == "4tower"
    assert report["dataset"] == {"source": str(SAMPLE_DATA_DIR), "split": SPLIT, "num_products": NUM_PRODUCTS}
    assert report["queries"] == {"source": "attribute-derived", "seed": 3, "num_requested": 15}
    assert report["k_values"] == [5, 10]
    assert report["run_file"] == str(run_path)
    assert report["wall_time_seconds"] > 0

    # The CLI evaluated exactly the seeded attribute-derived queries of the catalogue slice.
    expected_queries = make_evaluation_queries(catalogue, seed=3, num_queries=15)
    assert [query["text"] for query in saved_queries] == [query.text for query in expected_queries]
    assert report["num_queries"] == report["metrics"]["num_queries"] == len(expected_queries) > 0

    # Every ranking holds max(k) distinct catalogue products, and the reported metrics are those of the saved run.
    catalogue_ids = set(catalogue["product_id"])
    assert set(run) == {query["query_id"] for query in saved_queries}
    for ranking in run.values():
        assert len(ranking) == len(set(ranking)) == 10 and set(ranking) <= catalogue_ids
    qrels = {query["query_id"]: set(query["relevant_ids"]) for query in saved_queries}
    recomputed = compute_retrieval_metrics(run, qrels, k_values=(5, 10))
    for name, value in recomputed.items():
        assert report["metrics"][name] == pytest.approx(value), name
        assert 0.0 <= value <= 1.0

    comparison = report["comparison"]
    assert comparison["model_id"] == str(text_checkpoint.resolve())
    assert comparison["architecture"] == "text_only"
    # Real MiniLM ranks attribute queries far better than a random tiny model.
    assert comparison["metrics"]["mrr@10"] > report["metrics"]["mrr@10"] + 0.2
    exclusive = comparison["exclusive_matches"]
    assert exclusive["k"] == 5 and exclusive["num_queries"] == report["num_queries"]
    # Two top-5 lists over 40 products: each holds as many products missing from the other as the reverse.
    assert exclusive["multimodal_exclusive/total"] == exclusive["text_exclusive/total"] <= 5 * report["num_queries"]
    for direction in ("multimodal_exclusive", "text_exclusive"):
        assert 0 <= exclusive[f"{direction}/num_relevant"] <= exclusive[f"{direction}/total"]

    assert "recall@10" in result.stdout and "Exclusive matches in the top 5" in result.stdout


@pytest.mark.slow
def test_evaluate_reads_a_queries_file_and_reports_the_colour_slice(tmp_path, titles, text_checkpoint):
    # Each query is a product's exact title; MiniLM should rank that product first.
    product_ids = sorted(titles)[:8]
    records = [
        {"query_id": f"title-{product_id}", "text": titles[product_id], "relevant_ids": [product_id],
         "colour_absent_from_titles": position % 2 == 0}
        for position, product_id in enumerate(product_ids)
    ]
    queries_file = tmp_path / "queries.json"
    queries_file.write_text(json.dumps(records))
    report_path = tmp_path / "report.json"
    succeeded(
        run_example(
            "evaluate.py", "--model_name_or_path", text_checkpoint, *CATALOGUE_ARGS, "--queries_file", queries_file,
            "--k_values", 1, 10, "--output_file", report_path,
        )
    )
    report = json.loads(report_path.read_text())
    assert report["queries"] == {"source": str(queries_file)}
    assert report["num_queries"] == len(records)
    assert report["metrics"]["recall@10"] == 1.0
    assert report["metrics"]["mrr@10"] >= 0.9
    colour_slice = report["slices"]["colour_not_in_title"]
    assert colour_slice["num_queries"] == len(records) // 2
    assert 0.0 <= colour_slice["recall@1"] <= 1.0
    assert report["comparison"] is None


@pytest.mark.slow
def test_evaluate_refuses_a_malformed_queries_file(tmp_path, text_checkpoint):
    queries_file = tmp_path / "queries.json"
    queries_file.write_text(json.dumps([{"query_id": "q1", "text": "red shirt"}]))
    stderr = refused(
        run_example(
            "evaluate.py", "--model_name_or_path", text_checkpoint, *CATALOGUE_ARGS, "--queries_file", queries_file
        )
    )
    assert "relevant_ids" in stderr


# --- search.py -------------------------------------------------------------------------------------------------


def test_search_builds_an_index_and_ranks_the_titled_product_first(built_index, titles):
    index_dir, query, result = built_index
    assert f"Built an index of {NUM_PRODUCTS} products" in result.stderr
    assert (index_dir / "index_meta.json").is_file()
    (search,) = json.loads(result.stdout)
    assert (search["query"], search["kind"]) == (query, "text")
    ranked = search["results"]
    assert [record["rank"] for record in ranked] == [1, 2, 3, 4, 5]
    scores = [record["score"] for record in ranked]
    assert scores == sorted(scores, reverse=True)
    assert all(record["title"] == titles[record["product_id"]] for record in ranked)
    assert ranked[0]["product_id"] == "10275"


def test_search_reuses_a_saved_index_without_rebuilding_it(built_index, text_checkpoint):
    index_dir, query, first = built_index
    stamps = index_file_stamps(index_dir)
    # No --dataset: a reused index needs no catalogue.
    result = succeeded(
        run_example(
            "search.py", "--model_name_or_path", text_checkpoint, "--index_dir", index_dir, "--query", query,
            "--top_k", 5, "--output_format", "json",
        )
    )
    assert f"Loaded the index of {NUM_PRODUCTS} products" in result.stderr
    assert "Built an index" not in result.stderr and "Catalogue:" not in result.stderr
    assert index_file_stamps(index_dir) == stamps
    assert json.loads(result.stdout) == json.loads(first.stdout)


@pytest.mark.slow
def test_search_refuses_an_index_built_by_another_model(built_index, image_checkpoint):
    index_dir, query, _ = built_index
    stamps = index_file_stamps(index_dir)
    stderr = refused(
        run_example("search.py", "--model_name_or_path", image_checkpoint, "--index_dir", index_dir, "--query", query)
    )
    assert "model_fingerprint" in stderr and "--rebuild_index" in stderr
    assert index_file_stamps(index_dir) == stamps


@pytest.mark.slow
def test_image_search_ranks_the_product_with_that_image_first(tmp_path, catalogue, titles, image_checkpoint):
    product = catalogue[3]
    image_path = tmp_path / "query.jpg"
    image_path.write_bytes(product["image"]["bytes"])
    result = succeeded(
        run_example(
            "search.py", "--model_name_or_path", image_checkpoint, *CATALOGUE_ARGS, "--image", image_path,
            "--top_k", 4, "--output_format", "json",
        )
    )
    (search,) = json.loads(result.stdout)
    assert search["kind"] == "image"
    ranked = search["results"]
    assert ranked[0]["product_id"] == product["product_id"]
    assert ranked[0]["title"] == titles[product["product_id"]]
    scores = [record["score"] for record in ranked]
    assert scores == sorted(scores, reverse=True)


@pytest.mark.slow
def test_text_only_model_refuses_image_queries_clearly(tmp_path, built_index, catalogue, text_checkpoint):
    index_dir, _, _ = built_index
    image_path = tmp_path / "query.jpg"
    image_path.write_bytes(catalogue[0]["image"]["bytes"])
    stderr = refused(
        run_example(
            "search.py", "--model_name_or_path", text_checkpoint, "--index_dir", index_dir, "--image", image_path
        )
    )
    assert "architecture='text_only'" in stderr and "Image queries need a 4tower" in stderr


@pytest.mark.slow
def test_search_serves_the_demo_until_interrupted(built_index, text_checkpoint, titles):
    index_dir, query, _ = built_index
    command = example_command(
        "search.py", "--model_name_or_path", text_checkpoint, *CATALOGUE_ARGS, "--index_dir", index_dir,
        "--serve", "--port", 0,
    )
    server = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ready, _, _ = select.select([server.stdout], [], [], SUBPROCESS_TIMEOUT_S)
        assert ready, "the demo did not start in time"
        url = re.search(r"http://127\.0\.0\.1:\d+/", server.stdout.readline()).group(0)
        search_url = f"{url}api/search?{urllib.parse.urlencode({'q': query, 'k': 3})}"
        with urllib.request.urlopen(search_url, timeout=HTTP_TIMEOUT_S) as response:
            results = json.loads(response.read())["results"]
        assert results[0]["product_id"] == "10275"
        assert all(result["title"] == titles[result["product_id"]] for result in results)
        server.send_signal(signal.SIGINT)
        server.communicate(timeout=HTTP_TIMEOUT_S)
        assert server.returncode == 0
    finally:
        if server.poll() is None:
            server.kill()
            server.communicate()


# --- The `mmretrieval` console entry ----------------------------------------------------------------------------


def run_module_entry(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "modeling_mmretrieval", *args], cwd=REPO_ROOT, capture_output=True, text=True,
        timeout=SUBPROCESS_TIMEOUT_S, check=False,
    )


def test_setup_declares_the_console_entry_and_the_installed_one_runs_cli_main():
    from importlib.metadata import entry_points

    from modeling_mmretrieval import cli

    assert '"mmretrieval=modeling_mmretrieval.cli:main"' in (REPO_ROOT / "setup.py").read_text(encoding="utf-8")
    installed = entry_points(group="console_scripts", name="mmretrieval")
    if not installed:
        pytest.skip("the package is not installed (pip install -e .)")
    # An install made before the entry moved to cli.py points at __main__.main, which is the same function.
    assert next(iter(installed)).load() is cli.main


def test_module_entry_lists_every_command_and_dispatches_to_one():
    listed = succeeded(run_module_entry("--help")).stdout
    for command in ("train", "index", "search", "evaluate", "data-stats", "align-pair", "convert-dinov2"):
        assert f"\n  {command} " in listed

    command_help = succeeded(run_module_entry("data-stats", "--help")).stdout
    assert command_help.startswith("usage: mmretrieval data-stats") and "--num-queries" in command_help


def test_unknown_or_missing_command_exits_2_with_one_line(capsys):
    from modeling_mmretrieval.cli import main

    assert main(["frobnicate"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "unknown command 'frobnicate'" in error and "search" in error
    assert main([]) == 2
    assert "usage: mmretrieval <command>" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["train", "index", "search", "evaluate", "data-stats", "align-pair",
                                     "convert-dinov2"])
def test_every_command_answers_help_with_its_own_usage(command, capsys):
    from modeling_mmretrieval.cli import main

    assert main([command, "--help"]) == 0
    usage = capsys.readouterr().out
    assert usage.startswith("usage: ") and "--help" in usage


def test_command_usage_errors_become_exit_statuses(capsys):
    from modeling_mmretrieval.cli import main

    assert main(["convert-dinov2", "--check-parity", "-1"]) == 2
    assert "mmretrieval convert-dinov2: error: --check-parity must be >= 0" in capsys.readouterr().err
    assert main(["search", "--model_name_or_path", "unused"]) == 2
    assert "give --query, --image or --serve" in capsys.readouterr().err
