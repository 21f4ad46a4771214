"""Processor turning queries, product rows and images into `MultimodalRetrievalModel` inputs.

It bundles up to three sub-processors: the text-tower tokenizer (always), a PIL-based image processor
(4tower/3tower) and the dual encoder's tokenizer (4tower queries, e.g. CLIP's BPE tokenizer). Products are
rows (mappings) whose `product_text_fields` are joined into one product text.
"""

import json
import math
import os
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoTokenizer, BatchFeature
from transformers.dynamic_module_utils import custom_object_save
from transformers.processing_utils import ProcessorMixin

PROCESSOR_CONFIG_NAME = "processor_config.json"
DUAL_TOKENIZER_FOLDER = "dual_tokenizer"

# The input contract of `MultimodalRetrievalModel.forward`, defined once: query tensors carry the `query_`
# prefix, product text tensors the `product_` prefix, product image tensors and loss inputs none.
QUERY_INPUT_PREFIX = "query_"
PRODUCT_INPUT_PREFIX = "product_"
PRODUCT_IMAGE_INPUTS = ("pixel_values", "image_mask", "image_features")
LOSS_INPUTS = ("false_negative_mask",)


def pair_model_inputs(query_inputs: Mapping | None, product_inputs: Mapping | None) -> dict:
    """The `model.forward` batch for the inputs of `get_query_embeddings` and `get_product_embeddings`.

    Example:
    ```python
    >>> sorted(pair_model_inputs({"input_ids": q}, {"input_ids": p, "image_mask": m}))
    ['image_mask', 'product_input_ids', 'query_input_ids']
    ```
    """
    batch = {f"{QUERY_INPUT_PREFIX}{key}": value for key, value in (query_inputs or {}).items()}
    for key, value in (product_inputs or {}).items():
        batch[key if key in PRODUCT_IMAGE_INPUTS else f"{PRODUCT_INPUT_PREFIX}{key}"] = value
    return batch


def split_model_inputs(batch: Mapping) -> tuple[dict, dict]:
    """Splits a `model.forward` batch into keyword arguments of `get_query_embeddings` and `get_product_embeddings`.

    The inverse of `pair_model_inputs`: `query_*` and `product_*` keys lose their prefix; `pixel_values`,
    `image_mask` and `image_features` belong to the products; loss inputs and `None` values are dropped.

    Example:
    ```python
    >>> queries, products = split_model_inputs({"query_input_ids": q, "product_input_ids": p, "image_mask": m})
    >>> sorted(queries), sorted(products)
    (['input_ids'], ['image_mask', 'input_ids'])
    ```
    """
    query_inputs, product_inputs, unknown = {}, {}, []
    for key, value in batch.items():
        if value is None or key in LOSS_INPUTS:
            continue
        if key.startswith(QUERY_INPUT_PREFIX):
            query_inputs[key.removeprefix(QUERY_INPUT_PREFIX)] = value
        elif key.startswith(PRODUCT_INPUT_PREFIX):
            product_inputs[key.removeprefix(PRODUCT_INPUT_PREFIX)] = value
        elif key in PRODUCT_IMAGE_INPUTS:
            product_inputs[key] = value
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(
            f"Unexpected batch keys {unknown}: a contrastive batch holds `query_*`, `product_*` and "
            f"{list(PRODUCT_IMAGE_INPUTS)}."
        )
    for side, inputs in (("query", query_inputs), ("product", product_inputs)):
        if "input_ids" not in inputs:
            raise ValueError(f"The batch has no `{side}_input_ids`.")
    return query_inputs, product_inputs


