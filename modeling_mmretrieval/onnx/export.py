"""ONNX export of a `MultimodalRetrievalModel`: query encoder, product text path with its fusion, image tower.

`export_onnx` writes one self-contained folder (graphs, an int8 query encoder, the processor files, the model
config and a manifest), atomically, and refuses to publish it unless the float32 graphs reproduce the torch
model on real inputs (`check_onnx_parity`). `runtime.OnnxRetrievalEncoder` serves it with onnxruntime.

The graphs are traced with `torch.onnx.export(dynamo=True)`: the TorchScript exporter (`dynamo=False`) bakes the
traced batch's attention-mask shape into transformers' mask code, so padded batches of another length come out
wrong. The visual-word tagger (`VisualWordTagger`) inserts a variable number of tokens per product, which is not a
fixed-shape graph: it runs in the runtime between the image and product graphs, with the model's own code and
its classifier weights saved in the folder, so tagged products keep their torch embeddings.

Example:
```python
>>> export_onnx(model, processor, "exports/retriever-onnx")
PosixPath('exports/retriever-onnx')
```
"""

import contextlib
import io
import logging
import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..atomic_files import atomic_directory, write_json_atomically

logger = logging.getLogger(__name__)

MANIFEST_NAME = "onnx_export.json"
MODEL_CONFIG_NAME = "retrieval_config.json"
VISUAL_TAGGER_WEIGHTS_NAME = "visual_tagger.npz"
GRAPH_FILES = {
    "query": "query_encoder.onnx",
    "query_int8": "query_encoder_int8.onnx",
    "product": "product_encoder.onnx",
    "image": "image_encoder.onnx",
}
DEFAULT_OPSET = 18
MIN_PARITY_COSINE = 0.99999
FORMAT_VERSION = 1
# Real inputs for the parity check: the product sample committed with the package (photos included).
SAMPLE_PARQUET = Path(__file__).resolve().parents[1] / "data" / "sample" / "validation.parquet"


class OnnxExportError(ValueError):
    """An export that cannot be made or would not reproduce the model (one line, naming what and why)."""


class OnnxParityError(OnnxExportError):
    """The exported graphs' embeddings differ from torch's beyond the cosine bound."""


class QueryEncoderGraph(nn.Module):
    """Query tokens -> `(embeddings, unnormalized_embeddings)`, as `get_query_embeddings` computes them."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids=None, dual_input_ids=None, dual_attention_mask=None):
        embeddings = self.model.get_query_embeddings(
            input_ids, attention_mask, token_type_ids, dual_input_ids, dual_attention_mask, normalize=False
        )
        return F.normalize(embeddings, dim=-1), embeddings


class ProductEncoderGraph(nn.Module):
    """Product tokens (+ the image tower's features and `image_mask`) -> `(embeddings, unnormalized_embeddings)`:
    the product text tower then `fuse_product_features`. Tokens come in already tagged (see the module docstring)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids=None, image_features=None, image_mask=None):
        text = self.model.get_product_text_features(input_ids, attention_mask, token_type_ids)
        embeddings = self.model.fuse_product_features(text, image_features, image_mask, normalize=False)
        return F.normalize(embeddings, dim=-1), embeddings


class ImageEncoderGraph(nn.Module):
    """`pixel_values` -> the image tower's features (what the product graph and the tagger read), plus the image-query
    embeddings `(normalised, unnormalised)` of models that support image queries."""

    def __init__(self, model, image_queries: bool):
        super().__init__()
        self.model = model
        self.image_queries = image_queries

    def forward(self, pixel_values):
        features = self.model.get_image_features(pixel_values)
        if not self.image_queries:
            return (features,)
        embeddings = self.model.get_image_query_embeddings(image_features=features, normalize=False)
        return features, F.normalize(embeddings, dim=-1), embeddings


def image_queries_unsupported_reason(model) -> str | None:
    """Why `model` cannot embed image queries (`model.check_image_queries_supported`'s message), or None."""
    try:
        model.check_image_queries_supported()
    except ValueError as error:
        return str(error)
    return None


