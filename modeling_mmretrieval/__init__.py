"""modeling_mmretrieval: multimodal product retrieval (text-only, 4tMM, 3tMM) as Transformers models.

Importing the package registers the classes with `AutoConfig`, `AutoModel` and `AutoProcessor`, and marks
them for `register_for_auto_class`, so saved checkpoints carry their code (`auto_map`) and load in a
Python process without this package through `trust_remote_code=True`.

Example:
```python
>>> import modeling_mmretrieval  # registers the Auto classes
>>> from transformers import AutoModel, AutoProcessor
>>> model = AutoModel.from_pretrained("path/to/checkpoint")
>>> processor = AutoProcessor.from_pretrained("path/to/checkpoint")
```
"""

from transformers import AutoConfig, AutoModel, AutoProcessor

from .configuration_mmretrieval import MultimodalRetrievalConfig
from .losses import NTXentLoss
from .modeling_mmretrieval import MultimodalRetrievalModel, MultimodalRetrievalOutput
from .processing_mmretrieval import MultimodalRetrievalProcessor

__version__ = "0.1.0"

AutoConfig.register(MultimodalRetrievalConfig.model_type, MultimodalRetrievalConfig, exist_ok=True)
AutoModel.register(MultimodalRetrievalConfig, MultimodalRetrievalModel, exist_ok=True)
AutoProcessor.register(MultimodalRetrievalConfig, MultimodalRetrievalProcessor, exist_ok=True)
MultimodalRetrievalConfig.register_for_auto_class()
MultimodalRetrievalModel.register_for_auto_class("AutoModel")
MultimodalRetrievalProcessor.register_for_auto_class("AutoProcessor")

__all__ = [
    "MultimodalRetrievalConfig",
    "MultimodalRetrievalModel",
    "MultimodalRetrievalOutput",
    "MultimodalRetrievalProcessor",
    "NTXentLoss",
]
