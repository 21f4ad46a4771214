"""Other libraries' entry points into a checkpoint: sentence-transformers' module (`modules.json`) and transformers'
`pipeline("feature-extraction")` (`custom_pipelines` in `config.json`).

This is the fifth file a checkpoint carries (beside configuration, modeling, processing and losses), so that
`SentenceTransformer(checkpoint, trust_remote_code=True)` loads the model without this package, the way
jina-embeddings-v3 and jina-clip ship their own module. `modules.json` names
`MultimodalRetrievalSentenceTransformer`; it is a plain `torch.nn.Module` with the methods sentence-transformers
calls (`load`, `preprocess`, `forward`, `save`, `modalities`), so neither this file nor the model imports
sentence-transformers, which stays an optional dependency.

- `encode` / `encode_query`: text queries (`model.get_query_embeddings`); a PIL image is an image query
  (`model.get_image_query_embeddings`, 4tower with a concat fusion; other models refuse with one line).
- `encode_document`: products, as their text, or `{"text": ..., "image": PIL image or None}`
  (`model.get_product_embeddings`).

`pipeline("feature-extraction", model=checkpoint, trust_remote_code=True)` gives one query embedding per text
(or per PIL image, for models that embed image queries), not per-token states: this model's unit is the query.

Embeddings are L2-normalised, as the package's own are, and compared by cosine similarity.
"""

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from torch import nn
from transformers import Pipeline

SENTENCE_TRANSFORMERS_MODULES_NAME = "modules.json"
SENTENCE_TRANSFORMERS_CONFIG_NAME = "config_sentence_transformers.json"
# sentence-transformers 6.x routes `encode_query`/`encode_document` as a `task` and checks input modalities.
SENTENCE_TRANSFORMERS_REQUIREMENT = ">=6.0,<7"
# The key of the features dict that tells `forward` which embedding the batch asks for.
_INPUT_KIND = "mmretrieval_input_kind"


def sentence_transformers_files() -> dict[str, str]:
    """The files, by name, that make a checkpoint folder a sentence-transformers model (besides this module).

    `MultimodalRetrievalModel.save_pretrained` writes them next to the weights; they hold no path and no weights,
    so they are the same for every checkpoint.

    Example:
    ```python
    >>> sorted(sentence_transformers_files())
    ['config_sentence_transformers.json', 'modules.json']
    ```
    """
    import transformers

    module_type = f"{Path(__file__).stem}.{MultimodalRetrievalSentenceTransformer.__name__}"
    modules = [{"idx": 0, "name": "0", "path": "", "type": module_type}]
    config = {
        "model_type": "SentenceTransformer",
        "__version__": {"transformers": transformers.__version__, "pytorch": torch.__version__.split("+")[0]},
        # Empty prompts keep `encode_query`/`encode_document` from falling back to any default prompt.
        "prompts": {"query": "", "document": ""},
        "default_prompt_name": None,
        "similarity_fn_name": "cosine",
        "requirements": {
            "sentence-transformers": {
                "specifier": SENTENCE_TRANSFORMERS_REQUIREMENT,
                "reason": "the checkpoint's module relies on the task and modality routing of sentence-transformers 6",
            }
        },
    }
    return {
        SENTENCE_TRANSFORMERS_MODULES_NAME: json.dumps(modules, indent=2) + "\n",
        SENTENCE_TRANSFORMERS_CONFIG_NAME: json.dumps(config, indent=2, sort_keys=True) + "\n",
    }


def custom_pipelines() -> dict:
    """The `custom_pipelines` entry of `config.json` through which `pipeline("feature-extraction", ...)` finds
    `MultimodalRetrievalFeatureExtractionPipeline`."""
    impl = f"{Path(__file__).stem}.{MultimodalRetrievalFeatureExtractionPipeline.__name__}"
    return {"feature-extraction": {"impl": impl, "pt": ["AutoModel"]}}


