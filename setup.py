from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="modeling_mmretrieval",
    version="0.1.0",
    description=(
        "Transformers-compatible multimodal product retrieval (text-only, 4tMM, 3tMM) after "
        "'Multimodal Semantic Retrieval for Product Search' (arXiv:2501.07365)"
    ),
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["modeling_mmretrieval", "modeling_mmretrieval.*"]),
    package_data={
        "modeling_mmretrieval": ["data/sample/*.parquet", "data/sample/*.md", "training/model_card_template.md"]
    },
    include_package_data=True,
    install_requires=[
        "torch>=2.1",
        "transformers>=5.0,<6",
        "datasets>=3.0",
        "accelerate>=1.0",
        "safetensors>=0.4",
        "huggingface_hub>=1.0",
        "pillow>=10.1",
        "numpy",
        "tqdm",
    ],
    extras_require={
        # Offline pretrained towers: install these with `pip install --no-deps` (see docs/offline_towers.md).
        "towers": ["onnx", "onnxruntime"],
        "faiss": ["faiss-cpu"],
        "tensorboard": ["tensorboard"],
        # BM25 baselines (retrieval.lexical); results are compared against it in docs/results.md.
        "lexical": ["bm25s==0.3.16"],
        # A saved checkpoint is also a sentence-transformers model (integrations_mmretrieval.py, modules.json).
        "sentence-transformers": ["sentence-transformers==6.3.0"],
        # ONNX export of the towers and onnxruntime inference (modeling_mmretrieval.onnx, `mmretrieval export-onnx`).
        "onnx": ["onnx==1.23.2", "onnxruntime==1.32.0", "onnxscript==0.7.2"],
        # Indexing beyond one machine (Ray Data) and a vector database that loads the Parquet embeddings.
        "scale": ["ray[data]==2.60.0", "lancedb==0.40.0", "pyarrow>=14"],
        "test": [
            "pytest", "hypothesis", "onnx==1.23.2", "onnxruntime==1.32.0", "onnxscript==0.7.2", "pytrec_eval-terrier",
            "bm25s==0.3.16", "sentence-transformers==6.3.0", "ray[data]==2.60.0", "lancedb==0.40.0", "pyarrow>=14",
            # The browser tests drive headless Chromium over the DevTools protocol (a websocket client).
            "aiohttp==3.14.5",
        ],
    },
    entry_points={"console_scripts": ["mmretrieval=modeling_mmretrieval.cli:main"]},
)
