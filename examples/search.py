#!/usr/bin/env python
"""Search a product catalogue with a trained retriever (same as `mmretrieval search`; see docs/search.md).

```bash
python examples/search.py --model_name_or_path outputs/run/final --index_dir indexes/test --query "red shoes"
```
"""

import sys

from modeling_mmretrieval.commands.search import main

if __name__ == "__main__":
    sys.exit(main())
