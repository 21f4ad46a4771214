"""Model cards and Hub uploads: the card's YAML as the Hub reads it, no local path in a saved checkpoint, the lineage of
a fine-tuned model, and `push_to_hub` of the model (the package's card, not transformers' placeholder) and of the
processor (transformers' own upload, every keyword kept), against the local Hub of `tests/hub_server.py`.

Towers are tiny (a 2-layer BERT with the real all-MiniLM-L6-v2 tokenizer, a 1-layer DINOv2 on 28 px images) and
saved under the test's temporary folder, so every absolute path a checkpoint could leak is known; the catalogue is
a slice of the committed sample (real JPEG product photos).
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from huggingface_hub import ModelCard
from hub_server import MiniHub
from tiny_towers import make_config, save_tiny_pretrained_towers
from transformers import AutoTokenizer

from modeling_mmretrieval import MultimodalRetrievalModel, MultimodalRetrievalProcessor
from modeling_mmretrieval.commands import train as train_command
from modeling_mmretrieval.configuration_mmretrieval import without_local_paths
from modeling_mmretrieval.data import SAMPLE_DATA_DIR
from modeling_mmretrieval.modeling_mmretrieval import card_for_repo, is_package_model_card
from modeling_mmretrieval.towers import get_minilm_path
from modeling_mmretrieval.training.model_builder import OFFLINE_TOWERS
from modeling_mmretrieval.training.model_card import (
    HUB_LICENSES,
    INITIAL_CHECKPOINT_ROLE,
    TOWER_LICENSES,
    ModelCardInfo,
    dataset_reference,
    default_license,
    public_name,
    render_model_card,
    usage_repo_id,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
MINILM = OFFLINE_TOWERS["minilm"][1]
DINOV2_OFFLINE = OFFLINE_TOWERS["dinov2-small"][1]
IMAGE_SIZE = 28
AFTER = {"eval/recall@10": 0.4375, "eval/recall@100": 0.8125, "eval/ndcg@10": 0.3125, "eval/mrr@10": 0.25,
         "eval/map": 0.2, "eval/num_queries": 30, "eval/text_silent/recall@10": 0.125}
BEFORE = {"eval/recall@10": 0.125, "eval/ndcg@10": 0.0625}


@pytest.fixture(autouse=True)
def isolated_runs():
    """One intra-op thread for the tiny towers on shared cores; accelerate's process-wide state reset after each
    test (as in tests/test_train.py), so an in-process training run leaks into no other test."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def card_info(**overrides) -> ModelCardInfo:
    settings = dict(
        config=make_config("3tower-residual"), towers={"text": MINILM, "vision": DINOV2_OFFLINE},
        dataset=str(SAMPLE_DATA_DIR), queries_are_derived=True, num_train_pairs=2800, eval_split="validation",
        training_settings={"optimizer steps": 100, "image size": 112, "seed": 42}, before=BEFORE, after=AFTER,
        repo_id="fashion-retriever", image_size=112,
    )
    return ModelCardInfo(**{**settings, **overrides})


def metadata(card: str) -> dict:
    return ModelCard(card).data.to_dict()


# ----------------------------------------------------------------------------------------------------------------
# The card's YAML and text
# ----------------------------------------------------------------------------------------------------------------


def test_card_metadata_has_every_field_the_hub_reads():
    card = render_model_card(card_info())
    data = metadata(card)
    assert data["license"] == "apache-2.0" and data["language"] == ["en"]
    assert data["library_name"] == "transformers" and data["pipeline_tag"] == "feature-extraction"
    assert {"mmretrieval", "product-search", "arxiv:2501.07365"} <= set(data["tags"])
    # The offline DINOv2 is described, not a Hub id: only MiniLM is a base model.
    assert data["base_model"] == ["sentence-transformers/all-MiniLM-L6-v2"]
    assert "datasets" not in data  # a local catalogue has no Hub id
    (result,) = data["model-index"][0]["results"]
    assert data["model-index"][0]["name"] == "fashion-retriever"
    assert result["task"]["type"] == "information-retrieval" and result["dataset"]["split"] == "validation"
    assert result["dataset"]["name"] == "modeling_mmretrieval/data/sample"
    assert {m["type"]: m["value"] for m in result["metrics"]} == {
        "recall@10": 0.4375, "recall@100": 0.8125, "ndcg@10": 0.3125, "mrr@10": 0.25, "map": 0.2,
    }
    # The parsed card says what the model is and how to load it from a namespaced repository.
    parsed = ModelCard(card)
    assert parsed.data.eval_results[0].metric_value == 0.4375
    assert 'from_pretrained("your-namespace/fashion-retriever", trust_remote_code=True)' in card
    assert "| recall@10 | 0.1250 | 0.4375 |" in card and "| ndcg@10 | 0.0625 | 0.3125 |" in card
    assert "the residual fusion starts silent, so this is the text tower alone" in card
    assert "@article{liu2025multimodal" in card and "- transformers: " in card
    assert is_package_model_card(card) and str(SAMPLE_DATA_DIR) not in card


