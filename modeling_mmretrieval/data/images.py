"""Robust decoding of product images into RGB PIL images.

Catalogue images arrive in many shapes (a PIL image, a `datasets.Image` dict `{"bytes", "path"}`, raw bytes,
a file path, or nothing at all) and some of them are broken. `load_product_image` turns every one of them into
either an RGB image or a typed, explained failure. The default policy is "mask": a broken or missing image makes
the product image-less (the collator sets `image_mask=0` and the model falls back to the product text) instead of
feeding the model a silent black or grey picture.

Behaviour per input (see also docs/data.md):

| input | result |
|---|---|
| RGB image / JPEG / PNG / ... | RGB image, EXIF orientation applied |
| greyscale (`L`, `1`), palette (`P`), CMYK, YCbCr, ... | converted to RGB |
| alpha (`RGBA`, `LA`, `PA`, `P` with transparency) | composited on **white** (catalogue background), not black |
| 16/32-bit integer or float (`I;16`, `I`, `F`) | rescaled to 8 bits (65535 -> 255), not clipped to white |
| `None`, `{"bytes": None, "path": None}`, missing file | `reason="missing"` |
| `b""` / 0-byte file | `reason="empty"` |
| not an image, corrupt bytes | `reason="undecodable"` |
| truncated file (pixel data cut short) | `reason="truncated"` (Pillow's `LOAD_TRUNCATED_IMAGES` is left alone) |
| width * height over `max_pixels` | `reason="too_large"`, refused from the header before any pixel is decoded |
| width or height 0 | `reason="zero_size"` |
| a side more than `MAX_IMAGE_ASPECT_RATIO` times the other (a 1x5000 strip) | `reason="degenerate"` |
| `http(s)://` URL (string, or a dict's `path`) | `reason="url_not_fetched"`, unless `fetch_urls=True` |
| URL that cannot be downloaded (HTTP error, timeout, over `MAX_IMAGE_DOWNLOAD_BYTES`) | `reason="download_failed"` (`"too_large"` for the size cap) |

With `on_error="mask"` a failure is returned as `ImageLoadResult(image=None, error=..., reason=...)`; with
`on_error="raise"` it raises `ImageDecodeError` (a `ValueError`) carrying the same reason. An input of an
unsupported Python type (say, an int) is a programming error and always raises `TypeError`.

`ImageReport` turns many results into the counts a run prints and records: `ok`, `missing` (no value, no file,
failed download), `undecodable` (broken, empty, truncated, 0x0 or degenerate) and `refused` (a URL without the
opt-in, an image over the size limits), with example product ids, and decides when too many failed.
"""

import contextlib
import enum
import http.client
import io
import logging
import os
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image, ImageOps

# Catalogue photographs are far below this (the model only ever sees a few hundred pixels a side); anything larger
# is much more likely a decompression bomb than a product photo. Pillow's own default is ~89M pixels.
DEFAULT_MAX_IMAGE_PIXELS = 6000 * 6000

# A product photo is at most a few times wider than tall; a 1x5000 strip is a broken file, and resizing its short
# side to the tower's size would blow it up to millions of pixels.
MAX_IMAGE_ASPECT_RATIO = 100

# Image URLs are only fetched on request (`fetch_urls=True`), with these limits per image.
IMAGE_DOWNLOAD_TIMEOUT_S = 10.0
MAX_IMAGE_DOWNLOAD_BYTES = 20 * 1024 * 1024
_URL_SCHEMES = ("http://", "https://")

logger = logging.getLogger(__name__)

OnError = Literal["mask", "raise"]
_ON_ERROR_POLICIES = ("mask", "raise")

# Modes whose samples do not fit in 8 bits; `convert("L")` would clip them instead of rescaling.
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
_UNDECLARED_RANGES = {"I": (255.0, 65535.0), "F": (1.0, 255.0, 65535.0)}
_WIDE_MODES = (*_SIXTEEN_BIT_MODES, *_UNDECLARED_RANGES)

# Product photos are shot on white, so transparent pixels are filled with white.
_BACKGROUND_RGBA = (255, 255, 255, 255)