def default_parity_inputs(num_products: int = 12, seed: int = 0) -> tuple[list[str], list[dict], list]:
    """`(queries, products, images)` from the committed product sample: attribute-derived queries, products as the
    catalogue writes them and, for every other one, with its colour and pattern words stripped (texts that name no
    colour: the ones a visual-word tagger writes into), their decoded photos and one image-less product.

    Example:
    ```python
    >>> queries, products, images = default_parity_inputs()
    >>> len(products) == len(images)
    True
    ```
    """
    import pyarrow.parquet as pq

    from ..data.catalogue import CatalogueColumns, product_records
    from ..data.images import load_product_image
    from ..data.queries import derive_query
    from ..data.visual_words import VisualWords, degrade_product_texts

    rows = pq.read_table(SAMPLE_PARQUET).slice(0, num_products).to_pylist()
    columns = CatalogueColumns()
    rng = random.Random(seed)
    queries = [derive_query(record, rng, columns).text for record in product_records(rows, columns)]
    stripped_ids = {str(row[columns.product_id]) for row in rows[::2]}
    products = degrade_product_texts(rows, stripped_ids, VisualWords.default(), columns.product_id)
    products = [{key: product[key] for key in ("product_id", "title", "description")} for product in products]
    images = [load_product_image(row[columns.image]).image for row in rows]
    images[len(images) // 2] = None
    return queries, products, images


def _token_inputs(encoded: dict, prefix: str = "") -> dict[str, torch.Tensor]:
    names = ("input_ids", "attention_mask", "token_type_ids")
    return {f"{prefix}{name}": encoded[name] for name in names if encoded.get(name) is not None}


def _export_graph(graph: nn.Module, example: dict[str, torch.Tensor], dynamic: dict[str, dict], output_names,
                  path: Path, opset: int) -> None:
    # The exporter prints its progress and warns at length about unused ops; one line of failure is what matters.
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            torch.onnx.export(
                graph, (), str(path), kwargs=example, input_names=list(example), output_names=list(output_names),
                dynamic_shapes={name: dynamic[name] for name in example}, opset_version=opset, dynamo=True,
                external_data=False,
            )
    except Exception as error:  # the exporter raises many types; name the graph and the first line
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise OnnxExportError(f"torch.onnx.export failed on {path.name}: {first_line}") from error


def _example_inputs(model, processor) -> tuple[dict, dict, dict | None]:
    """Example query, product and pixel inputs of batch 2 (torch.export specialises a dimension seen as 1)."""
    queries = processor.encode_queries(["red running shoes for men", "black formal shoes"])
    query = _token_inputs(queries)
    if "dual_input_ids" in queries:
        query.update(dual_input_ids=queries["dual_input_ids"], dual_attention_mask=queries["dual_attention_mask"])
    product = _token_inputs(processor.encode_products([
        {"title": "Nike Men Red Running Shoes", "description": "Mesh upper, rubber sole"},
        {"title": "Clarks Black Formal Shoes"},
    ]))
    pixels = None
    if model.config.uses_images:
        from PIL import Image

        photos = [Image.new("RGB", (64, 48), colour) for colour in ((200, 30, 40), (15, 15, 15))]
        pixels = {"pixel_values": processor.encode_images(photos)["pixel_values"]}
        with torch.no_grad():
            features = model.get_image_features(pixels["pixel_values"])
        product.update(image_features=features, image_mask=torch.tensor([True, False]))
    return query, product, pixels


def _dynamic_axes() -> dict[str, dict]:
    batch, sequence, dual_sequence = (torch.export.Dim(name) for name in ("batch", "sequence", "dual_sequence"))
    text = {0: batch, 1: sequence}
    return {
        "input_ids": text, "attention_mask": text, "token_type_ids": text,
        "dual_input_ids": {0: batch, 1: dual_sequence}, "dual_attention_mask": {0: batch, 1: dual_sequence},
        "image_features": {0: batch}, "image_mask": {0: batch}, "pixel_values": {0: batch},
    }


def _quantize_query_encoder(source: Path, target: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # Its "run pre-processing first" advice concerns static quantisation; dynamic int8 needs none.
    quantization_logger = logging.getLogger()
    level = quantization_logger.level
    quantization_logger.setLevel(logging.ERROR)
    try:
        quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8)
    finally:
        quantization_logger.setLevel(level)


def export_onnx(
    model,
    processor,
    output_dir: str | Path,
    *,
    quantize_int8: bool = True,
    opset: int = DEFAULT_OPSET,
    overwrite: bool = False,
    parity_inputs: tuple[Sequence[str], Sequence[dict], Sequence] | None = None,
    min_cosine: float = MIN_PARITY_COSINE,
) -> Path:
    r"""
    Exports `model` to ONNX in `output_dir`: `query_encoder.onnx` (and `query_encoder_int8.onnx`, dynamically
    quantised, unless `quantize_int8=False`), `product_encoder.onnx` and, for 4tower/3tower, `image_encoder.onnx`,
    with dynamic batch and sequence axes; the processor files, the model config (`retrieval_config.json`), the
    visual-word tagger's weights where the model has one, and `onnx_export.json` (files, input and output names,
    `model_fingerprint`, package version, parity report).

    The folder appears complete or not at all (`atomic_files.atomic_directory`): it is published only after
    `check_onnx_parity` found every float32 graph within `min_cosine` of torch on `parity_inputs`
    (`(queries, products, images)`, default `default_parity_inputs()`: real products and photos), and raises
    `OnnxParityError` otherwise.

    Example:
    ```python
    >>> model = MultimodalRetrievalModel.from_pretrained("outputs/main_job/final").eval()
    >>> processor = MultimodalRetrievalProcessor.from_pretrained("outputs/main_job/final")
    >>> export_onnx(model, processor, "exports/main_job")
    >>> OnnxRetrievalEncoder.from_pretrained("exports/main_job").encode_queries(["red running shoes"]).shape
    (384,)
    ```
    """
    from .. import __version__
    from ..retrieval.search import model_fingerprint

    output_dir = Path(output_dir)
    if not 14 <= opset <= 23:
        raise OnnxExportError(f"opset {opset} is outside what this export supports (14 to 23)")
    if model.config.uses_images and processor.image_processor is None:
        raise OnnxExportError("the processor has no image processor, but the model's product path reads images")
    was_training, runner = model.training, model.text_tower_runner
    # The graphs trace the plain text-tower path: a runner that splits batches (speedups) has the same results.
    model.eval()
    model.text_tower_runner = None
    try:
        with atomic_directory(output_dir, overwrite=overwrite) as staging:
            graphs = _export_graphs(model, processor, staging, opset)
            if quantize_int8:
                _quantize_query_encoder(staging / GRAPH_FILES["query"], staging / GRAPH_FILES["query_int8"])
                graphs["query_int8"] = dict(graphs["query"], file=GRAPH_FILES["query_int8"])
            processor.save_pretrained(staging)
            model.config.to_json_file(staging / MODEL_CONFIG_NAME)
            if model.visual_tagger is not None:
                classifier = model.visual_tagger.classifier
                np.savez(staging / VISUAL_TAGGER_WEIGHTS_NAME, weight=classifier.weight.detach().float().cpu().numpy(),
                         bias=classifier.bias.detach().float().cpu().numpy())
            manifest = {
                "format_version": FORMAT_VERSION,
                "package_version": __version__,
                "model_fingerprint": model_fingerprint(model),
                "model_id": model.config.name_or_path or None,
                "architecture": model.config.architecture,
                "embedding_dim": model.embedding_dim,
                "image_feature_size": model.image_feature_size if model.config.uses_images else None,
                "image_queries_unsupported": image_queries_unsupported_reason(model),
                "visual_tagger": VISUAL_TAGGER_WEIGHTS_NAME if model.visual_tagger is not None else None,
                "exporter": f"torch.onnx.export(dynamo=True) torch {torch.__version__}",
                "opset": opset,
                "graphs": graphs,
            }
            write_json_atomically(staging / MANIFEST_NAME, manifest)
            queries, products, images = parity_inputs if parity_inputs is not None else default_parity_inputs()
            manifest["parity"] = check_onnx_parity(
                model, staging, queries, products, images if model.config.uses_images else None, min_cosine=min_cosine
            )
            manifest["files"] = sorted(str(path.relative_to(staging)) for path in staging.rglob("*") if path.is_file())
            write_json_atomically(staging / MANIFEST_NAME, manifest)
    except FileExistsError as error:
        raise OnnxExportError(f"{output_dir} already exists and is not empty; pass overwrite=True (--overwrite)") from error
    finally:
        model.text_tower_runner = runner
        model.train(was_training)
    return output_dir


def _export_graphs(model, processor, staging: Path, opset: int) -> dict[str, dict]:
    query, product, pixels = _example_inputs(model, processor)
    dynamic = _dynamic_axes()
    embedding_outputs = ("embeddings", "unnormalized_embeddings")
    graphs = {}
    plan = [("query", QueryEncoderGraph(model), query, embedding_outputs),
            ("product", ProductEncoderGraph(model), product, embedding_outputs)]
    if pixels is not None:
        image_queries = image_queries_unsupported_reason(model) is None
        outputs = ("image_features",) + (("image_query_embeddings", "unnormalized_image_query_embeddings")
                                         if image_queries else ())
        plan.append(("image", ImageEncoderGraph(model, image_queries), pixels, outputs))
    for role, graph, example, outputs in plan:
        _export_graph(graph, example, dynamic, outputs, staging / GRAPH_FILES[role], opset)
        graphs[role] = {"file": GRAPH_FILES[role], "inputs": list(example), "outputs": list(outputs)}
    return graphs


def _min_cosine(first, second) -> float:
    first, second = (np.atleast_2d(np.asarray(value, dtype=np.float64)) for value in (first, second))
    norms = np.linalg.norm(first, axis=1) * np.linalg.norm(second, axis=1)
    # Two all-zero rows (image-less products' features) agree exactly.
    cosines = np.where(norms > 0, (first * second).sum(axis=1) / np.maximum(norms, 1e-30),
                       np.where(np.abs(first - second).max(axis=1) == 0, 1.0, 0.0))
    return float(cosines.min())


def check_onnx_parity(
    model,
    export_dir: str | Path,
    queries: Sequence[str],
    products: Sequence[dict],
    images: Sequence | None = None,
    *,
    min_cosine: float = MIN_PARITY_COSINE,
    batch_size: int = 4,
) -> dict[str, float]:
    r"""
    Compares the float32 graphs in `export_dir` with `model` on real inputs through the same API
    (`encode_queries`, `encode_products` with `images`, the image tower's features, and `encode_images` where
    the model takes image queries), with the export's processor on both sides. Batches of `batch_size` make padded
    batches of different lengths. Returns the smallest cosine of each part (and of the int8 query encoder, which
    is reported, not bounded); raises `OnnxParityError` when a float32 part is below `min_cosine`.

    Example:
    ```python
    >>> check_onnx_parity(model, "exports/main_job", *default_parity_inputs())
    {'queries': 0.9999999, 'products': 0.9999999, 'image_features': 1.0, 'queries_int8': 0.998}
    ```
    """
    from .runtime import OnnxRetrievalEncoder

    encoder = OnnxRetrievalEncoder.from_pretrained(export_dir)
    processor = encoder.processor
    common = dict(processor=processor, batch_size=batch_size)
    report = {"queries": _min_cosine(model.encode_queries(list(queries), **common),
                                     encoder.encode_queries(list(queries), batch_size=batch_size))}
    report["products"] = _min_cosine(model.encode_products(list(products), images=images, **common),
                                     encoder.encode_products(list(products), images=images, batch_size=batch_size))
    photos = [image for image in images or [] if image is not None]
    if photos:
        pixel_values = processor.encode_images(photos)["pixel_values"]
        with torch.inference_mode():
            expected = model.get_image_features(pixel_values).float().numpy()
        report["image_features"] = _min_cosine(expected, encoder.image_features(pixel_values.numpy()))
        if encoder.image_queries_unsupported is None:
            report["image_queries"] = _min_cosine(model.encode_images(photos, **common),
                                                  encoder.encode_images(photos, batch_size=batch_size))
    failed = {part: cosine for part, cosine in report.items() if not cosine >= min_cosine}
    if (Path(export_dir) / GRAPH_FILES["query_int8"]).is_file():
        quantized = OnnxRetrievalEncoder.from_pretrained(export_dir, quantized=True)
        report["queries_int8"] = _min_cosine(encoder.encode_queries(list(queries), batch_size=batch_size),
                                             quantized.encode_queries(list(queries), batch_size=batch_size))
    if failed:
        parts = ", ".join(f"{part} {cosine:.7f}" for part, cosine in failed.items())
        raise OnnxParityError(f"ONNX export does not reproduce the torch model: min cosine {parts} < {min_cosine}")
    return report


__all__ = [
    "GRAPH_FILES", "MANIFEST_NAME", "MIN_PARITY_COSINE", "OnnxExportError", "OnnxParityError", "check_onnx_parity",
    "default_parity_inputs", "export_onnx",
]