def test_hub_datasets_and_namespaced_repo_ids_are_kept():
    card = render_model_card(card_info(dataset="ashraq/fashion-product-images-small", repo_id="acme/shoes"))
    data = metadata(card)
    assert data["datasets"] == ["ashraq/fashion-product-images-small"]
    assert data["model-index"][0]["results"][0]["dataset"]["type"] == "ashraq/fashion-product-images-small"
    assert 'from_pretrained("acme/shoes", trust_remote_code=True)' in card and "your-namespace" not in card
    assert usage_repo_id(None) == "your-namespace/multimodal-product-retriever"
    assert usage_repo_id("shoes") == "your-namespace/shoes" and usage_repo_id("acme/shoes") == "acme/shoes"


def test_an_unevaluated_run_has_no_model_index():
    data = metadata(render_model_card(card_info(after={}, before={}, eval_split=None)))
    assert "model-index" not in data and data["license"] == "apache-2.0"


def test_license_defaults_to_the_towers_licence_and_can_be_set(tmp_path):
    assert default_license([MINILM, DINOV2_OFFLINE]) == "apache-2.0"
    assert default_license([MINILM, "openai/clip-vit-base-patch32"]) == "other"
    assert default_license([MINILM, "tmp-tower"]) == "unknown"
    card = render_model_card(card_info(towers={"text": MINILM, "dual encoder": "openai/clip-vit-base-patch32"},
                                       config=make_config("4tower-concat")))
    assert metadata(card)["license"] == "other" and "`openai/clip-vit-base-patch32`: mit" in card
    card = render_model_card(card_info(license="mit"))
    assert metadata(card)["license"] == "mit" and "as set by the model's author" in card


def test_license_flag_takes_the_hubs_licence_ids_and_refuses_others_with_a_usage_error(capsys):
    assert train_command.parse_args(["--license", "cc-by-nc-4.0"]).license == "cc-by-nc-4.0"
    assert train_command.parse_args([]).license is None  # the card then takes the towers' licence
    for bad, hint in (("Apache-2.0", "did you mean 'apache-2.0'?"), ("MIT", "did you mean 'mit'?"),
                      ("proprietary", "'other' with a LICENSE file"), ("", "is not a Hub licence identifier")):
        with pytest.raises(SystemExit) as exit_info:
            train_command.parse_args(["--license", bad])
        assert exit_info.value.code == 2
        last_line = capsys.readouterr().err.strip().splitlines()[-1]
        assert "argument --license:" in last_line and repr(bad) in last_line and hint in last_line
    # The card generator refuses what the Hub would not read, from Python too.
    with pytest.raises(ValueError, match="'Apache-2.0' is not a Hub licence identifier"):
        render_model_card(card_info(license="Apache-2.0"))
    assert set(TOWER_LICENSES.values()) <= set(HUB_LICENSES)  # every licence a card may default to is a Hub id


def test_local_paths_become_names(tmp_path):
    cache = tmp_path / "hf" / "hub" / "models--facebook--dinov2-small" / "snapshots" / "0123abcd"
    cache.mkdir(parents=True)
    assert public_name(str(cache)) == "facebook/dinov2-small"
    assert public_name(str(tmp_path / "towers" / "my-bert")) == "my-bert"
    assert public_name(f"`{SAMPLE_DATA_DIR}`") == "modeling_mmretrieval/data/sample"
    assert public_name(DINOV2_OFFLINE) == DINOV2_OFFLINE and public_name(MINILM) == MINILM
    assert dataset_reference(tmp_path / "shop") == ("`shop` (a local catalogue)", None)
    settings = {"text_config": {"_name_or_path": str(tmp_path)},
                "vision_config": {"_name_or_path": "facebook/dinov2-small"},
                "dual_encoder_config": {"text_config": {"_name_or_path": "../towers/clip"}}}
    assert without_local_paths(settings) == {
        "text_config": {"_name_or_path": ""}, "vision_config": {"_name_or_path": "facebook/dinov2-small"},
        "dual_encoder_config": {"text_config": {"_name_or_path": ""}},
    }


