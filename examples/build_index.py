#!/usr/bin/env python
"""Encode a catalogue into a `ProductIndex`, sharded under `accelerate launch` (same as `mmretrieval index`).

```bash
accelerate launch --num_processes 8 examples/build_index.py --model_name_or_path org/model \\
    --dataset org/catalogue --split train --output_dir index/
```
"""

import sys

from modeling_mmretrieval.commands.build_index import main

if __name__ == "__main__":
    sys.exit(main())
