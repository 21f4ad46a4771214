"""onnxruntime inference of an `export_onnx` folder behind the `encode_*` API of `MultimodalRetrievalModel`.

`load_encoder(path, backend=...)` is the one entry point, in the manner of sentence-transformers' `backend=`:
`"torch"` loads the checkpoint, `"onnx"` the float32 graphs of an export folder, `"onnx-int8"` its dynamically
quantised query encoder (products and images stay float32, so an index built with either matches).

Example:
```python
>>> encoder = load_encoder("exports/main_job", backend="onnx-int8", intra_op_threads=1)
>>> encoder.encode_queries("red running shoes").shape
(384,)
```
"""

import json
from pathlib import Path

import numpy as np
import torch

from .export import MANIFEST_NAME, MODEL_CONFIG_NAME, VISUAL_TAGGER_WEIGHTS_NAME

BACKENDS = ("torch", "onnx", "onnx-int8")


def _session(path: Path, intra_op_threads: int | None, providers):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    if intra_op_threads is not None:
        options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = 1
    return onnxruntime.InferenceSession(str(path), options, providers=providers or ["CPUExecutionProvider"])


def read_manifest(export_dir: str | Path) -> dict:
    """The `onnx_export.json` of an export folder; a `FileNotFoundError` naming the folder when it has none.

    Example: `read_manifest("exports/main_job")["model_fingerprint"]`.
    """
    path = Path(export_dir) / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{export_dir} is not an ONNX export (no {MANIFEST_NAME}); make one with "
            f"`mmretrieval export-onnx --model CHECKPOINT --output_dir {export_dir}`"
        )
    return json.loads(path.read_text(encoding="utf-8"))