def test_a_fine_tuned_card_keeps_the_base_model_towers_and_licence(tmp_path):
    initial = tmp_path / "runs" / "first" / "final"
    initial.mkdir(parents=True)
    (initial / "README.md").write_text(render_model_card(card_info(license="mit")), encoding="utf-8")
    card = render_model_card(card_info(
        towers={INITIAL_CHECKPOINT_ROLE: str(initial)}, image_size=None,
        training_settings={"optimizer steps": 10, "image size": None, "seed": 1}, dataset=str(tmp_path / "shop"),
    ))
    data = metadata(card)
    assert data["base_model"] == ["sentence-transformers/all-MiniLM-L6-v2"] and data["license"] == "mit"
    assert f"| text | `{MINILM}` |" in card and f"| vision | `{DINOV2_OFFLINE}` |" in card
    assert "| initial checkpoint | `final` |" in card
    assert "image size" not in card and "None`" not in card.split("## Training settings")[1].split("##")[0]
    assert "before training (the initial checkpoint)" in card
    assert str(tmp_path) not in card
    # A Hub checkpoint is itself the base model of a fine-tune (its card cannot be read offline here).
    data = metadata(render_model_card(card_info(towers={INITIAL_CHECKPOINT_ROLE: "acme/fashion-retriever"})))
    assert data["base_model"] == ["acme/fashion-retriever"]


def test_card_for_repo_fills_in_the_namespace_and_tags():
    card = render_model_card(card_info(repo_id="fashion-retriever"))
    published = card_for_repo(card, "tester/fashion-retriever", ["shoes"])
    assert "your-namespace" not in published and published.count("tester/fashion-retriever") == card.count(
        "your-namespace/fashion-retriever")
    assert metadata(published)["tags"][-1] == "shoes" and metadata(published)["license"] == "apache-2.0"
    assert published.split("\n---\n", 1)[1] == card.split("\n---\n", 1)[1].replace(
        "your-namespace/fashion-retriever", "tester/fashion-retriever")


# ----------------------------------------------------------------------------------------------------------------
# A trained checkpoint: no absolute path anywhere, the card travels with the model
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("card_assets")
    save_tiny_pretrained_towers(root, IMAGE_SIZE)
    (root / "data").mkdir()
    for split, rows in (("train", 64), ("validation", 32)):
        sample = pq.read_table(SAMPLE_DATA_DIR / f"{split}.parquet")
        pq.write_table(sample.slice(0, rows), root / "data" / f"{split}.parquet")
    return {"root": root, "text": root / "text", "vision": root / "vision", "data": root / "data"}


def absolute_paths_in(folder: Path, forbidden: list[str]) -> list[tuple[str, str]]:
    """(file, path) for every forbidden absolute path found in the folder's text files."""
    found = []
    for path in folder.rglob("*"):
        if path.is_file() and path.suffix != ".safetensors":
            text = path.read_bytes().decode("utf-8", errors="replace")
            found += [(path.name, root) for root in forbidden if root in text]
    return found


def test_a_trained_checkpoint_names_no_local_path_and_keeps_its_card(assets, tmp_path):
    import huggingface_hub

    output_dir = tmp_path / "run"
    train_command.run([
        "--dataset", str(assets["data"]), "--output_dir", str(output_dir), "--text_model", str(assets["text"]),
        "--architecture", "3tower", "--vision_model", str(assets["vision"]), "--image_size", str(IMAGE_SIZE), "--per_device_train_batch_size", "16",
        "--max_train_steps", "2", "--max_eval_queries", "16", "--license", "mit",
    ])
    final = output_dir / "final"
    forbidden = [str(assets["root"]), str(tmp_path), str(REPO_ROOT), sys.prefix, str(huggingface_hub.constants.HF_HOME),
                 str(Path.home())]
    assert absolute_paths_in(final, [path for path in forbidden if len(path) > 1]) == []
    config = json.loads((final / "config.json").read_text())
    assert all(config[tower].get("_name_or_path", "") == "" for tower in ("text_config", "vision_config"))

    card = (final / "README.md").read_text()
    assert "| text | `text` |" in card and "| vision | `vision` |" in card and "`data` (a local catalogue)" in card
    assert metadata(card)["model-index"][0]["results"][0]["dataset"]["name"] == "data"
    assert metadata(card)["license"] == "mit" and "`mit`, as set by the model's author" in card  # --license
    # The model keeps the card it was saved with, and saves it again (a loaded model re-saved or pushed).
    model = MultimodalRetrievalModel.from_pretrained(final)
    assert model.model_card == card and model.config.text_config.hidden_size == 32
    model.save_pretrained(tmp_path / "copy")
    assert (tmp_path / "copy" / "README.md").read_text() == card
    model.model_card = None
    model.save_pretrained(tmp_path / "card-less")
    assert not (tmp_path / "card-less" / "README.md").exists()

    # Fine-tuning the checkpoint: the card keeps its towers and licence (set by the first run's --license; the
    # towers' own, local, would be "unknown"), names the checkpoint, leaks no path, and
    # reports no setting the run left unset (its image size comes from the loaded processor).
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    train_command.run(["--dataset", str(assets["data"]), "--output_dir", str(tmp_path / "tuned"), "--model_name_or_path",
                       str(final), "--per_device_train_batch_size", "16", "--max_train_steps", "2",
                       "--eval_split", "none"])
    tuned = tmp_path / "tuned" / "final"
    assert absolute_paths_in(tuned, [path for path in forbidden if len(path) > 1]) == []
    tuned_card = (tuned / "README.md").read_text()
    assert "| text | `text` |" in tuned_card and "| vision | `vision` |" in tuned_card
    assert "| initial checkpoint | `final` |" in tuned_card and "| image size |" not in tuned_card
    assert metadata(tuned_card)["license"] == "mit" and "`mit`, the licence of the initial checkpoint" in tuned_card


