"""A real-size checkpoint on the local Hub of `tests/hub_server.py`: the main job's towers (all-MiniLM-L6-v2 and the
offline DINOv2-small, about 180 MB of weights), pushed the three ways a user or the trainer pushes and loaded back by
transformers and sentence-transformers with the embeddings of the model that was pushed. Also the Hub behaviours the
uploads rely on: `create_repo(exist_ok=True)` of an existing repository (409) and the multipart LFS transfer.

The client runs in a subprocess: `HF_ENDPOINT` is read when `huggingface_hub` is imported. Xet is off there
(`HF_HUB_DISABLE_XET=1`): with `hf_xet` installed, huggingface_hub 2.x uploads through Xet storage without asking
the server, and the test hub implements Git LFS (basic and multipart), which the Hub still accepts.
"""

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from hub_server import MAX_BODY_BYTES, MULTIPART_CHUNK_BYTES, MiniHub

REPO_ROOT = Path(__file__).resolve().parents[1]
TOKEN = "hf_test_token"

PUSH = textwrap.dedent("""
    import json, sys
    from pathlib import Path

    import torch

    from modeling_mmretrieval import MultimodalRetrievalModel, MultimodalRetrievalProcessor
    from modeling_mmretrieval.data import SAMPLE_DATA_DIR, load_catalogue
    from modeling_mmretrieval.data.images import load_product_image
    from modeling_mmretrieval.towers import get_dinov2_small_path, get_minilm_path
    from modeling_mmretrieval.training.hub import push_folder_to_hub
    from modeling_mmretrieval.training.model_builder import OFFLINE_TOWERS
    from modeling_mmretrieval.training.model_card import ModelCardInfo, render_model_card

    scratch = Path(sys.argv[1])
    torch.manual_seed(0)
    # The main job's model before training: the offline towers composed as `mmretrieval train --architecture 3tower`
    # composes them.
    model = MultimodalRetrievalModel.from_towers_pretrained(
        get_minilm_path(), get_dinov2_small_path(), architecture="3tower", fusion="residual")
    processor = MultimodalRetrievalProcessor.from_towers_pretrained(
        get_minilm_path(), get_dinov2_small_path(), config=model.config)
    # The residual fusion starts silent (the text tower alone); as after a training step, let the image count, so
    # the embeddings compared below depend on the vision tower's weights having arrived too.
    with torch.no_grad():
        model.product_fusion.layers[-1].weight.normal_(std=0.02)
    model.model_card = render_model_card(ModelCardInfo(
        config=model.config, towers={"text": OFFLINE_TOWERS["minilm"][1], "vision": OFFLINE_TOWERS["dinov2-small"][1]},
        dataset=str(SAMPLE_DATA_DIR), queries_are_derived=True, num_train_pairs=0, eval_split=None,
        training_settings={}, repo_id="real-retriever"))
    local = scratch / "real-retriever"
    model.save_pretrained(local)
    processor.save_pretrained(local)

    model.push_to_hub("real-retriever", private=True, commit_message="model")
    processor.push_to_hub("real-retriever", commit_message="processor")  # create_repo of an existing repo: 409
    folder_url = push_folder_to_hub(local, "real-retriever-folder")  # what `mmretrieval train --push_to_hub` does

    # Four sample products with their JPEG photos, one without a photo, and queries.
    catalogue = load_catalogue(SAMPLE_DATA_DIR, split="validation").select(range(4))
    rows = [{"title": row["title"], "description": row["description"]} for row in catalogue]
    images = [load_product_image(row["image"], on_error="raise").image for row in catalogue] + [None]
    for position, row in enumerate(catalogue):
        (scratch / f"photo-{position}.jpg").write_bytes(row["image"]["bytes"])
    rows.append({"title": "Puma Men Black Running Shoes", "description": None})
    queries = ["black tshirt for men", "women blue handbag", "red running shoes"]
    local_embeddings = {
        "queries": model.encode_queries(queries, processor=processor).tolist(),
        "products": model.encode_products(rows, images=images, processor=processor).tolist(),
        "texts_only": model.encode_products(rows, processor=processor).tolist(),
    }
    print(json.dumps({"rows": rows, "texts": processor.product_texts(rows), "queries": queries,
                      "local": local_embeddings, "folder_url": folder_url,
                      "local_files": sorted(path.name for path in local.iterdir())}))
""")

