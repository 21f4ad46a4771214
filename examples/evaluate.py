#!/usr/bin/env python
"""Evaluate a retriever on a product catalogue (same as `mmretrieval evaluate`; see docs/search.md).

```bash
python examples/evaluate.py --model_name_or_path outputs/4tower/final --split test --output_file report.json
```
"""

import sys

from modeling_mmretrieval.commands.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