def write_integration_files(save_directory: str | os.PathLike) -> None:
    """Makes a saved checkpoint folder (which carries this module's file) loadable by sentence-transformers and
    transformers' `pipeline`: writes `sentence_transformers_files()` and adds `custom_pipelines` to `config.json`."""
    for name, text in sentence_transformers_files().items():
        Path(save_directory, name).write_text(text, encoding="utf-8")
    config_file = Path(save_directory, "config.json")
    if config_file.is_file():
        config = json.loads(config_file.read_text(encoding="utf-8"))
        if config.get("custom_pipelines") != custom_pipelines():
            config["custom_pipelines"] = custom_pipelines()
            config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


class MultimodalRetrievalSentenceTransformer(nn.Module):
    r"""
    The sentence-transformers module of a checkpoint: the retriever and its processor as one input module.

    sentence-transformers builds it from `modules.json` with `load`; `encode_query` (and plain `encode`) embed
    queries, `encode_document` products. Batches hold one kind of input: texts, images, or product dicts.

    Example:
    ```python
    >>> from sentence_transformers import SentenceTransformer
    >>> model = SentenceTransformer("outputs/main_job/final", trust_remote_code=True)
    >>> queries = model.encode_query(["red running shoes"])
    >>> products = model.encode_document([{"text": "Nike Men Red Running Shoes", "image": pil_image}])
    >>> model.similarity(queries, products)
    ```
    """

    # What sentence-transformers reads off its first module.
    save_in_root = True
    forward_kwargs = {"task"}

    def __init__(self, model: nn.Module, processor):
        super().__init__()
        self.model = model  # a submodule: sentence-transformers' `.to(device)` and `.eval()` reach it
        self.processor = processor

    @classmethod
    def load(
        cls,
        model_name_or_path: str,
        subfolder: str = "",
        token: bool | str | None = None,
        cache_folder: str | None = None,
        revision: str | None = None,
        local_files_only: bool = False,
        model_kwargs: dict | None = None,
        processor_kwargs: dict | None = None,
        config_kwargs: dict | None = None,
        **kwargs,
    ) -> "MultimodalRetrievalSentenceTransformer":
        """Loads the checkpoint's model and processor (sentence-transformers calls this with its loading options)."""
        from .modeling_mmretrieval import MultimodalRetrievalModel
        from .processing_mmretrieval import MultimodalRetrievalProcessor

        location = os.path.join(model_name_or_path, subfolder) if subfolder else model_name_or_path
        hub_kwargs = {"token": token, "cache_dir": cache_folder, "revision": revision, "local_files_only": local_files_only}
        hub_kwargs = {key: value for key, value in hub_kwargs.items() if value is not None}
        model_options = {key: value for key, value in (model_kwargs or {}).items() if key != "trust_remote_code"}
        model = MultimodalRetrievalModel.from_pretrained(location, **hub_kwargs, **model_options, **(config_kwargs or {}))
        processor = MultimodalRetrievalProcessor.from_pretrained(location, **hub_kwargs, **(processor_kwargs or {}))
        return cls(model.eval(), processor)

    # ----- what sentence-transformers asks of an input module -----------------------------------------------
    @property
    def modalities(self) -> list:
        """Texts always; images and `{"text", "image"}` products for models with an image tower."""
        if not self.model.config.uses_images:
            return ["text"]
        return ["text", "image", ("image", "text")]

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def max_seq_length(self) -> int:
        return self.processor.max_query_length

    def get_embedding_dimension(self) -> int:
        return self.model.embedding_dim

    def preprocess(self, inputs: Sequence, prompt: str | None = None, task: str | None = None, **kwargs) -> dict:
        """Model inputs for one batch: queries (task None or "query") or products (task "document")."""
        kinds = {_input_kind(item) for item in inputs}
        if len(kinds) != 1:
            raise ValueError(f"A batch holds one kind of input (texts, images or products); got {sorted(kinds)}.")
        kind = kinds.pop()
        prompt = prompt or ""
        if task == "document":
            if kind == "image":
                raise ValueError("A product needs its text: pass {'text': ..., 'image': ...} to encode_document.")
            field = self.processor.product_text_fields[0]
            rows = [{field: prompt + _part(item, "text")} for item in inputs]
            images = [_part(item, "image") for item in inputs] if kind == "product" else None
            if images is not None and not self.model.config.uses_images:
                raise ValueError("This model is text_only: it embeds product text, not product images.")
            return {**self.processor.encode_products(rows, images=images), _INPUT_KIND: "product"}
        if kind == "text":
            return {**self.processor.encode_queries([prompt + _part(item, "text") for item in inputs]), _INPUT_KIND: "query"}
        if kind == "image":
            self.model.check_image_queries_supported()
            images = [_part(item, "image") for item in inputs]
            if any(image is None for image in images):
                raise ValueError("An image query needs an image; got None.")
            return {"pixel_values": self.processor.encode_images(images)["pixel_values"], _INPUT_KIND: "image_query"}
        raise ValueError("A query is a text or an image; products ({'text': ..., 'image': ...}) go to encode_document.")

    def forward(self, features: dict, task: str | None = None, **kwargs) -> dict:
        inputs = {key: value for key, value in features.items() if key != _INPUT_KIND}
        kind = features[_INPUT_KIND]
        if kind == "query":
            embeddings = self.model.get_query_embeddings(**inputs)
        elif kind == "product":
            embeddings = self.model.get_product_embeddings(**inputs)
        else:
            embeddings = self.model.get_image_query_embeddings(pixel_values=inputs["pixel_values"])
        features["sentence_embedding"] = embeddings
        return features

    def save(self, output_path: str, *args, **kwargs) -> None:
        """Saves the checkpoint (model, processor, this file and `modules.json`) into `output_path`."""
        self.model.save_pretrained(output_path)
        self.processor.save_pretrained(output_path)