# Loads from the Hub as a user without the package does: the checkpoint's own code (`trust_remote_code`) only.
LOAD_WITHOUT_PACKAGE = textwrap.dedent("""
    import importlib.abc, json, sys
    from pathlib import Path

    class HidePackage(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] == "modeling_mmretrieval":
                raise ImportError("the package is deliberately hidden: " + name)

    sys.meta_path.insert(0, HidePackage())
    from huggingface_hub import HfApi
    from PIL import Image
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel, AutoProcessor

    scratch, pushed = Path(sys.argv[1]), json.loads(sys.argv[2])
    rows, texts, queries = pushed["rows"], pushed["texts"], pushed["queries"]
    images = [Image.open(scratch / f"photo-{position}.jpg").convert("RGB") for position in range(4)] + [None]
    model = AutoModel.from_pretrained("tester/real-retriever", trust_remote_code=True)
    processor = AutoProcessor.from_pretrained("tester/real-retriever", trust_remote_code=True)
    st_model = SentenceTransformer("tester/real-retriever-folder", trust_remote_code=True, device="cpu")
    api = HfApi()
    print(json.dumps({
        "hub": {
            "queries": model.encode_queries(queries, processor=processor).tolist(),
            "products": model.encode_products(rows, images=images, processor=processor).tolist(),
            "texts_only": model.encode_products(rows, processor=processor).tolist(),
        },
        "sentence_transformers": {
            "queries": st_model.encode_query(queries).tolist(),
            "products": st_model.encode_document(
                [{"text": text, "image": image} for text, image in zip(texts, images)]).tolist(),
        },
        "classes": [type(model).__module__, type(processor).__module__, type(st_model[0]).__module__],
        "files": {repo: sorted(sibling.rfilename for sibling in api.model_info(repo).siblings)
                  for repo in ("tester/real-retriever", "tester/real-retriever-folder")},
    }))
""")


