"""Evaluate a lexlora adapter against its base model on a split; same as `lexlora eval`.

    python scripts/evaluate.py --adapter adapters/file-description --split test
"""

import sys

from lexlora.cli import eval_main

if __name__ == "__main__":
    sys.exit(eval_main())