class OnnxRetrievalEncoder:
    r"""
    The `encode_queries` / `encode_products` / `encode_images` / `similarity` API of `MultimodalRetrievalModel`,
    run by onnxruntime on the graphs of an `export_onnx` folder: same arguments, same types (float32 numpy by
    default, a torch tensor with `convert_to_tensor=True`, a vector for one query string), same embeddings within
    the export's parity bound. Only the CPU is supported by default (`device` must be None or "cpu"; pass
    onnxruntime `providers` for others).

    Args:
        export_dir: the folder `export_onnx` wrote.
        quantized (`bool`): use the int8 query encoder (`query_encoder_int8.onnx`).
        intra_op_threads (`int`, *optional*): threads per graph run; onnxruntime's default (all cores) when None.
            One thread suits batch-1 serving with one process per core.
        providers (`list`, *optional*): onnxruntime execution providers (default: the CPU).

    Example:
    ```python
    >>> encoder = OnnxRetrievalEncoder.from_pretrained("exports/main_job", quantized=True, intra_op_threads=1)
    >>> encoder.similarity(encoder.encode_queries(["red shoes"]), encoder.encode_products(["Red Shoes"])).shape
    torch.Size([1, 1])
    ```
    """

    def __init__(self, export_dir: str | Path, quantized: bool = False, intra_op_threads: int | None = None,
                 providers=None):
        from ..configuration_mmretrieval import MultimodalRetrievalConfig
        from ..processing_mmretrieval import MultimodalRetrievalProcessor

        self.export_dir = Path(export_dir)
        self.manifest = read_manifest(self.export_dir)
        graphs = self.manifest["graphs"]
        query_role = "query_int8" if quantized else "query"
        if query_role not in graphs:
            raise FileNotFoundError(f"{self.export_dir} has no int8 query encoder (exported with --no_int8)")
        self.quantized = quantized
        self.processor = MultimodalRetrievalProcessor.from_pretrained(self.export_dir)
        self.config = MultimodalRetrievalConfig.from_json_file(self.export_dir / MODEL_CONFIG_NAME)
        sessions = {role: _session(self.export_dir / graphs[role]["file"], intra_op_threads, providers)
                    for role in (query_role, "product", "image") if role in graphs}
        self.query_session = sessions[query_role]
        self.product_session = sessions["product"]
        self.image_session = sessions.get("image")
        self.visual_tagger = self._load_visual_tagger()

    @classmethod
    def from_pretrained(cls, export_dir: str | Path, quantized: bool = False, intra_op_threads: int | None = None,
                        providers=None) -> "OnnxRetrievalEncoder":
        """Loads an export folder (see the class docstring). Example:
        `OnnxRetrievalEncoder.from_pretrained("exports/main_job", quantized=True)`."""
        return cls(export_dir, quantized=quantized, intra_op_threads=intra_op_threads, providers=providers)

    def _load_visual_tagger(self):
        if not self.manifest.get("visual_tagger"):
            return None
        from ..modeling_mmretrieval import VisualWordTagger

        weights = np.load(self.export_dir / VISUAL_TAGGER_WEIGHTS_NAME)
        tagger = VisualWordTagger(self.config, self.manifest["image_feature_size"])
        with torch.no_grad():
            tagger.classifier.weight.copy_(torch.from_numpy(weights["weight"]))
            tagger.classifier.bias.copy_(torch.from_numpy(weights["bias"]))
        return tagger.eval()

    @property
    def embedding_dim(self) -> int:
        """Size of the query and product embeddings."""
        return self.manifest["embedding_dim"]

    @property
    def image_queries_unsupported(self) -> str | None:
        """Why this model cannot embed image queries (as `check_image_queries_supported` says), or None."""
        return self.manifest.get("image_queries_unsupported")

    @property
    def model_fingerprint(self) -> str:
        """The exported checkpoint's `retrieval.search.model_fingerprint`: an index built by it matches."""
        return self.manifest["model_fingerprint"]

    def get_processor(self, processor=None):
        """`processor` when given, else the export's own. Example: `encoder.get_processor().max_query_length`."""
        return processor if processor is not None else self.processor

    # ----- graph runs -----------------------------------------------------------------------------------------
    @staticmethod
    def _feed(session, inputs: dict) -> dict[str, np.ndarray]:
        feed = {}
        for node in session.get_inputs():
            value = inputs[node.name]
            feed[node.name] = value.numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
        return feed

    def image_features(self, pixel_values: np.ndarray) -> np.ndarray:
        """The image tower's features of preprocessed images `(n, 3, height, width)`, shape `(n, image_feature_size)`,
        as `model.get_image_features(pixel_values)`. Example:
        `encoder.image_features(encoder.processor.encode_images([photo])["pixel_values"].numpy())`."""
        if self.image_session is None:
            raise ValueError("`architecture='text_only'` has no image tower.")
        return self.image_session.run(["image_features"], {"pixel_values": np.asarray(pixel_values, np.float32)})[0]

    def _query_embeddings(self, inputs: dict, normalize: bool) -> np.ndarray:
        output = "embeddings" if normalize else "unnormalized_embeddings"
        return self.query_session.run([output], self._feed(self.query_session, inputs))[0]

    def _product_embeddings(self, inputs: dict, normalize: bool) -> np.ndarray:
        if self.config.uses_images:
            count = inputs["input_ids"].shape[0]
            image_mask = inputs.get("image_mask", torch.zeros(count, dtype=torch.bool)).numpy().astype(bool)
            features = np.zeros((count, self.manifest["image_feature_size"]), dtype=np.float32)
            if image_mask.any():
                features[image_mask] = self.image_features(inputs["pixel_values"].numpy()[image_mask])
            if self.visual_tagger is not None and "pixel_values" in inputs:
                # As `get_product_text_features`: the colour read off the image goes into texts that name none.
                with torch.no_grad():
                    ids, mask, types = self.visual_tagger.write_tags(
                        inputs["input_ids"], inputs["attention_mask"], inputs.get("token_type_ids"),
                        torch.from_numpy(features), torch.from_numpy(image_mask))
                inputs = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
            inputs = {**inputs, "image_features": features, "image_mask": image_mask}
        output = "embeddings" if normalize else "unnormalized_embeddings"
        return self.product_session.run([output], self._feed(self.product_session, inputs))[0]

    # ----- the encode API -------------------------------------------------------------------------------------
    def encode_queries(self, queries: str | list[str], processor=None, batch_size: int = 32,
                       show_progress_bar: bool = False, normalize: bool = True, convert_to_numpy: bool = True,
                       convert_to_tensor: bool = False, device=None):
        """As `MultimodalRetrievalModel.encode_queries`. Example: `encoder.encode_queries(["red shoes"]).shape`."""
        from ..processing_mmretrieval import validate_texts

        processor = self.get_processor(processor)
        texts = validate_texts(queries, "Query")
        return _encode_in_batches(
            texts, [len(text) for text in texts],
            lambda rows: self._query_embeddings(processor.encode_queries(rows), normalize),
            single=isinstance(queries, str), batch_size=batch_size, show_progress_bar=show_progress_bar,
            convert_to_numpy=convert_to_numpy, convert_to_tensor=convert_to_tensor, device=device,
        )

    def encode_products(self, products, images: list | None = None, processor=None, batch_size: int = 32,
                        show_progress_bar: bool = False, normalize: bool = True, convert_to_numpy: bool = True,
                        convert_to_tensor: bool = False, device=None):
        """As `MultimodalRetrievalModel.encode_products`: catalogue rows or texts, `images` aligned (None for
        image-less). Example: `encoder.encode_products([{"title": "Red Shoes"}], images=[photo]).shape`."""
        from ..modeling_mmretrieval import as_product_rows

        processor = self.get_processor(processor)
        rows = as_product_rows(products, processor.product_text_fields[0])
        if images is not None and len(images) != len(rows):
            raise ValueError(f"Got {len(images)} images for {len(rows)} products; pass None for missing images.")
        lengths = [len(text) for text in processor.product_texts(rows)]
        items = list(zip(rows, images)) if images is not None else [(row, None) for row in rows]

        def embed(batch):
            batch_images = [image for _, image in batch] if images is not None else None
            return self._product_embeddings(processor.encode_products([row for row, _ in batch], images=batch_images),
                                            normalize)

        return _encode_in_batches(
            items, lengths, embed, single=False, batch_size=batch_size, show_progress_bar=show_progress_bar,
            convert_to_numpy=convert_to_numpy, convert_to_tensor=convert_to_tensor, device=device,
        )

    def encode_images(self, images: list, processor=None, batch_size: int = 32, show_progress_bar: bool = False,
                      normalize: bool = True, convert_to_numpy: bool = True, convert_to_tensor: bool = False,
                      device=None):
        """As `MultimodalRetrievalModel.encode_images` (image queries: 4tower with a concat fusion; other models
        raise its `ValueError`). Example: `encoder.encode_images([photo]).shape`."""
        if self.image_queries_unsupported is not None:
            raise ValueError(self.image_queries_unsupported)
        processor = self.get_processor(processor)
        images = list(images)
        for position, image in enumerate(images):
            if image is None:
                raise ValueError(f"Image {position} is None: an image query needs an image.")
        output = "image_query_embeddings" if normalize else "unnormalized_image_query_embeddings"
        return _encode_in_batches(
            images, [0] * len(images),
            lambda batch: self.image_session.run(
                [output], {"pixel_values": processor.encode_images(batch)["pixel_values"].numpy()})[0],
            single=False, batch_size=batch_size, show_progress_bar=show_progress_bar,
            convert_to_numpy=convert_to_numpy, convert_to_tensor=convert_to_tensor, device=device,
        )

    @staticmethod
    def similarity(embeddings1, embeddings2) -> torch.Tensor:
        """Cosine similarity matrix, as `MultimodalRetrievalModel.similarity`. Example:
        `encoder.similarity(queries, products).shape`."""
        from ..modeling_mmretrieval import MultimodalRetrievalModel

        return MultimodalRetrievalModel.similarity(embeddings1, embeddings2)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({str(self.export_dir)!r}, architecture={self.config.architecture!r}, "
                f"quantized={self.quantized})")