# Pillow reports truncated data with messages such as "image file is truncated" or "Truncated File Read".
_TRUNCATION_MARKER = "truncated"

_PIL_LIMIT_LOCK = threading.Lock()


class ImageProblem(str, enum.Enum):
    """Why a product image could not be turned into an RGB picture."""

    MISSING = "missing"
    EMPTY = "empty"
    UNDECODABLE = "undecodable"
    TRUNCATED = "truncated"
    TOO_LARGE = "too_large"
    ZERO_SIZE = "zero_size"
    DEGENERATE = "degenerate"
    UNSUPPORTED_MODE = "unsupported_mode"
    URL_NOT_FETCHED = "url_not_fetched"
    DOWNLOAD_FAILED = "download_failed"


class ImageDecodeError(ValueError):
    """A product image could not be decoded; `reason` says why (an `ImageProblem`)."""

    def __init__(self, reason: ImageProblem, message: str):
        super().__init__(message)
        self.reason = reason

    def __reduce__(self):
        # Keeps the error picklable (multiprocessing data loaders) despite the two-argument constructor.
        return type(self), (self.reason, str(self))


@dataclass(frozen=True)
class ImageLoadResult:
    """Outcome of `load_product_image`: an RGB `image`, or `image=None` with the `error` message and `reason`."""

    image: Image.Image | None
    error: str | None = None
    reason: ImageProblem | None = None

    @property
    def has_image(self) -> bool:
        """Whether the product has a usable image (the value of its `image_mask`)."""
        return self.image is not None


def _describe_source(value: Any) -> str:
    if isinstance(value, Mapping):
        return _describe_source(value.get("bytes") if value.get("bytes") is not None else value.get("path"))
    if isinstance(value, (bytes, bytearray, memoryview)):
        return f"{len(value)} bytes"
    if isinstance(value, (str, os.PathLike)):
        return f"file {os.fspath(value)!r}"
    return type(value).__name__


def is_image_url(value: Any) -> bool:
    """Whether `value` is an `http(s)://` image address (a string), which is only read with `fetch_urls=True`.

    Example:
    ```python
    >>> is_image_url("https://shop.example/img/7.jpg"), is_image_url("img/7.jpg")
    (True, False)
    ```
    """
    return isinstance(value, str) and value.strip()[:8].lower().startswith(_URL_SCHEMES)


def _download(url: str) -> bytes:
    """The bytes at `url`, within `IMAGE_DOWNLOAD_TIMEOUT_S` and `MAX_IMAGE_DOWNLOAD_BYTES`, or `ImageDecodeError`."""
    url = url.strip()
    try:
        with urllib.request.urlopen(url, timeout=IMAGE_DOWNLOAD_TIMEOUT_S) as response:
            declared = response.headers.get("Content-Length")
            if declared is not None and declared.isdigit() and int(declared) > MAX_IMAGE_DOWNLOAD_BYTES:
                raise ImageDecodeError(
                    ImageProblem.TOO_LARGE,
                    f"image URL {url!r} is {int(declared)} bytes, over the {MAX_IMAGE_DOWNLOAD_BYTES}-byte download cap",
                )
            # One byte past the cap tells an oversized body from one exactly at the cap, whatever the headers said.
            encoded = response.read(MAX_IMAGE_DOWNLOAD_BYTES + 1)
    except ImageDecodeError:
        raise
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as error:  # HTTP errors, timeouts
        detail = getattr(error, "reason", None) or error
        raise ImageDecodeError(
            ImageProblem.DOWNLOAD_FAILED, f"image URL {url!r} could not be downloaded: {type(error).__name__}: {detail}"
        ) from error
    if len(encoded) > MAX_IMAGE_DOWNLOAD_BYTES:
        raise ImageDecodeError(
            ImageProblem.TOO_LARGE, f"image URL {url!r} is over the {MAX_IMAGE_DOWNLOAD_BYTES}-byte download cap"
        )
    return encoded