def field_text(value, field: str = "field") -> str:
    """The text of one product field: empty for missing values (None, NaN), numbers as written, strings as is.

    Containers and bytes are refused: their `repr` would be embedded as if it were product text. Text that is not
    valid Unicode (a lone surrogate, e.g. from a badly decoded file) is refused with a `ValueError` naming the
    field, instead of the tokenizer's opaque `TypeError`.
    """
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, str):
        if not value.isascii():  # the check costs an encode only for non-ASCII text
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as error:
                raise ValueError(f"Product field {field!r} is not valid Unicode text ({error.reason}).") from error
        return value.strip()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise TypeError(f"Product field {field!r} must be text or a number, got {type(value).__name__}.")


def join_product_text(product: Mapping, fields: Sequence[str], separator: str) -> str:
    """Joins the non-empty `fields` of a product row, in order.

    Example:
    ```python
    >>> join_product_text({"title": "Red Tee", "description": None}, ["title", "description"], " | ")
    'Red Tee'
    ```
    """
    return separator.join(text for text in (field_text(product.get(name), name) for name in fields) if text)


def pad_width_to_multiple(
    encoded: Mapping[str, torch.Tensor], multiple: int | None, max_width: int, pad_token_id: int, padding_side: str
) -> dict[str, torch.Tensor]:
    """Widens a padded token batch to the next multiple of `multiple` columns, but never past `max_width`.

    `input_ids` are padded with `pad_token_id`, every other tensor (attention mask, token types) with 0, on
    the tokenizer's padding side. Unlike the tokenizers' own `pad_to_multiple_of`, the width stays within
    the truncation length, so a tower with 77 positions (CLIP) never sees 80.

    Example:
    ```python
    >>> batch = {"input_ids": torch.tensor([[101, 7592, 102]]), "attention_mask": torch.ones(1, 3, dtype=torch.long)}
    >>> pad_width_to_multiple(batch, 8, 128, 0, "right")["attention_mask"].tolist()
    [[1, 1, 1, 0, 0, 0, 0, 0]]
    ```
    """
    width = next(iter(encoded.values())).shape[1]
    target = width if not multiple else min(max(width, max_width), -(-width // multiple) * multiple)
    if target == width:
        return dict(encoded)
    widths = (0, target - width) if padding_side == "right" else (target - width, 0)
    return {
        key: torch.nn.functional.pad(value, widths, value=pad_token_id if key == "input_ids" else 0)
        for key, value in encoded.items()
    }


def validate_texts(texts: Sequence[str], what: str = "Query") -> list[str]:
    """Checks a list of texts (a single string counts as one), raising a typed error that names the position."""
    if isinstance(texts, str):
        texts = [texts]
    checked = list(texts)
    if not checked:
        raise ValueError(f"Got no {what.lower()} texts to encode.")
    for position, text in enumerate(checked):
        if not isinstance(text, str):
            raise TypeError(f"{what} {position} must be a string, got {type(text).__name__}.")
        if not text.strip():
            raise ValueError(f"{what} {position} is empty or whitespace only; it would embed as noise.")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as error:
            raise ValueError(f"{what} {position} is not valid Unicode text ({error.reason}).") from error
    return checked


class MultimodalRetrievalProcessor(ProcessorMixin):
    r"""
    Tokenizes queries and product texts and preprocesses product images for [`MultimodalRetrievalModel`].

    Args:
        tokenizer: tokenizer of the text tower(s).
        image_processor (*optional*): PIL-based image processor of the image tower (4tower/3tower).
        dual_tokenizer (*optional*): tokenizer of the dual encoder's text tower (4tower).
        max_query_length (`int`): truncation length of queries in text-tower tokens.
        max_product_length (`int`): truncation length of product texts.
        product_text_fields (`list[str]`): product row fields joined into the product text.
        max_dual_length (`int`): truncation length for the dual encoder's tokenizer (CLIP uses 77).
        fast_image_processing (`bool`): a saved preference, read by `modeling_mmretrieval.speedups.apply`:
            whether to install the batched image path (`batched_image_processor`) for this processor. The
            processor itself only ever calls `batched_image_processor` (when set) or `image_processor`.
        pad_to_multiple_of (`int` or `None`): batches are padded to their longest text, then widened to a
            multiple of this (at most the truncation length). Few distinct widths keep the kernels torch's CPU
            backend caches per input shape, and the heap memory each one pins, few (docs/performance.md,
            `benchmarks/shape_cache_memory.py`). `None` pads to the longest text only.

    Images are PIL images or `None`; `None` marks an image-less product (`image_mask` False, and the image
    tower never sees the zero placeholder left in `pixel_values`). Decoding files and bytes is the caller's
    job (`modeling_mmretrieval.data.images.load_product_image` does it defensively).

    `batched_image_processor` (not saved) is an optional drop-in for `image_processor` on whole batches,
    with the same outputs within a stated tolerance; `speedups.apply(processor=...)` installs one.

    Example:
    ```python
    >>> processor = MultimodalRetrievalProcessor.from_pretrained("path/to/checkpoint")
    >>> batch = processor(queries=["white sneakers"], products=[{"title": "Nike Men White Sneakers"}],
    ...                   images=[pil_image])
    >>> sorted(batch)  # doctest: +SKIP
    ['image_mask', 'pixel_values', 'product_attention_mask', 'product_input_ids', 'query_attention_mask', ...]
    ```
    """

    def __init__(
        self,
        tokenizer,
        image_processor=None,
        dual_tokenizer=None,
        max_query_length: int = 32,
        max_product_length: int = 128,
        product_text_fields: Sequence[str] = ("title", "description"),
        max_dual_length: int = 77,
        fast_image_processing: bool = False,
        pad_to_multiple_of: int | None = 8,
    ):
        # ProcessorMixin requires every sub-processor; here the image processor and dual tokenizer are
        # optional (text-only models have neither), so attributes are set directly and saving/loading is
        # done by this class.
        self.chat_template = None
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.dual_tokenizer = dual_tokenizer
        self.max_query_length = max_query_length
        self.max_product_length = max_product_length
        self.product_text_fields = list(product_text_fields)
        self.max_dual_length = max_dual_length
        self.fast_image_processing = fast_image_processing
        self.batched_image_processor = None
        if pad_to_multiple_of is not None and (
            isinstance(pad_to_multiple_of, bool) or not isinstance(pad_to_multiple_of, int) or pad_to_multiple_of < 1
        ):
            raise ValueError(f"pad_to_multiple_of must be a positive integer or None, got {pad_to_multiple_of!r}")
        self.pad_to_multiple_of = pad_to_multiple_of

    @property
    def product_text_separator(self) -> str:
        sep = getattr(self.tokenizer, "sep_token", None)
        return f" {sep} " if sep else " | "

    # ----- encoding ----------------------------------------------------------------------------------------
    def _tokenize(self, tokenizer, texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
        # Fast tokenizers keep padding/truncation as shared state that every call rewrites, so concurrent
        # calls with different lengths (queries vs products) would see each other's settings.
        with self._tokenizer_lock:
            encoded = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        return pad_width_to_multiple(
            encoded, self.pad_to_multiple_of, max_length, tokenizer.pad_token_id or 0, tokenizer.padding_side
        )

    @property
    def _tokenizer_lock(self) -> threading.Lock:
        lock = self.__dict__.get("_lock")
        if lock is None:
            lock = self.__dict__.setdefault("_lock", threading.Lock())
        return lock

    def __getstate__(self) -> dict:
        # Locks do not pickle (DataLoader workers copy the processor); each copy makes its own.
        state = dict(self.__dict__)
        state.pop("_lock", None)
        return state

    def product_texts(self, products: Sequence[Mapping]) -> list[str]:
        """The product texts the model reads, one per row; raises for a row with no text at all."""
        if not products:
            raise ValueError("Got no products to encode.")
        texts = []
        for position, product in enumerate(products):
            if not isinstance(product, Mapping):
                raise TypeError(f"Product {position} must be a mapping of field -> value, got {type(product).__name__}.")
            try:
                text = join_product_text(product, self.product_text_fields, self.product_text_separator)
            except (TypeError, ValueError) as error:
                raise type(error)(f"Product {position}: {error}") from error
            if not text:
                raise ValueError(
                    f"Product {position} has no text in any of the fields {self.product_text_fields}; "
                    f"got fields {sorted(product)[:12]}."
                )
            texts.append(text)
        return texts

    def encode_queries(self, queries: Sequence[str]) -> dict[str, torch.Tensor]:
        """Inputs of `model.get_query_embeddings` for text queries."""
        queries = validate_texts(queries, "Query")
        inputs = self._tokenize(self.tokenizer, queries, self.max_query_length)
        if self.dual_tokenizer is not None:
            dual = self._tokenize(self.dual_tokenizer, queries, self.max_dual_length)
            inputs["dual_input_ids"] = dual["input_ids"]
            inputs["dual_attention_mask"] = dual["attention_mask"]
        return inputs

    def encode_images(self, images: Sequence) -> dict[str, torch.Tensor]:
        """`pixel_values` and `image_mask` for a list of PIL images, `None` marking a missing image.

        Example:
        ```python
        >>> inputs = processor.encode_images([pil_image, None])
        >>> inputs["image_mask"].tolist()
        [True, False]
        ```
        """
        if self.image_processor is None:
            raise ValueError("This processor has no image processor (a text-only model takes no images).")
        for position, image in enumerate(images):
            if image is not None and not isinstance(image, Image.Image):
                raise TypeError(
                    f"Image {position} is a {type(image).__name__}; pass PIL images or None (decode files and bytes "
                    "with modeling_mmretrieval.data.images.load_product_image)."
                )
        image_mask = torch.tensor([image is not None for image in images], dtype=torch.bool)
        present = [image for image in images if image is not None]
        if not present:
            return {"pixel_values": torch.zeros((len(images), 3, *self._image_size())), "image_mask": image_mask}
        image_processor = self.batched_image_processor or self.image_processor
        processed = image_processor(images=present, return_tensors="pt")["pixel_values"]
        if len(present) == len(images):
            return {"pixel_values": processed, "image_mask": image_mask}  # no placeholders: spare a copy
        pixel_values = processed.new_zeros((len(images), *processed.shape[1:]))
        pixel_values[image_mask] = processed
        return {"pixel_values": pixel_values, "image_mask": image_mask}

    def _image_size(self) -> tuple[int, int]:
        size = getattr(self.image_processor, "crop_size", None) or self.image_processor.size
        if "height" in size:
            return size["height"], size["width"]
        edge = size.get("shortest_edge", 224)
        return edge, edge

    def encode_products(self, products: Sequence[Mapping], images: Sequence | None = None) -> dict[str, torch.Tensor]:
        """Inputs of `model.get_product_embeddings`; `images` aligns with `products` (None = image-less)."""
        inputs = self._tokenize(self.tokenizer, self.product_texts(products), self.max_product_length)
        if images is not None:
            if len(images) != len(products):
                raise ValueError(f"Got {len(images)} images for {len(products)} products; pass None for missing images.")
            inputs.update(self.encode_images(images))
        return inputs

    def __call__(
        self,
        queries: Sequence[str] | None = None,
        products: Sequence[Mapping] | None = None,
        images: Sequence | None = None,
        return_tensors: str = "pt",
        text: str | Sequence[str] | None = None,
    ) -> BatchFeature:
        r"""
        Model inputs, in two styles.

        - transformers style, `text=` and/or `images=`: `text` (queries) gives the inputs of
          `model.get_query_embeddings` (`input_ids`, `attention_mask`, and `dual_*` for 4tower); `images` (PIL,
          `None` for a missing one) gives `pixel_values` and `image_mask`, for `model.get_image_features` or
          `model.get_image_query_embeddings`.
        - contrastive, `queries=`/`products=` (with the products' `images=`): the `model.forward` batch, `query_*`,
          `query_dual_*`, `product_*`, `pixel_values`, `image_mask`.

        Example:
        ```python
        >>> model.get_query_embeddings(**processor(text=["white sneakers"])).shape
        torch.Size([1, 384])
        >>> sorted(processor(images=[pil_image]))
        ['image_mask', 'pixel_values']
        >>> model(**processor(queries=["white sneakers"], products=[{"title": "Nike White Sneakers"}])).loss
        ```
        """
        if text is not None and (queries is not None or products is not None):
            raise ValueError("Pass either `text=`/`images=` (query inputs, image inputs) or `queries=`/`products=` "
                             "(a contrastive batch), not both.")
        if text is not None or (images is not None and queries is None and products is None):
            inputs = self.encode_queries(text) if text is not None else {}
            if images is not None:
                inputs.update(self.encode_images([images] if isinstance(images, Image.Image) else list(images)))
            return BatchFeature(inputs, tensor_type=return_tensors)
        if queries is None and products is None:
            raise ValueError("Pass `text`, `images`, `queries` or `products`.")
        if images is not None and products is None:
            raise ValueError("`images` are product images: pass them with `products` (for query images use "
                             "`encode_images`).")
        query_inputs = self.encode_queries(queries) if queries is not None else None
        product_inputs = self.encode_products(products, images) if products is not None else None
        return BatchFeature(pair_model_inputs(query_inputs, product_inputs), tensor_type=return_tensors)

    # ----- persistence ------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "processor_class": self.__class__.__name__,
            "max_query_length": self.max_query_length,
            "max_product_length": self.max_product_length,
            "product_text_fields": self.product_text_fields,
            "max_dual_length": self.max_dual_length,
            "fast_image_processing": self.fast_image_processing,
            "pad_to_multiple_of": self.pad_to_multiple_of,
            "has_image_processor": self.image_processor is not None,
            "has_dual_tokenizer": self.dual_tokenizer is not None,
        }

    def save_pretrained(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs):
        """Saves the tokenizer(s), image processor and settings; `from_pretrained` restores them.

        `push_to_hub=True` then uploads the folder as transformers' processors do (`PushToHubMixin`): `repo_id`
        (default: the folder's name in the token's namespace), `commit_message` and the `create_repo` arguments
        (`token`, `private`, ...) in `kwargs`. `processor.push_to_hub(repo_id, ...)` is transformers' own.

        Example:
        ```python
        >>> processor.save_pretrained("retriever", push_to_hub=True, repo_id="my-user/retriever", private=True)
        ```
        """
        save_directory = Path(save_directory)
        save_directory.mkdir(parents=True, exist_ok=True)
        if push_to_hub:
            from huggingface_hub import HfApi

            commit_message = kwargs.pop("commit_message", None)
            repo_id = HfApi().create_repo(kwargs.pop("repo_id", save_directory.name), exist_ok=True, **kwargs).repo_id
            files_timestamps = self._get_files_timestamps(save_directory)
        self.tokenizer.save_pretrained(save_directory)
        if self.image_processor is not None:
            self.image_processor.save_pretrained(save_directory)
        if self.dual_tokenizer is not None:
            self.dual_tokenizer.save_pretrained(save_directory / DUAL_TOKENIZER_FOLDER)
        settings = self.to_dict()
        if self._auto_class is not None:
            # Copies this module (and its relative imports) next to the files and records `auto_map`.
            custom_object_save(self, save_directory)
            settings["auto_map"] = {self._auto_class: f"{self.__class__.__module__.split('.')[-1]}.{self.__class__.__name__}"}
        with open(save_directory / PROCESSOR_CONFIG_NAME, "w", encoding="utf-8") as handle:
            json.dump(settings, handle, indent=2, sort_keys=True)
        if push_to_hub:
            self._upload_modified_files(
                save_directory, repo_id, files_timestamps, commit_message=commit_message, token=kwargs.get("token")
            )
        return [str(save_directory / PROCESSOR_CONFIG_NAME)]

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs):
        """Loads a processor saved by `save_pretrained` from a local folder or a Hub repo id."""
        hub_kwargs = {
            key: kwargs.pop(key) for key in ("revision", "token", "cache_dir", "local_files_only") if key in kwargs
        }
        kwargs.pop("trust_remote_code", None)
        kwargs.pop("_from_auto", None)
        settings = _read_processor_settings(pretrained_model_name_or_path, hub_kwargs)
        # The sub-processors are standard classes: never let them prompt for (or run) remote code.
        hub_kwargs["trust_remote_code"] = False
        tokenizer = AutoTokenizer.from_pretrained(pretrained_model_name_or_path, **hub_kwargs)
        image_processor = None
        if settings.get("has_image_processor"):
            image_processor = AutoImageProcessor.from_pretrained(pretrained_model_name_or_path, **hub_kwargs)
        dual_tokenizer = None
        if settings.get("has_dual_tokenizer"):
            dual_tokenizer = AutoTokenizer.from_pretrained(
                pretrained_model_name_or_path, subfolder=DUAL_TOKENIZER_FOLDER, **hub_kwargs
            )
        option_names = (
            "max_query_length", "max_product_length", "product_text_fields", "max_dual_length", "fast_image_processing",
            "pad_to_multiple_of",
        )
        options = {key: settings[key] for key in option_names if key in settings}
        options.update(kwargs)
        return cls(tokenizer, image_processor=image_processor, dual_tokenizer=dual_tokenizer, **options)

    @classmethod
    def from_towers_pretrained(
        cls,
        text_model: str | os.PathLike,
        vision_or_dual_encoder: str | os.PathLike | None = None,
        *,
        config=None,
        dual_tokenizer: str | os.PathLike | None = None,
        **kwargs,
    ):
        """Builds the processor for `MultimodalRetrievalModel.from_towers_pretrained` from the same towers.

        With `config` (the model's config), lengths and product fields follow it and the dual tokenizer is
        loaded only for 4tower models. `dual_tokenizer` overrides where the dual encoder's tokenizer is read.

        Example:
        ```python
        >>> processor = MultimodalRetrievalProcessor.from_towers_pretrained(
        ...     "sentence-transformers/all-MiniLM-L6-v2", "facebook/dinov2-small", config=model.config)
        ```
        """
        if config is not None:
            kwargs.setdefault("max_query_length", config.max_query_length)
            kwargs.setdefault("max_product_length", config.max_product_length)
            kwargs.setdefault("product_text_fields", config.product_text_fields)
        architecture = config.architecture if config is not None else None
        tokenizer = AutoTokenizer.from_pretrained(text_model)
        image_processor = None
        dual = None
        if vision_or_dual_encoder is not None:
            image_processor = AutoImageProcessor.from_pretrained(vision_or_dual_encoder)
            if architecture == "4tower" or dual_tokenizer is not None:
                dual = AutoTokenizer.from_pretrained(dual_tokenizer or vision_or_dual_encoder)
        return cls(tokenizer, image_processor=image_processor, dual_tokenizer=dual, **kwargs)

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({json.dumps(self.to_dict(), sort_keys=True)})"


def _read_processor_settings(name_or_path: str | os.PathLike, hub_kwargs: dict) -> dict:
    local = Path(name_or_path) / PROCESSOR_CONFIG_NAME
    if local.is_file():
        path = local
    else:
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(str(name_or_path), PROCESSOR_CONFIG_NAME, **hub_kwargs)
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


__all__ = ["MultimodalRetrievalProcessor", "join_product_text", "pair_model_inputs", "split_model_inputs"]
