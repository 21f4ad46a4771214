"""`python -m modeling_mmretrieval <command> [options]`: the `mmretrieval` console command (see `cli`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