def _encode_in_batches(items: list, lengths: list[int], embed, *, single: bool, batch_size: int,
                       show_progress_bar: bool, convert_to_numpy: bool, convert_to_tensor: bool, device):
    """`embed_in_length_order` on onnxruntime (CPU arrays), returned as `MultimodalRetrievalModel.encode_*` return."""
    from ..modeling_mmretrieval import as_requested_embeddings, embed_in_length_order

    if device is not None and torch.device(device).type != "cpu":
        raise ValueError(f"device={device!r}: the ONNX encoder runs where its onnxruntime providers run; pass "
                         "providers= to OnnxRetrievalEncoder.from_pretrained instead")
    embeddings = embed_in_length_order(items, lengths, embed, batch_size=batch_size,
                                       show_progress_bar=show_progress_bar)
    return as_requested_embeddings(embeddings, single=single, convert_to_numpy=convert_to_numpy,
                                   convert_to_tensor=convert_to_tensor)


def load_encoder(path: str | Path, backend: str = "torch", *, intra_op_threads: int | None = None, providers=None):
    r"""
    An object with the `encode_queries` / `encode_products` / `encode_images` / `similarity` API: the torch model of
    the checkpoint at `path` (`backend="torch"`, eval mode), or onnxruntime on the export folder at `path`
    (`"onnx"`: float32 graphs; `"onnx-int8"`: the int8 query encoder), as sentence-transformers' `backend=`.

    Example:
    ```python
    >>> torch_model = load_encoder("outputs/main_job/final")
    >>> onnx_model = load_encoder("exports/main_job", backend="onnx")
    >>> torch_model.encode_queries(["red shoes"]) @ onnx_model.encode_queries(["red shoes"]).T
    array([[1.]], dtype=float32)
    ```
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {', '.join(BACKENDS)}")
    if backend == "torch":
        from ..modeling_mmretrieval import MultimodalRetrievalModel

        if (Path(path) / MANIFEST_NAME).is_file() and not (Path(path) / "config.json").is_file():
            raise ValueError(f"{path} is an ONNX export; load it with backend='onnx' or 'onnx-int8', or pass the "
                             "checkpoint folder for backend='torch'")
        return MultimodalRetrievalModel.from_pretrained(path).eval()
    return OnnxRetrievalEncoder.from_pretrained(path, quantized=backend == "onnx-int8",
                                                intra_op_threads=intra_op_threads, providers=providers)


__all__ = ["BACKENDS", "OnnxRetrievalEncoder", "load_encoder", "read_manifest"]