def _validate_options(max_pixels: int | None, on_error: str) -> None:
    if on_error not in _ON_ERROR_POLICIES:
        raise ValueError(f"on_error must be one of {_ON_ERROR_POLICIES}, got {on_error!r}")
    if max_pixels is not None and (isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1):
        raise ValueError(f"max_pixels must be a positive int or None (no limit), got {max_pixels!r}")


def _read_encoded_bytes(value: Any, fetch_urls: bool = False) -> bytes:
    """Resolve a dict / bytes / path / URL input to the encoded image bytes, or raise `ImageDecodeError`."""
    if isinstance(value, Mapping):
        # `datasets.Image(decode=False)` rows: embedded bytes win; the path is only a fallback.
        if value.get("bytes") is not None:
            return _read_encoded_bytes(value["bytes"], fetch_urls)
        if value.get("path"):
            return _read_encoded_bytes(value["path"], fetch_urls)
        raise ImageDecodeError(ImageProblem.MISSING, "no image: the image entry has neither bytes nor a path")
    if isinstance(value, (bytes, bytearray, memoryview)):
        encoded = bytes(value)
    elif is_image_url(value):
        if not fetch_urls:
            raise ImageDecodeError(
                ImageProblem.URL_NOT_FETCHED,
                f"image URL {value.strip()!r} not fetched; pass --fetch_images (fetch_images=True) to download it",
            )
        encoded = _download(value)
    elif isinstance(value, str) and not value.strip():
        raise ImageDecodeError(ImageProblem.MISSING, "no image: the image path is blank")
    elif isinstance(value, (str, os.PathLike)):
        path = Path(value)
        if not path.is_file():
            raise ImageDecodeError(ImageProblem.MISSING, f"no image: there is no file at {str(path)!r}")
        encoded = path.read_bytes()
    else:
        raise TypeError(
            "an image must be a PIL image, a datasets.Image dict {'bytes', 'path'}, bytes, a file path or None; "
            f"got {type(value).__name__}"
        )
    if not encoded:
        raise ImageDecodeError(ImageProblem.EMPTY, f"empty image ({_describe_source(value)})")
    return encoded


@contextlib.contextmanager
def _pil_limit_at_least(max_pixels: int | None) -> Iterator[None]:
    """Lift (never lower) Pillow's global pixel limit around one `Image.open`.

    Pillow checks its own `Image.MAX_IMAGE_PIXELS` while reading the header, so a caller limit above Pillow's
    would otherwise be overridden. Nothing changes in the usual case (caller limit at or below Pillow's), and
    the previous value is always restored: the global is never changed permanently.
    """
    current = Image.MAX_IMAGE_PIXELS
    if current is None or (max_pixels is not None and max_pixels <= current):
        yield
        return
    with _PIL_LIMIT_LOCK:
        previous = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = max_pixels
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = previous


def _resolve_source(value: Any, fetch_urls: bool = False) -> Image.Image | bytes:
    """Return the caller's PIL image as is, or the encoded bytes behind any other input."""
    if isinstance(value, Image.Image):
        return value
    if value is None or (isinstance(value, float) and value != value):  # None, or NaN from a pandas-read column
        raise ImageDecodeError(ImageProblem.MISSING, "no image: the product has no image")
    return _read_encoded_bytes(value, fetch_urls)


def _open_header(encoded: bytes, max_pixels: int | None) -> Image.Image:
    """Read the header only: Pillow decodes pixels lazily, on `load()`."""
    with _pil_limit_at_least(max_pixels):
        return Image.open(io.BytesIO(encoded))


def _check_dimensions(image: Image.Image, max_pixels: int | None) -> None:
    width, height = image.size
    if width <= 0 or height <= 0:
        raise ImageDecodeError(ImageProblem.ZERO_SIZE, f"zero-size image ({width}x{height})")
    if max(width, height) > MAX_IMAGE_ASPECT_RATIO * min(width, height):
        raise ImageDecodeError(
            ImageProblem.DEGENERATE,
            f"degenerate image ({width}x{height}): one side is over {MAX_IMAGE_ASPECT_RATIO} times the other",
        )
    if max_pixels is not None and width * height > max_pixels:
        raise ImageDecodeError(
            ImageProblem.TOO_LARGE,
            f"image of {width}x{height} = {width * height} pixels exceeds max_pixels={max_pixels} "
            "(possible decompression bomb); raise max_pixels if such images are expected",
        )


