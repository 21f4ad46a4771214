"""ONNX export and onnxruntime inference: a fast query encoder (float32 or int8) for serving, the product text path
with its fusion, and the image tower, behind the same `encode_*` API as the torch model.

- `export`: `export_onnx` (and `mmretrieval export-onnx`) writes the graphs, the processor, the config and a
  manifest, atomically, after a parity check on real inputs (`check_onnx_parity`);
- `runtime`: `OnnxRetrievalEncoder` and `load_encoder(path, backend="torch" | "onnx" | "onnx-int8")`.

Example:
```python
>>> from modeling_mmretrieval.onnx import export_onnx, load_encoder
>>> export_onnx(model, processor, "exports/main_job")
>>> load_encoder("exports/main_job", backend="onnx-int8").encode_queries(["red running shoes"]).shape
(1, 384)
```
"""

from .export import (
    MANIFEST_NAME,
    MIN_PARITY_COSINE,
    OnnxExportError,
    OnnxParityError,
    check_onnx_parity,
    default_parity_inputs,
    export_onnx,
)
from .runtime import BACKENDS, OnnxRetrievalEncoder, load_encoder, read_manifest

__all__ = [
    "BACKENDS", "MANIFEST_NAME", "MIN_PARITY_COSINE", "OnnxExportError", "OnnxParityError", "OnnxRetrievalEncoder",
    "check_onnx_parity", "default_parity_inputs", "export_onnx", "load_encoder", "read_manifest",
]