class MultimodalRetrievalFeatureExtractionPipeline(Pipeline):
    r"""
    `pipeline("feature-extraction")` for a retriever checkpoint: the L2-normalised query embedding of each text (a
    list of floats; a tensor with `return_tensors=True`), or of each PIL image for 4tower models with a concat fusion.

    Example:
    ```python
    >>> from transformers import pipeline
    >>> extractor = pipeline("feature-extraction", model="outputs/main_job/final", trust_remote_code=True)
    >>> len(extractor("red running shoes"))  # the model's embedding_dim
    384
    ```
    """

    # The processor is the one saved with the checkpoint, found by the model (`model.get_processor()`).
    _load_processor = False
    _load_tokenizer = False
    _load_image_processor = False
    _load_feature_extractor = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.processor = self.processor or self.model.get_processor()

    def _sanitize_parameters(self, return_tensors: bool | None = None, **kwargs):
        postprocess = {} if return_tensors is None else {"return_tensors": return_tensors}
        return {}, {}, postprocess

    def preprocess(self, inputs) -> dict:
        if isinstance(inputs, Image.Image):
            self.model.check_image_queries_supported()
            return {"pixel_values": self.processor.encode_images([inputs])["pixel_values"]}
        return dict(self.processor.encode_queries([inputs]))

    def _forward(self, model_inputs: dict) -> dict:
        if "pixel_values" in model_inputs:
            return {"embeddings": self.model.get_image_query_embeddings(pixel_values=model_inputs["pixel_values"])}
        return {"embeddings": self.model.get_query_embeddings(**model_inputs)}

    def postprocess(self, model_outputs: dict, return_tensors: bool = False):
        embedding = model_outputs["embeddings"][0]
        return embedding if return_tensors else embedding.tolist()


def _input_kind(item) -> str:
    """`text`, `image` or `product` (both), for an input as sentence-transformers passes it: a string, a PIL
    image, or a dict with `text` and/or `image`."""
    if isinstance(item, str):
        return "text"
    if isinstance(item, Image.Image):
        return "image"
    if isinstance(item, dict) and item and set(item) <= {"text", "image"}:
        return "product" if len(item) == 2 else next(iter(item))
    raise TypeError(f"Cannot embed a {type(item).__name__}: pass texts, PIL images or {{'text', 'image'}} dicts.")


def _part(item, modality: str):
    """The text or image of one input (a dict's entry, or the input itself)."""
    return item.get(modality) if isinstance(item, dict) else item


__all__ = [
    "MultimodalRetrievalFeatureExtractionPipeline", "MultimodalRetrievalSentenceTransformer", "custom_pipelines",
    "sentence_transformers_files", "write_integration_files",
]