def _wide_to_8bit(image: Image.Image) -> Image.Image:
    """Rescale a 16/32-bit integer or float greyscale image to 8 bits instead of clipping it."""
    values = np.asarray(image, dtype=np.float64)
    if image.mode in _SIXTEEN_BIT_MODES:
        full_scale = 65535.0
    else:
        # "I" and "F" declare no bit depth: take the smallest usual range that holds the data, else its peak.
        peak = float(values.max(initial=0.0))
        full_scale = next((limit for limit in _UNDECLARED_RANGES[image.mode] if peak <= limit), peak)
    scaled = np.clip(np.rint(values * (255.0 / full_scale)), 0, 255).astype(np.uint8)
    return Image.fromarray(scaled)


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in _WIDE_MODES:
        image = _wide_to_8bit(image)
    if image.has_transparency_data:
        background = Image.new("RGBA", image.size, _BACKGROUND_RGBA)
        return Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def _classify_pillow_failure(error: Exception) -> ImageProblem:
    if isinstance(error, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return ImageProblem.TOO_LARGE
    if isinstance(error, OSError) and _TRUNCATION_MARKER in str(error).lower():
        return ImageProblem.TRUNCATED
    return ImageProblem.UNDECODABLE


def _decode_to_rgb(value: Any, max_pixels: int | None, fetch_urls: bool = False) -> Image.Image:
    source = _resolve_source(value, fetch_urls)
    try:
        image = source if isinstance(source, Image.Image) else _open_header(source, max_pixels)
        _check_dimensions(image, max_pixels)
        image.load()
        image = ImageOps.exif_transpose(image)
    except ImageDecodeError:
        raise
    except Exception as error:  # Pillow's format plugins raise many exception types on malformed files.
        problem = _classify_pillow_failure(error)
        description = problem.value.replace("_", " ")
        message = f"{description} image ({_describe_source(value)}): {type(error).__name__}: {error}"
        raise ImageDecodeError(problem, message) from error
    try:
        return _to_rgb(image)
    except ValueError as error:
        raise ImageDecodeError(
            ImageProblem.UNSUPPORTED_MODE, f"cannot convert an image of mode {image.mode!r} to RGB: {error}"
        ) from error


def load_product_image(
    value: Any,
    *,
    max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    on_error: OnError = "mask",
    fetch_urls: bool = False,
) -> ImageLoadResult:
    """Decode one product image into an RGB PIL image, or explain why it cannot be.

    Args:
        value: a PIL image, a `datasets.Image` dict `{"bytes": ..., "path": ...}` (bytes preferred), raw encoded
            bytes, a file path (`str` / `os.PathLike`), an `http(s)://` URL, or `None` for a product without an
            image. A relative path is read from the working directory (`load_catalogue` makes catalogue paths
            absolute, relative to their data file).
        max_pixels: largest accepted `width * height`; checked on the header, before pixels are decoded, so
            decompression bombs cost nothing. `None` disables the limit.
        on_error: `"mask"` (default) returns `ImageLoadResult(image=None, ...)` for a missing or broken image so
            the caller can set `image_mask=0`; `"raise"` raises `ImageDecodeError` instead (every successful
            call then returns an image).
        fetch_urls: download `http(s)://` images (`IMAGE_DOWNLOAD_TIMEOUT_S`, `MAX_IMAGE_DOWNLOAD_BYTES`); by
            default a URL is refused (`reason="url_not_fetched"`) so nothing reaches the network unasked.

    Returns:
        `ImageLoadResult` with an RGB `image`, or `image=None` plus `error` and `reason` under the mask policy.

    Example:
    ```python
    >>> from modeling_mmretrieval.data.images import load_product_image
    >>> result = load_product_image({"bytes": b"not a jpeg", "path": None})
    >>> result.has_image, result.reason.value
    (False, 'undecodable')
    ```
    """
    _validate_options(max_pixels, on_error)
    try:
        return ImageLoadResult(image=_decode_to_rgb(value, max_pixels, fetch_urls))
    except ImageDecodeError as error:
        if on_error == "raise":
            raise
        return ImageLoadResult(image=None, error=str(error), reason=error.reason)


# --------------------------------------------------------------------------------------------------------------
# Reporting: how a run's images loaded
# --------------------------------------------------------------------------------------------------------------


class ImageStatus(str, enum.Enum):
    """How a product's image loaded, as a run reports it (`ImageReport`)."""

    OK = "ok"
    MISSING = "missing"
    UNDECODABLE = "undecodable"
    REFUSED = "refused"


# Each `ImageProblem` counts under one reported status.
STATUS_OF_PROBLEM = {
    ImageProblem.MISSING: ImageStatus.MISSING,
    ImageProblem.DOWNLOAD_FAILED: ImageStatus.MISSING,
    ImageProblem.EMPTY: ImageStatus.UNDECODABLE,
    ImageProblem.UNDECODABLE: ImageStatus.UNDECODABLE,
    ImageProblem.TRUNCATED: ImageStatus.UNDECODABLE,
    ImageProblem.ZERO_SIZE: ImageStatus.UNDECODABLE,
    ImageProblem.DEGENERATE: ImageStatus.UNDECODABLE,
    ImageProblem.UNSUPPORTED_MODE: ImageStatus.UNDECODABLE,
    ImageProblem.TOO_LARGE: ImageStatus.REFUSED,
    ImageProblem.URL_NOT_FETCHED: ImageStatus.REFUSED,
}

# Examples kept per status, and the length of a reason in the one-line summary.
MAX_REPORT_EXAMPLES = 5
_SUMMARY_REASON_CHARS = 100


class ImageFailureError(ValueError):
    """Too many product images failed to load (or any did, with `strict=True`); the message is one line."""


def _one_line(text: str, limit: int | None = None) -> str:
    text = " ".join(str(text).split())
    return text if limit is None or len(text) <= limit else text[: limit - 3] + "..."


@dataclass
class ImageReport:
    """Counts of `ok` / `missing` / `undecodable` / `refused` product images, with example product ids.

    Each product counts once, however often it is loaded (epochs, hard negatives): `add` ignores a product id
    it has already counted. Collators, the frozen-feature cache and indexing fill one; a run prints `summary()`,
    records `to_dict()` and calls `check()`.

    Example:
    ```python
    >>> report = ImageReport()
    >>> report.add("sku-1", load_product_image(Image.new("RGB", (8, 8))))
    >>> report.add("sku-7", load_product_image("img/7.jpg"))
    >>> report.summary()
    "images: 1 ok, 1 missing (e.g. 'sku-7': no image: there is no file at 'img/7.jpg'), 0 undecodable, 0 refused"
    >>> report.failure_share
    0.5
    ```
    """

    counts: dict[ImageStatus, int] = field(default_factory=lambda: dict.fromkeys(ImageStatus, 0))
    examples: dict[ImageStatus, list[tuple[str, str]]] = field(
        default_factory=lambda: {status: [] for status in ImageStatus if status is not ImageStatus.OK}
    )
    _status_by_product: dict[str, ImageStatus] = field(default_factory=dict, repr=False)
    _unnamed_counts: dict[ImageStatus, int] = field(default_factory=dict, repr=False)

    def record(self, product_id: Any, status: ImageStatus | str, reason: str | None = None) -> None:
        """Count one product under `status` (once per product id; `None` ids are counted every time)."""
        status = ImageStatus(status)
        if product_id is not None:
            key = str(product_id)
            if key in self._status_by_product:
                return
            self._status_by_product[key] = status
        else:
            self._unnamed_counts[status] = self._unnamed_counts.get(status, 0) + 1
        self.counts[status] += 1
        if status is not ImageStatus.OK and len(self.examples[status]) < MAX_REPORT_EXAMPLES:
            self.examples[status].append((str(product_id), _one_line(reason or status.value)))

    def add(self, product_id: Any, load_result: ImageLoadResult) -> None:
        """Count the outcome of `load_product_image` for one product."""
        if load_result.has_image:
            self.record(product_id, ImageStatus.OK)
        else:
            status = STATUS_OF_PROBLEM.get(load_result.reason, ImageStatus.UNDECODABLE)
            self.record(product_id, status, load_result.error)

    def status_of(self, product_id: Any) -> ImageStatus | None:
        """The status counted for `product_id`, or `None` if it has not been counted."""
        return self._status_by_product.get(str(product_id))

    def reason_of(self, product_id: Any) -> str | None:
        """The reason kept for `product_id` when it is one of the examples."""
        key = str(product_id)
        return next((reason for kept in self.examples.values() for pid, reason in kept if pid == key), None)

    def copy_outcome(self, other: "ImageReport", product_id: Any) -> bool:
        """Count `product_id` as `other` counted it; returns False when `other` never counted it."""
        status = other.status_of(product_id)
        if status is None:
            return False
        self.record(product_id, status, other.reason_of(product_id))
        return True

    def merge(self, other: "ImageReport") -> "ImageReport":
        """Add the products of `other` not counted here yet (in place; returns `self`)."""
        for product_id, status in other._status_by_product.items():
            if product_id not in self._status_by_product:
                self.record(product_id, status, other.reason_of(product_id))
        for status, count in other._unnamed_counts.items():  # products without an id cannot be deduplicated
            self.counts[status] += count
            self._unnamed_counts[status] = self._unnamed_counts.get(status, 0) + count
            examples = self.examples.get(status, [])
            unnamed = [example for example in other.examples.get(status, []) if example[0] == str(None)]
            examples.extend(unnamed[: MAX_REPORT_EXAMPLES - len(examples)])
        return self

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def failures(self) -> int:
        """Products whose image could not be used (missing, undecodable or refused)."""
        return self.total - self.counts[ImageStatus.OK]

    @property
    def failure_share(self) -> float:
        """`failures / total`, 0.0 before any product is counted."""
        return self.failures / self.total if self.total else 0.0

    def summary(self) -> str:
        """One line: the count of every status, with one example product and reason per failing status."""
        parts = []
        for status in ImageStatus:
            part = f"{self.counts[status]} {status.value}"
            examples = self.examples.get(status)
            if examples:
                product_id, reason = examples[0]
                part += f" (e.g. {product_id!r}: {_one_line(reason, _SUMMARY_REASON_CHARS)})"
            parts.append(part)
        return "images: " + ", ".join(parts)

    def to_dict(self) -> dict:
        """JSON-ready counts, failure share and examples (for `results.json`)."""
        return {
            **{status.value: self.counts[status] for status in ImageStatus},
            "total": self.total,
            "failure_share": round(self.failure_share, 4),
            "examples": {
                status.value: [{"product_id": pid, "reason": reason} for pid, reason in examples]
                for status, examples in self.examples.items()
            },
        }

    def check(self, max_failure_share: float = 0.5, strict: bool = False) -> bool:
        """Warn loudly when more than `max_failure_share` of the images failed; with `strict`, raise on any failure.

        Returns True when the share of failures is within the limit.

        Raises:
            ImageFailureError: (a `ValueError`, one line) `strict` and at least one image failed.

        Example:
        ```python
        >>> report.check(max_failure_share=0.5, strict=True)
        Traceback (most recent call last):
        ImageFailureError: 1 of 2 product images failed and strict images are required: images: 1 ok, 1 missing ...
        ```
        """
        if isinstance(max_failure_share, bool) or not 0.0 <= max_failure_share <= 1.0:
            raise ValueError(f"max_failure_share must be between 0 and 1, got {max_failure_share!r}")
        if strict and self.failures:
            raise ImageFailureError(
                f"{self.failures} of {self.total} product images failed and strict images are required "
                f"(--strict_images): {self.summary()}"
            )
        if self.failure_share > max_failure_share:
            logger.warning(
                f"WARNING: {self.failure_share:.0%} of product images failed, more than the {max_failure_share:.0%} "
                f"allowed (--max_image_failure_share); those products are text-only. {self.summary()}"
            )
            return False
        return True