def run_client(script: str, *args: str, env: dict, cwd: Path) -> dict:
    run = subprocess.run([sys.executable, "-c", script, *args], env=env, cwd=cwd, capture_output=True, text=True,
                         timeout=300, stdin=subprocess.DEVNULL, check=False)
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_a_real_size_checkpoint_pushed_to_the_hub_loads_back_with_the_same_embeddings(tmp_path):
    with MiniHub(token=TOKEN, user="tester") as hub:
        env = {**os.environ, "HF_ENDPOINT": hub.endpoint, "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_XET": "1",
               "HF_HOME": str(tmp_path / "hf_home"), "HF_TOKEN": TOKEN, "OMP_NUM_THREADS": "1",
               "TOKENIZERS_PARALLELISM": "false", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
               "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
        pushed = run_client(PUSH, str(tmp_path), env=env, cwd=REPO_ROOT)
        hub_env = {name: value for name, value in env.items() if name != "PYTHONPATH"}
        report = run_client(LOAD_WITHOUT_PACKAGE, str(tmp_path), json.dumps(pushed), env=hub_env, cwd=tmp_path)
        assert hub.unhandled == [], hub.unhandled
        requests = list(hub.requests)
        stored = {repo_id: (repo.private, repo.head[1]) for repo_id, repo in hub.repos.items()}

    local = tmp_path / "real-retriever"
    weights = (local / "model.safetensors").read_bytes()
    assert len(weights) > 150 * 1024 * 1024 > MAX_BODY_BYTES  # a real checkpoint, larger than any one request
    for repo_id in ("tester/real-retriever", "tester/real-retriever-folder"):
        files = stored[repo_id][1]
        assert files["model.safetensors"].lfs and hashlib.sha256(files["model.safetensors"].content).digest() == (
            hashlib.sha256(weights).digest())
        assert report["files"][repo_id] == sorted(files)
    # The weights went up in parts (multipart LFS), once per repository: LFS objects belong to a repository.
    part_uploads = [path for method, path in requests if method == "PUT" and "/parts/" in path]
    for repo_id in ("tester/real-retriever", "tester/real-retriever-folder"):
        parts = [path for path in part_uploads if path.startswith(f"/{repo_id}/lfs-objects/")]
        assert len(parts) == -(-len(weights) // MULTIPART_CHUNK_BYTES), repo_id

    # model.push_to_hub + processor.push_to_hub make a complete, private checkpoint; the folder upload is the folder.
    private, files = stored["tester/real-retriever"]
    assert private and {"model.safetensors", "config.json", "modeling_mmretrieval.py", "modules.json", "README.md",
                        "processor_config.json", "tokenizer.json", "preprocessor_config.json"} <= set(files)
    assert 'from_pretrained("tester/real-retriever", trust_remote_code=True)' in files["README.md"].content.decode()
    private, files = stored["tester/real-retriever-folder"]
    assert not private and sorted(files) == pushed["local_files"] and "modules.json" in files
    assert pushed["folder_url"].startswith(f"{hub.endpoint}/tester/real-retriever-folder/commit/")
    assert all(module.startswith("transformers_modules.") for module in report["classes"]), report["classes"]

    local_embeddings, hub_embeddings = pushed["local"], report["hub"]
    for kind in ("queries", "products", "texts_only"):
        np.testing.assert_array_equal(np.array(hub_embeddings[kind]), np.array(local_embeddings[kind]), err_msg=kind)
    for kind in ("queries", "products"):
        np.testing.assert_allclose(np.array(report["sentence_transformers"][kind]), np.array(local_embeddings[kind]),
                                   atol=1e-5, rtol=0, err_msg=kind)
    # Every photo counts (the vision tower arrived and is used); the photo-less product embeds as without photos.
    products, texts_only = np.array(local_embeddings["products"]), np.array(local_embeddings["texts_only"])
    assert np.abs(products[:4] - texts_only[:4]).max(axis=1).min() > 1e-3
    np.testing.assert_allclose(products[4], texts_only[4], atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------------------------------------------
# The Hub behaviours the uploads rely on, through huggingface_hub's own client (in-process: `HfApi(endpoint=...)`)
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture
def online_client(monkeypatch):
    """huggingface_hub allowed to reach the test hub (the suite runs offline) and uploading through LFS."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)


def test_create_repo_of_an_existing_repository_keeps_it_with_exist_ok_and_refuses_without(online_client, tmp_path):
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    with MiniHub(token=TOKEN, user="tester") as hub:
        api = HfApi(endpoint=hub.endpoint, token=TOKEN)
        url = api.create_repo("shoes-retriever", private=True)
        api.upload_file(path_or_fileobj=b'{"architecture": "3tower"}', path_in_repo="config.json",
                        repo_id="tester/shoes-retriever")
        head = hub.repos["tester/shoes-retriever"].head
        for repo_id in ("shoes-retriever", "tester/shoes-retriever"):
            again = api.create_repo(repo_id, exist_ok=True, private=True)
            assert again == url and again.repo_id == "tester/shoes-retriever"
        with pytest.raises(HfHubHTTPError) as conflict:
            api.create_repo("shoes-retriever")
        assert conflict.value.response.status_code == 409
        assert conflict.value.response.json()["url"] == f"{hub.endpoint}/tester/shoes-retriever"
        # Nothing was recreated: the repository keeps its commit and file, and stays private.
        assert hub.repos["tester/shoes-retriever"].head == head and hub.repos["tester/shoes-retriever"].private
        config = api.hf_hub_download("tester/shoes-retriever", "config.json", cache_dir=tmp_path / "cache")
        assert json.loads(Path(config).read_text()) == {"architecture": "3tower"}
        assert hub.unhandled == []


def test_large_files_upload_in_parts_once_per_repository(online_client, tmp_path):
    import urllib.error
    import urllib.request

    from huggingface_hub import HfApi

    weights = np.random.default_rng(0).bytes(300_000)  # binary, so LFS; over 4 parts of 80 KB
    (tmp_path / "model.safetensors").write_bytes(weights)
    with MiniHub(token=TOKEN, user="tester", multipart_chunk_bytes=80_000) as hub:
        api = HfApi(endpoint=hub.endpoint, token=TOKEN)
        for repo_id in ("tester/first", "tester/second"):
            api.create_repo(repo_id)
            api.upload_file(path_or_fileobj=tmp_path / "model.safetensors", path_in_repo="model.safetensors",
                            repo_id=repo_id)
        api.upload_file(path_or_fileobj=tmp_path / "model.safetensors", path_in_repo="copy.safetensors",
                        repo_id="tester/first")
        parts = [path for method, path in hub.requests if method == "PUT" and "/parts/" in path]
        downloaded = Path(api.hf_hub_download("tester/second", "model.safetensors", cache_dir=tmp_path / "cache"))

        # A completion whose part does not match what was uploaded is refused, and stores nothing.
        oid = hashlib.sha256(b"x" * 100_000).hexdigest()
        base = f"{hub.endpoint}/tester/first/lfs-objects/{oid}"
        for number, part in ((1, b"x" * 80_000), (2, b"x" * 20_000)):
            urllib.request.urlopen(urllib.request.Request(f"{base}/parts/{number}", data=part, method="PUT"))
        completion = {"oid": oid, "parts": [{"partNumber": 1, "etag": '"0"'}, {"partNumber": 2, "etag": '"0"'}]}
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(urllib.request.Request(
                f"{base}/complete/100000", data=json.dumps(completion).encode(), method="POST"))
        assert refused.value.code == 400 and "etag" in refused.value.headers["X-Error-Message"]
        assert oid not in hub.repos["tester/first"].lfs_objects
        assert hub.unhandled == []

    # Four parts per repository, none for the second file with the same content in the same repository.
    for repo_id in ("tester/first", "tester/second"):
        numbers = sorted(path.rsplit("/", 1)[1] for path in parts if path.startswith(f"/{repo_id}/"))
        assert numbers == ["1", "2", "3", "4"], repo_id
    assert downloaded.read_bytes() == weights
    assert hub.repos["tester/first"].head[1]["copy.safetensors"].content == weights
