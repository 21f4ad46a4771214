#!/usr/bin/env python
"""Train a multimodal product retriever (same as `mmretrieval train`; every flag is in docs/training.md).

```bash
python examples/train.py --output_dir outputs/main_job
# full catalogue, two GPUs, bf16, checkpoints every 500 steps, resumable after a crash:
accelerate launch --num_processes 2 examples/train.py --dataset ../shared/data/fashion-products \
    --mixed_precision bf16 --checkpointing_steps 500 --resume_from_checkpoint latest --output_dir outputs/full
```
"""

import os

# Idle OpenMP threads sleep instead of spinning: on a CPU shared with other jobs, spinning threads steal each
# other's time slices (docs/training.md, "CPU runs"). It must be set before torch is imported, hence here.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from modeling_mmretrieval.commands.train import cli  # noqa: E402

if __name__ == "__main__":
    cli()