# ----------------------------------------------------------------------------------------------------------------
# Push to a (local) Hub
# ----------------------------------------------------------------------------------------------------------------

PUSH = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from transformers import AutoModel
    from modeling_mmretrieval import MultimodalRetrievalModel, MultimodalRetrievalProcessor
    from modeling_mmretrieval.training.hub import push_folder_to_hub

    checkpoint, scratch = Path(sys.argv[1]), Path(sys.argv[2])
    model = MultimodalRetrievalModel.from_pretrained(checkpoint)
    processor = MultimodalRetrievalProcessor.from_pretrained(checkpoint)
    model.push_to_hub("shoes-retriever", private=True, tags=["shoes"], commit_message="model")
    processor.push_to_hub("shoes-retriever", commit_message="processor")
    processor.save_pretrained(scratch / "processor", push_to_hub=True, repo_id="processor-only", private=True)
    model.save_pretrained(scratch / "saved", push_to_hub=True, repo_id="saved-retriever", private=True)
    folder_url = push_folder_to_hub(checkpoint, "folder-retriever")
    reloaded = AutoModel.from_pretrained("tester/shoes-retriever")
    print(json.dumps({"reloaded_card": reloaded.model_card, "folder_url": folder_url,
                      "saved_readme": (scratch / "saved" / "README.md").read_text()}))
""")


def test_push_to_hub_uploads_the_package_card_and_the_processor_keeps_every_keyword(tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(get_minilm_path())
    config = make_config("text_only")
    config.text_config.vocab_size = tokenizer.vocab_size
    model = MultimodalRetrievalModel(config)
    model.model_card = render_model_card(card_info(config=config, towers={"text": MINILM}, repo_id=None))
    checkpoint = tmp_path / "checkpoint"
    model.save_pretrained(checkpoint)
    MultimodalRetrievalProcessor(tokenizer).save_pretrained(checkpoint)

    # Model and processor go to one repository: the second `create_repo(exist_ok=True)` gets the Hub's 409.
    with MiniHub(token="hf_test_token", user="tester") as hub:
        env = {**os.environ, "HF_ENDPOINT": hub.endpoint, "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_XET": "1",
               "HF_HOME": str(tmp_path / "hf_home"), "HF_TOKEN": "hf_test_token", "OMP_NUM_THREADS": "1",
               "TOKENIZERS_PARALLELISM": "false",
               "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
        run = subprocess.run([sys.executable, "-c", PUSH, str(checkpoint), str(tmp_path)], env=env,
                             capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL, check=False)
        assert run.returncode == 0, run.stderr[-3000:]
        report = json.loads(run.stdout.strip().splitlines()[-1])
        assert hub.unhandled == [], hub.unhandled
        repos = {repo_id: (repo.private, repo.head[1]) for repo_id, repo in hub.repos.items()}

    private, files = repos["tester/shoes-retriever"]
    card = files["README.md"].content.decode()
    assert private and is_package_model_card(card) and "More Information Needed" not in card
    assert 'from_pretrained("tester/shoes-retriever", trust_remote_code=True)' in card and "your-namespace" not in card
    assert {"mmretrieval", "shoes"} <= set(metadata(card)["tags"])
    assert {"model.safetensors", "config.json", "modeling_mmretrieval.py", "tokenizer.json",
            "processor_config.json"} <= set(files)
    assert report["reloaded_card"] == card  # from_pretrained(repo id) keeps the card too

    private, files = repos["tester/processor-only"]
    assert private and {"processor_config.json", "tokenizer.json"} <= set(files)  # `private` reached create_repo
    assert "README.md" not in files  # the processor's files only, as transformers' processors upload them
    private, files = repos["tester/saved-retriever"]
    assert private and 'from_pretrained("tester/saved-retriever"' in files["README.md"].content.decode()
    assert report["saved_readme"] == files["README.md"].content.decode()
    _, files = repos["tester/folder-retriever"]
    assert 'from_pretrained("tester/folder-retriever"' in files["README.md"].content.decode()
    assert report["folder_url"].startswith(f"{hub.endpoint}/tester/folder-retriever/commit/")
    # The local folder keeps its placeholder: it is not published anywhere by itself.
    assert "your-namespace/multimodal-product-retriever" in (checkpoint / "README.md").read_text()
